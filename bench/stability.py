"""
Learning-rate sweep: which models train stably at high rates? (MODEL.md sections 8, 9)

    python bench/stability.py --data_dir=data/bench                  # small preset, one GPU, 8 runs at a time
    python bench/stability.py --data_dir=data/bench --dry_run        # the train.py commands and the budget
    python bench/stability.py --data_dir=data/bench --models parcae looped_linear --rates 4e-3 16e-3

Trains every model at every rate, at the same size and token budget (same seed, so the
same batches), and records for each run: the training loss curve, whether it diverged,
the number of loss spikes, ‖h_T‖ and max Ā over training, and the final validation loss.
  diverged: train.py stopped on a non-finite loss, or the run ended (last logged training
            loss or final validation loss) above its initial training loss.
  spike:    a logged training loss more than --spike_margin nats (0.5) above the exponential
            moving average (β = 0.9) of the losses logged before it; consecutive points above
            count once.
Writes stability.json (after every run, so a cut-off sweep still tells something),
stability.md, stability_loss.png (one panel per model, one curve per rate) and
stability_state.png (‖h_T‖ and max Ā over training, looped models) to --results_dir.
bench/quality.py takes each model's best rate from stability.json.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--models", nargs="+", default=list(common.SWEEP_MODELS), choices=common.MODELS)
    p.add_argument("--rates", nargs="+", type=float, help="learning rates (default: the preset's)")
    p.add_argument("--tokens", type=common.at_least(1), help="training tokens per run (default: the preset's sweep budget)")
    p.add_argument("--spike_margin", type=float, default=0.5, help="nats above the loss EMA that make a spike")
    args = common.finish_args(p.parse_args(argv))
    args.command = common.command(__file__, argv)
    rates = args.rates or args.preset["rates"]
    tokens = args.tokens or args.preset["sweep_tokens"]

    runs = []
    for model in args.models:
        for lr in rates:
            out_dir = os.path.join(args.work_dir, "stability", f"{model}_lr{lr:g}")
            runs.append((f"{model} lr={lr:g}", model, lr, common.run_settings(
                args.preset, model, lr, tokens, args.data_dir, out_dir, args.overrides)))
    common.print_plan([(n, s) for n, _, _, s in runs], args.meta, "stability sweep", args.preset, args.parallel, args.gpus)

    def report(_=None):
        results = collect(args, runs)
        common.write_results(args.results_dir, "stability", results, markdown)
        return results

    common.run_all([(n, s) for n, _, _, s in runs], args.parallel, args.gpus, args.dry_run, on_finish=report)
    if args.dry_run:
        return None
    results = report()
    plot_losses(results, os.path.join(args.results_dir, "stability_loss.png"))
    plot_state(results, os.path.join(args.results_dir, "stability_state.png"))
    print(markdown(results))
    return results


def collect(args, runs):
    out = {"preset": args.preset_name, "environment": common.environment(), "command": args.command,
           "data_dir": args.data_dir, "spike_margin": args.spike_margin,
           "spike_definition": f"a logged training loss more than {args.spike_margin} nats above the EMA (beta 0.9) "
                               "of the losses logged before it; consecutive points above count once",
           "divergence_definition": "train.py stopped on a non-finite loss, or the run ended above its initial loss",
           "runs": []}
    for _, model, lr, s in runs:
        vocab = args.meta["vocab_size"]
        params, flops = common.model_size(s, vocab)
        r = {"model": model, "lr": lr, "out_dir": s["out_dir"], "tokens": common.tokens_of(s),
             "params": params, "flops_per_token": flops, "settings": s}
        r.update(common.summarize(s["out_dir"], s, args.spike_margin))
        out["runs"].append(r)
    return out


def best_rates(results):
    """Each model's rate with the lowest final validation loss among its runs that did not diverge."""
    best = {}
    for r in results["runs"]:
        if r["diverged"] or r["final_val_loss"] is None:
            continue
        if r["model"] not in best or r["final_val_loss"] < best[r["model"]]["final_val_loss"]:
            best[r["model"]] = r
    return best


def markdown(results):
    fmt = common.fmt
    runs = results["runs"]
    lines = [f"Learning-rate sweep, preset `{results['preset']}`, {common.fmt_tokens(runs[0]['tokens'])} training "
             f"tokens per run, data `{results['data_dir']}`. **Diverged**: {results['divergence_definition']}. "
             f"**Spikes**: {results['spike_definition']}. ‖h_T‖: mean per-token norm of the final recurrent state; "
             "max Ā: the largest entry of Ā (Parcae), the top singular value of W_x (linear), 1 (add); "
             "both read at each logged step. Val loss at the training mean depth μ_rec.", "",
             "| model | lr | diverged | spikes | final val loss | train loss first → last | max ‖h_T‖ | "
             "final ‖h_T‖ | max Ā (peak) | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['model']} | {r['lr']:g} | {'**yes**' if r['diverged'] else 'no'} | {r['spikes']} | "
                     f"{fmt(r['final_val_loss'])} | {fmt(r['initial_loss'])} → {fmt(r['last_loss'])} | "
                     f"{fmt(r['max_state_norm'], '.3g')} | {fmt(r['final_state_norm'], '.3g')} | "
                     f"{fmt(r['max_a_max'], '.3g')} | {r['status']} ({r['steps_done']}/{r['max_iters']} steps) |")
    best = best_rates(results)
    lines += ["", "| model | finished without diverging | diverged | failed or not run | spikes in all | best rate | "
              "its val loss |", "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        ok = [f"{r['lr']:g}" for r in mine if not r["diverged"] and r["status"] == "finished"]
        bad = [f"{r['lr']:g}" for r in mine if r["diverged"]]
        lost = [f"{r['lr']:g}" for r in mine if not r["diverged"] and r["status"] != "finished"]
        b = best.get(model)
        rate, loss = (format(b["lr"], "g"), fmt(b["final_val_loss"])) if b else ("–", "–")
        lines.append(f"| {model} | {' '.join(ok) or 'none'} | {' '.join(bad) or 'none'} | {' '.join(lost) or 'none'} | "
                     f"{sum(r['spikes'] for r in mine)} | {rate} | {loss} |")
    return "\n".join(lines) + "\n" + common.provenance(results)


def rate_colors(results):
    rates = sorted({r["lr"] for r in results["runs"]})
    cmap = plt.get_cmap("viridis")
    return {lr: cmap(i / max(1, len(rates) - 1)) for i, lr in enumerate(rates)}


def panels(n):
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=True)
    return fig, axes[0]


def plot_losses(results, path):
    models = list(dict.fromkeys(r["model"] for r in results["runs"]))
    colors = rate_colors(results)
    fig, axes = panels(len(models))
    finite = [x for r in results["runs"] for x in r["curve"]["loss"] if x is not None]
    initial = [r["initial_loss"] for r in results["runs"] if r["initial_loss"] is not None]
    for ax, model in zip(axes, models):
        for r in (r for r in results["runs"] if r["model"] == model):
            c = r["curve"]
            style = dict(ls="--" if r["diverged"] else "-", lw=1, color=colors[r["lr"]])
            ax.plot(c["step"], c["loss"], label=f"lr {r['lr']:g}" + (" (diverged)" if r["diverged"] else ""), **style)
            if r["diverged"] and c["step"]:
                ax.plot(c["step"][-1], c["loss"][-1], "x", color=colors[r["lr"]], ms=8)
        ax.set_title(model)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (nats)")
    if finite:      # the start of training would squash everything else
        axes[0].set_ylim(min(finite) - 0.1, max(initial) + 0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_state(results, path):
    runs = [r for r in results["runs"] if any(v is not None for v in r["curve"]["state_norm"])]
    models = list(dict.fromkeys(r["model"] for r in runs)) or ["(no looped model)"]
    colors = rate_colors(results)
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False, sharex="col")
    for j, model in enumerate(models):
        for r in (r for r in runs if r["model"] == model):
            c = r["curve"]
            for i, key in enumerate(("state_norm", "a_max")):
                pts = [(s, v) for s, v in zip(c["step"], c[key]) if v is not None]
                if pts:
                    axes[i, j].plot(*zip(*pts), lw=1, ls="--" if r["diverged"] else "-", color=colors[r["lr"]],
                                    label=f"lr {r['lr']:g}")
        axes[0, j].set_title(model)
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("step")
        for i in range(2):
            axes[i, j].grid(alpha=0.3)
        axes[0, j].legend(fontsize=7)
    axes[0, 0].set_ylabel("‖h_T‖ (per token)")
    axes[1, 0].set_ylabel("max Ā (linear: σ_max(W_x))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
