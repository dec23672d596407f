"""
Quality at equal parameters and equal training tokens (MODEL.md section 9).

    python bench/quality.py --data_dir=data/bench --reuse_sweep        # after bench/stability.py
    python bench/quality.py --data_dir=data/bench --budgets 8000000 24000000 --dry_run

Trains the Transformer (gpt), the Transformer with twice the layers (gpt_2x), looped_add,
looped_linear and parcae on the same tokens, each at its best rate from the sweep
(stability.json in --results_dir: the lowest final validation loss among the runs that did
not diverge; gpt_2x takes gpt's; a model without one takes --lr), at each of --budgets.
Reports each model's validation perplexity at the training mean depth μ_rec, its ratio to
the parameter-matched Transformer's, and the paper's relative quality: the share of the
2× Transformer's gain that a looped model recovers, in perplexity,
    (PPL_gpt − PPL_model) / (PPL_gpt − PPL_gpt_2x)     (1 = as good as twice the layers).
It also reports each run's training FLOPs (model.flops_per_token() × tokens): looping buys
quality with compute, so an equal-parameter win is not an equal-FLOP win.

--reuse_sweep takes a sweep run as the quality run wherever its settings are the same
(same size, rate and budget), so only what is missing trains. The runs of the largest
budget keep a checkpoint for bench/loops.py. Writes quality.json, quality.md, quality.png.
"""

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402
import stability  # noqa: E402

# the settings that may differ between a sweep run and the quality run it stands for
INCIDENTAL = ("out_dir", "save_checkpoint")


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--models", nargs="+", default=list(common.MODELS), choices=common.MODELS)
    p.add_argument("--budgets", nargs="+", type=common.at_least(1), help="training tokens per run (default: the preset's two)")
    p.add_argument("--reuse_sweep", action="store_true", help="use finished sweep runs with the same settings")
    p.add_argument("--lr", type=float, default=8e-3, help="the rate of a model the sweep has no rate for")
    args = common.finish_args(p.parse_args(argv))
    args.command = common.command(__file__, argv)
    budgets = sorted(args.budgets or args.preset["budgets"])
    sweep = common.read_json(os.path.join(args.results_dir, "stability.json"))
    rates = {m: pick_rate(m, sweep, args.lr) for m in args.models}

    runs = []     # (name, model, budget, settings, reused sweep run or None)
    for budget in budgets:
        for model in args.models:
            lr, _ = rates[model]
            out_dir = os.path.join(args.work_dir, "quality", f"{model}_{common.fmt_tokens(budget)}")
            s = common.run_settings(args.preset, model, lr, budget, args.data_dir, out_dir, args.overrides,
                                    save_checkpoint=budget == budgets[-1])
            reused = find_in_sweep(sweep, s) if args.reuse_sweep else None
            runs.append((f"{model} {common.fmt_tokens(budget)} lr={lr:g}", model, budget, reused or s, reused))
    for model, (lr, why) in rates.items():
        print(f"  {model}: lr {lr:g} ({why})")
    for name, *_, reused in runs:
        if reused:
            print(f"  {name}: the sweep's run in {reused['out_dir']}")
    to_train = [(n, s) for n, _, _, s, reused in runs if not reused]
    common.print_plan(to_train, args.meta, "quality runs to train", args.preset, args.parallel, args.gpus)

    def report(_=None):
        results = collect(args, runs, rates)
        common.write_results(args.results_dir, "quality", results, markdown)
        return results

    common.run_all(to_train, args.parallel, args.gpus, args.dry_run, on_finish=report)
    if args.dry_run:
        return None
    results = report()
    plot(results, os.path.join(args.results_dir, "quality.png"))
    print(markdown(results))
    return results


def pick_rate(model, sweep, default):
    """(rate, where it comes from): the sweep's best for the model (gpt's for gpt_2x), else the default."""
    if sweep:
        best = stability.best_rates(sweep)
        source = "gpt" if model == "gpt_2x" else model
        if source in best:
            return best[source]["lr"], f"best of the sweep for {source}"
    return default, "no usable sweep result: --lr"


def find_in_sweep(sweep, settings):
    """The finished sweep run whose settings are the quality run's, but for where it lives
    (and whether it saved a checkpoint, unless this run must keep one)."""
    if not sweep:
        return None
    want = {k: v for k, v in settings.items() if k not in INCIDENTAL}
    for r in sweep["runs"]:
        s = r["settings"]
        if (r["status"] == "finished" and {k: v for k, v in s.items() if k not in INCIDENTAL} == want
                and (s["save_checkpoint"] or not settings["save_checkpoint"])):
            return s
    return None


def collect(args, runs, rates):
    vocab = args.meta["vocab_size"]
    out = {"preset": args.preset_name, "environment": common.environment(), "command": args.command,
           "data_dir": args.data_dir,
           "budgets": sorted({b for _, _, b, _, _ in runs}), "rates": {m: r for m, (r, _) in rates.items()},
           "metric": "validation perplexity exp(loss) at the training mean depth; relative quality = "
                     "(PPL_gpt - PPL_model) / (PPL_gpt - PPL_gpt_2x)", "runs": []}
    for _, model, budget, s, reused in runs:
        params, flops = common.model_size(s, vocab)
        summary = common.summarize(s["out_dir"], s)
        loss = summary["final_val_loss"]
        tokens = common.tokens_of(s)
        out["runs"].append({
            "model": model, "budget": budget, "tokens": tokens, "lr": s["lr"], "out_dir": s["out_dir"],
            "reused_sweep_run": bool(reused), "status": summary["status"], "diverged": summary["diverged"],
            "params": params, "flops_per_token": flops, "train_flops": flops * tokens,
            "eval_loops": s.get("mean_loops", 1) if model in common.LOOPED else 1,
            "val_loss": loss, "val_ppl": math.exp(loss) if loss is not None else None,
            "spikes": summary["spikes"], "wall_s": summary["wall_s"]})
    # the comparisons, budget by budget
    for budget in out["budgets"]:
        here = {r["model"]: r for r in out["runs"] if r["budget"] == budget}
        gpt, gpt2 = here.get("gpt"), here.get("gpt_2x")
        for r in here.values():
            ok = r["val_ppl"] is not None and gpt and gpt["val_ppl"] is not None
            r["ppl_ratio_to_gpt"] = r["val_ppl"] / gpt["val_ppl"] if ok else None
            r["flops_ratio_to_gpt"] = r["train_flops"] / gpt["train_flops"] if gpt else None
            gain = gpt["val_ppl"] - gpt2["val_ppl"] if ok and gpt2 and gpt2["val_ppl"] is not None else None
            r["relative_quality"] = ((gpt["val_ppl"] - r["val_ppl"]) / gain
                                     if gain and r["model"] in common.LOOPED else None)
    return out


def markdown(results):
    fmt = common.fmt
    lines = [f"Quality at equal parameters and equal training tokens, preset `{results['preset']}`, data "
             f"`{results['data_dir']}`. Validation perplexity at the training mean depth μ_rec (the Transformers: "
             "one pass). **Relative quality** = (PPL_gpt − PPL_model) / (PPL_gpt − PPL_gpt_2x): the share of the "
             "2× Transformer's gain a looped model recovers, in perplexity (1 = as good as twice the layers). "
             "**Training FLOPs** = model.flops_per_token() × tokens: the looped models spend more compute per "
             "token than the parameter-matched Transformer, so this is not an equal-FLOP comparison.", "",
             "| tokens | model | params | lr | val loss | val PPL | PPL / gpt | relative quality | training FLOPs | "
             "FLOPs / gpt | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {common.fmt_tokens(r['tokens'])} | {r['model']} | {r['params'] / 1e6:.3g}M | {r['lr']:g} | "
                     f"{fmt(r['val_loss'])} | {fmt(r['val_ppl'], '.2f')} | {fmt(r.get('ppl_ratio_to_gpt'))} | "
                     f"{fmt(r.get('relative_quality'), '.2f')} | {r['train_flops']:.2e} | "
                     f"{fmt(r.get('flops_ratio_to_gpt'), '.2f')} | {r['status']}"
                     f"{' (sweep run)' if r['reused_sweep_run'] else ''} |")
    return "\n".join(lines) + "\n" + common.provenance(results)


def plot(results, path):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        pts = [(r["tokens"], r["val_ppl"]) for r in results["runs"] if r["model"] == model and r["val_ppl"]]
        if pts:
            ax.plot(*zip(*sorted(pts)), "o-", label=model)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"equal parameters, equal tokens ({results['preset']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
