"""
Test-time depth: validation loss of trained looped models at T = 1 ... 32 loops, and the
saturating exponential the paper fits to it, L(T) = L∞ + Z·exp(−z·T) (MODEL.md section 7).

    python bench/loops.py --data_dir=data/bench                 # the looped models of quality.json's largest budget
    python bench/loops.py --data_dir=data/bench --checkpoints out/bench/small/quality/parcae_24M --loops 1 4 16
    python bench/loops.py --data_dir=data/fineweb-edu-parcae-tokenizer --init_from=SandyResearch/parcae-140m

Every T sees the same validation batches as train.py's own evaluation (its get_batch), and
so the same random initial states h_0: with --batches equal to the run's eval_iters, the
loss at T = μ_rec is the run's final validation loss. --init_from evaluates one of the
authors' pretrained models instead (hub.py), on data prepared with its tokenizer, in
windows of its block_size, with seed 1337 and the preset's batch size (--preset tiny on a
CPU). bf16 autocast on CUDA. The fit is least squares: for each z on a grid over
[0.001, 5], L∞ and Z are a linear least-squares problem; we keep the z with the smallest
squared error, refining the grid around it, and report R² (1 is a perfect fit). z at 5
means the loss is flat after the first loop or two.
Non-finite losses (a loop that blew up) are shown but left out of the fit.
Writes loops.json, loops.md and loops.png to --results_dir.

--speculative measures self-speculative decoding (sample.py --draft_loops) on --checkpoints instead:
tokens/s at batch 1 against plain decoding at each --loops (default 16), both replayed as CUDA graphs,
and the acceptance rate by draft depth K (--draft_loops) and drafts per verify (--draft_tokens);
writes speculative.json and speculative.md.

--adaptive measures per-token exit (sample.py --exit_threshold) on --checkpoints instead, up to
--cap loops (default 2·μ_rec), and writes adaptive.json, adaptive.md and adaptive.png:
  - the validation loss and mean loops per token of the real adaptive forward at each of
    --thresholds (one forward over each sequence, which equals decoding it token by token: tests),
    against the fixed depths T = 1 ... cap, on the same batches and h_0 draws;
  - the two exit criteria side by side, simulated on the fixed-depth trajectories (a token exits at
    the first T where its criterion falls below the threshold, and scores its loss at that T): the
    relative state change ‖h_T − h_(T−1)‖/‖h_T‖, and the KL between the predictions at T and T − 1,
    which needs the coda and the head at every iteration; costs are forward MFLOPs per token;
  - what the shared KV cache costs: the loss of decoding token by token with each cache, at μ_rec
    and at the cap (--decode_batches batches);
  - on a GPU, decoding speed at batch 1 and 8: fixed depths μ_rec and the cap, and adaptive exit at
    the fewest loops within 0.01 nats of T = μ_rec, with each cache, all replayed as CUDA graphs (under
    exit, one per phase; the host reads the exit flag after each iteration), and adaptive exit launched
    from Python.
"""

import dataclasses
import json
import math
import os
from contextlib import nullcontext
from types import SimpleNamespace

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402
import sample  # noqa: E402  (its generate)
import train  # noqa: E402  (its evaluation, and its checkpoint reading)
from model import GPT, KVCache  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--checkpoints", nargs="+", help="run folders (or ckpt.pt files); default: quality.json's "
                                                    "looped models at its largest budget")
    p.add_argument("--loops", nargs="+", type=common.at_least(1), help="test-time depths (default: the preset's)")
    p.add_argument("--batches", type=common.at_least(1), help="validation batches per depth (default: the preset's)")
    p.add_argument("--init_from", help="a pretrained model instead: a Hugging Face repo such as "
                                       "SandyResearch/parcae-140m (@REVISION pins one), or a folder holding "
                                       "its files (hub.py)")
    p.add_argument("--adaptive", action="store_true", help="measure per-token exit and the shared cache instead")
    p.add_argument("--cap", type=common.at_least(1), help="--adaptive: the most loops a token may run (default 2·μ_rec)")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002],
                   help="--adaptive: exit thresholds ε on the relative state change")
    p.add_argument("--speculative", action="store_true", help="measure self-speculative decoding instead, at each "
                   "of --loops (default 16) against plain decoding, batch 1")
    p.add_argument("--draft_loops", nargs="+", type=common.at_least(1), default=[1, 2, 4, 8],
                   help="--speculative: draft depths K")
    p.add_argument("--draft_tokens", nargs="+", type=common.at_least(1), default=[2, 4, 6],
                   help="--speculative: drafts per verify")
    p.add_argument("--decode_batches", type=common.at_least(1), default=2, help="--adaptive: batches decoded token "
                   "by token per cache mode and depth")
    args = common.finish_args(p.parse_args(argv))
    args.command = common.command(__file__, argv)
    if args.adaptive:
        return adaptive_main(args)
    if args.speculative:
        return speculative_main(args)
    loops = sorted(args.loops or args.preset["loops"])
    batches = args.batches or args.preset["loop_batches"]
    checkpoints = [(args.init_from, args.init_from)] if args.init_from else find_checkpoints(args)
    print(f"test-time depth: {len(checkpoints)} models × {len(loops)} depths × {batches} batches")
    if args.dry_run:
        for label, path in checkpoints:
            print(f"  {label}: {path}")
        return None
    device = torch.device(args.overrides.get("device", args.preset["train"]["device"]))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this preset evaluates on cuda, and there is no GPU here (try --preset tiny)")

    results = {"preset": args.preset_name, "environment": common.environment(), "command": args.command,
               "data_dir": args.data_dir, "loops": loops, "batches": batches,
               "models": []}
    for label, path in checkpoints:
        model, settings = load_pretrained(args, device) if args.init_from else load(path, device, args)
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
    print(common.write_results(args.results_dir, "loops", results, markdown))
    plot(results, os.path.join(args.results_dir, "loops.png"))
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


def load(path, device, args):
    """The model of a train.py checkpoint, in eval mode, and the settings it was trained with."""
    ckpt = train.load_checkpoint(path)
    model = train.model_from_checkpoint(ckpt, path)
    if not model.config.looped:
        raise SystemExit(f"{path} holds a plain Transformer: it has no loop to vary")
    # the same tokens: the same tokenizer (by its file's hash where it has one), or the same characters
    trained, here = ([m.get("tokenizer_sha256") or m.get("tokenizer"), m.get("chars"), m.get("vocab_size")]
                     for m in (ckpt.get("meta") or {}, args.meta))
    if trained != here:     # another vocabulary's ids: an IndexError at best, else a loss of the wrong tokens
        name = lambda m: f"{m.get('tokenizer')} tokens (vocab {m.get('vocab_size')})"
        raise SystemExit(f"{path} was trained on {name(ckpt.get('meta') or {})}, but {args.data_dir} holds other "
                         f"tokens, {name(args.meta)}: pass the --data_dir it was trained on")
    return model.to(device).eval(), ckpt["settings"]


def load_pretrained(args, device):
    """A pretrained model (hub.py), in eval mode, and the settings its evaluation reads."""
    import hub
    model = hub.load_for_data(args.init_from, args.meta, args.data_dir)
    if not model.config.looped:
        raise SystemExit(f"{args.init_from} is a plain Transformer: it has no loop to vary")
    return model.to(device).eval(), {"seed": 1337, "batch_size": args.preset["train"]["batch_size"]}


def validation(data_dir, settings, model, **more):
    """The validation tokens, and the settings train.py's get_batch and evaluate read: the run's seed and
    batch size, the model's block_size, and `more`."""
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    return val, SimpleNamespace(seed=settings["seed"], block_size=model.config.block_size,
                                batch_size=settings["batch_size"], **more)


def autocast_for(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def evaluate(model, data_dir, settings, loops, batches, device):
    """Mean validation loss at each T: train.py's own evaluation, over the same batches (and h_0
    draws) for every T."""
    val, cfg = validation(data_dir, settings, model, eval_loops=loops, eval_iters=batches)
    losses = train.evaluate(model, val, cfg, rank=0, world=1, device=device, autocast=autocast_for(device))
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

    def errors(zs):
        """solve's squared error at every z of zs at once (a bootstrap fits thousands of curves): the best Z is
        the regression slope of L on u = exp(−z·T), and the residuals are those of the centred values."""
        u = np.exp(-np.outer(zs, T))
        u -= u.mean(axis=1, keepdims=True)
        y = L - L.mean()
        suu = (u * u).sum(axis=1)
        Z = np.divide(u @ y, suu, out=np.zeros_like(suu), where=suu > 0)
        return ((y - Z[:, None] * u) ** 2).sum(axis=1)

    grid = np.logspace(*np.log10(Z_RANGE), 400)
    for _ in range(4):
        i = int(np.argmin(errors(grid)))
        best = grid[i]
        grid = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 101)
    sse, (L_inf, Z) = solve(best)
    sst = float(((L - L.mean()) ** 2).sum())
    r2 = 1 - sse / sst if sst > 0 else 1.0
    return {"L_inf": float(L_inf), "Z": float(Z), "z": float(best), "r2": float(r2), "sse": sse}


# -----------------------------------------------------------------------------
# --adaptive: per-token exit and the shared cache


def adaptive_main(args):
    if not (args.checkpoints or args.init_from):
        raise SystemExit("--adaptive needs --checkpoints (run folders or ckpt.pt files) or --init_from")
    batches = args.batches or args.preset["loop_batches"]
    device = torch.device(args.overrides.get("device", args.preset["train"]["device"]))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this preset evaluates on cuda, and there is no GPU here (try --preset tiny)")
    results = {"preset": args.preset_name, "environment": common.environment(), "command": args.command,
               "data_dir": args.data_dir, "batches": batches, "decode_batches": args.decode_batches, "models": []}
    for label, path in [(args.init_from, args.init_from)] if args.init_from else find_checkpoints(args):
        model, settings = load_pretrained(args, device) if args.init_from else load(path, device, args)
        mu = model.config.mean_loops
        cap = args.cap or 2 * mu
        print(f"{label}: μ_rec {mu}, cap {cap}, {batches} batches", flush=True)
        r = {"model": label, "checkpoint": path, "mean_loops": mu, "cap": cap}
        r["fixed"] = {str(T): L for T, L in evaluate(model, args.data_dir, settings, range(1, cap + 1), batches,
                                                     device).items()}
        r["adaptive"] = [adaptive_loss(model, args.data_dir, settings, cap, eps, batches, device)
                         for eps in sorted(args.thresholds, reverse=True)]
        for a in r["adaptive"]:
            print(f"  ε {a['threshold']:g}: loss {a['loss']:.4f} at {a['mean_loops']:.2f} loops per token", flush=True)
        r["simulated"] = simulate_criteria(model, args.data_dir, settings, cap, batches, device)
        r["decoding"] = [dict(loops=T, shared=shared, **decoding_loss(model, args.data_dir, settings, T, shared,
                                                                      args.decode_batches, device))
                         for T in sorted({mu, cap}) for shared in (False, True)]
        for d in r["decoding"]:
            print(f"  decoding at {d['loops']} loops, {'shared' if d['shared'] else 'full'} cache: "
                  f"loss {d['loss']:.4f}", flush=True)
        r["claim"] = adaptive_claim(r)
        if device.type == "cuda":
            r["speed_threshold"] = (r["claim"]["best"] or r["adaptive"][-1])["threshold"]
            x, _ = val_batch(args.data_dir, settings, model, 0, device)
            r["speed"] = decoding_speed(model, x, mu, cap, r["speed_threshold"])
            r["speed_note"] = TIMING
            r["speed_claim"] = speed_claim(r)
        results["models"].append(r)
        del model
    print(common.write_results(args.results_dir, "adaptive", results, adaptive_markdown))
    adaptive_plot(results, os.path.join(args.results_dir, "adaptive.png"))
    return results


def val_batch(data_dir, settings, model, i, device):
    """train.py's validation batch i. get_batch also seeds torch, so h_0 is drawn the same every time."""
    val, cfg = validation(data_dir, settings, model)
    return train.get_batch(val, 1, i, 0, cfg, device)


def batches_of(data_dir, settings, model, batches, device):
    return (val_batch(data_dir, settings, model, i, device) for i in range(batches))


@torch.no_grad()
def adaptive_loss(model, data_dir, settings, cap, eps, batches, device):
    """Validation loss and mean loops per token of one forward per sequence with per-token exit. A
    single forward reads only keys and values written in it, so the small shared cache serves."""
    losses, loops = [], []
    for x, y in batches_of(data_dir, settings, model, batches, device):
        cache = KVCache(model, len(x), cap, shared=True)
        with autocast_for(device):
            logits = model.decode(x, cache, cap, exit_threshold=eps)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1).item())
        loops.append(model.last_state["loops_per_token"].mean().item())
    return {"threshold": eps, "loss": float(np.mean(losses)), "mean_loops": float(np.mean(loops))}


def forward_flops(model, loops, readout=0):
    """Forward matmul FLOPs per token at `loops` iterations (a mean, for tokens that exit), the model's own
    count. The KL criterion also runs C, the coda and the head after every earlier iteration: pass their
    cost as readout (readout_flops)."""
    return model.flops_per_token(loops=loops, backward=False) + (loops - 1) * readout


def readout_flops(model):
    """Forward FLOPs per token of C, the coda and the head, by the model's own count: a model like this one
    but without a prelude costs them plus T iterations at T loops, so F(1) − (F(2) − F(1)) leaves them."""
    with torch.device("meta"):
        bare = GPT(dataclasses.replace(model.config, n_prelude=0))
    one, two = (bare.flops_per_token(loops=T, backward=False) for T in (1, 2))
    return 2 * one - two


@torch.no_grad()
def simulate_criteria(model, data_dir, settings, cap, batches, device):
    """
    Both exit criteria on the fixed-depth trajectories, for a grid of thresholds. For every token
    and T = 1 ... cap: its loss at T (a forward at T loops), its state change (hooks read h_(T-1)
    going into the injection and h_T going into C), and the KL from its prediction at T-1 to that at T.
    A fixed depth runs every token to T, so this leaves out how exited tokens' frozen keys and values
    change the others' attention; the real adaptive forward includes it.
    """
    nll, change, kl = [], [], []         # each a list over batches of (cap, tokens)
    for i in range(batches):
        states = []
        hooks = [model.injection.register_forward_pre_hook(lambda m, a: states.append(a[0].float())),
                 model.C.register_forward_pre_hook(lambda m, a: states.append(a[0].float()))]
        per_T, previous = [], None
        for T in range(1, cap + 1):
            states.clear()
            x, y = val_batch(data_dir, settings, model, i, device)      # and the same h_0 at every T
            with autocast_for(device):
                logits, _ = model(x, loops=T)
            logp = torch.log_softmax(logits.float(), dim=-1)      # over the padded vocabulary, as the loss is
            nll_T = -logp.gather(-1, y[..., None])[..., 0]
            kl_T = (logp.exp() * (logp - previous)).sum(-1) if previous is not None else torch.full_like(nll_T, math.inf)
            h = states          # h_0 ... h_(T-1) into the injection, then h_T into C
            change_T = (h[-1] - h[-2]).norm(dim=-1) / h[-1].norm(dim=-1)
            per_T.append((nll_T.flatten(), change_T.flatten(), kl_T.flatten()))
            previous = logp
        for hook in hooks:
            hook.remove()
        nll.append(torch.stack([p[0] for p in per_T])), change.append(torch.stack([p[1] for p in per_T]))
        kl.append(torch.stack([p[2] for p in per_T]))
    nll, change, kl = (torch.cat(t, dim=1) for t in (nll, change, kl))
    out, readout = {}, readout_flops(model)
    for name, crit in (("state", change), ("kl", kl)):
        points = []
        for eps in np.logspace(-5, 0.5, 56):
            below = crit < eps
            below[-1] = True                                    # the cap stops everyone
            exit_at = below.float().argmax(dim=0)               # first T (0-based) below the threshold
            loss = nll.gather(0, exit_at[None])[0].mean().item()
            T = exit_at.float().mean().item() + 1
            # affine in the loops: the cost at the mean exit depth is the mean cost
            flops = forward_flops(model, T, readout if name == "kl" else 0)
            points.append({"threshold": float(eps), "loss": loss, "mean_loops": T, "forward_mflops": flops / 1e6})
        out[name] = points
    out["fixed_mflops"] = {str(T): forward_flops(model, T) / 1e6 for T in range(1, cap + 1)}
    return out


@torch.no_grad()
def decoding_loss(model, data_dir, settings, loops, shared, batches, device):
    """Validation loss of decoding each sequence one token at a time through a KV cache."""
    losses = []
    for x, y in batches_of(data_dir, settings, model, batches, device):
        cache = KVCache(model, len(x), loops, shared=shared)
        nll = []
        with autocast_for(device):
            for i in range(x.size(1)):
                logits = model.decode(x[:, i:i + 1], cache, loops)
                logp = torch.log_softmax(logits.float()[:, 0], dim=-1)
                nll.append(-logp.gather(-1, y[:, i:i + 1])[:, 0])
        losses.append(torch.stack(nll).mean().item())
    return {"loss": float(np.mean(losses))}


PROMPT, TIMED = 64, (32, 160)     # decoding speed: prompt length, and the two runs whose difference is timed
TIMING = (f"{PROMPT}-token prompts; decoding steps only: the time of {TIMED[1]} new tokens less that of {TIMED[0]} "
          "(both prefill the prompt and record the same CUDA graphs)")


def decoding_rate(model, prompt, **generate):
    """common.decoding_rate over TIMED tokens: every step reads one span of the cache (prompt and new
    tokens fit in 256 positions)."""
    return common.decoding_rate(model, prompt, TIMED, **generate)


def decoding_speed(model, x, mu, cap, eps):
    """Decoding speed at batch 1 and 8, prompts from the token rows x: fixed depths μ_rec and the cap, and
    adaptive exit at ε with both caches, replayed as CUDA graphs; adaptive exit also launched from Python.
    Under exit, a batch's step runs until all its tokens have exited: `iterations` counts the loops a step
    ran, the most of its rows'."""
    rows = []
    for batch in (1, 8):
        prompt = x[:batch, :PROMPT]
        runs = [(mu, None, False, True), (cap, None, False, True), (cap, eps, False, True), (cap, eps, True, True),
                (cap, eps, False, False)]       # (loops, threshold, shared cache, CUDA graphs)
        for loops, threshold, shared, graph in runs:
            rate, stats = decoding_rate(model, prompt, loops=loops, exit_threshold=threshold, shared_cache=shared,
                                        cuda_graph=graph)
            used = stats.get("loops_per_token", torch.full((batch, 1), float(loops)))
            rows.append({"batch_size": batch, "loops": loops, "threshold": threshold, "cuda_graph": graph,
                         "kv_cache": "shared" if shared else "full", "tokens_per_sec": rate,
                         "mean_loops": used.float().mean().item(),
                         "iterations": used.max(0).values.float().mean().item()})
            print(f"  batch {batch}, {loops} loops, {'ε = %g' % threshold if threshold is not None else 'fixed'}, "
                  f"{rows[-1]['kv_cache']} cache, {'graphs' if graph else 'eager'}: {rate:,.0f} tokens/s", flush=True)
    return rows


def speed_claim(r):
    """Adaptive exit at batch 1, replayed as graphs, against fixed T = μ_rec replayed: at least 1.25× as fast?
    On the full cache, the one whose loss the adaptive rows measure (the shared one changes it: r["decoding"])."""
    rate = lambda **k: next(d["tokens_per_sec"] for d in r["speed"] if d["batch_size"] == 1 and d["cuda_graph"]
                            and all(d[key] == v for key, v in k.items()))
    fixed = rate(loops=r["mean_loops"], threshold=None)
    ratios = {cache: rate(threshold=r["speed_threshold"], kv_cache=cache) / fixed for cache in ("full", "shared")}
    return {"ratio": ratios, "holds": ratios["full"] >= 1.25}


def adaptive_claim(r):
    """What per-token exit should deliver: within 0.01 nats of the fixed T = μ_rec loss with ≥ 30 % fewer loops."""
    target = r["fixed"][str(r["mean_loops"])] + 0.01
    ok = [a for a in r["adaptive"] if a["loss"] <= target]
    best = min(ok, key=lambda a: a["mean_loops"]) if ok else None
    saved = 1 - best["mean_loops"] / r["mean_loops"] if best else None
    return {"target_loss": target, "best": best, "loops_saved": saved, "holds": saved is not None and saved >= 0.3}


def adaptive_markdown(results):
    fmt = common.fmt
    lines = []
    for r in results["models"]:
        c = r["claim"]
        lines += [f"### {r['model']} (μ_rec {r['mean_loops']}, cap {r['cap']} loops)", "",
                  f"Validation loss at fixed depths, {results['batches']} batches:", "",
                  "| T | " + " | ".join(r["fixed"]) + " |", "|---|" + "---|" * len(r["fixed"]),
                  "| loss | " + " | ".join(fmt(v) for v in r["fixed"].values()) + " |", "",
                  "Adaptive exit on the relative state change (the real forward, same batches and h_0):", "",
                  "| ε | mean loops per token | loss | vs fixed T = μ_rec |", "|---|---|---|---|"]
        base = r["fixed"][str(r["mean_loops"])]
        lines += [f"| {a['threshold']:g} | {a['mean_loops']:.2f} | {a['loss']:.4f} | {a['loss'] - base:+.4f} |"
                  for a in r["adaptive"]]
        verdict = (f"the lowest mean loops within 0.01 nats of T = {r['mean_loops']} ({fmt(base, '.4f')}) is "
                   f"{c['best']['mean_loops']:.2f} at ε = {c['best']['threshold']:g}, {100 * c['loops_saved']:.0f} % "
                   f"fewer loops: the claim (≥ 30 % fewer) {'holds' if c['holds'] else 'does not hold'}."
                   if c["best"] else f"no threshold came within 0.01 nats of T = {r['mean_loops']} ({fmt(base, '.4f')}).")
        lines += ["", "Claim: " + verdict, ""]
        sim = r["simulated"]
        lines += ["Exit criteria compared on the fixed-depth trajectories (simulated): the lowest loss each reaches "
                  "within a forward cost (MFLOPs per token; the KL criterion runs the coda and head every "
                  "iteration):", "", "| cost ≤ fixed T | state change: loss | KL: loss |", "|---|---|---|"]
        for T, g in sim["fixed_mflops"].items():
            best = [min((p["loss"] for p in sim[k] if p["forward_mflops"] <= g * (1 + 1e-9)), default=None)
                    for k in ("state", "kl")]
            lines.append(f"| {T} ({g:.1f}) | {fmt(best[0], '.4f')} | {fmt(best[1], '.4f')} |")
        lines += ["", "Decoding token by token through the KV cache ({} batches): what the shared cache costs".format(
            results["decode_batches"]), "", "| loops | full cache | shared cache | shared − full |", "|---|---|---|---|"]
        for T in sorted({d["loops"] for d in r["decoding"]}):
            full, shared = (next(d["loss"] for d in r["decoding"] if d["loops"] == T and d["shared"] == s)
                            for s in (False, True))
            lines.append(f"| {T} | {full:.4f} | {shared:.4f} | {shared - full:+.4f} |")
        if r.get("speed"):
            note = f", {r['speed_note']}" if "speed_note" in r else ""  # runs before batch and cache were kept: –
            lines += ["", f"Decoding speed{note}; iterations: the loops a step ran (under exit, the most of its "
                      "rows'):", "", "| batch | cache | loops | exit | decoding | mean loops per token | iterations "
                      "per step | new tokens/s |", "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {fmt(d.get('batch_size'), 'd')} | {d.get('kv_cache', '–')} | {d['loops']} | "
                      f"{'ε = %g' % d['threshold'] if d['threshold'] is not None else 'fixed'} | "
                      f"{'CUDA graph' if d['cuda_graph'] else 'launched from Python'} | {d['mean_loops']:.2f} | "
                      f"{fmt(d.get('iterations'), '.2f')} | {d['tokens_per_sec']:,.0f} |" for d in r["speed"]]
        if r.get("speed_claim"):
            s = r["speed_claim"]
            lines += ["", f"Claim: adaptive exit at batch 1, as graphs, decodes {s['ratio']['full']:.2f}× as fast as "
                      f"fixed T = {r['mean_loops']} as graphs (the shared cache: {s['ratio']['shared']:.2f}×): the "
                      f"claim (≥ 1.25×, full cache) {'holds' if s['holds'] else 'does not hold'}."]
        lines.append("")
    return "\n".join(lines) + common.provenance(results)


def adaptive_plot(results, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results["models"][:1]:
        fixed = [(int(T), L) for T, L in r["fixed"].items()]
        sim = r["simulated"]
        ax = axes[0]
        ax.plot(*zip(*fixed), "o-", color="k", label="fixed T")
        ax.plot([a["mean_loops"] for a in r["adaptive"]], [a["loss"] for a in r["adaptive"]], "s-", color="C0",
                label="adaptive exit (state change)")
        for a in r["adaptive"]:
            ax.annotate(f"{a['threshold']:g}", (a["mean_loops"], a["loss"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(r["claim"]["target_loss"], color="gray", ls=":", lw=0.8, label="fixed T = μ_rec + 0.01")
        ax.set_xlabel("mean loops per token")
        ax2 = axes[1]
        gf = sim["fixed_mflops"]
        ax2.plot([gf[str(T)] for T, _ in fixed], [L for _, L in fixed], "o-", color="k", label="fixed T")
        for k, color, name in (("state", "C0", "state change (simulated)"), ("kl", "C3", "KL (simulated)")):
            pts = sorted((p["forward_mflops"], p["loss"]) for p in sim[k])
            ax2.plot(*zip(*pts), "-", color=color, lw=1, label=name)
        ax2.set_xlabel("forward MFLOPs per token")
        for a in axes:
            a.set_ylabel("validation loss (nats)")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        lo = min(L for _, L in fixed)
        for a in axes:
            a.set_ylim(lo - 0.02, lo + 0.4)
        fig.suptitle(f"{r['model']}: adaptive exit against fixed depth", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# --speculative: self-speculative decoding


def speculative_main(args):
    if not (args.checkpoints or args.init_from):
        raise SystemExit("--speculative needs --checkpoints (run folders or ckpt.pt files) or --init_from")
    device = torch.device(args.overrides.get("device", args.preset["train"]["device"]))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this preset evaluates on cuda, and there is no GPU here (try --preset tiny)")
    results = {"preset": args.preset_name, "environment": common.environment(), "command": args.command,
               "data_dir": args.data_dir, "timing": TIMING if device.type == "cuda" else None, "models": []}
    for label, path in [(args.init_from, args.init_from)] if args.init_from else find_checkpoints(args):
        model, settings = load_pretrained(args, device) if args.init_from else load(path, device, args)
        x, _ = val_batch(args.data_dir, settings, model, 0, device)
        r = {"model": label, "checkpoint": path, "mean_loops": model.config.mean_loops,
             "runs": speculative_runs(model, x[:1, :PROMPT], args.loops or [16], args.draft_loops, args.draft_tokens)}
        r["claim"] = speculative_claim(r)
        results["models"].append(r)
        del model
    print(common.write_results(args.results_dir, "speculative", results, speculative_markdown))
    return results


def speculative_runs(model, prompt, loops, draft_loops, draft_tokens):
    """At each T of `loops`, sampled as sample.py samples (temperature 0.8, top 200) and greedily: plain
    decoding, then self-speculative decoding at each draft depth K < T and number of drafts per verify,
    with its acceptance rate (drafts kept / drafted) and new tokens per verifying forward. On a GPU, all
    replayed as CUDA graphs and timed (decoding_rate); elsewhere the acceptance only, over 64 new tokens."""
    runs, timed = [], prompt.is_cuda
    for T in loops:
        for sampling, how in (("sampled", dict(temperature=0.8, top_k=200)), ("greedy", dict(top_k=1))):
            plain = decoding_rate(model, prompt, loops=T, **how)[0] if timed else None
            runs.append({"loops": T, "sampling": sampling, "draft_loops": None, "draft_tokens": None,
                         "tokens_per_sec": plain})
            for K in [K for K in draft_loops if K < T]:
                for n in draft_tokens:
                    torch.manual_seed(0)
                    if timed:
                        rate, stats = decoding_rate(model, prompt, loops=T, draft_loops=K, draft_tokens=n, **how)
                    else:
                        rate, stats = None, {}
                        sample.generate(model, prompt, 64, loops=T, draft_loops=K, draft_tokens=n, stats=stats, **how)
                    runs.append({"loops": T, "sampling": sampling, "draft_loops": K, "draft_tokens": n,
                                 "tokens_per_sec": rate, "speedup": rate / plain if timed else None,
                                 "acceptance": stats["accepted"] / stats["drafted"],
                                 "tokens_per_verify": (stats["accepted"] + stats["rounds"]) / stats["rounds"]})
                    print(f"  T {T} {sampling}, K {K}, {n} drafts: {100 * runs[-1]['acceptance']:.0f} % kept"
                          + (f", {rate:,.0f} tokens/s ({rate / plain:.2f}× plain)" if timed else ""), flush=True)
    return runs


def speculative_claim(r):
    """Self-speculative decoding at T = 16, batch 1, sampled, as graphs: at least 1.5× plain decoding?"""
    fastest = max((d for d in r["runs"] if d["loops"] == 16 and d["sampling"] == "sampled" and d.get("speedup")),
                  key=lambda d: d["speedup"], default=None)
    return {"best": fastest, "holds": fastest is not None and fastest["speedup"] >= 1.5}


def speculative_markdown(results):
    fmt = common.fmt
    lines = []
    for r in results["models"]:
        timing = f"replayed as CUDA graphs, {results['timing']}" if results["timing"] else "not timed (no GPU)"
        lines += [f"### {r['model']} (μ_rec {r['mean_loops']}): self-speculative decoding, batch 1", "",
                  "Drafts at K loops, verified at T in one forward. Acceptance: drafts kept / drafted; tokens per "
                  f"verify: new tokens per verifying forward. Tokens/s: {timing}.", ""]
        for T, sampling in dict.fromkeys((d["loops"], d["sampling"]) for d in r["runs"]):
            rows = [d for d in r["runs"] if (d["loops"], d["sampling"]) == (T, sampling)]
            plain = rows[0]["tokens_per_sec"]
            lines += [f"T = {T}, {sampling} ({'temperature 0.8, top 200' if sampling == 'sampled' else 'top 1'}): "
                      f"plain decoding {fmt(plain, ',.0f')} tokens/s", "",
                      "| K | drafts per verify | acceptance | tokens per verify | tokens/s | × plain |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {d['draft_loops']} | {d['draft_tokens']} | {100 * d['acceptance']:.0f} % | "
                      f"{d['tokens_per_verify']:.2f} | {fmt(d['tokens_per_sec'], ',.0f')} | "
                      f"{fmt(d['speedup'], '.2f')} |" for d in rows[1:]]
            lines.append("")
        best = r["claim"]["best"]
        lines += ["Claim: " + (f"the fastest at T = 16, sampled, is K = {best['draft_loops']} with "
                               f"{best['draft_tokens']} drafts per verify, {best['speedup']:.2f}× plain decoding: the "
                               f"claim (≥ 1.5×) {'holds' if r['claim']['holds'] else 'does not hold'}." if best else
                               "not measured (T = 16 on a GPU)."), ""]
    return "\n".join(lines) + common.provenance(results)


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
    return "\n".join(lines) + "\n" + common.provenance(results)


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
