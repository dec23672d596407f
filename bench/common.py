"""
What bench/stability.py, bench/quality.py and bench/loops.py share: the size presets,
the five models compared, a runner that launches train.py N runs at a time, the
read-outs of a run's metrics.jsonl (loss spikes, divergence, final validation loss),
and decoding speed without the one-time costs (decoding_rate, bench/throughput.py's too).

Every run is a plain `python train.py --key=value ...` in its own out_dir, so any of
them can be repeated by hand: its command is the first line of its train.log.
"""

import argparse
import ast
import contextlib
import inspect
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402
from model import GPT, KVCache  # noqa: E402

# -----------------------------------------------------------------------------
# presets: one model size, token budgets and evaluation settings per name.
# train: train.py settings of every run; layers: P/R/C of the looped models (gpt runs the
# same layers once, gpt_2x twice as many); rates: the sweep's; sweep_tokens, budgets:
# training tokens per run; evals: evaluations per run (the last at its end); parallel: runs at a
# time on each GPU; loops, loop_batches: loops.py's depths and batches; tokens_per_sec (one
# GPU over all its runs) and run_tokens_per_sec (one run, the slowest model, sharing its GPU
# with two others): measured, for the time estimate.

PRESETS = {
    # seconds on a CPU, for the tests: it checks that the scripts run, not the science
    "tiny": {
        "train": dict(device="cpu", dtype="float32", compile=False, n_embd=32, n_head=2, block_size=32,
                      batch_size=4, grad_accum_steps=1, eval_iters=2, log_interval=1),
        "layers": (1, 1, 1), "mean_loops": 2, "backprop_loops": 1,
        "rates": [2e-3, 4e-3, 8e-3, 16e-3], "sweep_tokens": 2_560, "budgets": [2_560, 5_120],
        "evals": 2, "parallel": 2, "loops": [1, 2, 4, 8], "loop_batches": 2,
    },
    # one H200, 8 runs at a time. head_dim 128 as in the paper; the looped models are
    # P/R/C = 1/2/1 at μ_rec 4, μ_bwd 2; the Transformer has the same 4 unique layers.
    # ~65M parameters, 89 % of them the token and value-embedding tables (GPT-2's vocab).
    # Measured on one H200 (GPT-2 tokens, not compiled): the GPU saturates at ~330k tokens/s
    # over all runs from 3 runs at a time on, and 8 runs of 16 × 512-token micro-batches take
    # ~75 GB (32-sequence micro-batches ran out of memory). Measured (commit 009e77e): the
    # sweep (20 runs × 4M) took ~4 min on one H200; quality (5 models × 10M and 40M) ~5 min
    # on four, where one 40M run alone takes 3-5 min whatever the GPU count; loops.py ~40 s.
    "small": {
        "train": dict(device="cuda", dtype="auto", compile=False, n_embd=384, n_head=3, block_size=512,
                      batch_size=16, grad_accum_steps=2, eval_iters=32, log_interval=5),
        "layers": (1, 2, 1), "mean_loops": 4, "backprop_loops": 2,
        "rates": [2e-3, 4e-3, 8e-3, 16e-3, 32e-3], "sweep_tokens": 4_000_000, "budgets": [10_000_000, 40_000_000],
        "evals": 2, "parallel": 8, "loops": [1, 2, 4, 6, 8, 12, 16, 24, 32], "loop_batches": 32,
        "tokens_per_sec": 330_000, "run_tokens_per_sec": 130_000,
    },
}

MODELS = ("gpt", "gpt_2x", "looped_add", "looped_linear", "parcae")
SWEEP_MODELS = ("gpt", "looped_add", "looped_linear", "parcae")
LOOPED = ("looped_add", "looped_linear", "parcae")


def model_settings(name, preset):
    """
    train.py's model settings for one of the compared models at a preset's size:
    gpt           the plain Transformer with the same unique layers, each run once
    gpt_2x        the plain Transformer with twice the layers (the quality reference)
    looped_add    u = h + e, with the prior recipe of config/looped_*.py: one depth per batch, no prelude norm
    looped_linear u = W [h; e] (Ā = W_x, unconstrained), the same prior recipe
    parcae        the stable injection, with depths per sequence and the prelude norm
    """
    P, R, C = preset["layers"]
    loop = dict(n_prelude=P, n_core=R, n_coda=C, mean_loops=preset["mean_loops"],
                backprop_loops=preset["backprop_loops"], init_state="normal")
    table = {
        "gpt": dict(injection="none", n_prelude=P, n_core=R, n_coda=C),
        "gpt_2x": dict(injection="none", n_prelude=2 * P, n_core=2 * R, n_coda=2 * C),
        "looped_add": dict(loop, injection="add", depth_sampling="per-batch", prelude_norm=False),
        "looped_linear": dict(loop, injection="linear", depth_sampling="per-batch", prelude_norm=False),
        "parcae": dict(loop, injection="parcae", depth_sampling="per-sequence", prelude_norm=True),
    }
    if name not in table:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    return table[name]


def run_settings(preset, model, lr, tokens, data_dir, out_dir, overrides=(), save_checkpoint=False):
    """All the train.py settings of one run: preset, model, rate and a token budget."""
    s = dict(preset["train"], **model_settings(model, preset))
    s.update(overrides)        # --set key=value from the command line, before the budget is turned into steps
    per_step = s["batch_size"] * s["grad_accum_steps"] * s["block_size"]
    max_iters = max(1, round(tokens / per_step))
    s.update(data_dir=data_dir, out_dir=out_dir, lr=lr, max_iters=max_iters, save_checkpoint=save_checkpoint,
             eval_interval=max(1, max_iters // preset["evals"]), eval_loops=[preset["mean_loops"]])
    return s


def tokens_of(settings):
    return settings["max_iters"] * settings["batch_size"] * settings["grad_accum_steps"] * settings["block_size"]


def meta_model(settings, vocab_size):
    """The run's model on the meta device (no memory), built once per configuration: a build still takes
    0.2 s, and the scripts ask after every run."""
    config = train.model_config({**train.SETTINGS, **settings}, vocab_size)
    key = repr(config)
    if key not in _models:
        with torch.device("meta"):
            _models[key] = GPT(config)
    return _models[key]


_models = {}


def model_size(settings, vocab_size):
    """Parameters and training FLOPs per token (model.flops_per_token(), at the nominal depth μ_rec)."""
    model = meta_model(settings, vocab_size)
    return model.num_params(), model.flops_per_token()


def read_meta(data_dir):
    """train.py's reading of a data folder's meta.json, with train_tokens even where meta.json lacks it."""
    meta = train.read_meta(data_dir)
    meta.setdefault("train_tokens", os.path.getsize(os.path.join(data_dir, "train.bin")) // 2)
    return meta


def fmt_tokens(n):
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(n)


# -----------------------------------------------------------------------------
# the command line every script shares


def at_least(low):
    """An argparse type: a whole number of at least `low` (so --parallel 0 is an error, not a run that never starts)."""
    def whole(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return whole


def parser(description, data_dir_required=True):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=data_dir_required,
                   help="a folder with train.bin, val.bin, meta.json (prepare.py)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size and budgets")
    p.add_argument("--work_dir", help="where the runs' out_dirs go (default out/bench/<preset>)")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"), help="JSON, Markdown, PNG")
    p.add_argument("--parallel", type=at_least(1), help="train.py runs at a time on each GPU (default: the preset's)")
    p.add_argument("--gpus", type=at_least(0), help="spread the runs over this many GPUs (default: every GPU here)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train.py setting in every run, e.g. --set batch_size=16 (repeatable)")
    p.add_argument("--dry_run", action="store_true", help="print the commands and the token budget, run nothing")
    return p


def finish_args(args, need_data=True):
    """The parsed command line's presets, GPUs, overrides and the data's meta.json (None if the data are not
    here and need_data is False: a plan made on another machine than the GPU's)."""
    args.preset_name, args.preset = args.preset, PRESETS[args.preset]
    args.work_dir = args.work_dir or os.path.join(ROOT, "out", "bench", args.preset_name)
    args.parallel = args.parallel or args.preset["parallel"]
    n_gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    if args.preset["train"].get("device") == "cpu" or n_gpus == 0:
        args.gpus = [None]          # the CPU: runs share it, and see whatever GPUs there are
    elif n_gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {n_gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
    else:
        args.gpus = list(range(n_gpus))
    args.overrides = dict(train.parse_override("--" + item) for item in args.set)    # checked as train.py does
    here = os.path.exists(os.path.join(args.data_dir, "meta.json"))
    args.meta = read_meta(args.data_dir) if need_data or here else None
    os.makedirs(args.results_dir, exist_ok=True)
    return args


# -----------------------------------------------------------------------------
# running train.py


def train_command(settings):
    def text(v):
        # a bare word reads back as the same string in train.py; anything else goes as a literal
        if isinstance(v, str):
            try:
                ast.literal_eval(v)
            except (ValueError, SyntaxError):
                return v
        return repr(v)
    return [sys.executable, os.path.join(ROOT, "train.py")] + [f"--{k}={text(v)}" for k, v in settings.items()]


def read_metrics(out_dir):
    """metrics.jsonl as (training lines, evaluation lines, skipped-step lines)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    train, evals, skipped = [], [], []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue    # a line cut off when the run was killed
                (evals if "val_loss" in r else skipped if r.get("skipped") else train).append(r)
    return train, evals, skipped


def environment():
    """Where the numbers were made: GPU (or CPU), PyTorch, and the git commit when there is one."""
    commit = os.environ.get("PARCAE_COMMIT")     # for a copy of the code whose .git is missing or stale
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "gpus": torch.cuda.device_count(), "torch": torch.__version__, "commit": commit}


def command(script, argv):
    """The command line that made a result (argv: the arguments, or None for this process's own)."""
    return shlex.join(["python", os.path.relpath(script, ROOT), *(sys.argv[1:] if argv is None else argv)])


def provenance(results):
    """The last line of a result's Markdown: what made it, where, and at which commit."""
    env = results["environment"]
    where = f"{env['gpus']}× {env['device']}" if env.get("gpus") else env["device"]
    return (f"\nMade by `{results['command']}` on {where} (torch {env['torch']}), commit {env['commit']}.\n"
            if results.get("command") else "")


def read_json(path):
    """The JSON file at path, or None if there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_status(out_dir):
    """What runner() recorded: {"status": finished | diverged | failed, ...}, or None if it never ended."""
    return read_json(os.path.join(out_dir, "run.json"))


def classify(returncode, out_dir, max_iters):
    """finished (the final evaluation is logged), diverged (train.py stopped on a non-finite loss) or failed."""
    _, evals, _ = read_metrics(out_dir)
    if returncode == 0 and evals and evals[-1]["step"] == max_iters:
        return "finished"
    with open(os.path.join(out_dir, "train.log"), errors="replace") as f:
        log = f.read()
    # train.py's own words when the training or validation loss is nan or inf
    if "stopped at step" in log and ("not finite" in log or "training loss is" in log):
        return "diverged"
    return "failed"


def run_all(runs, parallel, gpus=(None,), dry_run=False, on_finish=None):
    """
    Run train.py for every (name, settings) in `runs`, `parallel` at a time on each of `gpus`
    (CUDA device numbers; None: leave the device alone), each in its own settings["out_dir"] with
    its output in train.log. The largest budgets start first, so no long run is left alone at
    the end. A run already ended with the same settings (its run.json says finished or
    diverged) is skipped, so an interrupted bench resumes. Prints one line per ended run and
    calls on_finish(name) after each.
    """
    todo = []
    for name, s in runs:
        done = run_status(s["out_dir"])
        if done and done["settings"] == s and done["status"] in ("finished", "diverged"):
            print(f"  {name}: {done['status']} earlier, skipped")
        else:
            todo.append((name, s))
    todo.sort(key=lambda run: -tokens_of(run[1]))       # stable: same budgets keep their order
    if dry_run:
        for name, s in todo:
            print(shlex.join(train_command(s)))
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # share the cores, unless the caller chose; and let the CUDA allocator grow segments
    # rather than strand reserved memory (several runs share each GPU)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 16) // (parallel * len(gpus)))))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # GPU i is the i-th of those this process sees (CUDA_VISIBLE_DEVICES may already pick some)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(64)))).split(",")
    queue, active, n_done = deque(todo), {}, 0
    # a SIGTERM (a time limit) should stop our train.py processes too, not orphan them
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while queue or active:
            while queue and len(active) < parallel * len(gpus):
                name, s = queue.popleft()
                load = {g: sum(run[4] == g for run in active.values()) for g in gpus}
                gpu = min(gpus, key=load.get)           # the least busy GPU
                run_env = env if gpu is None else dict(env, CUDA_VISIBLE_DEVICES=visible[gpu])
                os.makedirs(s["out_dir"], exist_ok=True)
                for stale in ("run.json", "metrics.jsonl", "ckpt.pt"):     # a rerun starts afresh
                    if os.path.exists(os.path.join(s["out_dir"], stale)):
                        os.remove(os.path.join(s["out_dir"], stale))
                log = open(os.path.join(s["out_dir"], "train.log"), "w")
                cmd = train_command(s)
                log.write(shlex.join(cmd) + "\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=run_env)
                active[name] = (proc, s, log, time.time(), gpu)
            time.sleep(0.2)
            for name, (proc, s, log, t0, _) in list(active.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del active[name]
                n_done += 1
                status = classify(proc.returncode, s["out_dir"], s["max_iters"])
                wall = time.time() - t0
                with open(os.path.join(s["out_dir"], "run.json"), "w") as f:
                    json.dump({"status": status, "returncode": proc.returncode, "wall_s": round(wall, 1),
                               "settings": s}, f, indent=1)
                print(f"[{n_done}/{len(todo)}] {name}: {status} in {wall:.0f} s, {progress_note(s['out_dir'])}",
                      flush=True)
                if status == "failed":
                    print("    " + "\n    ".join(tail(os.path.join(s["out_dir"], "train.log"))), flush=True)
                if on_finish:
                    on_finish(name)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc, _, log, *_ in active.values():
            proc.terminate()
            proc.wait()
            log.close()


def progress_note(out_dir):
    train, evals, _ = read_metrics(out_dir)
    note = f"step {train[-1]['step']} loss {train[-1]['loss']:.3f}" if train else "no step logged"
    if evals:
        note += " | val " + ", ".join(f"{v:.3f} at {k} loops" for k, v in evals[-1]["val_loss"].items()
                                      if v is not None)
    return note


def tail(path, n=6):
    with open(path, errors="replace") as f:
        return [line.rstrip() for line in f.readlines()[-n:]]


def print_plan(runs, meta, what, preset, parallel, gpus=(None,)):
    tokens = [tokens_of(s) for _, s in runs]
    epochs = max(tokens) / meta["train_tokens"] if tokens else 0
    print(f"{what}: {len(runs)} runs, {fmt_tokens(sum(tokens))} training tokens in all "
          f"(at most {fmt_tokens(max(tokens, default=0))} per run, {epochs:.1f} epochs of the training split)")
    if "tokens_per_sec" in preset and runs:
        # all GPUs busy at their measured rate, but no faster than the longest run alone;
        # plus ~15 s to start each wave of runs
        rate = preset["tokens_per_sec"] * len(gpus)
        seconds = max(sum(tokens) / rate, max(tokens) / preset["run_tokens_per_sec"])
        print(f"  about {seconds + 15 * math.ceil(len(runs) / (parallel * len(gpus))):.0f} s "
              f"on {len(gpus)} H200(s) ({fmt_tokens(rate)} tokens/s over all runs)")
    if epochs > 4:
        print(f"  warning: a run sees the training data {epochs:.1f} times")


# -----------------------------------------------------------------------------
# decoding speed


def decoding_rate(model, prompt, timed, **generate):
    """
    New tokens per second of sample.generate() after prompt (B, L), the rows of the batch counted, and
    the stats of its last run (bf16 autocast on a GPU): the time of timed[1] new tokens less that of
    timed[0]. Both runs prefill the prompt and record a CUDA graph for each span of the cache that they
    read, so only decoding steps are left in the difference, as long as both reach the same spans; a
    warm-up of timed[0] tokens first records and compiles (under --compile) everything once.
    """
    bucket = inspect.signature(KVCache).parameters["bucket"].default
    spans = [-(-(prompt.size(1) + n) // bucket) for n in timed]
    if spans[0] != spans[1]:
        raise ValueError(f"{prompt.size(1)} + {timed[0]} and {prompt.size(1)} + {timed[1]} positions end in "
                         f"different spans of the cache ({bucket} positions each): the difference would time "
                         "a recording")
    times, stats = [], {}
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    with torch.autocast("cuda", dtype=torch.bfloat16) if prompt.is_cuda else contextlib.nullcontext():
        sample.generate(model, prompt, timed[0], **generate)         # warm-up: cuBLAS, compiling, autocast's copies
        for n in timed:
            stats = {}
            sync()
            t0 = time.perf_counter()
            sample.generate(model, prompt, n, stats=stats, **generate)
            sync()
            times.append(time.perf_counter() - t0)
    return len(prompt) * (timed[1] - timed[0]) / (times[1] - times[0]), stats

# -----------------------------------------------------------------------------
# read-outs of one run


def count_spikes(losses, margin=0.5, beta=0.9):
    """
    Loss spikes: a logged training loss more than `margin` nats above the exponential
    moving average (weight `beta` on the past) of the losses logged before it. Consecutive
    points above count as one spike. The EMA lags *above* a falling loss, so the fast drop
    at the start of training never counts.
    """
    spikes, ema, inside = 0, None, False
    for x in losses:
        if ema is not None:
            above = x > ema + margin
            spikes += above and not inside
            inside = above
        ema = x if ema is None else beta * ema + (1 - beta) * x
    return spikes


def final_val_loss(evals, mean_loops):
    """The last evaluation's loss at mean_loops (the Transformer's at its single pass), or None."""
    if not evals:
        return None
    val = evals[-1]["val_loss"]
    v = val.get(str(mean_loops), next(iter(val.values())))
    return v if v is not None and math.isfinite(v) else None


def summarize(out_dir, settings, spike_margin=0.5):
    """
    One run as a dict: its status, the curves (train loss, ‖h_T‖, max Ā, gradient norm, val
    loss), the number of spikes, the final validation loss, and whether it diverged: train.py
    stopped on a non-finite loss, or the run ends above its initial loss.
    """
    done = run_status(out_dir)
    if not done or done["settings"] != settings:    # not ended, or left by a run with other settings
        done = {"status": "not run"}
    train, evals, skipped = read_metrics(out_dir) if done["status"] != "not run" else ([], [], [])
    train = [r for r in train if r.get("loss") is not None]
    losses = [r["loss"] for r in train]
    val = final_val_loss(evals, settings["mean_loops"] if "mean_loops" in settings else 1)
    initial = losses[0] if losses else None
    ends_above = initial is not None and (losses[-1] > initial or (val is not None and val > initial))
    norms = [r["state_norm"] for r in train if r.get("state_norm") is not None]
    a_max = [r["a_max"] for r in train if r.get("a_max") is not None]
    return {
        "status": done["status"],
        "diverged": done["status"] == "diverged" or (done["status"] == "finished" and ends_above),
        "spikes": count_spikes(losses, spike_margin),
        "skipped_steps": len(skipped),
        "initial_loss": initial, "last_loss": losses[-1] if losses else None,
        "final_val_loss": val if done["status"] == "finished" else None,
        "steps_done": (settings["max_iters"] if done["status"] == "finished" else train[-1]["step"] if train else 0),
        "max_iters": settings["max_iters"],
        "max_state_norm": max(norms) if norms else None, "final_state_norm": norms[-1] if norms else None,
        "max_a_max": max(a_max) if a_max else None, "final_a_max": a_max[-1] if a_max else None,
        "wall_s": done.get("wall_s"),
        "curve": {k: [r.get(k) for r in train] for k in ("step", "loss", "state_norm", "a_max", "grad_norm")},
        "val_curve": {"step": [r["step"] for r in evals],
                      "loss": [final_val_loss([r], settings.get("mean_loops", 1)) for r in evals]},
    }


def write_results(results_dir, name, results, markdown):
    """name.json and name.md, markdown(results), in results_dir; returns the Markdown."""
    write_json(os.path.join(results_dir, name + ".json"), results)
    text = markdown(results)
    with open(os.path.join(results_dir, name + ".md"), "w") as f:
        f.write(text)
    return text


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)
