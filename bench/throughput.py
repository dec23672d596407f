"""
Training and generation speed on one GPU, side by side.

    python bench/throughput.py                      # all models, writes bench/results/throughput.{json,md}
    python bench/throughput.py --models parcae_140m gpt_140m --steps 10

For each config it times real training steps (forward, backward, clip, Muon + AdamW
step; bf16 autocast; compiled blocks) after warm-up, at the micro-batch the config
uses, and reports tokens/s, step time, peak memory and MFU (model.py's FLOPs estimate
against the GPU's peak). It also times the same Parcae model with the release's masked
loop (every sequence padded to the deepest), the peak memory at mean_loops 8 and 32
with backprop_loops 4, and generation with the KV cache at 1, 8 and 16 loops.
"""

import argparse
import json
import os
import platform
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from model import GPT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MaskedLoopGPT(GPT):
    """The release's loop: max(n) no-grad then max(k) grad iterations over the whole batch,
    with finished sequences frozen by a mask, so each micro-batch pays for its deepest one."""

    def recur(self, e, idx, depths, n_grad, cos, sin, cache=None):
        h = self.initial_state(e)
        k = depths.clamp(max=n_grad)
        n = depths - k

        def iterate(h):
            u = self.injection(h, e)
            for block in self.core:
                u = block(u, idx, cos, sin)
            return u

        with torch.no_grad():
            for i in range(int(n.max())):
                h = torch.where((i < n).to(h.device).view(-1, 1, 1), iterate(h), h)
        for j in range(int(k.max())):
            h = torch.where((j < k).to(h.device).view(-1, 1, 1), iterate(h), h)
        return h


def build(name, vocab_size, cls=GPT, **overrides):
    """The model of config/<name>.py, read and checked as train.py reads it, on the GPU."""
    settings = {**train.parse_settings([os.path.join(ROOT, "config", name + ".py")]), **overrides}
    config = train.model_config(settings, vocab_size)
    with torch.device("cuda"):        # initialise on the GPU: orthogonal_ of the embeddings is slow on a CPU
        model = cls(config)
    return model, settings


def time_training(model, batch_size, steps, warmup, profile_to=None):
    """Total wall time of `steps` steps after `warmup` steps, synced. With profile_to, also a
    torch.profiler table of 3 more steps' most expensive GPU kernels, written to that file."""
    c = model.config
    for block in model.blocks():         # as train.py does
        block.compile(dynamic=True)
    optimizers = model.configure_optimizers(lr=1e-3, weight_decay=0.2, device_type="cuda")
    torch.manual_seed(0)
    data = torch.randint(0, c.vocab_size, (steps + warmup, batch_size, c.block_size + 1), device="cuda")

    def step(i):
        x, y = data[i, :, :-1], data[i, :, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    model.train()
    torch.manual_seed(1)                 # the same depth draws for every model
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens_per_sec = batch_size * c.block_size / dt
    if profile_to:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(3):
                step(warmup + i)
            torch.cuda.synchronize()
        with open(profile_to, "w") as f:
            f.write(prof.key_averages().table(sort_by="device_time_total", row_limit=30))
    return {"params": model.num_params(), "batch_size": batch_size, "seq_len": c.block_size,
            "step_ms": 1000 * dt, "tokens_per_sec": tokens_per_sec,
            "mfu": model.estimate_mfu(tokens_per_sec), "flops_per_token": model.flops_per_token(),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


def time_generation(model, loops, batch_size, prompt_len=128, new_tokens=256):
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.generate(prompt, 32, loops=loops)         # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        model.generate(prompt, new_tokens, loops=loops)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    c = model.config
    slots = c.n_prelude + loops * c.n_core + c.n_coda
    cache_bytes = 2 * slots * batch_size * c.n_embd * c.block_size * 2      # k and v, bf16
    return {"loops": loops, "batch_size": batch_size, "new_tokens_per_sec": batch_size * new_tokens / dt,
            "ms_per_token": 1000 * dt / new_tokens, "kv_cache_gb": cache_bytes / 1e9,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "extra_mem_gb": (torch.cuda.max_memory_allocated() - base) / 1e9}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt_350m", "parcae_350m", "looped_add_350m",
                                                        "gpt_140m", "parcae_140m", "looped_add_140m"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--vocab_size", type=int, default=50257, help="GPT-2's")
    parser.add_argument("--profile", action="store_true",
                        help="also write a torch.profiler kernel table per model next to --out")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "throughput"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/throughput.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.recompile_limit = 64
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
               "cuda": torch.version.cuda, "steps": args.steps, "warmup": args.warmup, "training": {}, "generation": []}

    def run(label, name, cls=GPT, **overrides):
        model, settings = build(name, args.vocab_size, cls, **overrides)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")      # a plain file name
        profile_to = f"{args.out}.profile-{safe}.txt" if args.profile else None
        r = time_training(model, settings["batch_size"], args.steps, args.warmup, profile_to)
        results["training"][label] = r
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"{label:28s} {r['tokens_per_sec'] / 1e3:8.1f}k tok/s  {r['step_ms']:8.1f} ms/step  "
              f"MFU {mfu:>6s}  peak {r['peak_mem_gb']:.1f} GB", flush=True)
        del model
        torch.cuda.empty_cache()
        save()

    def save():     # after every measurement, so a run cut short still leaves its numbers
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(results))

    # the most important measurements first
    sizes = [m.split("_")[-1] for m in args.models if m.startswith("parcae")]
    for size in sizes:
        run(f"parcae_{size}", f"parcae_{size}")
        run(f"parcae_{size} (masked loop)", f"parcae_{size}", MaskedLoopGPT)
    for name in args.models:
        if name not in results["training"]:
            run(name, name)
        if name == "parcae_350m":
            run("parcae_350m mean_loops=32", "parcae_350m", mean_loops=32, backprop_loops=4)
            model, _ = build("parcae_350m", args.vocab_size)
            for loops in (1, 8, 16):
                for batch_size in (1, 8):
                    g = time_generation(model, loops, batch_size)
                    results["generation"].append(g)
                    save()
                    print(f"generate parcae_350m loops={loops:2d} batch={batch_size}: {g['new_tokens_per_sec']:8.1f} "
                          f"tok/s  cache {g['kv_cache_gb']:.2f} GB  peak {g['peak_mem_gb']:.1f} GB", flush=True)
            del model
    print(markdown(results))


def markdown(results):
    lines = [f"Training on one {results['gpu']} (torch {results['torch']}, CUDA {results['cuda']}), bf16, compiled blocks, "
             f"mean of {results['steps']} steps after {results['warmup']} warm-up steps:", "",
             "| model | params | micro-batch | tokens/s | step (ms) | MFU | peak memory (GB) |", "|---|---|---|---|---|---|---|"]
    for label, r in results["training"].items():
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] else "n/a"
        lines.append(f"| {label} | {r['params'] / 1e6:.1f}M | {r['batch_size']}×{r['seq_len']} | "
                     f"{r['tokens_per_sec']:,.0f} | {r['step_ms']:.0f} | {mfu} | {r['peak_mem_gb']:.1f} |")
    t = results["training"]
    for size in ("350m", "140m"):
        a, b = t.get(f"parcae_{size}"), t.get(f"parcae_{size} (masked loop)")
        if a and b:
            lines += ["", f"Active-sequences loop vs masked loop, parcae_{size}: "
                          f"{a['tokens_per_sec'] / b['tokens_per_sec']:.2f}× the tokens/s."]
    m8, m32 = t.get("parcae_350m"), t.get("parcae_350m mean_loops=32")
    if m8 and m32:
        lines += ["", f"Training memory depends on backprop_loops, not on the no-grad iterations: parcae_350m "
                      f"(backprop_loops 4) peaks at {m8['peak_mem_gb']:.1f} GB with mean_loops 8 and "
                      f"{m32['peak_mem_gb']:.1f} GB with mean_loops 32."]
    if results["generation"]:
        lines += ["", "Generation, parcae_350m, 128-token prompt, 256 new tokens, KV cache:", "",
                  "| loops | batch | new tokens/s | ms/token | KV cache (GB) | peak memory (GB) |", "|---|---|---|---|---|---|"]
        for g in results["generation"]:
            lines.append(f"| {g['loops']} | {g['batch_size']} | {g['new_tokens_per_sec']:,.0f} | {g['ms_per_token']:.1f} | "
                         f"{g['kv_cache_gb']:.2f} | {g['peak_mem_gb']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
