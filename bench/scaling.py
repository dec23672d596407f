"""
Scaling laws for looping (the paper's isoFLOP study, MODEL.md section 9): at a fixed parameter count,
how should a FLOP budget C be shared between looping (μ_rec) and data (D tokens)? And how does a trained
model's loss fall with its test-time depth T?

    python bench/scaling.py --dry_run           # the plan, and the GPU jobs left, each as one command
    python bench/scaling.py --results_dir "$OUT" --only NAME ...    # a job: train these runs, then the report
    python bench/scaling.py --report_only       # fits and plots of the finished runs, on any machine

The corpus is made on the GPU machine, by each job unless it is still there (data/src/meta.json):
    python prepare.py --input "$(python -c 'import site; print(site.getsitepackages()[0])')" /usr/include \
        --suffix .py .h .hpp --tokenizer byte --name src
prepare.py walks site-packages recursively, then /usr/include, so it reads the packages' Python sources,
the C/C++ headers they ship (torch/include, nvidia/*/include, ...) and the system's (Boost's are most of
them), in sorted order: the same machine image gives the same tokens, and scaling.json records their
sha256 (a job on other tokens is refused).

The sweep. One Parcae model trains at each budget C and each μ_rec, with μ_bwd = ceil(μ_rec / 2) (MODEL.md
section 5), on D = C / F(μ_rec) tokens, F the expected training FLOPs per token (below); the Transformer
with the same unique layers trains at each C too, the reference line. Every run has the paper's learning
rate (--lr, 8e-3), train.py's trapezoid schedule over its own length, and Muon's momentum warm-up over the
same share of its steps as the release's 300 steps are of its 140m run's 21,400 (1.4 %); it logs about
100 times and is evaluated once, at its end. A budget whose lowest loss is at its deepest μ_rec gets the
next depth of `extend`, until its lowest loss lies inside. At the two largest budgets, once their runs
are done, the three μ_rec nearest the budget's optimum train again with a second seed (train.py's seed
+ 1): the spread is the seed noise, and the μ* intervals resample those runs too. Validation windows do
not depend on the seed (train.py get_batch), so every run and every T is measured on the same tokens.

The plan (preset small), for one H200 and ≤ 10-minute GPU jobs.
  model   d 256, 2 heads of 128, P/R/C = 1/1/1: a third of the unique layers loop, as in the paper's
          2/2/2; 2.49M non-embedding parameters (2.36M for the Transformer's 3 layers), on the byte
          vocabulary (257 ids, padded to 320): the head is 1 % of a token's FLOPs, so C is spent on
          blocks. F = 18.5M FLOPs per token at μ_rec 1, 20.0M at 2, 27.3M at 4, 43.1M at 8 (μ_bwd
          steps of 1 make F jump at the odd μ_rec); 17.0M for the Transformer.
  data    bytes of the GPU machine's Python sources and C/C++ headers (prepare.py above; 9 files of 10
          train): 591.9M training tokens, as the first job recorded them; the dry run prints the epochs
          each run reads. (site-packages alone held 415.6M: the top budget's Transformer would have read
          them 1.98 times.)
  steps   128 × 512 = 65,536 tokens, one micro-batch; compiled. A small run's step is bound by the host
          (launches, Python), not the GPU: on an H200 the Transformer's step took 14.8 ms at 64 × 512 and
          14.2 ms at 128 × 512 (`bench/throughput.py --small --batch_size 64`, then 128, times the same
          steps), so twice the tokens a step is about twice the rate.
  budgets 4.4e14, 1.05e15, 2.5e15, 5.9e15, 1.4e16 FLOPs: 5 over 32×, 2.37× apart. At 1.4e16 the μ_rec 1
          run reads 756M tokens, 303 per non-embedding parameter (the paper's fixed-depth runs read 50 to
          3,300 per block parameter), and the Transformer 823M: 1.39 epochs. At 4.4e14, 9.5 per
          parameter; μ_rec 8 there trains 10.2M tokens, 156 steps.
  time    training and the one evaluation, 1.72e17 FLOPs for the 35 first runs, at 1.5e14 FLOP/s over 4
          runs at a time (the rate aimed at, 3× the char sweep's measured 5e13; a guess until the finished
          runs' wall times measure it, start-ups included, and scaling.json keeps the rate): ~19 minutes of
          GPU, the 6 second seeds ~7 more. A run of the top budget would take ~420 s. Measured over the
          9 calls of the sweep: 1.04e14 FLOP/s, at most 1.23e14 in one call (4 or more runs at a time;
          one run alone 4.7e13), 38 runs in 39 minutes of training; 4 top-budget runs took 498 s together.
  jobs    the dry run packs the runs left into GPU jobs of at most `job_seconds` (510 s, within a
          device call's 10 minutes), counting the corpus (prepare_s) and the report after every run
          (report_s), and prints each job as one command. While the time model is a guess, the first
          job holds only the smallest runs, as many as end in time on a GPU 3 times slower than guessed;
          plan again once its results are committed. Each call ends by printing the jobs left.

FLOPs per token. model.flops_per_token() counts the matmuls (with the LM head and causal attention) at
the nominal depth; but training draws T = max(1, Poisson(μ_rec)) per sequence and backpropagates
through min(T, μ_bwd) iterations, so expected_flops_per_token() here takes the expectation exactly,
Σ_T P(T) · model.flops_per_token(loops=T). At μ_rec = 1 the mean depth is 1 + 1/e, not 1.

Test-time depth. Every run keeps its checkpoint, and train.py evaluates it at the end at each T of
--loops (and μ_rec), over eval_iters batches. The Transformer is evaluated once.

Fits, numpy only.
  per budget  the validation loss at T = μ_rec against x = ln μ_rec, every run and seed a point: a
              least-squares parabola over the window of the 4 swept μ_rec nearest (in x) the one of
              lowest mean loss of the first seed, with an offset for the second: all of a seed's runs
              read the same training batches (train.py get_batch), and the second seed's were lower
              at all 7 pairs, by 0.002 to 0.010 nats. The first seed's parabola, the Transformer's
              seed too, is the budget's. Its vertex is μ*(C) when the parabola opens upward and the
              vertex lies inside the window; otherwise the budget has no μ* (the tables say at which
              end its lowest loss is) and stays out of the μ* and D* laws. A window, not every μ_rec:
              over 8× in μ_rec an isoFLOP curve need not be a parabola. At 1.4e16 the one through all six μ_rec opened
              downward, its best at μ_rec 8, though both seeds were lower at 6 than at 4 or 8.
              D*(C) = C / F(μ*), F interpolated log-log between the swept μ_rec. L*(C): the parabola's
              lowest value over the window.
  bootstrap   --bootstrap resamples (seed 0) of the runs and seeds within each budget, with replacement,
              a budget redrawn until it has ≥ 3 distinct μ_rec: each budget's optimum (the vertex, or the
              better end of its window) gives μ*'s 95 % interval (percentiles; an end of the swept range
              means "this far or beyond"; none for a budget of only 3 μ_rec, which every resample fits exactly),
              and the laws across budgets those of a, b and α.
  across C    μ* = k·C^a and D* = k'·C^b (least squares in log-log); L* = E + A·C^(−α): for each α the
              law is linear in E and A, so loops.fit_exponential scans α as it scans z (on ln C/C_min).
  parametric  the paper's L = E + A·N^(−α) + B·D^(−β) over every Parcae run, N = N(μ_rec) the unrolled
              model's non-embedding parameters (prelude, coda and C once, the core and the injection
              μ_rec times): for each (α, β) of a grid it is linear in (E, A, B); Levenberg–Marquardt
              refines the best point. Fitted again without the largest budget, it predicts that budget's
              runs: its error there is the law's test. Its optimum μ_rec at each C: min over μ_rec of
              L(N(μ_rec), C / F(μ_rec)).
  test time   L(T) = L∞ + Z·exp(−z·T) per checkpoint (loops.fit_exponential), then whether one law
              describes them all: z = k·μ_rec^(−β) (log-log) and L∞ = E + A·C^(−α) (pooled over μ_rec),
              each with its R² and the share of the spread that μ_rec alone or C alone explains. It
              holds here if both R² reach 0.9 (our bar); z pinned at an end of the scan, or a curve that
              rises (Z ≤ 0), is left out.

Over several GPU jobs. Runs resume one by one (common.run_all): a run that ended with the same settings
is not trained again; nor is a run that an earlier record holds as finished (with the same settings and
corpus): the records are every scaling*.json in bench/results (the committed sweep) and in --results_dir.
So a job on a fresh machine, which has lost the run folders, trains only its own runs. Each call trains
the runs of --only (all, without it), and the runs that their results make due (extensions, second
seeds); after every run that ends, and at the end, it writes the report of every finished run, earlier
records included: scaling.json, scaling.md, scaling_isoflop.png, scaling_laws.png and
scaling_testtime.png in --results_dir. A job killed at its time limit keeps the runs it finished. To
continue the sweep, copy a job's files over bench/results/ and commit them; two jobs run from the same
commit each hold only their own new runs: keep the second's scaling.json as bench/results/scaling_<job>.json
(it is read as a record too) and run --report_only to merge them into scaling.json.
"""

import fnmatch
import glob
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
import prepare  # noqa: E402  (the byte vocabulary, to plan without the corpus)
import train  # noqa: E402  (its settings, and the release config's)

LOOPS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32]      # test-time depths of every looped run
TEST_TIME_R2 = 0.98     # a checkpoint's L(T) saturates exponentially when the fit explains this much of it
LAW_R2 = 0.9            # our bar for a law across checkpoints
PAPER = {"a": 0.40, "b": 0.78}   # μ* ∝ C^0.40, D* ∝ C^0.78 (MODEL.md section 9)
SEED = train.SETTINGS["seed"]    # the first seed; second seeds are SEED + 1
SEEDED_BUDGETS, SEEDED_RUNS = 2, 3      # second seeds: the 3 μ_rec nearest the optimum of the 2 largest budgets
WINDOW = 4      # a budget's parabola: over the 4 swept μ_rec nearest (in ln μ_rec) its lowest mean loss
# Muon's momentum warm-up takes the same share of every run as of the release's 140m run
RELEASE = train.parse_settings([os.path.join(common.ROOT, "config", "parcae_140m.py")])
MOMENTUM_WARMUP_SHARE = RELEASE["momentum_warmup_iters"] / RELEASE["max_iters"]

# per preset of common.py: train.py settings on top of the preset's, the layers, the sweep (μ_rec at every
# budget, and the deeper ones a budget gets while its lowest loss is at its deepest), runs at a time on a GPU,
# the time model until runs have measured it (flops_per_sec of all runs on one GPU together, and each run's
# startup_s), and job_seconds, the longest GPU job the plan packs
SCALING = {
    # seconds on a CPU, for the tests: it checks that the pipeline runs, not the science
    "tiny": {"train": dict(eval_iters=2), "layers": (1, 1, 1), "mean_loops": [1, 2, 4], "extend": [6],
             "budgets": [2.5e8, 5e8, 1e9], "parallel": 4, "flops_per_sec": 1e9, "startup_s": 3, "job_seconds": 60,
             "report_s": 5},
    # one H200: the plan of the docstring. 8 validation batches of 128 (524k tokens, the same for every run,
    # seed and T, so comparisons are paired) at the 13 depths cost a looped run 1.7e14 FLOPs: 3 % of the
    # sweep's, though 40 % of the smallest budget's training.
    # data_dir and prepare: the corpus, made afresh on each GPU machine; prepare_s, report_s: a job's
    # time besides training, with a margin (prepare.py read 245 MB of the same kinds of files in 9 s on 2
    # shared CPU cores; the report of 18 runs with 1000 resamples took 3-10 s there)
    "small": {"train": dict(n_embd=256, n_head=2, batch_size=128, grad_accum_steps=1, compile=True, eval_iters=8,
                            graph_iterations=True),
              "layers": (1, 1, 1), "mean_loops": [1, 2, 3, 4, 6, 8], "extend": [12, 16, 24],
              "budgets": [4.4e14, 1.05e15, 2.5e15, 5.9e15, 1.4e16], "parallel": 4, "flops_per_sec": 1.5e14,
              "startup_s": 40, "job_seconds": 510, "report_s": 10, "prepare_s": 60,
              "data_dir": "data/src", "tokenizer": "byte",
              "prepare": "python prepare.py --input \"$(python -c 'import site; print(site.getsitepackages()[0])')\" "
                         "/usr/include --suffix .py .h .hpp --tokenizer byte --name src"},
}
RESULTS = os.path.join(common.ROOT, "bench", "results")     # where the committed sweep lies


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    runs = plan(args)
    args.startup, args.rate, args.measured = time_model(runs, args)
    print_plan(runs, args)
    selected(runs, args.only, warn=True)
    if args.dry_run:
        print_jobs(runs, args)
        return None
    trained = [] if args.report_only else train_due(runs, args, argv)
    results = report(args, argv, trained)
    print(markdown(results))
    print_jobs(plan(args), args)
    return results


def report(args, argv, calls):
    """Fit and plot every finished run (this call's, and those the earlier records hold) into --results_dir."""
    results = collect(args, plan(args), argv, calls)
    common.write_results(args.results_dir, "scaling", results, markdown)
    plot_isoflop(results, os.path.join(args.results_dir, "scaling_isoflop.png"))
    plot_laws(results, os.path.join(args.results_dir, "scaling_laws.png"))
    plot_test_time(results, os.path.join(args.results_dir, "scaling_testtime.png"))
    return results


def parse(argv):
    """The command line, the preset's sweep, the corpus's fingerprint and what scaling.json records of it."""
    p = common.parser(__doc__, data_dir_required=False)
    p.add_argument("--only", nargs="+", metavar="NAME", help="train only these runs (names, or patterns such as "
                   "'*_C1.4e+16'); the report still covers every finished run")
    p.add_argument("--loops", nargs="+", type=int, default=LOOPS, help="test-time depths T of every looped run")
    p.add_argument("--lr", type=float, default=8e-3, help="the learning rate of every run")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the confidence intervals")
    p.add_argument("--report_only", action="store_true", help="fit and plot the finished runs, train nothing")
    args = p.parse_args(argv)
    parallel = args.parallel
    if args.preset not in SCALING:
        raise SystemExit(f"bench/scaling.py has no sweep for preset {args.preset!r}: choose {' or '.join(SCALING)}")
    sweep = SCALING[args.preset]
    args.data_dir = args.data_dir or sweep.get("data_dir")
    if not args.data_dir:
        raise SystemExit(f"bench/scaling.py --preset {args.preset}: give --data_dir, a folder made by prepare.py")
    here = os.path.exists(os.path.join(args.data_dir, "meta.json"))
    # a plan or a report needs only the runs' records; training needs the tokens
    if not here and not (args.dry_run or args.report_only) and "prepare" in sweep:
        raise SystemExit(f"{args.data_dir}/meta.json not found: prepare the sweep's corpus first, {sweep['prepare']}")
    args = common.finish_args(args, need_data=not (args.dry_run or args.report_only) or "tokenizer" not in sweep)
    args.scaling = sweep
    args.parallel = parallel or sweep["parallel"]
    records = earlier_records(args.results_dir)
    args.corpus = corpus(args.data_dir, args.meta) if args.meta else recorded_corpus(records, args.data_dir, sweep)
    args.meta = args.meta or {"vocab_size": args.corpus["vocab_size"], "train_tokens": args.corpus["train_tokens"]}
    args.ledger, args.calls = ledger(records, args.corpus)
    return args


def train_due(runs, args, argv):
    """Train the selected runs that have not ended, then those their results make due, until none is left.
    Records each round as a call: its runs, their FLOPs (training and evaluation) and its wall time. The
    report is written again after every run that ends, so a job stopped at its time limit keeps the runs it
    finished (its call then counts only their FLOPs over the time so far: an underestimate of the rate)."""
    trained, tried = [], set()
    while True:
        todo = [r for r in selected(runs, args.only) if not ended(r, args.ledger) and r["name"] not in tried]
        if not todo:
            return trained
        tried |= {r["name"] for r in todo}      # a run that failed is not tried again in this call
        t0, ended_here = time.time(), []

        def call(names):
            seconds = time.time() - t0
            work = sum(r["flops"] + r["eval_flops"] for r in todo if r["name"] in names)
            return {"runs": names, "flops": work, "seconds": round(seconds, 1), "flops_per_sec": work / seconds,
                    "parallel": args.parallel, **common.environment()}

        def on_finish(name):
            ended_here.append(name)
            report(args, argv, trained + [call(ended_here)])
        common.run_all([(r["name"], r["settings"]) for r in todo], args.parallel, args.gpus, on_finish=on_finish)
        trained.append(call([r["name"] for r in todo]))
        c = trained[-1]
        print(f"trained {len(todo)} runs, {c['flops']:.3g} FLOPs with evaluation, in {c['seconds']:.0f} s: "
              f"{c['flops_per_sec']:.3g} FLOP/s over all runs, start-ups included")
        runs = plan(args)
        args.startup, args.rate, args.measured = time_model(runs, args)


def selected(runs, patterns, warn=False):
    if not patterns:
        return runs
    for pattern in patterns if warn else ():
        if not any(fnmatch.fnmatchcase(r["name"], pattern) for r in runs):
            print(f"--only {pattern}: no run of the sweep has this name (yet)")
    return [r for r in runs if any(fnmatch.fnmatchcase(r["name"], pattern) for pattern in patterns)]

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


def param_counts(model):
    """(non-embedding parameters, those of them that loop): the token and value-embedding tables cost no
    matmul and are left out; the core blocks and the injection run μ_rec times."""
    embedding = lambda name: name.startswith("wte") or "value_embed" in name
    total = sum(p.numel() for n, p in model.named_parameters() if not embedding(n))
    looped = (sum(p.numel() for n, p in model.named_parameters() if n.startswith(("core.", "injection."))
                  and not embedding(n)) if model.config.looped else 0)
    return total, looped


def eval_flops(settings, vocab_size):
    """FLOPs of a run's evaluation at its end, at each of its depths. A forward pass costs a third of the
    training FLOPs of the same model with gradient through every iteration (backward = 2 × forward)."""
    model = common.meta_model({**settings, "backprop_loops": max(settings["eval_loops"])}, vocab_size)
    forward = sum(model.flops_per_token(loops=T) for T in (settings["eval_loops"] if model.config.looped else [1])) / 3
    return settings["eval_iters"] * settings["batch_size"] * settings["block_size"] * forward


def make_run(args, C, mu, seed=SEED):
    """One run of the sweep: the Transformer (mu None) or Parcae at μ_rec mu, at budget C, with a seed."""
    scaling, vocab = args.scaling, args.meta["vocab_size"]
    model = "gpt" if mu is None else "parcae"
    name = (f"gpt_C{C:.3g}" if mu is None else f"parcae_mu{mu}_C{C:.3g}") + ("" if seed == SEED else f"_seed{seed - SEED + 1}")
    preset = dict(args.preset, train={**args.preset["train"], **scaling["train"]}, layers=scaling["layers"],
                  evals=1, mean_loops=mu or 1, backprop_loops=math.ceil((mu or 1) / 2))

    def settings(tokens):
        s = common.run_settings(preset, model, args.lr, tokens, args.data_dir,
                                os.path.join(args.work_dir, "scaling", name), args.overrides, save_checkpoint=True)
        for key, value in (("seed", seed), ("log_interval", max(1, s["max_iters"] // 100)),
                           ("momentum_warmup_iters", max(1, round(MOMENTUM_WARMUP_SHARE * s["max_iters"])))):
            if key not in args.overrides:
                s[key] = value
        if mu is not None:
            s["eval_loops"] = sorted(set(args.loops) | {mu})
        return s
    flops_per_token = expected_flops_per_token(common.meta_model(settings(1), vocab))
    s = settings(C / flops_per_token)       # the token budget rounds to whole steps
    meta = common.meta_model(s, vocab)
    non_embedding, looped = param_counts(meta)
    tokens = common.tokens_of(s)
    return {"name": name, "model": model, "mu": mu, "mu_bwd": preset["backprop_loops"] if mu else None,
            "budget": C, "seed": seed, "flops_per_token": flops_per_token, "tokens": tokens,
            "flops": flops_per_token * tokens, "eval_flops": eval_flops(s, vocab), "params": meta.num_params(),
            "non_embedding_params": non_embedding, "looped_params": looped,
            "tokens_per_param": tokens / non_embedding, "settings": s}


def plan(args):
    """Every run of the sweep as far as the results so far say: at each budget the Transformer and Parcae at
    each μ_rec, deeper ones while a budget's lowest loss is at its deepest, then the second seeds."""
    scaling = args.scaling
    runs = [make_run(args, C, mu) for C in scaling["budgets"] for mu in [None, *scaling["mean_loops"]]]
    for C in sorted(scaling["budgets"], reverse=True):
        while True:     # one deeper μ_rec at a time, as long as the deepest is the best
            first = [r for r in runs if r["budget"] == C and r["mu"] and r["seed"] == SEED]
            if not all(ended(r, args.ledger) for r in first):
                break       # wait for them
            losses = {r["mu"]: loss for r in first if (loss := val_loss(r, args.ledger)) is not None}
            deeper = [mu for mu in scaling["extend"] if mu > max(r["mu"] for r in first)]
            if len(losses) < 3 or not deeper or min(losses, key=losses.get) != max(r["mu"] for r in first):
                break
            runs.append(make_run(args, C, deeper[0]))
        if C in sorted(scaling["budgets"])[-SEEDED_BUDGETS:] and all(ended(r, args.ledger) for r in first) \
                and len(losses) >= 3:
            best = fit_budget(C, list(losses.items()))["mu_best"]
            nearest = sorted(losses, key=lambda mu: (abs(math.log(mu / best)), mu))[:SEEDED_RUNS]
            # and those an earlier plan placed (another optimum then) that have run: they stay in the report
            nearest += [mu for mu in losses if mu not in nearest and ended(make_run(args, C, mu, SEED + 1), args.ledger)]
            runs += [make_run(args, C, mu, SEED + 1) for mu in sorted(nearest)]
    return runs


def val_loss(run, recorded):
    """The run's final validation loss at T = μ_rec if it finished (here, or in a call scaling.json records);
    None if it has not, or diverged."""
    summary = common.summarize(run["settings"]["out_dir"], run["settings"])
    if summary["status"] == "finished":
        return summary["final_val_loss"]
    r = recorded.get(key(run))
    return r["val_loss"] if r else None


def key(run):
    """What makes two runs the same: their settings, but not where their folder is (a GPU machine's checkout
    may lie elsewhere from one call to the next)."""
    return json.dumps({k: v for k, v in run["settings"].items() if k != "out_dir"}, sort_keys=True)


def earlier_records(results_dir):
    """What earlier calls recorded: every scaling*.json in bench/results (the committed sweep) and in
    --results_dir (a GPU job's $OUT, say)."""
    paths = sorted({os.path.realpath(p) for folder in (RESULTS, results_dir)
                    for p in glob.glob(os.path.join(folder, "scaling*.json"))})
    return [common.read_json(p) for p in paths]


def recorded_corpus(records, data_dir, sweep):
    """The corpus as the records of this data_dir describe it, when its files are not here (a plan made on
    another machine than the GPU's); before any record, only its vocabulary is known."""
    for r in records:
        if r.get("data", {}).get("data_dir") == data_dir:
            return r["data"]
    return {"data_dir": data_dir, "tokenizer": sweep["tokenizer"], "vocab_size": prepare.BYTE_EOT + 1,
            "source": None, "train_tokens": None, "train_sha256": None, "val_tokens": None, "val_sha256": None}


def ledger(records, data):
    """What earlier calls recorded (earlier_records): their finished runs, by their settings, and the calls
    that trained them (their FLOP rates). A GPU machine does not keep the run folders from one job to the
    next: the sweep continues from these records instead of training those runs again (their checkpoints
    are not in them, their results are). Records of another corpus count for nothing (a new sweep
    replaces them), and the same data_dir holding other tokens is refused."""
    runs, calls = {}, []
    for earlier in records:
        if earlier.get("data", {}).get("data_dir") != data["data_dir"]:
            continue
        if data["train_sha256"] and earlier["data"]["train_sha256"] != data["train_sha256"]:
            raise SystemExit(f"scaling.json's runs trained on another {data['data_dir']} (train.bin sha256 "
                             f"{earlier['data']['train_sha256'][:12]}… there, {data['train_sha256'][:12]}… here): "
                             "prepare the same corpus, or give another --data_dir or --results_dir")
        for r in earlier.get("runs", []):
            if r["status"] == "finished":
                runs.setdefault(key(r), r)
        calls += [c for c in earlier.get("calls", []) if c not in calls]
    return runs, calls


def ended(run, recorded=()):
    """Whether the run needs no training: common.run_all would skip it, or an earlier call recorded it."""
    done = common.run_status(run["settings"]["out_dir"])
    return (bool(done) and done["settings"] == run["settings"] and done["status"] in ("finished", "diverged")
            or key(run) in recorded)


def measured_rate(calls):
    """FLOPs per second over all runs on the GPU, start-ups included, over every call that trained."""
    seconds = sum(c["seconds"] for c in calls)
    return sum(c["flops"] for c in calls) / seconds if seconds else None


def time_model(runs, args):
    """(start-up seconds, FLOP/s over all runs on the GPU, measured) for the time estimates. A run's wall
    time is about its start-up (Python, compiling, the first steps) plus its FLOPs at a parallel-th of the
    GPU's rate: least squares over the finished runs whose wall times are known, once there are 4 and the
    largest has at least twice the smallest's FLOPs (measured True; one budget's runs, all about the same
    size, leave the slope to their noise); until then the preset's guesses."""
    known = [(r["flops"] + r["eval_flops"], wall) for r in runs if (wall := wall_seconds(r, args.ledger))]
    works = [work for work, _ in known]
    if len(works) >= 4 and max(works) >= 2 * min(works):
        slope, startup = np.polyfit(*zip(*known), 1)
        if slope > 0 and startup >= 0:
            return float(startup), args.parallel / float(slope), True
    return args.scaling["startup_s"], args.scaling["flops_per_sec"], False


def wall_seconds(run, recorded):
    """How long the run took, if it finished (its run folder, or scaling.json's record of it)."""
    done = common.run_status(run["settings"]["out_dir"])
    if done and done["settings"] == run["settings"] and done["status"] == "finished":
        return done["wall_s"]
    r = recorded.get(key(run))
    return r["wall_s"] if r else None


def run_seconds(run, args):
    """A run's expected wall time sharing the GPU with args.parallel - 1 others (time_model)."""
    return args.startup + (run["flops"] + run["eval_flops"]) * args.parallel / args.rate


def makespan(runs, args):
    """Seconds until the last of these runs ends, started as common.run_all starts them (most tokens
    first, args.parallel at a time), each at its run_seconds."""
    slots = [0.0] * args.parallel
    for r in sorted(runs, key=lambda r: -r["tokens"]):
        i = slots.index(min(slots))
        slots[i] += run_seconds(r, args)
    return max(slots)


def jobs(runs, args):
    """The runs packed into GPU jobs of at most job_seconds (job_time): the longest first, each into the
    first job where it fits. A run longer than that gets a job of its own, whose free parallel slots
    take runs that end no later than it does."""
    def fits(job, r):
        return job_time(job + [r], args) <= args.scaling["job_seconds"] or \
            (len(job) < args.parallel and makespan(job + [r], args) <= makespan(job, args))
    out = []
    for r in sorted(runs, key=lambda r: -run_seconds(r, args)):
        fit = next((job for job in out if fits(job, r)), None)
        if fit is None:
            out.append([r])
        else:
            fit.append(r)
    return out


def print_plan(runs, args):
    train_tokens, scaling = args.meta["train_tokens"], args.scaling
    print(f"isoFLOP sweep, preset {args.preset_name}: {len(scaling['budgets'])} budgets × (the Transformer + "
          f"μ_rec {', '.join(map(str, scaling['mean_loops']))}), deeper while the deepest is best, second seeds "
          f"near the optimum of the {SEEDED_BUDGETS} largest: {len(runs)} runs planned so far; times: a "
          f"{args.startup:.0f} s start-up, then {args.rate:.3g} FLOP/s over {args.parallel} runs at a time ("
          + ("measured from the finished runs)" if args.measured else "the preset's guess, until runs measure it)"))
    if not train_tokens:
        print(f"  {args.data_dir} is not here and no record describes it yet: epochs are unknown")
    print(f"  {'run':<28} {'μ_bwd':>5} {'FLOPs/token':>11} {'tokens':>7} {'per param':>9} {'steps':>6} "
          f"{'epochs':>6} {'FLOPs':>9} {'GPU s':>6}  status")
    for r in runs:
        done = ended(r, args.ledger)
        print(f"  {r['name']:<28} {r['mu_bwd'] or '–':>5} {r['flops_per_token']:>11.4g} "
              f"{common.fmt_tokens(r['tokens']):>7} {r['tokens_per_param']:>9.1f} {r['settings']['max_iters']:>6} "
              f"{r['tokens'] / train_tokens if train_tokens else math.nan:>6.2f} {r['flops'] + r['eval_flops']:>9.3g} "
              f"{run_seconds(r, args):>6.0f}  " + ("done" if done else "to train"))
    top = max(r["tokens"] / train_tokens for r in runs) if train_tokens else 0
    if top > 1.5:
        print(f"  warning: a run reads {top:.2f} epochs of the training split (the plan keeps to about 1.5)")


def job_command(job, args):
    """One GPU job as one shell command: make the corpus unless the machine still has it, train the job's
    runs, and write the report of every run so far (the committed ones and these) into $OUT."""
    sweep, data = args.scaling, args.data_dir
    options = ([] if args.preset_name == "small" else ["--preset", args.preset_name]) \
        + ([] if data == sweep.get("data_dir") else ["--data_dir", data])
    train = shlex.join(["python", "bench/scaling.py", *options])
    make = f"{{ [ -f {shlex.quote(data)}/meta.json ] || {sweep['prepare']}; }} && " if "prepare" in sweep else ""
    return f"{make}{train} --results_dir \"$OUT\" --only {' '.join(sorted(r['name'] for r in job))}"


def job_time(job, args, slower=1):
    """A job's expected wall time: the corpus, its runs as run_all starts them (on a GPU `slower` times
    slower than the time model says), and a report after each."""
    return args.scaling.get("prepare_s", 0) + slower * makespan(job, args) + args.scaling["report_s"] * (len(job) + 1)


def print_jobs(runs, args):
    todo = sorted((r for r in runs if not ended(r, args.ledger)), key=lambda r: run_seconds(r, args))
    limit, first = args.scaling["job_seconds"], []
    if not args.measured:
        # the time model is a guess: the first job takes the smallest runs, as many as still end within a
        # job on a GPU 3 times slower than guessed; they measure the model for the others
        while len(first) < len(todo) and (not first or job_time(todo[:len(first) + 1], args, slower=3) <= limit):
            first = todo[:len(first) + 1]
    # the job of the smallest runs first: it measures the time model at the least risk
    packed = ([first] if first else []) + sorted(jobs(todo[len(first):], args),
                                                 key=lambda job: max(run_seconds(r, args) for r in job))
    print(f"left: {len(todo)} runs, {sum(r['flops'] + r['eval_flops'] for r in todo):.3g} FLOPs, in {len(packed)} "
          f"GPU job(s) of at most {limit} s" + ("" if args.measured else " (the time model is a guess until the "
                                                "first job measures it: plan again after committing its results)")
          + "; each writes the report of every run so far into $OUT:")
    for i, job in enumerate(packed, 1):
        over = job_time(job, args) > limit
        print(f"  job {i}, {len(job)} runs, about {job_time(job, args):.0f} s" + (f" (over the {limit} s of a "
              "job: it may not end within a device call)" if over else "") + f":\n    {job_command(job, args)}")
    pending = [C for C in sorted(args.scaling["budgets"])[-SEEDED_BUDGETS:]
               if not any(r["budget"] == C and r["seed"] != SEED for r in runs)]
    if pending:
        print(f"  then: second seeds at C = {', '.join(f'{C:.3g}' for C in pending)}, planned once their budgets' "
              "runs are done (the dry run then lists them)")

# -----------------------------------------------------------------------------
# the report


def collect(args, runs, argv, trained):
    vocab = args.meta["vocab_size"]
    calls = args.calls + trained
    out = {"preset": args.preset_name, "environment": common.environment(),
           "command": "python bench/scaling.py " + shlex.join(argv), "data": args.corpus, "lr": args.lr,
           "layers": list(args.scaling["layers"]), "budgets": args.scaling["budgets"],
           "mean_loops": sorted({r["mu"] for r in runs if r["mu"]}), "loops": args.loops,
           "backprop_loops": "ceil(mean_loops / 2)", "seeds": [SEED, SEED + 1],
           "momentum_warmup": f"{MOMENTUM_WARMUP_SHARE:.4f} of each run's steps (the release's 300 of 21,400)",
           "flops_per_token": "expected training matmul FLOPs per token over T = max(1, Poisson(mean_loops)), "
                              "head and causal attention included (bench/scaling.py expected_flops_per_token)",
           "calls": calls, "flops_per_sec": measured_rate(calls),
           "runs": [run_result(r, args.meta["train_tokens"], args.ledger.get(key(r))) for r in runs]}
    done = [r for r in out["runs"] if r["model"] == "parcae" and r["val_loss"] is not None]
    flops_at = interpolate_flops({r["mu"]: r["flops_per_token"] for r in out["runs"] if r["mu"]})
    points = {C: [(r["mu"], r["val_loss"], r["seed"]) for r in done if r["budget"] == C] for C in out["budgets"]}
    fits = {C: fit_budget(C, pts, flops_at) for C, pts in points.items() if len({p[0] for p in pts}) >= 3}
    ci = bootstrap({C: points[C] for C in fits}, flops_at, args.bootstrap)
    out["parametric"] = parametric_law(done, flops_at, out["budgets"])
    out["isoflop"] = []
    for C in out["budgets"]:
        gpt = next((r["val_loss"] for r in out["runs"] if r["model"] == "gpt" and r["budget"] == C), None)
        law = out["parametric"]["mu_star"].get(f"{C:.6g}") if out["parametric"] else None
        out["isoflop"].append({"budget": C, "gpt_loss": gpt, "fit": fits.get(C), "mu_star_law": law,
                               "mu_star_ci95": ci["mu_star"][C] if C in fits else None})
    out["laws"] = fit_laws(list(fits.values()))
    out["bootstrap"] = {k: v for k, v in ci.items() if k != "mu_star"}
    out["seed_noise"] = seed_noise(done)
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


def run_result(run, train_tokens, recorded=None):
    s = run["settings"]
    summary = common.summarize(s["out_dir"], s)
    if summary["status"] != "finished" and recorded:        # trained in an earlier call, on another machine
        return recorded
    _, evals, _ = common.read_metrics(s["out_dir"])
    losses = evals[-1]["val_loss"] if summary["status"] == "finished" else {}
    finite = sorted((int(T), L) for T, L in losses.items() if L is not None)
    fit = loops.fit_exponential(*zip(*finite)) if run["mu"] and len(finite) >= 3 else None
    return {**{k: v for k, v in run.items() if k != "settings"}, "steps": s["max_iters"],
            "epochs": run["tokens"] / train_tokens if train_tokens else None, "status": summary["status"], "diverged": summary["diverged"],
            "wall_s": summary["wall_s"], "val_loss": summary["final_val_loss"], "losses": losses,
            "test_time_fit": fit, "out_dir": s["out_dir"], "settings": s}


def interpolate_flops(table):
    """F(μ) between the swept μ_rec, linear in log-log: {μ_rec: FLOPs per token} -> a function."""
    mus = sorted(table)
    x, y = np.log(mus), np.log([table[m] for m in mus])
    return lambda mu: float(np.exp(np.interp(math.log(mu), x, y)))


def fit_budget(C, points, flops_at=None):
    """One budget's parabola of loss in ln μ_rec over the WINDOW swept μ_rec nearest its lowest loss, with
    an offset for each seed but the first, and μ*, D*, L* from it (see the module docstring); points are
    (μ_rec, loss) or (μ_rec, loss, seed); D* needs F(μ), flops_at."""
    points = [(p[0], p[1], p[2] if len(p) > 2 else SEED) for p in points]
    swept = sorted({mu for mu, _, _ in points})
    first = min(seed for _, _, seed in points)
    own = [(mu, loss) for mu, loss, seed in points if seed == first]
    mean = {mu: np.mean([loss for m, loss in own if m == mu]) for mu in {mu for mu, _ in own}}
    lowest = min(mean, key=mean.get)
    window = sorted(swept, key=lambda mu: (abs(math.log(mu / lowest)), mu))[:WINDOW]
    mus, losses, seeds = map(np.array, zip(*[p for p in points if p[0] in window]))
    x = np.log(mus)
    others = sorted(set(seeds.tolist()) - {first})
    X = np.stack([x ** 2, x, np.ones_like(x)] + [(seeds == seed).astype(float) for seed in others], axis=1)
    if np.linalg.matrix_rank(X) < X.shape[1]:       # an offset these runs cannot tell from the parabola
        X, others = X[:, :3], []
    solution = np.linalg.lstsq(X, losses, rcond=None)[0]
    coef = solution[:3]                             # the first seed's curve
    lo, hi = x.min(), x.max()
    vertex = -coef[1] / (2 * coef[0]) if coef[0] > 0 else None
    inside = vertex is not None and lo <= vertex <= hi
    best = vertex if inside else min((lo, hi), key=lambda v: np.polyval(coef, v))
    mu_star = math.exp(best) if inside else None
    return {"budget": C, "swept": swept, "mu": mus.tolist(), "loss": losses.tolist(), "seed": seeds.tolist(),
            "coef": coef.tolist(), "seed_offsets": {int(s): float(v) for s, v in zip(others, solution[3:])},
            "mu_star": mu_star, "D_star": C / flops_at(mu_star) if inside and flops_at else None,
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
    """95 % intervals from resampling the runs (and seeds) within each budget ({C: [(μ, loss, seed)]}): each
    budget's optimum (its vertex, or the better end of the resample's range), and the laws' a, b and α."""
    rng = np.random.default_rng(seed)
    optimum = {C: [] for C in points}
    draws = {"a": [], "b": [], "alpha": []}
    for _ in range(resamples):
        fits = []
        for C, pts in points.items():
            while True:     # a parabola needs 3 distinct μ_rec
                pick = [pts[i] for i in rng.integers(0, len(pts), len(pts))]
                if len({p[0] for p in pick}) >= 3:
                    break
            fits.append(fit_budget(C, pick, flops_at))
            optimum[C].append(fits[-1]["mu_best"])
        laws = fit_laws(fits)
        for name, law, field in (("a", "mu_star", "exponent"), ("b", "D_star", "exponent"),
                                 ("alpha", "L_star", "alpha")):
            if laws[law]:
                draws[name].append(laws[law][field])
    interval = lambda v: np.percentile(v, [2.5, 97.5]).tolist() if v else None
    # a parabola through 3 points fits them exactly, and a resample of 3 distinct μ_rec is those 3 again:
    # its interval would have no width whatever the noise, so a budget needs 4 distinct μ_rec for one
    spread = {C: len({p[0] for p in pts}) >= 4 for C, pts in points.items()}
    return {"resamples": resamples, "seed": seed,
            "mu_star": {C: interval(v) if spread[C] else None for C, v in optimum.items()},
            **{name: {"ci95": interval(v), "used": len(v)} for name, v in draws.items()}}


def fit_parametric(N, D, L):
    """
    L = E + A·N^(−α) + B·D^(−β) by least squares. In units of the smallest N and D (n = N / N_min, so
    A = a·N_min^α, and the same for D) the columns are of order 1. For fixed (α, β) the law is linear in
    (E, a, b): a 60 × 60 log grid over [0.02, 3] finds the best pair, then Levenberg–Marquardt refines all
    five from there (exact data converge to the last digits), α and β kept within the grid's range: with
    few runs, or runs that do not tell N from D apart, an exponent would otherwise run off to overflow.
    """
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    n, d = N / N.min(), D / D.min()
    ln_n, ln_d = np.log(n), np.log(d)

    def linear(alpha, beta):
        X = np.stack([np.ones_like(L), n ** -alpha, d ** -beta], axis=1)
        coef = np.linalg.lstsq(X, L, rcond=None)[0]
        return coef, float(((X @ coef - L) ** 2).sum())

    grid = np.geomspace(0.02, 3.0, 60)
    alpha, beta = min(((a, b) for a in grid for b in grid), key=lambda ab: linear(*ab)[1])
    E, a, b = linear(alpha, beta)[0]
    p = np.array([E, a, alpha, b, beta])

    def residual(p):
        return p[0] + p[1] * n ** -p[2] + p[3] * d ** -p[4] - L
    r = residual(p)
    sse, damping = float(r @ r), 1e-3
    for _ in range(500):            # until a step, however damped, no longer lowers the squared error
        E, a, alpha, b, beta = p
        J = np.stack([np.ones_like(L), n ** -alpha, -a * ln_n * n ** -alpha, d ** -beta, -b * ln_d * d ** -beta], 1)
        JtJ = J.T @ J
        step = np.linalg.lstsq(JtJ + damping * np.diag(np.diag(JtJ)), -J.T @ r, rcond=None)[0]
        inside = all(grid[0] <= v <= grid[-1] for v in (p[2] + step[2], p[4] + step[4]))
        r_new = residual(p + step) if inside else None
        if inside and float(r_new @ r_new) < sse:
            p, r, sse, damping = p + step, r_new, float(r_new @ r_new), max(damping / 10, 1e-12)
        elif damping > 1e10:
            break
        else:
            damping *= 10
    E, a, alpha, b, beta = p.tolist()
    return {"E": E, "A": a * N.min() ** alpha, "alpha": alpha, "B": b * D.min() ** beta, "beta": beta,
            "r2": r_squared(L, L + r), "rmse": math.sqrt(sse / len(L)), "n": len(L)}


def predict(law, N, D):
    return law["E"] + law["A"] * np.asarray(N, dtype=float) ** -law["alpha"] + law["B"] * np.asarray(D, dtype=float) ** -law["beta"]


def unrolled_params(run):
    """N(μ_rec): the unrolled model's non-embedding parameters, the looped ones counted μ_rec times."""
    return run["non_embedding_params"] + (run["mu"] - 1) * run["looped_params"]


def parametric_law(runs, flops_at, budgets):
    """The paper's law over the Parcae runs; refitted without the largest budget, its error there; and
    the μ_rec it puts the optimum at, at each budget (a log grid of 200 over the swept μ_rec)."""
    if len({r["budget"] for r in runs}) < 3 or len(runs) < 8:
        return None
    fit = lambda rs: fit_parametric([unrolled_params(r) for r in rs], [r["tokens"] for r in rs],
                                    [r["val_loss"] for r in rs])
    law = fit(runs)
    top = max(r["budget"] for r in runs)
    rest, held = [r for r in runs if r["budget"] < top], [r for r in runs if r["budget"] == top]
    without = fit(rest)
    error = predict(without, [unrolled_params(r) for r in held], [r["tokens"] for r in held]) - [r["val_loss"] for r in held]
    mus = np.geomspace(min(r["mu"] for r in runs), max(r["mu"] for r in runs), 200)
    once, looped = runs[0]["non_embedding_params"] - runs[0]["looped_params"], runs[0]["looped_params"]
    mu_star = {}
    for C in budgets:
        L = predict(law, once + mus * looped, [C / flops_at(mu) for mu in mus])
        mu_star[f"{C:.6g}"] = float(mus[int(np.argmin(L))])
    return {**law, "left_out": {"budget": top, "fit": without, "runs": len(held),
                                "rmse": float(np.sqrt(np.mean(error ** 2))), "max_abs": float(np.abs(error).max()),
                                "mean": float(error.mean())},
            "mu_star": mu_star}


def seed_noise(runs):
    """The runs trained with two seeds: their differences, the seed noise σ of one run's loss they imply,
    √(mean difference² / 2), and their mean with the σ left about it: a seed fixes the training batches
    of all its runs, so part of a difference can be a shift of that seed's whole curve."""
    by = {}
    for r in runs:
        by.setdefault((r["budget"], r["mu"]), {})[r["seed"]] = r["val_loss"]
    pairs = [{"budget": C, "mu": mu, "losses": [v[s] for s in sorted(v)], "difference": v[SEED + 1] - v[SEED]}
             for (C, mu), v in sorted(by.items()) if len(v) == 2]
    d = np.array([p["difference"] for p in pairs])
    sigma = math.sqrt(float((d ** 2).sum()) / (2 * len(d))) if len(d) else None
    about = math.sqrt(float(((d - d.mean()) ** 2).sum()) / (2 * (len(d) - 1))) if len(d) > 1 else None
    return {"pairs": pairs, "sigma": sigma, "mean": float(d.mean()) if len(d) else None, "sigma_about_mean": about}


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
    """Plain-language answers: looping and data in tandem? does looping pay? one parametric law? the test-time law?"""
    laws, ci, tt, budgets = results["laws"], results["bootstrap"], results["test_time"], results["isoflop"]
    out = {}
    for name, k, law in (("mu_star", "a", laws["mu_star"]), ("D_star", "b", laws["D_star"])):
        interval = ci[k]["ci95"] if law else None
        out[name] = trend(interval)
        out[name + "_text"] = (f"exponent {law['exponent']:.2f}, 95 % interval [{interval[0]:.2f}, {interval[1]:.2f}], "
                               f"over {law['n']} budgets; the paper's {PAPER[k]} is "
                               f"{'inside' if interval[0] <= PAPER[k] <= interval[1] else 'outside'} it"
                               if law and interval else "fewer than 2 budgets have their minimum inside the swept μ_rec")
    out["tandem"] = out["mu_star"] == out["D_star"] == "grows with C"
    # looping pays at C when the whole interval of μ* lies above 1 (fixed depth) and L* is below the Transformer's
    loop_pays = [b["budget"] for b in budgets if b["mu_star_ci95"] and b["mu_star_ci95"][0] > 1]
    beats = [b["budget"] for b in budgets if b["fit"] and b["gpt_loss"] is not None and b["fit"]["L_star"] < b["gpt_loss"]]
    out["looping_pays_at"], out["beats_transformer_at"] = loop_pays, beats
    out["looping_text"] = (f"μ* > 1 at 95 % at {len(loop_pays)} of {sum(1 for b in budgets if b['fit'])} budgets"
                           + (f" (C = {', '.join(f'{C:.3g}' for C in loop_pays)})" if loop_pays else "")
                           + f"; Parcae's L* is below the Transformer's loss at {len(beats)}"
                           + (f" (C = {', '.join(f'{C:.3g}' for C in beats)})" if beats else ""))
    law = results["parametric"]
    out["parametric"] = (f"L = {law['E']:.3f} + {law['A']:.3g}·N^(−{law['alpha']:.3f}) + {law['B']:.3g}·D^(−"
                         f"{law['beta']:.3f}) (R² {law['r2']:.3f}); fitted without C = {law['left_out']['budget']:.3g}, "
                         f"it predicts that budget's runs within {law['left_out']['max_abs']:.3f} nats "
                         f"(RMS {law['left_out']['rmse']:.3f})" if law else "too few budgets for the parametric law")
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


def fitted_over(results):
    """Which points a record's parabolas went through, from what its fits hold: records made before the
    window (bench/results/scaling_code64) fitted every μ_rec, and before the seed offsets, one curve."""
    fits = [b["fit"] for b in results["isoflop"] if b["fit"]]
    if fits and all("seed_offsets" in f for f in fits):
        return f" over the {WINDOW} μ_rec nearest the first seed's lowest loss, the second seed with an offset"
    if fits and all("swept" in f for f in fits):
        return f" over the {WINDOW} μ_rec nearest the lowest mean loss"
    return ""       # every μ_rec, as those records' tables said


def markdown(results):
    fmt, v = common.fmt, results["verdict"]
    d, env = results["data"], results["environment"]
    runs, mus = results["runs"], results["mean_loops"]
    rate = results["flops_per_sec"]
    lines = [f"isoFLOP sweep of looping, preset `{results['preset']}`: Parcae (P/R/C "
             f"{'/'.join(map(str, results['layers']))}) at each μ_rec (μ_bwd = ceil(μ_rec/2)) and the Transformer with "
             f"the same unique layers, each trained on D = C / F tokens (F: expected training FLOPs per token over the "
             f"sampled depths), lr {results['lr']:g} for every run, Muon's momentum warm-up over "
             f"{results['momentum_warmup']}; second seeds near the optimum of the largest budgets. Data "
             f"`{d['data_dir']}` ({d['tokenizer']}, vocab {d['vocab_size']:,}): {d['train_tokens']:,} training and "
             f"{d['val_tokens']:,} validation tokens, sha256 {d['train_sha256'][:12]}… and {d['val_sha256'][:12]}…. "
             f"Trained on {', '.join(trained_on(results['calls'])) or 'nothing yet'} over {len(results['calls'])} "
             f"call(s) of `python bench/scaling.py`; this report by `{results['command']}` (commit {env['commit']})"
             + (f"; {rate:.3g} FLOP/s over all runs on the GPU, start-ups included." if rate else "."), "",
             "**Verdict.**",
             f"- Looping and data in tandem: **{'yes' if v['tandem'] else 'not shown'}**. μ* {v['mu_star']} "
             f"({v['mu_star_text']}); D* {v['D_star']} ({v['D_star_text']}).",
             f"- Does looping pay: {v['looping_text']}.",
             f"- The paper's parametric law: {v['parametric']}.",
             f"- Test-time curves: {v['test_time_fits']}.",
             f"- One test-time law: {v['law']}.", "",
             "Validation loss at T = μ_rec (a second seed after the slash); tokens per non-embedding parameter of "
             "the μ_rec 1 run, and the most epochs a run of the budget reads; μ* with its 95 % bootstrap interval over runs and seeds (an end of the "
             f"swept range: that far or beyond), D*, L* from the parabola in ln μ_rec{fitted_over(results)}; the "
             "parametric law's optimum.", "",
             "| C | tokens/param | epochs | Transformer | " + " | ".join(f"μ={m}" for m in mus)
             + " | μ* [95 %] | D* | L* | law μ* |",
             "|---|---|---|---|" + "---|" * len(mus) + "---|---|---|---|"]
    for b in results["isoflop"]:
        here = [r for r in runs if r["budget"] == b["budget"]]
        cell = lambda mu: " / ".join(fmt(r["val_loss"]) for r in sorted(here, key=lambda r: r["seed"])
                                     if r["mu"] == mu) or "–"
        ref = next((r for r in here if r["mu"] == 1 and r["seed"] == SEED), here[0])
        epochs = max(r["tokens"] for r in here) / d["train_tokens"] if d["train_tokens"] else math.nan
        f, interval = b["fit"] or {}, b["mu_star_ci95"]
        star = (fmt(f["mu_star"], ".2f") if f.get("mu_star") else f"at the {f['edge']} μ" if f else "–")
        star += f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        lines.append(f"| {b['budget']:.3g} | {ref['tokens_per_param']:.3g} | {epochs:.2f} | "
                     + " | ".join(cell(mu) for mu in [None, *mus]) + f" | {star} | "
                     f"{common.fmt_tokens(round(f['D_star'])) if f.get('D_star') else '–'} | {fmt(f.get('L_star'))} | "
                     f"{fmt(b['mu_star_law'], '.2f')} |")
    laws, ci = results["laws"], results["bootstrap"]
    lines += ["", f"Laws across budgets; 95 % intervals from {ci['resamples']} bootstrap resamples of the runs and "
                  "seeds within each budget.", "",
              "| law | exponent | 95 % interval | R² | budgets | paper |", "|---|---|---|---|---|---|"]
    for name, law, k, field in (("μ* = k·C^a", laws["mu_star"], "a", "exponent"),
                                ("D* = k·C^b", laws["D_star"], "b", "exponent"),
                                ("L* = E + A·C^(−α)", laws["L_star"], "alpha", "alpha")):
        interval, used = ci[k]["ci95"], ci[k]["used"]
        lines.append(f"| {name} | {fmt(law and law[field], '.3f')} | "
                     + (f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "–")
                     + (f" ({used} resamples with a fit)" if interval and used < ci["resamples"] else "")
                     + f" | {fmt(law and law['r2'])} | {law['n'] if law else 0} | {PAPER.get(k, '–')} |")
    if laws["L_star"]:
        lines.append(f"\nL* law: E = {laws['L_star']['E']:.4f}, A = {laws['L_star']['A']:.4g}.")
    law = results["parametric"]
    if law:
        held = law["left_out"]
        lines += ["", f"Parametric law over {law['n']} Parcae runs, N the unrolled non-embedding parameters: E = "
                      f"{law['E']:.4f}, A = {law['A']:.4g}, α = {law['alpha']:.4f}, B = {law['B']:.4g}, β = "
                      f"{law['beta']:.4f}; R² {law['r2']:.4f}, RMS {law['rmse']:.4f}. Fitted without C = "
                      f"{held['budget']:.3g} (α = {held['fit']['alpha']:.3f}, β = {held['fit']['beta']:.3f}), its "
                      f"{held['runs']} runs are predicted with error RMS {held['rmse']:.4f}, mean {held['mean']:+.4f}, "
                      f"at most {held['max_abs']:.4f} nats."]
    noise = results["seed_noise"]
    if noise["pairs"]:
        lines += ["", "Seed noise: " + "; ".join(f"C {p['budget']:.3g} μ_rec {p['mu']}: {p['difference']:+.4f}"
                                                 for p in noise["pairs"])
                  + f" (second seed minus first): σ ≈ {noise['sigma']:.4f} nats per run"
                  + (f"; their mean {noise['mean']:+.4f}, and σ ≈ {noise['sigma_about_mean']:.4f} about it"
                     if noise.get("sigma_about_mean") is not None else "") + "."]
    tt = results["test_time"]
    lines += ["", "Test time: L(T) = L∞ + Z·exp(−z·T) per checkpoint (least squares over the finite T).", "",
              "| C | μ_rec | seed | L(1) | L(μ_rec) | L(T max) | L∞ | Z | z | R² |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["test_time_fit"]
        if f:
            last = str(max(map(int, r["losses"])))
            lines.append(f"| {r['budget']:.3g} | {r['mu']} | {r['seed']} | {fmt(r['losses'].get('1'))} | "
                         f"{fmt(r['val_loss'])} | {fmt(r['losses'][last])} (T={last}) | {f['L_inf']:.3f} | "
                         f"{f['Z']:.3f} | {f['z']:.3f} | {f['r2']:.3f} |")
    share = lambda s: ", ".join(f"{k} {fmt(x, '.2f')}" for k, x in s.items())
    lines += ["", f"Across checkpoints ({tt['left_out']} left out: z at the end of the scan, or a curve that rises): "
                  f"share of the spread of ln z explained by {share(tt['z_explained_by'])}; of L∞ by "
                  f"{share(tt['L_inf_explained_by'])}."]
    return "\n".join(lines) + "\n"


def trained_on(calls):
    """The machines and PyTorch versions the calls trained on, each once: 'NVIDIA H200 (torch 2.11)'."""
    return list(dict.fromkeys(f"{c['device']} (torch {c['torch']})" for c in calls))


def has_points(ax):
    """Whether an axis shows any point: a log scale of nothing fails (a budget not trained yet, say)."""
    return any(len(line.get_xdata()) for line in ax.lines) or bool(ax.collections)


def budget_colors(budgets):
    cmap = plt.get_cmap("viridis")
    return {C: cmap(0.85 * i / max(1, len(budgets) - 1)) for i, C in enumerate(budgets)}


def plot_isoflop(results, path):
    colors = budget_colors(results["budgets"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for b in results["isoflop"]:
        C, color, f = b["budget"], colors[b["budget"]], b["fit"]
        for seed, marker in ((SEED, "o"), (SEED + 1, "s")):
            pts = sorted((r["mu"], r["val_loss"]) for r in results["runs"]
                         if r["budget"] == C and r["mu"] and r["seed"] == seed and r["val_loss"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker, color=color, mfc=color if seed == SEED else "none",
                        label=f"C = {C:.3g}" if seed == SEED else None)
        if f:
            x = np.linspace(math.log(min(f["mu"])), math.log(max(f["mu"])), 100)
            ax.plot(np.exp(x), np.polyval(f["coef"], x), "-", color=color, lw=1)
            for offset in f.get("seed_offsets", {}).values():     # the second seed's: the same curve, shifted
                ax.plot(np.exp(x), np.polyval(f["coef"], x) + offset, ":", color=color, lw=1)
            ax.plot(f["mu_best"], f["L_star"], "*" if f["mu_star"] else "^", ms=13, color=color,
                    mfc=color if f["mu_star"] else "none")
        if b["gpt_loss"] is not None:
            ax.axhline(b["gpt_loss"], color=color, ls="--", lw=0.8)
    ax.plot([], [], "k*", ms=10, label="minimum μ* (△: at an end)")
    ax.plot([], [], "ks:", mfc="none", lw=1, label="second seed (its curve: the first's + an offset)")
    ax.plot([], [], "k--", lw=0.8, label="Transformer, same C")
    if any(b["fit"] for b in results["isoflop"]):
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
    fits = [b for b in results["isoflop"] if b["fit"]]
    laws, ci = results["laws"], results["bootstrap"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    C_line = np.geomspace(min(results["budgets"]), max(results["budgets"]), 50)
    for b in fits:      # each budget's optimum with its 95 % interval (hollow: at an end of the swept range)
        f, (lo, hi) = b["fit"], b["mu_star_ci95"] or (b["fit"]["mu_best"],) * 2     # (3 μ_rec: no interval)
        below, above = max(0.0, f["mu_best"] - lo), max(0.0, hi - f["mu_best"])
        axes[0].errorbar(b["budget"], f["mu_best"], yerr=[[below], [above]], fmt="o",
                         color="C0" if f["mu_star"] else "C3", mfc="C0" if f["mu_star"] else "none", capsize=3)
    inside = [b["fit"] for b in fits if b["fit"]["mu_star"]]
    axes[1].plot([f["budget"] for f in inside], [f["D_star"] for f in inside], "o", color="C0", label="parabola vertex")
    for ax, k, ci_key, label in ((axes[0], "mu_star", "a", "μ*"), (axes[1], "D_star", "b", "D* (tokens)")):
        law = laws[k]
        if law:
            interval = ci[ci_key]["ci95"]
            ax.plot(C_line, law["prefactor"] * C_line ** law["exponent"], "-", color="C0", lw=1,
                    label=f"∝ C^{law['exponent']:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
                    + f" (paper: {PAPER[ci_key]})")
        if has_points(ax):
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_ylabel(label)
    law_mu = [(b["budget"], b["mu_star_law"]) for b in results["isoflop"] if b["mu_star_law"]]
    if law_mu:
        axes[0].plot(*zip(*law_mu), "x", color="C2", label="the parametric law's optimum")
    axes[2].plot([b["budget"] for b in fits], [b["fit"]["L_star"] for b in fits], "o", color="C0", label="L*")
    gpt = [(b["budget"], b["gpt_loss"]) for b in results["isoflop"] if b["gpt_loss"] is not None]
    if gpt:
        axes[2].plot(*zip(*gpt), "k--", lw=0.8, label="Transformer")
    if laws["L_star"]:
        L = laws["L_star"]
        axes[2].plot(C_line, L["E"] + L["A"] * C_line ** -L["alpha"], "-", color="C0", lw=1,
                     label=f"{L['E']:.3f} + A·C^(−{L['alpha']:.2f})")
    if has_points(axes[2]):
        axes[2].set_xscale("log")
    axes[2].set_ylabel("L* (nats)")
    for ax in axes:
        ax.set_xlabel("FLOP budget C")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_test_time(results, path):
    runs = [r for r in results["runs"] if r["test_time_fit"] and r["seed"] == SEED]
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
        if has_points(ax):
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=6)
        ax.set_title(f"C = {C:.3g}", fontsize=9)
        ax.set_xlabel("test-time loops T")
        ax.grid(alpha=0.3, which="both")
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
    if has_points(ax):
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
