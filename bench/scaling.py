"""
Scaling laws for looping (the paper's isoFLOP study, PARCAE.md section 9): at a fixed parameter count,
how should a FLOP budget C be shared between looping (μ_rec) and data (D tokens)? And how does a trained
model's loss fall with its test-time depth T?

    python bench/scaling.py --data_dir=data/sitepkg --dry_run            # the plan and a time estimate
    python bench/scaling.py --data_dir=data/sitepkg --part 1/2           # half of the runs (of the FLOPs)
    python bench/scaling.py --data_dir=data/sitepkg --part 2/2           # the other half, then the report
    python bench/scaling.py --data_dir=data/sitepkg --report_only        # fits and plots of the finished runs

The sweep. One Parcae model, the preset's size (small: d 384, 3 heads of 128, P/R/C = 1/2/1, 17.7M
parameters on a 9k vocabulary), trains at each budget C of --budgets and each μ_rec of --mean_loops,
with μ_bwd = ceil(μ_rec / 2) (PARCAE.md section 5), on D = C / F(μ_rec) tokens, F the expected training
FLOPs per token (below). The Transformer with the same 4 unique layers trains at each C too: the
reference line. Every run has the same learning rate (--lr, 8e-3) and train.py's trapezoid schedule
over its own length, one micro-batch of 16 × 512 tokens per step, bf16 autocast, not compiled, and
small runs 8 at a time on one GPU. D must fit in the training split (one epoch): the plan warns if not.

FLOPs per token. model.flops_per_token() counts the matmuls (with the LM head and causal attention) at
the nominal depth; but training draws T = max(1, Poisson(μ_rec)) per sequence and backpropagates
through min(T, μ_bwd) iterations, so expected_flops_per_token() here takes the expectation exactly,
Σ_T P(T) · model.flops_per_token(loops=T). At μ_rec = 1 the mean depth is 1 + 1/e, not 1.

Why characters, not GPT-2 tokens. A token costs 6·d·V FLOPs in the LM head, which does not loop,
against 72·d² per block application. With GPT-2's V = 50,304 the head equals V / (12 d) block
applications, 16 at d 256 and 11 at d 384: at the widths one H200 sweeps in ~15 minutes (~5e16 FLOPs
in all), the head, not the loop, would make up most of C. The char tokenizer on Python sources
(prepare.py --suffix .py --tokenizer char on site-packages: V ≈ 9k) makes the head ~1.7 block
applications at d 384 (with attention at block_size 512), and the loop dominates from μ_rec 2 on.
The script runs on any prepared corpus (FineWeb-Edu with GPT-2 tokens, on a larger machine).

Test-time depth. Every run keeps its checkpoint, and train.py evaluates it at the end at each T of
--loops (and μ_rec), over eval_iters batches that are the same for every run and every T. train.py
evaluates at step 0 too, at every T: the time estimate counts both. The Transformer is evaluated once.

Fits, numpy only.
  per budget  the validation loss at T = μ_rec against x = ln μ_rec: a least-squares parabola. Its
              vertex is μ*(C) when the parabola opens upward and the vertex lies inside the swept
              range; otherwise the budget has no μ* (the tables say at which end its lowest loss is)
              and stays out of the μ* and D* laws. D*(C) = C / F(μ*), F interpolated log-log between
              the swept μ_rec. L*(C): the parabola's lowest value over the swept range.
  across C    μ* = k·C^a and D* = k'·C^b (least squares in log-log); L* = E + A·C^(−α): for each α the
              law is linear in E and A, so loops.fit_exponential scans α as it scans z (on ln C/C_min).
  bootstrap   95 % intervals of a, b and α: --bootstrap resamples (seed 0) of the runs within each
              budget, with replacement, a budget redrawn until it has ≥ 3 distinct μ_rec; percentiles.
  test time   L(T) = L∞ + Z·exp(−z·T) per checkpoint (loops.fit_exponential), then whether one law
              describes them all: z = k·μ_rec^(−β) (log-log) and L∞ = E + A·C^(−α) (pooled over μ_rec),
              each with its R² and the share of the spread that μ_rec alone or C alone explains. It
              holds here if both R² reach 0.9 (our bar); z pinned at an end of the scan, or a curve that
              rises (Z ≤ 0), is left out.

Runs resume one by one (common.run_all): a run that ended with the same settings is not trained again,
so the sweep can span several calls, and --part K/N trains the K-th of N parts of about equal FLOPs. A run
that --results_dir's scaling.json records as finished (with the same settings) is not trained again
either: the sweep continues on a fresh machine that has lost the run folders.
Each call ends with the report of every finished run of the sweep, whichever part trained it:
scaling.json, scaling.md, scaling_isoflop.png, scaling_laws.png and scaling_testtime.png in
--results_dir. The time estimate divides the FLOPs (training and both evaluations) by the preset's
flops_per_sec, the aggregate rate of all runs on one GPU; each call prints the rate it measured.
"""

import hashlib
import json
import math
import os
import shlex
import sys
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402
import loops  # noqa: E402  (its fit of L(T))

LOOPS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32]      # test-time depths of every looped run
TEST_TIME_R2 = 0.98     # a checkpoint's L(T) saturates exponentially when the fit explains this much of it
LAW_R2 = 0.9            # our bar for a law across checkpoints
PAPER = {"a": 0.40, "b": 0.78}   # μ* ∝ C^0.40, D* ∝ C^0.78 (PARCAE.md section 9)

# per preset of common.py: train.py settings on top of the preset's, the sweep, and flops_per_sec,
# the FLOP rate of all runs together on one GPU (training and evaluation), for the time estimate
SCALING = {
    # seconds on a CPU, for the tests: it checks that the pipeline runs, not the science
    "tiny": {"train": dict(eval_iters=2), "mean_loops": [1, 2, 4], "budgets": [2.5e8, 5e8, 1e9],
             "flops_per_sec": 1e9},
    # one H200, 8 runs at a time, one micro-batch of 16 × 512 tokens per step; budgets spaced by √10
    # over 32×, ~4e16 FLOPs in all with evaluation. 8 validation batches (65k tokens, the same for every
    # run and T, so comparisons are paired) keep the 13 depths at step 0 and at the end to ~12 % of the
    # FLOPs. flops_per_sec: measured on one H200, 5.4e13 with 8 runs at a time and 5.0e13 with 4
    "small": {"train": dict(grad_accum_steps=1, eval_iters=8), "mean_loops": [1, 2, 4, 6, 8, 12, 16],
              "budgets": [1e14, 3.16e14, 1e15, 3.16e15], "flops_per_sec": 5e13},
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = common.parser(__doc__)
    p.add_argument("--budgets", nargs="+", type=float, help="FLOP budgets C (default: the preset's)")
    p.add_argument("--mean_loops", nargs="+", type=int, help="the μ_rec at each budget (default: the preset's)")
    p.add_argument("--loops", nargs="+", type=int, default=LOOPS, help="test-time depths T of every looped run")
    p.add_argument("--lr", type=float, default=8e-3, help="the learning rate of every run")
    p.add_argument("--part", default="1/1", help="K/N: train the K-th of N parts of about equal FLOPs")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the confidence intervals")
    p.add_argument("--report_only", action="store_true", help="fit and plot the finished runs, train nothing")
    args = common.finish_args(p.parse_args(argv))
    if args.preset_name not in SCALING:
        raise SystemExit(f"bench/scaling.py has no sweep for preset {args.preset_name!r}: "
                         f"choose {' or '.join(SCALING)}")
    scaling = SCALING[args.preset_name]
    args.budgets = sorted(args.budgets or scaling["budgets"])
    args.mean_loops = sorted(set(args.mean_loops or scaling["mean_loops"]))
    part, n_parts = parse_part(args.part)

    runs = plan(args, scaling)
    args.ledger = ledger(args.results_dir)
    mine = split(runs, n_parts)[part - 1]
    print_plan(runs, mine, args, scaling["flops_per_sec"])
    if args.dry_run:
        return None
    if not args.report_only:
        todo = [r for r in mine if not ended(r, args.ledger)]
        t0 = time.time()
        common.run_all([(r["name"], r["settings"]) for r in mine if key(r) not in args.ledger], args.parallel,
                       args.gpus)
        if todo:
            work, seconds = sum(r["flops"] + r["eval_flops"] for r in todo), time.time() - t0
            print(f"trained {len(todo)} runs, {work:.3g} FLOPs with evaluation, in {seconds:.0f} s: "
                  f"{work / seconds:.3g} FLOP/s over all runs, start-ups included "
                  f"(the preset assumes {scaling['flops_per_sec']:.3g})")
    results = collect(args, runs, argv)
    text = common.write_results(args.results_dir, "scaling", results, markdown)
    plot_isoflop(results, os.path.join(args.results_dir, "scaling_isoflop.png"))
    plot_laws(results, os.path.join(args.results_dir, "scaling_laws.png"))
    plot_test_time(results, os.path.join(args.results_dir, "scaling_testtime.png"))
    print(text)
    return results


def parse_part(text):
    try:
        k, n = map(int, text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise SystemExit(f"--part {text}: expected K/N with 1 <= K <= N, e.g. --part 1/2")
    return k, n

# -----------------------------------------------------------------------------
# the plan


def expected_flops_per_token(model):
    """
    Training FLOPs per token averaged over the depths a looped model trains at: T = max(1, Poisson(μ_rec))
    (per sequence or per batch, the mean is the same), Σ_T P(T) · model.flops_per_token(loops=T), which
    counts T iterations forward and min(T, μ_bwd) backward. The sum stops where the Poisson tail weighs
    less than 1e-20 (12 standard deviations and 30 more past the mean). Fixed depth, or no loop: nominal.
    """
    c = model.config
    if not c.looped or c.depth_sampling == "fixed":
        return model.flops_per_token()
    mu = c.mean_loops
    top = int(mu + 12 * math.sqrt(mu) + 30)
    pmf = [math.exp(k * math.log(mu) - mu - math.lgamma(k + 1)) for k in range(top + 1)]
    pmf[1] += pmf[0]                    # a draw of 0 runs once
    return sum(p * model.flops_per_token(loops=T) for T, p in enumerate(pmf) if T >= 1)


def eval_flops(settings, vocab_size):
    """FLOPs of a run's two evaluations (step 0 and the end) at each of its depths. A forward pass costs a
    third of the training FLOPs of the same model with gradient through every iteration (backward = 2 × forward)."""
    model = common.meta_model({**settings, "backprop_loops": max(settings["eval_loops"])}, vocab_size)
    forward = sum(model.flops_per_token(loops=T) for T in (settings["eval_loops"] if model.config.looped else [1])) / 3
    return 2 * settings["eval_iters"] * settings["batch_size"] * settings["block_size"] * forward


def plan(args, scaling):
    """Every run of the sweep, budget by budget: the Transformer, then Parcae at each μ_rec."""
    vocab = args.meta["vocab_size"]
    base = dict(args.preset, train={**args.preset["train"], **scaling["train"]}, evals=1)  # step 0 and the end
    runs = []
    for C in args.budgets:
        for mu in [None, *args.mean_loops]:
            model, name = ("gpt", f"gpt_C{C:.3g}") if mu is None else ("parcae", f"parcae_mu{mu}_C{C:.3g}")
            preset = dict(base, mean_loops=mu or 1, backprop_loops=math.ceil((mu or 1) / 2))

            def settings(tokens):
                return common.run_settings(preset, model, args.lr, tokens, args.data_dir,
                                           os.path.join(args.work_dir, "scaling", name), args.overrides,
                                           save_checkpoint=True)
            flops_per_token = expected_flops_per_token(common.meta_model(settings(1), vocab))
            s = settings(C / flops_per_token)       # the token budget rounds to whole steps
            if mu is not None:
                s["eval_loops"] = sorted(set(args.loops) | {mu})
            tokens = common.tokens_of(s)
            runs.append({"name": name, "model": model, "mu": mu, "mu_bwd": preset["backprop_loops"] if mu else None,
                         "budget": C, "flops_per_token": flops_per_token, "tokens": tokens,
                         "flops": flops_per_token * tokens, "eval_flops": eval_flops(s, vocab), "settings": s})
    return runs


def split(runs, n):
    """n lists of runs of about equal FLOPs (training and evaluation): the largest first, each to the lightest."""
    parts, load = [[] for _ in range(n)], [0.0] * n
    for r in sorted(runs, key=lambda r: -(r["flops"] + r["eval_flops"])):
        i = load.index(min(load))
        parts[i].append(r)
        load[i] += r["flops"] + r["eval_flops"]
    return parts


def key(run):
    return json.dumps(run["settings"], sort_keys=True)


def ledger(results_dir):
    """The finished runs that an earlier call recorded in --results_dir's scaling.json, by their settings. A
    GPU machine may not keep the run folders from one call to the next: the sweep then continues from this
    record instead of training those runs again (their checkpoints are not in it, their results are)."""
    earlier = common.read_json(os.path.join(results_dir, "scaling.json")) or {}
    return {key(r): r for r in earlier.get("runs", []) if r["status"] == "finished"}


def ended(run, recorded=()):
    """Whether the run needs no training: common.run_all would skip it, or an earlier call recorded it."""
    done = common.run_status(run["settings"]["out_dir"])
    return (bool(done) and done["settings"] == run["settings"] and done["status"] in ("finished", "diverged")
            or key(run) in recorded)


def print_plan(runs, mine, args, flops_per_sec):
    train_tokens = args.meta["train_tokens"]
    print(f"isoFLOP sweep, preset {args.preset_name}: {len(args.budgets)} budgets × (the Transformer + "
          f"{len(args.mean_loops)} μ_rec) = {len(runs)} runs; this call: part {args.part}, {len(mine)} runs")
    print(f"  {'run':<26} {'μ_bwd':>5} {'FLOPs/token':>11} {'tokens':>7} {'steps':>6} {'epochs':>6} "
          f"{'train FLOPs':>11} {'eval FLOPs':>10} {'GPU s':>6}  status")
    for r in (r for r in runs if r in mine):     # in the plan's order
        print(f"  {r['name']:<26} {r['mu_bwd'] or '–':>5} {r['flops_per_token']:>11.4g} "
              f"{common.fmt_tokens(r['tokens']):>7} {r['settings']['max_iters']:>6} {r['tokens'] / train_tokens:>6.2f} "
              f"{r['flops']:>11.3g} {r['eval_flops']:>10.3g} {(r['flops'] + r['eval_flops']) / flops_per_sec:>6.0f}  "
              f"{'done' if ended(r, args.ledger) else 'to train'}")
    todo = [r for r in mine if not ended(r, args.ledger)]
    work = sum(r["flops"] + r["eval_flops"] for r in todo)
    waves = math.ceil(len(todo) / (args.parallel * len(args.gpus)))
    print(f"  to train: {len(todo)} runs, {work:.3g} FLOPs ({sum(r['eval_flops'] for r in todo):.3g} of them "
          f"evaluation): about {work / flops_per_sec + 15 * waves:.0f} s at {flops_per_sec:.3g} FLOP/s over all "
          f"runs (the preset's rate) and ~15 s to start each of {waves} waves")
    most = max(runs, key=lambda r: r["tokens"])
    if most["tokens"] > train_tokens:
        print(f"  warning: {most['name']} reads {most['tokens'] / train_tokens:.2f} epochs of the training split "
              f"({common.fmt_tokens(train_tokens)} tokens): lower --budgets or use a larger corpus for one epoch")

# -----------------------------------------------------------------------------
# the results of the runs, and the fits


def collect(args, runs, argv):
    vocab = args.meta["vocab_size"]
    out = {"preset": args.preset_name, "environment": common.environment(),
           "command": "python bench/scaling.py " + shlex.join(argv), "data": corpus(args.data_dir, args.meta),
           "lr": args.lr, "budgets": args.budgets, "mean_loops": args.mean_loops, "loops": args.loops,
           "backprop_loops": "ceil(mean_loops / 2)",
           "flops_per_token": "expected training matmul FLOPs per token over T = max(1, Poisson(mean_loops)), "
                              "head and causal attention included (bench/scaling.py expected_flops_per_token)",
           "runs": [run_result(r, args.meta["train_tokens"], common.meta_model(r["settings"], vocab).num_params(),
                               args.ledger.get(key(r))) for r in runs]}
    done = [r for r in out["runs"] if r["model"] == "parcae" and r["val_loss"] is not None]
    flops_at = interpolate_flops({r["mu"]: r["flops_per_token"] for r in out["runs"] if r["mu"]})
    points = {C: [(r["mu"], r["val_loss"]) for r in done if r["budget"] == C] for C in args.budgets}
    out["isoflop"] = []
    for C in args.budgets:
        gpt = next((r["val_loss"] for r in out["runs"] if r["model"] == "gpt" and r["budget"] == C), None)
        enough = len({mu for mu, _ in points[C]}) >= 3
        out["isoflop"].append({"budget": C, "gpt_loss": gpt,
                               "fit": fit_budget(C, points[C], flops_at) if enough else None})
    fits = [b["fit"] for b in out["isoflop"] if b["fit"]]
    out["laws"] = fit_laws(fits)
    out["bootstrap"] = bootstrap({f["budget"]: points[f["budget"]] for f in fits}, flops_at, args.bootstrap)
    out["test_time"] = test_time_law([r for r in done if r["test_time_fit"]])
    out["verdict"] = verdict(out)
    return out


def corpus(data_dir, meta):
    """The data's size and fingerprint: which corpus made these numbers."""
    out = {"data_dir": data_dir, "tokenizer": meta.get("tokenizer"), "vocab_size": meta["vocab_size"],
           "source": meta.get("source")}
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        out[f"{split}_tokens"] = os.path.getsize(path) // 2
        out[f"{split}_sha256"] = digest.hexdigest()
    return out


def run_result(run, train_tokens, params, recorded=None):
    s = run["settings"]
    summary = common.summarize(s["out_dir"], s)
    if summary["status"] != "finished" and recorded:        # trained in an earlier call, on another machine
        return recorded
    _, evals, _ = common.read_metrics(s["out_dir"])
    losses = evals[-1]["val_loss"] if summary["status"] == "finished" else {}
    finite = sorted((int(T), L) for T, L in losses.items() if L is not None)
    fit = loops.fit_exponential(*zip(*finite)) if run["mu"] and len(finite) >= 3 else None
    return {**{k: v for k, v in run.items() if k != "settings"}, "steps": s["max_iters"], "params": params,
            "epochs": run["tokens"] / train_tokens, "status": summary["status"], "diverged": summary["diverged"],
            "wall_s": summary["wall_s"], "val_loss": summary["final_val_loss"], "losses": losses,
            "test_time_fit": fit, "out_dir": s["out_dir"], "settings": s}


def interpolate_flops(table):
    """F(μ) between the swept μ_rec, linear in log-log: {μ_rec: FLOPs per token} -> a function."""
    mus = sorted(table)
    x, y = np.log(mus), np.log([table[m] for m in mus])
    return lambda mu: float(np.exp(np.interp(math.log(mu), x, y)))


def fit_budget(C, points, flops_at):
    """One budget's parabola of loss in ln μ_rec, and μ*, D*, L* from it (see the module docstring)."""
    mus, losses = map(np.array, zip(*points))
    x = np.log(mus)
    coef = np.polyfit(x, losses, 2)
    lo, hi = x.min(), x.max()
    vertex = -coef[1] / (2 * coef[0]) if coef[0] > 0 else None
    inside = vertex is not None and lo <= vertex <= hi
    best = vertex if inside else min((lo, hi), key=lambda v: np.polyval(coef, v))
    mu_star = math.exp(best) if inside else None
    return {"budget": C, "mu": mus.tolist(), "loss": losses.tolist(), "coef": coef.tolist(),
            "mu_star": mu_star, "D_star": C / flops_at(mu_star) if inside else None,
            "L_star": float(np.polyval(coef, best)), "mu_best": math.exp(best),
            "edge": None if inside else ("smallest" if best == lo else "largest")}


def fit_power_law(x, y):
    """y = k·x^exponent, least squares in log-log; r2 in log space."""
    lx, ly = np.log(x), np.log(y)
    exponent, log_k = np.polyfit(lx, ly, 1)
    return {"exponent": float(exponent), "prefactor": math.exp(log_k), "r2": r_squared(ly, exponent * lx + log_k),
            "n": len(lx)}


def fit_saturating(C, L):
    """L = E + A·C^(−α): loops.fit_exponential on ln(C / C_min), as C^(−α) = C_min^(−α)·exp(−α·ln(C / C_min))."""
    C0 = min(C)
    f = loops.fit_exponential(np.log(np.divide(C, C0)), L)
    return {"E": f["L_inf"], "A": f["Z"] * C0 ** f["z"], "alpha": f["z"], "r2": f["r2"], "n": len(C),
            "alpha_at_scan_end": pinned(f["z"])}


def pinned(z):
    """Whether a scanned rate sits at an end of loops.fit_exponential's range: then it is a bound, not a fit."""
    return any(abs(z / end - 1) < 1e-6 for end in loops.Z_RANGE)


def r_squared(y, fitted):
    sst = float(((y - np.mean(y)) ** 2).sum())
    return 1 - float(((y - fitted) ** 2).sum()) / sst if sst > 0 else 1.0


def fit_laws(fits):
    """The laws across budgets: μ* and D* from the budgets with a vertex inside, L* from all of them."""
    inside = [f for f in fits if f["mu_star"] is not None]
    C = [f["budget"] for f in inside]
    return {"mu_star": fit_power_law(C, [f["mu_star"] for f in inside]) if len(inside) >= 2 else None,
            "D_star": fit_power_law(C, [f["D_star"] for f in inside]) if len(inside) >= 2 else None,
            "L_star": fit_saturating([f["budget"] for f in fits], [f["L_star"] for f in fits]) if len(fits) >= 3
            else None}


def bootstrap(points, flops_at, resamples, seed=0):
    """95 % intervals of a, b and α from resampling the runs within each budget ({C: [(μ, loss)]})."""
    rng = np.random.default_rng(seed)
    draws = {"a": [], "b": [], "alpha": []}
    for _ in range(resamples):
        fits = []
        for C, pts in points.items():
            while True:     # a parabola needs 3 distinct μ_rec
                pick = [pts[i] for i in rng.integers(0, len(pts), len(pts))]
                if len({mu for mu, _ in pick}) >= 3:
                    break
            fits.append(fit_budget(C, pick, flops_at))
        laws = fit_laws(fits)
        for key, law, field in (("a", "mu_star", "exponent"), ("b", "D_star", "exponent"),
                                ("alpha", "L_star", "alpha")):
            if laws[law]:
                draws[key].append(laws[law][field])
    return {"resamples": resamples, "seed": seed, **{key: {
        "ci95": np.percentile(v, [2.5, 97.5]).tolist() if v else None, "used": len(v)} for key, v in draws.items()}}


def decays(fit):
    """Whether a test-time fit is a decay with a measured rate: Z > 0 (the loss falls with T), z inside the scan."""
    return fit["Z"] > 0 and not pinned(fit["z"])


def explained_share(values, groups):
    """The share of the spread of values that one factor explains: 1 − within-group / total sum of squares."""
    v, g = np.asarray(values, dtype=float), np.asarray(groups)
    if v.size < 2:
        return None
    total = float(((v - v.mean()) ** 2).sum())
    within = sum(float(((v[g == k] - v[g == k].mean()) ** 2).sum()) for k in set(g.tolist()))
    return 1 - within / total if total > 0 else None


def test_time_law(runs):
    """How the test-time fits of the checkpoints move with μ_rec and C, and whether one law describes them."""
    r2 = [r["test_time_fit"]["r2"] for r in runs]
    out = {"checkpoints": len(runs), "r2_at_least": TEST_TIME_R2, "passing": sum(x >= TEST_TIME_R2 for x in r2),
           "min_r2": min(r2, default=None)}
    decaying = [r for r in runs if decays(r["test_time_fit"])]
    out["left_out"] = len(runs) - len(decaying)
    mu, C = [r["mu"] for r in decaying], [r["budget"] for r in decaying]
    z, L_inf = [r["test_time_fit"]["z"] for r in decaying], [r["test_time_fit"]["L_inf"] for r in decaying]
    out["z_law"] = fit_power_law(mu, z) if len(set(mu)) >= 2 else None
    out["z_explained_by"] = {"mu_rec": explained_share(np.log(z), mu), "budget": explained_share(np.log(z), C)}
    out["L_inf_law"] = fit_saturating(C, L_inf) if len(set(C)) >= 3 else None
    out["L_inf_explained_by"] = {"mu_rec": explained_share(L_inf, mu), "budget": explained_share(L_inf, C)}
    out["holds"] = bool(out["z_law"] and out["L_inf_law"] and out["z_law"]["r2"] >= LAW_R2
                        and out["L_inf_law"]["r2"] >= LAW_R2)
    return out


def trend(interval):
    """What a 95 % interval says about an exponent's sign."""
    if interval is None:
        return "not measured"
    return ("grows with C" if interval[0] > 0 else "shrinks with C" if interval[1] < 0
            else "not established (the interval includes 0)")


def verdict(results):
    """Plain-language answers to this bench's questions: looping and data in tandem? saturating test-time curves?"""
    laws, ci, tt = results["laws"], results["bootstrap"], results["test_time"]
    out = {}
    for name, key, law in (("mu_star", "a", laws["mu_star"]), ("D_star", "b", laws["D_star"])):
        out[name] = trend(ci[key]["ci95"] if law else None)
        out[name + "_text"] = (f"exponent {law['exponent']:.2f}, 95 % interval [{ci[key]['ci95'][0]:.2f}, "
                               f"{ci[key]['ci95'][1]:.2f}], over {law['n']} budgets" if law and ci[key]["ci95"] else
                               "fewer than 2 budgets have their minimum inside the swept μ_rec")
    out["tandem"] = out["mu_star"] == out["D_star"] == "grows with C"
    out["test_time_fits"] = (f"{tt['passing']} of {tt['checkpoints']} checkpoints reach R² ≥ {TEST_TIME_R2}"
                             + (f" (lowest {tt['min_r2']:.3f})" if tt["min_r2"] is not None else ""))
    z, L = tt["z_law"], tt["L_inf_law"]
    parts = [f"z = {z['prefactor']:.2f}·μ_rec^{z['exponent']:.2f} (R² {z['r2']:.2f})" if z else "z: too few μ_rec",
             f"L∞ = {L['E']:.3f} + A·C^(−{L['alpha']:.3f}) (R² {L['r2']:.2f})" if L else "L∞: too few budgets"]
    out["law"] = (("holds: " if tt["holds"] else f"not supported by the data (a law needs R² ≥ {LAW_R2}): ")
                  + "; ".join(parts))
    return out

# -----------------------------------------------------------------------------
# outputs


def markdown(results):
    fmt, v = common.fmt, results["verdict"]
    d, env = results["data"], results["environment"]
    runs, mus = results["runs"], results["mean_loops"]
    lines = [f"isoFLOP sweep of looping, preset `{results['preset']}`: Parcae at each μ_rec (μ_bwd = ceil(μ_rec/2)) "
             f"and the Transformer with the same unique layers, each trained on D = C / F tokens (F: expected training "
             f"FLOPs per token over the sampled depths), lr {results['lr']:g} for every run. Data `{d['data_dir']}` "
             f"({d['tokenizer']}, vocab {d['vocab_size']:,}): {d['train_tokens']:,} training and {d['val_tokens']:,} "
             f"validation tokens, sha256 {d['train_sha256'][:12]}… and {d['val_sha256'][:12]}…. Made on "
             f"{env['device']} (torch {env['torch']}, commit {env['commit']}) by `{results['command']}`.", "",
             "**Verdict.**",
             f"- Looping and data in tandem: **{'yes' if v['tandem'] else 'not shown'}**. μ* {v['mu_star']} "
             f"({v['mu_star_text']}); D* {v['D_star']} ({v['D_star_text']}). Paper: μ* ∝ C^{PAPER['a']}, "
             f"D* ∝ C^{PAPER['b']}.",
             f"- Test-time curves: {v['test_time_fits']}.",
             f"- One test-time law: {v['law']}.", "",
             "Validation loss at T = μ_rec (training tokens in brackets); μ*, D*, L* from the parabola in "
             "ln μ_rec.", "",
             "| C | Transformer | " + " | ".join(f"μ={m}" for m in mus) + " | μ* | D* | L* |",
             "|---|---|" + "---|" * len(mus) + "---|---|---|"]
    for b in results["isoflop"]:
        here = {r["mu"]: r for r in runs if r["budget"] == b["budget"]}
        cells = [f"{fmt(here[m]['val_loss'])} ({common.fmt_tokens(here[m]['tokens'])})" if here.get(m) else "–"
                 for m in [None, *mus]]
        f = b["fit"] or {}
        star = (fmt(f["mu_star"], ".2f") if f.get("mu_star") else f"at the {f['edge']} μ" if f else "–")
        lines.append(f"| {b['budget']:.3g} | " + " | ".join(cells) + f" | {star} | "
                     f"{common.fmt_tokens(f['D_star']) if f.get('D_star') else '–'} | {fmt(f.get('L_star'))} |")
    laws, ci = results["laws"], results["bootstrap"]
    lines += ["", f"Laws across budgets; 95 % intervals from {ci['resamples']} bootstrap resamples of the runs within "
                  "each budget.", "",
              "| law | exponent | 95 % interval | R² | budgets | paper |", "|---|---|---|---|---|---|"]
    for name, law, key, field in (("μ* = k·C^a", laws["mu_star"], "a", "exponent"),
                                  ("D* = k·C^b", laws["D_star"], "b", "exponent"),
                                  ("L* = E + A·C^(−α)", laws["L_star"], "alpha", "alpha")):
        interval, used = ci[key]["ci95"], ci[key]["used"]
        lines.append(f"| {name} | {fmt(law and law[field], '.3f')} | "
                     + (f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "–")
                     + (f" ({used} resamples with a fit)" if interval and used < ci["resamples"] else "")
                     + f" | {fmt(law and law['r2'])} | {law['n'] if law else 0} | {PAPER.get(key, '–')} |")
    if laws["L_star"]:
        lines.append(f"\nL* law: E = {laws['L_star']['E']:.4f}, A = {laws['L_star']['A']:.4g}.")
    tt = results["test_time"]
    lines += ["", "Test time: L(T) = L∞ + Z·exp(−z·T) per checkpoint (least squares over the finite T).", "",
              "| C | μ_rec | L(1) | L(μ_rec) | L(T max) | L∞ | Z | z | R² |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["test_time_fit"]
        if f:
            last = str(max(map(int, r["losses"])))
            lines.append(f"| {r['budget']:.3g} | {r['mu']} | {fmt(r['losses'].get('1'))} | {fmt(r['val_loss'])} | "
                         f"{fmt(r['losses'][last])} (T={last}) | {f['L_inf']:.3f} | {f['Z']:.3f} | {f['z']:.3f} | "
                         f"{f['r2']:.3f} |")
    share = lambda s: ", ".join(f"{k} {fmt(x, '.2f')}" for k, x in s.items())
    lines += ["", f"Across checkpoints ({tt['left_out']} left out: z at the end of the scan, or a curve that rises): "
                  f"share of the spread of ln z explained by {share(tt['z_explained_by'])}; of L∞ by "
                  f"{share(tt['L_inf_explained_by'])}."]
    return "\n".join(lines) + "\n"


def budget_colors(budgets):
    cmap = plt.get_cmap("viridis")
    return {C: cmap(0.85 * i / max(1, len(budgets) - 1)) for i, C in enumerate(budgets)}


def plot_isoflop(results, path):
    colors = budget_colors(results["budgets"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for b in results["isoflop"]:
        C, color, f = b["budget"], colors[b["budget"]], b["fit"]
        pts = sorted((r["mu"], r["val_loss"]) for r in results["runs"]
                     if r["budget"] == C and r["mu"] and r["val_loss"] is not None)
        if pts:
            ax.plot(*zip(*pts), "o", color=color, label=f"C = {C:.3g}")
        if f:
            x = np.linspace(math.log(min(f["mu"])), math.log(max(f["mu"])), 100)
            ax.plot(np.exp(x), np.polyval(f["coef"], x), "-", color=color, lw=1)
            ax.plot(f["mu_best"], f["L_star"], "*" if f["mu_star"] else "^", ms=13, color=color,
                    mfc=color if f["mu_star"] else "none")
        if b["gpt_loss"] is not None:
            ax.axhline(b["gpt_loss"], color=color, ls="--", lw=0.8)
    ax.plot([], [], "k*", ms=10, label="minimum μ* (△: at an end)")
    ax.plot([], [], "k--", lw=0.8, label="Transformer, same C")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("μ_rec (training mean depth)")
    ax.set_ylabel("validation loss at T = μ_rec (nats)")
    ax.set_title("isoFLOP curves: fixed parameters, fixed FLOPs")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_laws(results, path):
    fits = [b["fit"] for b in results["isoflop"] if b["fit"]]
    inside = [f for f in fits if f["mu_star"]]
    laws, ci = results["laws"], results["bootstrap"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    C_line = np.geomspace(min(results["budgets"]), max(results["budgets"]), 50)
    for ax, key, ci_key, label in ((axes[0], "mu_star", "a", "μ*"), (axes[1], "D_star", "b", "D* (tokens)")):
        ax.plot([f["budget"] for f in inside], [f[key] for f in inside], "o", color="C0", label="parabola vertex")
        law = laws[key]
        if law:
            interval = ci[ci_key]["ci95"]
            ax.plot(C_line, law["prefactor"] * C_line ** law["exponent"], "-", color="C0", lw=1,
                    label=f"∝ C^{law['exponent']:.2f}"
                    + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel(label)
    edge = [f for f in fits if not f["mu_star"]]
    axes[0].plot([f["budget"] for f in edge], [f["mu_best"] for f in edge], "^", mfc="none", color="C3",
                 label="lowest loss at an end of the sweep")
    axes[2].plot([f["budget"] for f in fits], [f["L_star"] for f in fits], "o", color="C0", label="L*")
    if laws["L_star"]:
        L = laws["L_star"]
        axes[2].plot(C_line, L["E"] + L["A"] * C_line ** -L["alpha"], "-", color="C0", lw=1,
                     label=f"{L['E']:.3f} + A·C^(−{L['alpha']:.2f})")
    axes[2].set_xscale("log")
    axes[2].set_ylabel("L* (nats)")
    for ax in axes:
        ax.set_xlabel("FLOP budget C")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_test_time(results, path):
    runs = [r for r in results["runs"] if r["test_time_fit"]]
    budgets = results["budgets"]
    fig, axes = plt.subplots(1, len(budgets) + 1, figsize=(3.6 * (len(budgets) + 1), 3.6), squeeze=False)
    axes = axes[0]
    cmap = plt.get_cmap("plasma")
    mu_color = {m: cmap(0.85 * i / max(1, len(results["mean_loops"]) - 1)) for i, m in enumerate(results["mean_loops"])}
    T = np.linspace(1, max(results["loops"]), 200)
    for ax, C in zip(axes, budgets):
        for r in (r for r in runs if r["budget"] == C):
            f, color = r["test_time_fit"], mu_color[r["mu"]]
            pts = sorted((int(t), L) for t, L in r["losses"].items() if L is not None)
            ax.plot(*zip(*pts), "o", ms=3, color=color, label=f"μ_rec {r['mu']} (R² {f['r2']:.3f})")
            ax.plot(T, f["L_inf"] + f["Z"] * np.exp(-f["z"] * T), "-", lw=1, color=color)
        ax.set_xscale("log", base=2)
        ax.set_title(f"C = {C:.3g}", fontsize=9)
        ax.set_xlabel("test-time loops T")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("validation loss (nats)")
    ax, colors = axes[-1], budget_colors(budgets)
    for r in runs:
        fit, color = r["test_time_fit"], colors[r["budget"]]
        ax.plot(r["mu"], fit["z"], "o", color=color, mfc=color if decays(fit) else "none")
    law = results["test_time"]["z_law"]
    if law:
        m = np.geomspace(min(results["mean_loops"]), max(results["mean_loops"]), 50)
        ax.plot(m, law["prefactor"] * m ** law["exponent"], "k-", lw=1,
                label=f"z = {law['prefactor']:.2f}·μ_rec^{law['exponent']:.2f} (R² {law['r2']:.2f})")
        ax.legend(fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("μ_rec (colour: C; hollow: left out)")
    ax.set_ylabel("decay rate z")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
