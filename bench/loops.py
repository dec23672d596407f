"""
Test-time depth: validation loss of trained looped models at T = 1 ... 32 loops, and the
saturating exponential the paper fits to it, L(T) = L∞ + Z·exp(−z·T) (PARCAE.md section 7).

    python bench/loops.py --data_dir=data/bench                 # the looped models of quality.json's largest budget
    python bench/loops.py --data_dir=data/bench --checkpoints out/bench/small/quality/parcae_24M --loops 1 4 16

Every T sees the same validation batches as train.py's own evaluation (its get_batch), and
so the same random initial states h_0: with --batches equal to the run's eval_iters, the
loss at T = μ_rec is the run's final validation loss. bf16 autocast on CUDA. The fit is
least squares: for each z on a grid over [0.001, 5], L∞ and Z are a linear least-squares
problem; we keep the z with the smallest squared error, refining the grid around it, and
report R² (1 is a perfect fit). z at 5 means the loss is flat after the first loop or two.
Non-finite losses (a loop that blew up) are shown but left out of the fit.
Writes loops.json, loops.md and loops.png to --results_dir.
"""

import json
import math
import os
from contextlib import nullcontext
from types import SimpleNamespace

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402
import train  # noqa: E402  (its evaluation, and its checkpoint reading)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--checkpoints", nargs="+", help="run folders (or ckpt.pt files); default: quality.json's "
                                                    "looped models at its largest budget")
    p.add_argument("--loops", nargs="+", type=int, help="test-time depths (default: the preset's)")
    p.add_argument("--batches", type=int, help="validation batches per depth (default: the preset's)")
    args = common.finish_args(p.parse_args(argv))
    loops = sorted(args.loops or args.preset["loops"])
    batches = args.batches or args.preset["loop_batches"]
    checkpoints = find_checkpoints(args)
    print(f"test-time depth: {len(checkpoints)} models × {len(loops)} depths × {batches} batches")
    if args.dry_run:
        for label, path in checkpoints:
            print(f"  {label}: {path}")
        return None
    device = torch.device(args.overrides.get("device", args.preset["train"]["device"]))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this preset evaluates on cuda, and there is no GPU here (try --preset tiny)")

    results = {"preset": args.preset_name, "environment": common.environment(),
               "data_dir": args.data_dir, "loops": loops, "batches": batches,
               "models": []}
    for label, path in checkpoints:
        model, settings = load(path, device)
        losses = evaluate(model, args.data_dir, settings, loops, batches, device)
        ok = [(T, L) for T, L in losses.items() if math.isfinite(L)]
        fit = fit_exponential(*zip(*ok)) if len(ok) >= 3 else None
        results["models"].append({"model": label, "checkpoint": path, "mean_loops": model.config.mean_loops,
                                  "losses": {str(T): (L if math.isfinite(L) else None) for T, L in losses.items()},
                                  "fit": fit})
        print(f"  {label}: " + ", ".join(f"T={T} {L:.3f}" for T, L in losses.items())
              + (f" | L∞ {fit['L_inf']:.3f}, Z {fit['Z']:.3f}, z {fit['z']:.3f}, R² {fit['r2']:.3f}" if fit else ""),
              flush=True)
        del model
    common.write_json(os.path.join(args.results_dir, "loops.json"), results)
    with open(os.path.join(args.results_dir, "loops.md"), "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(args.results_dir, "loops.png"))
    print(markdown(results))
    return results


def find_checkpoints(args):
    """[(label, ckpt path)], from --checkpoints or from quality.json's looped runs at its largest budget."""
    if args.checkpoints:
        paths = [c if c.endswith(".pt") else os.path.join(c, "ckpt.pt") for c in args.checkpoints]
        labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    else:
        path = os.path.join(args.results_dir, "quality.json")
        if not os.path.exists(path):
            raise SystemExit(f"{path} not found: run bench/quality.py first, or name --checkpoints")
        with open(path) as f:
            quality = json.load(f)
        last = max(quality["budgets"])
        runs = [r for r in quality["runs"] if r["budget"] == last and r["model"] in common.LOOPED]
        paths = [os.path.join(r["out_dir"], "ckpt.pt") for r in runs]
        labels = [r["model"] for r in runs]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"no checkpoint at {', '.join(missing)}")
    return list(zip(labels, paths))


def load(path, device):
    """The model of a train.py checkpoint, in eval mode, and the settings it was trained with."""
    ckpt = train.load_checkpoint(path)
    model = train.model_from_checkpoint(ckpt, path)
    if not model.config.looped:
        raise SystemExit(f"{path} holds a plain Transformer: it has no loop to vary")
    return model.to(device).eval(), ckpt["settings"]


def evaluate(model, data_dir, settings, loops, batches, device):
    """Mean validation loss at each T: train.py's own evaluation, over the same batches (and h_0
    draws) for every T."""
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    cfg = SimpleNamespace(seed=settings["seed"], block_size=model.config.block_size,
                          batch_size=settings["batch_size"], eval_loops=loops, eval_iters=batches)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    losses = train.evaluate(model, val, cfg, rank=0, world=1, device=device, autocast=autocast)
    return {int(T): L for T, L in losses.items()}


Z_RANGE = (1e-3, 5.0)     # the decay rates z that fit_exponential scans


def fit_exponential(T, L):
    """
    Least-squares fit of L(T) = L∞ + Z·exp(−z·T), numpy only. Returns L_inf, Z, z, r2, sse.
    For fixed z the model is linear in (L∞, Z); we scan z on a log grid over [0.001, 5]
    (beyond 5, exp(-z) is too small for T = 1 and 2 to tell apart), then zoom in on the best cell.
    """
    T, L = np.asarray(T, dtype=float), np.asarray(L, dtype=float)

    def solve(z):
        X = np.stack([np.ones_like(T), np.exp(-z * T)], axis=1)
        coef = np.linalg.lstsq(X, L, rcond=None)[0]
        return float(((X @ coef - L) ** 2).sum()), coef

    grid = np.logspace(*np.log10(Z_RANGE), 400)
    for _ in range(4):
        i = int(np.argmin([solve(z)[0] for z in grid]))
        best = grid[i]
        grid = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 101)
    sse, (L_inf, Z) = solve(best)
    sst = float(((L - L.mean()) ** 2).sum())
    r2 = 1 - sse / sst if sst > 0 else 1.0
    return {"L_inf": float(L_inf), "Z": float(Z), "z": float(best), "r2": float(r2), "sse": sse}


def markdown(results):
    fmt = common.fmt
    loops = results["loops"]
    lines = [f"Validation loss against test-time loops T, preset `{results['preset']}`, {results['batches']} "
             f"validation batches (the same at every T), and the fit L(T) = L∞ + Z·exp(−z·T) (least squares, "
             "finite points). μ_rec: the training mean depth.", "",
             "| model | μ_rec | " + " | ".join(f"T={T}" for T in loops) + " | L∞ | Z | z | R² |",
             "|---|---|" + "---|" * len(loops) + "---|---|---|---|"]
    for m in results["models"]:
        f = m["fit"] or {}
        lines.append(f"| {m['model']} | {m['mean_loops']} | " + " | ".join(fmt(m["losses"][str(T)]) for T in loops)
                     + f" | {fmt(f.get('L_inf'))} | {fmt(f.get('Z'))} | {fmt(f.get('z'))} | {fmt(f.get('r2'))} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    grid = np.linspace(min(results["loops"]), max(results["loops"]), 200)
    for i, m in enumerate(results["models"]):
        color = f"C{i}"
        pts = [(int(T), L) for T, L in m["losses"].items() if L is not None]
        if pts:
            ax.plot(*zip(*pts), "o", color=color, label=m["model"])
        if m["fit"]:
            f = m["fit"]
            ax.plot(grid, f["L_inf"] + f["Z"] * np.exp(-f["z"] * grid), "-", color=color, lw=1,
                    label=f"L∞ {f['L_inf']:.3f}, z {f['z']:.2f}, R² {f['r2']:.2f}")
        ax.axvline(m["mean_loops"], color=color, ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test-time loops T (dotted: training mean μ_rec)")
    ax.set_ylabel("validation loss (nats)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
