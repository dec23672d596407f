"""
Training and generation speed on one GPU, side by side.

    python bench/throughput.py                      # all models, writes bench/results/throughput.{json,md}
    python bench/throughput.py --models parcae_140m gpt_140m --skip_generation --out bench/results/throughput_140m

For each config it times real training steps (--accum micro-batches of the config's size,
forward and backward, then clip and the Muon + AdamW step; bf16 autocast; compiled as train.py
does) after warm-up, and reports tokens/s, step time, peak memory and MFU (model.py's FLOPs
estimate against the GPU's peak). It also times the same Parcae model with the release's
masked loop (every sequence padded to the deepest) and gives that loop's FLOPs ratio, the most
that skipping finished sequences can gain (`--flops_ratio_only` prints just the ratio, on any
machine); the peak memory at mean_loops 8 and 32 with backprop_loops 4; and generation with
the KV cache at 1, 8 and 16 loops as sample.py decodes (bf16 linear weights, each step replayed
as a CUDA graph; decoding steps only, the prefill and the graphs' recording and compiling left
out: common.decoding_rate), with and without compiling (sample.py --compile), with kernels.py's fused
kernels (sample.py --fused; check_fused compares its greedy tokens and logits), and at 16 loops also
launched op by op, compiled as train.py compiles (cuBLAS's one-token matmuls), with the one-token
reductions but each block its own graph, and compiled with the fp32 weights; each decoding figure
also as a share of the bandwidth bound, the tokens/s at which the GPU's memory bandwidth would just
read what a decoding step must (decode_bytes). --profile adds a torch.profiler table per model (its
most expensive kernels, and how much of the step the GPU was busy, from the profiler's trace), and
three of decoding at 16 loops: plain, fused and compiled.
`--layouts_only` times just one token's matmuls by row-major and column-major bf16 weights,
the layout sample.bf16_weights chooses; `--decode_ops_only` one token's matmuls and attention by
cuBLAS and each SDPA backend and as compiled reductions (time_decode_ops); `--cache_modes_only`
just decoding with the full and the shared KV cache (sample.py --kv_cache).

`--large_only` times just training of the 770m and 1.3b configs as each of 8 GPUs runs their recipe:
the config's micro-batch, grad_accum_steps / 8 micro-steps per optimizer step, under DDP (here one
process, so that its gradient buckets count in the memory), with the config's activation
checkpointing, and also without it where the config has it on. A run that does not fit is recorded
as out of memory. It reports peak memory (allocated and reserved) and tokens/s, and how long the
config's whole run would take on 8 GPUs at 8 times that rate:

    python bench/throughput.py --large_only --models gpt_770m parcae_770m --out bench/results/throughput_770m
    python bench/throughput.py --large_only --models gpt_1.3b parcae_1.3b --out bench/results/throughput_1.3b

`--small` times the small models of the scaling sweep instead (bench/results/throughput_small):
    python bench/throughput.py --small [--batch_size 64] [--profile]
d 256, 2 heads of 128, the byte vocabulary (257), the sweep's tokens a step (128 × 512; --batch_size
sequences of 512 instead), μ_rec 4 and μ_bwd 2, in the P/R/C layouts 1/2/1 and the sweep's
(bench/scaling.py); for each, the Transformer with the same unique layers, and Parcae with depths
drawn per sequence (as trained) and with one depth for the whole step. Every step of --steps
(default 400) is timed from one host sync to the next, as train.py syncs once a step, compiled as
train.py compiles. Steps during which torch.compile made a graph are left out of the rates and
counted apart; warmup_s is the time until the last of them ended (steady state from then on). The
rates are of the steady steps of the second half, and count useful FLOPs only: each step's from the
depths drawn for it, Σ over its sequences of model.flops_per_token(loops=T) (work on a sequence that
has left the loop would not count), counted after the timed steps. --profile also profiles 2 steady
steps of each (profiles/small_*.txt): how much of a step the GPU was busy, and with what.
"""

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import socket
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig, KVCache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MaskedLoopGPT(GPT):
    """The release's loop: max(n) no-grad then max(k) grad iterations over the whole batch,
    with finished sequences frozen by a mask, so each micro-batch pays for its deepest one."""

    def recur(self, e, idx, depths, n_grad, cos, sin):
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


def masked_loop_flops_ratio(model, batch_size, draws=1000):
    """The masked loop's training FLOPs over the active-sequences loop's, for micro-batches of depths
    drawn as in training: the most that computing only the running sequences can gain. The masked
    loop runs every sequence of a micro-batch to the deepest one's depth."""
    active = masked = 0.0
    with torch.random.fork_rng(devices=[]):     # the same draws every time, and the caller's RNG untouched
        torch.manual_seed(0)
        for _ in range(draws):
            depths = model.sample_depths(batch_size).tolist()
            active += sum(model.flops_per_token(loops=T) for T in depths) / batch_size
            masked += model.flops_per_token(loops=max(depths))
    return masked / active


def build(name, vocab_size, cls=GPT, device="cuda", **overrides):
    """The model of config/<name>.py, read and checked as train.py reads it, on `device`."""
    settings = {**train.parse_settings([os.path.join(ROOT, "config", name + ".py")]), **overrides}
    config = train.model_config(settings, vocab_size)
    with torch.device(device):        # on the GPU: a CPU takes seconds for orthogonal_ of the embeddings
        model = cls(config)
    return model, settings


def time_training(model, batch_size, accum, steps, warmup, profile_to=None, activation_checkpoint=False, ddp=False):
    """Mean wall time of a training step (`accum` micro-batches, then the optimizers) over `steps`
    steps after `warmup`, synced. With profile_to, also a torch.profiler table of 2 more steps'
    most expensive GPU kernels, and how busy the GPU was, written to that file. activation_checkpoint
    and ddp (the one-process group that main starts) as train.py has them."""
    c = model.config
    if activation_checkpoint:
        train.checkpoint_blocks(model)
    train.compile_model(model)        # as train.py does
    optimizers = train.configure_optimizers(model, lr=1e-3, weight_decay=0.2, device_type="cuda")
    forward = train.wrap_ddp(model, torch.device("cuda", torch.cuda.current_device())) if ddp else model
    torch.manual_seed(0)
    data = torch.randint(0, c.vocab_size, (accum, batch_size, c.block_size + 1), device="cuda")

    def step():
        for micro in range(accum):
            x, y = data[micro, :, :-1], data[micro, :, 1:]
            with forward.no_sync() if ddp and micro < accum - 1 else nullcontext():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = forward(x, y)
                (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    model.train()
    torch.manual_seed(1)                 # the same depth draws for every model
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens_per_sec = accum * batch_size * c.block_size / dt
    result = {"params": model.num_params(), "batch_size": batch_size, "accum": accum, "seq_len": c.block_size,
              "step_ms": 1000 * dt, "tokens_per_sec": tokens_per_sec,
              "mfu": train.estimate_mfu(model, tokens_per_sec), "flops_per_token": model.flops_per_token(),
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
              "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    if profile_to:
        result.update(profile_steps(step, 2, profile_to))
    return result


def profile_steps(step, n, path):
    """Run step() n more times under torch.profiler and write to `path` the table of the most expensive
    kernels (then of CPU time), headed by how long a step took, its GPU kernels' time by kernel_family, and
    how long the GPU was busy (gpu_timeline): a busy share well under 1 says the host, not the GPU, sets
    the pace. Returns, per step: gpu_busy_frac, gpu_ms and gpu_ms_by_family."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else lambda: None
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        wall = (time.perf_counter() - t0) / n
    table, gpu = prof.key_averages(), gpu_timeline(prof)
    busy, kernels = gpu["busy_s"] / n, gpu["kernel_s"] / n
    by_family = {k: 1000 * v / n for k, v in gpu["by_family_s"].items()}
    families = ", ".join(f"{family} {ms:.1f}" for family, ms in sorted(by_family.items(), key=lambda kv: -kv[1]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"step {1000 * wall:.1f} ms under the profiler; GPU kernels {1000 * kernels:.1f} ms ({families}); "
                f"at least one running {1000 * busy:.1f} ms ({100 * busy / wall:.0f} % busy)\n\n")
        f.write(table.table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=40))
        f.write("\n\nby CPU time:\n" + table.table(sort_by="cpu_time_total", row_limit=25))
    return {"gpu_busy_frac": busy / wall, "gpu_ms": 1000 * busy, "gpu_ms_by_family": by_family}


def step_flops(model, depths, seq_len):
    """Useful training FLOPs of one step of sequences at these depths: each sequence's own
    model.flops_per_token(loops=T) (the Transformer: its one pass) times its tokens."""
    if not model.config.looped:
        return len(depths) * seq_len * model.flops_per_token()
    per_depth = {T: model.flops_per_token(loops=T) for T in set(depths)}     # (each call walks the parameters)
    return seq_len * sum(per_depth[T] for T in depths)


def graphs_compiled():
    """How many graphs torch.compile has made so far in this process, forward (Dynamo) and backward (AOT)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"] + counters["aot_autograd"]["total"]


def time_steady(model, batch_size, steps, device, compiled=True, profile_to=None):
    """Train `steps` steps on random tokens as train.py does (bf16 autocast on a GPU, clip, one host sync
    for the finiteness check, Muon + AdamW), drawing the depths here with the model's own sampler so that
    each step's useful FLOPs are known. Returns, per step: seconds from one sync to the next, graphs
    compiled during it, and useful FLOPs, counted after the last step: at 75 µs a model.flops_per_token()
    call on a CPU, counting 128 sequences' inside the timed steps cost a step 10 ms. With profile_to, 2
    more steps, in steady state, under the profiler: `profile`, profile_steps's figures."""
    c = model.config
    if compiled:
        train.compile_model(model)
    if c.looped:                    # graph_iterations, as the sweep trains them (a no-op on the CPU)
        model.core_iteration = train.GraphedIterations(model.core_iteration)
    optimizers = train.configure_optimizers(model, lr=1e-3, weight_decay=0.2, device_type=device.type)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    torch.manual_seed(0)
    data = torch.randint(0, c.vocab_size, (batch_size, c.block_size + 1), device=device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    model.train()
    times, compiles, drawn = [], [], []
    graphs, last = graphs_compiled(), time.perf_counter()

    def step():
        depths = model.sample_depths(batch_size) if c.looped else None     # the Transformer ignores depths
        with autocast:
            _, loss = model(x, y, depths=depths)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch.stack([loss.detach(), grad_norm.to(loss.dtype)]).isfinite().tolist()      # train.py's sync
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return depths

    for _ in range(steps):
        depths = step()
        now, n = time.perf_counter(), graphs_compiled()
        times.append(now - last)
        compiles.append(n - graphs)
        drawn.append(depths)
        last, graphs = now, n
    flops = [step_flops(model, d.tolist() if c.looped else [1] * batch_size, c.block_size) for d in drawn]
    return {"times": times, "compiles": compiles, "flops": flops,
            **({"profile": profile_steps(step, 2, profile_to)} if profile_to else {})}


def steady_state(steps, tokens_per_step, peak=None):
    """The rates of time_steady's steps: over the second half, leaving out the steps that compiled; and
    warmup_s, the time until the last step that compiled ended."""
    times, compiles, flops = steps["times"], steps["compiles"], steps["flops"]
    n = len(times)
    steady = [i for i in range(n // 2, n) if not compiles[i]]
    seconds = sum(times[i] for i in steady)
    compiled = [i for i in range(n) if compiles[i]]
    useful = sum(flops[i] for i in steady) / seconds
    return {"tokens_per_sec": tokens_per_step * len(steady) / seconds, "useful_flops_per_sec": useful,
            "mfu": useful / peak if peak else None, "step_ms": 1000 * seconds / len(steady),
            "warmup_s": sum(times[:compiled[-1] + 1]) if compiled else 0.0, "compile_steps": len(compiled),
            "compile_steps_s": sum(times[i] for i in compiled),
            "late_compile_steps": sum(1 for i in compiled if i >= n // 2), "steady_steps": len(steady)}


SMALL = dict(vocab_size=257, block_size=512, n_embd=256, n_head=2, mean_loops=4, backprop_loops=2)   # heads of 128

def small_models(sweep_layers, shape):
    """(label fields, GPTConfig) of every small model timed: for P/R/C 1/2/1 and the sweep's layout, the
    Transformer with the same layers, and Parcae with depths per sequence and per step."""
    out = []
    for P, R, C in dict.fromkeys([(1, 2, 1), tuple(sweep_layers)]):
        shape = dict(shape, n_prelude=P, n_core=R, n_coda=C)
        out.append(({"model": "gpt", "per_sequence_depths": None}, GPTConfig(**shape, injection="none")))
        for per_sequence in (True, False):
            out.append(({"model": "parcae", "per_sequence_depths": per_sequence},
                        GPTConfig(**shape, injection="parcae",
                                  depth_sampling="per-sequence" if per_sequence else "per-batch")))
    return out


def time_small(steps, device, sweep_layers, batch_size, compiled=True, save=lambda results: None, profiles=None,
               **shape):
    """throughput_small's results: every small model's steady-state training rate (see the docstring),
    and with `profiles` (a folder) each model's profile_steps table there, its figures in its run.
    batch_size and shape (GPTConfig fields) replace SMALL's for a test on the CPU."""
    peak = train.peak_flops(device) if device.type == "cuda" else None
    shape = {**SMALL, **shape}
    results = {**machine(device), "steps": steps, "batch_size": batch_size, **shape, "compiled": compiled,
               "runs": []}
    for fields, config in small_models(sweep_layers, shape):
        with torch.device(device):
            model = GPT(config)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        depths = {None: "", True: "_per_sequence", False: "_per_step"}[fields["per_sequence_depths"]]
        name = f"small_{config.n_prelude}{config.n_core}{config.n_coda}_d{config.n_embd}_{fields['model']}{depths}"
        timed = time_steady(model, batch_size, steps, device, compiled,
                            profile_to=os.path.join(profiles, name + ".txt") if profiles else None)
        r = {**steady_state(timed, batch_size * config.block_size, peak), **timed.get("profile", {})}
        results["runs"].append({**fields, "d_model": config.n_embd,
                                "layers": [config.n_prelude, config.n_core, config.n_coda],
                                "params": model.num_params(), **r,
                                "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None})
        del model
        torch._dynamo.reset()           # each model compiles afresh: its warm-up is its own
        save(results)
    return results


def machine(device):
    cuda = device.type == "cuda"
    return {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda, "commit": common.environment()["commit"]}


def small_markdown(results):
    profiled = [r for r in results["runs"] if "gpu_busy_frac" in r]
    lines = [f"Steady-state training of the scaling sweep's small models on one {results['gpu']} (torch "
             f"{results['torch']}, commit {results['commit']}): vocab {results['vocab_size']}, "
             f"{results['batch_size']} × {results['block_size']} tokens a step, μ_rec {results['mean_loops']}, "
             f"μ_bwd {results['backprop_loops']}, {'compiled' if results['compiled'] else 'not compiled'}; "
             f"{results['steps']} steps, rates over the steady steps of the second half (steps that compiled "
             "left out), useful FLOPs only. Made by `python bench/throughput.py --small"
             f"{' --profile' if profiled else ''}`.", "",
             "| P/R/C | d | model | depths | tokens/s | step (ms) | MFU | MFU / Transformer's | warm-up (s) "
             "| steps that compiled (late) |", "|---|---|---|---|---|---|---|---|---|---|"]
    gpt = {(tuple(r["layers"]), r["d_model"]): r for r in results["runs"] if r["model"] == "gpt"}
    for r in results["runs"]:
        ref = gpt.get((tuple(r["layers"]), r["d_model"]))
        ratio = f"{r['mfu'] / ref['mfu']:.2f}" if r["mfu"] and ref and ref["mfu"] else "–"
        depths = {None: "–", True: "per sequence", False: "per step"}[r["per_sequence_depths"]]
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        lines.append(f"| {'/'.join(map(str, r['layers']))} | {r['d_model']} | {r['model']} | {depths} | "
                     f"{r['tokens_per_sec']:,.0f} | {r['step_ms']:.1f} | {mfu} | {ratio} | "
                     f"{r['warmup_s']:.1f} | {r['compile_steps']} ({r['late_compile_steps']}) |")
    if profiled:
        lines += ["", "Under the profiler, 2 steady steps each (profiles/small_*.txt): the share of a step in which "
                  "the GPU ran a kernel, and the GPU time of each kind of kernel, per step."]
    for r in profiled:
        depths = {None: "", True: ", per sequence", False: ", per step"}[r["per_sequence_depths"]]
        kinds = ", ".join(f"{k} {ms:.1f}" for k, ms in sorted(r["gpu_ms_by_family"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {'/'.join(map(str, r['layers']))} {r['model']}{depths}: GPU busy "
                     f"{100 * r['gpu_busy_frac']:.0f} % ({r['gpu_ms']:.1f} ms a step; {kinds or 'no GPU kernels'})")
    return "\n".join(lines) + "\n"


def decode_ops_markdown(results):
    lines = [f"One decoding token's matmuls and attention at parcae_350m's width (d 1024; the heads in the "
             f"shape column), batch 1, bf16, on one "
             f"{results['gpu']} (torch {results['torch']}, commit {results['commit']}): µs per call, "
             f"{results['calls']} calls recorded in one CUDA graph and replayed; the bytes it must read, and the "
             "share of the datasheet's bandwidth that makes; the largest difference from the first row of its "
             "group. Made by `python bench/throughput.py --decode_ops_only`.", "",
             "| operation | shape | variant | µs | MB read | of the bandwidth | max difference |",
             "|---|---|---|---|---|---|---|"]
    for r in results["decode_ops"]:
        share = "–" if r["bandwidth_share"] is None else f"{100 * r['bandwidth_share']:.0f} %"
        diff = "–" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['variant']} | {r['us']:.2f} | {r['bytes'] / 1e6:.2f} | "
                     f"{share} | {diff} |")
    return "\n".join(lines) + "\n"


def gpu_timeline(prof):
    """The GPU's work in a profile, read from its trace (the chrome-trace export): the kernels, copies
    and memsets, each an interval of time. Returns how many, their summed time, how long at least
    one of them was running (busy_s: the union of the intervals, so overlaps count once), and the
    summed time of each kernel_family."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return timeline_of(json.load(f)["traceEvents"])


def timeline_of(events):
    """gpu_timeline() of a list of chrome-trace events (times in µs). Not counted: CPU operators,
    GPU-side annotations such as Optimizer.step (their kernels are already counted), and the
    profiler's "Command Buffer Full", which is the CPU waiting for room in the launch queue."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in gpu):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    by_family = {}
    for e in gpu:
        family = kernel_family(e["name"])
        by_family[family] = by_family.get(family, 0.0) + e["dur"] / 1e6
    return {"kernels": len(gpu), "kernel_s": sum(e["dur"] for e in gpu) / 1e6, "busy_s": busy / 1e6,
            "by_family_s": by_family}


def kernel_family(name):
    """A kernel's kind, told by its name (cuBLAS's nvjet/gemm, cuDNN's or flash attention, Triton)."""
    name = name.lower()
    if any(word in name for word in ("sdpa", "flash", "fmha", "attention")):
        return "attention"
    if any(word in name for word in ("nvjet", "gemm", "splitkreduce", "cutlass")):
        return "matmul"
    if name.startswith("triton"):
        return "fused by torch.compile"
    return "other"


def time_weight_layouts(d, batch_size=1, calls=400):
    """µs per bf16 matmul of batch_size tokens by each weight shape of a block (d×d, 3d×d, 4d×d, d×4d), stored
    row-major (as nn.Linear keeps it) and column-major (as sample.bf16_weights stores it), each as
    `calls` matmuls recorded in one CUDA graph and replayed, as decoding replays them."""
    results = []
    for out_features, in_features in ((d, d), (3 * d, d), (4 * d, d), (d, 4 * d)):
        x = torch.randn(batch_size, in_features, device="cuda", dtype=torch.bfloat16)
        row_major = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
        r = {"weight": f"{out_features}x{in_features}", "batch_size": batch_size}
        for layout, w in (("row_major_us", row_major), ("column_major_us", row_major.t().contiguous().t())):
            r[layout] = per_call_us(lambda: torch.nn.functional.linear(x, w), calls, x.device)
        results.append(r)
    return results


def per_call_us(fn, calls, device):
    """µs per call of fn: on a GPU `calls` calls recorded in one CUDA graph and replayed, as decoding
    replays them (two calls first, outside it, for cuBLAS, cuDNN and torch.compile to settle); on the
    CPU, calls timed in a loop."""
    fn(), fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e6 * (time.perf_counter() - t0) / calls
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / calls


def time_decode_ops(d=1024, n_head=8, spans=(256, 512), calls=200, device=torch.device("cuda"), compiled=True,
                    save=lambda rows: None):
    """
    One decoding token's costliest operations at parcae_350m's shapes (d 1024, 8 heads of 128), batch 1,
    bf16, each timed by per_call_us, with the bytes it must read and the share of the GPU's datasheet
    bandwidth that makes:
    - a matmul by each weight of a block (d×d, 3d×d, 4d×d, d×4d): by cuBLAS over the column-major
      weight that sample.bf16_weights stores, and as one multiply-and-sum over the row-major weight,
      which torch.compile turns into a single reduction kernel (with and without its coordinate-descent
      tuning of the kernel's block sizes);
    - attention of one query over `span` cached positions with the additive mask KVCache makes, by
      each SDPA backend, by flash attention without the mask (what attention could cost), and as a
      compiled softmax(q kᵀ/√D + mask) v in fp32.
    Each variant's largest difference from the first of its group (cuBLAS; the default SDPA) is kept;
    save(rows) after each.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    on_gpu = device.type == "cuda"
    dtype, bandwidth = torch.bfloat16, peak_bandwidth(torch.cuda.get_device_name(device)) if on_gpu else None
    rows, tag = [], "" if compiled else " (not compiled)"

    def measure(op, shape, variant, fn, nbytes, reference=None):
        us, out = per_call_us(fn, calls, device), fn()
        diff = None if reference is None else (out.float() - reference.float()).abs().max().item()
        rows.append({"op": op, "shape": shape, "variant": variant, "us": us, "bytes": nbytes, "max_abs_diff": diff,
                     "bandwidth_share": nbytes / (us * 1e-6) / bandwidth if bandwidth else None})
        print(f"{op:9s} {shape:22s} {variant:40s} {us:7.2f} µs", flush=True)
        save(rows)
        return out

    def compile_fresh(fn, **config):       # compiled on its first call, which per_call_us makes
        torch._dynamo.reset()
        if not compiled:
            return fn
        with torch._inductor.config.patch(**config):
            compiled_fn = torch.compile(fn)
            compiled_fn(*fn.example)
        return compiled_fn

    for out_features, in_features in ((d, d), (3 * d, d), (4 * d, d), (d, 4 * d)):
        x = torch.randn(1, in_features, device=device, dtype=dtype)
        w = torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features ** 0.5
        w_column_major, shape, nbytes = w.t().contiguous().t(), f"{out_features}x{in_features}", 2 * w.numel()
        ref = measure("matmul", shape, "cuBLAS, column-major weight",
                      lambda: torch.nn.functional.linear(x, w_column_major), nbytes)
        mul_sum = lambda x, w: (x[:, None, :] * w).sum(-1)
        mul_sum.example = (x, w)
        for label, config in (("compiled multiply-and-sum", {}),
                              ("compiled multiply-and-sum, tuned", {"coordinate_descent_tuning": True})):
            fn = compile_fresh(mul_sum, **config)
            measure("matmul", shape, label + tag, lambda: fn(x, w), nbytes, ref)
    for span in spans:
        q = torch.randn(1, n_head, 1, d // n_head, device=device, dtype=dtype)
        k, v = (torch.randn(1, n_head, span, d // n_head, device=device, dtype=dtype) for _ in range(2))
        mask = torch.zeros(1, span, device=device, dtype=dtype)
        mask[:, span // 2 + 1:] = -math.inf         # half the window filled, as KVCache masks the rest
        shape, nbytes = f"{n_head} heads x {span} keys", 2 * (k.numel() + v.numel())
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ref = measure("attention", shape, "SDPA, default backend", lambda: sdpa(q, k, v, attn_mask=mask), nbytes)
        backends = [("memory-efficient", SDPBackend.EFFICIENT_ATTENTION)] if on_gpu else []
        for name, backend in backends + [("math", SDPBackend.MATH)]:
            def by_backend(backend=backend):
                with sdpa_kernel(backend):
                    return sdpa(q, k, v, attn_mask=mask)
            measure("attention", shape, f"SDPA, {name}", by_backend, nbytes, ref)
        if on_gpu:      # flash attention takes no mask: the filled keys alone
            filled_k, filled_v = k[:, :, :span // 2 + 1], v[:, :, :span // 2 + 1]
            def unmasked():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return sdpa(q, filled_k, filled_v)
            measure("attention", shape, "SDPA, flash, the filled keys, no mask", unmasked,
                    2 * (filled_k.numel() + filled_v.numel()), ref)
        softmax = lambda q, k, v, mask: ((q @ k.transpose(-1, -2)).float() * q.size(-1) ** -0.5
                                         + mask).softmax(-1).type_as(v) @ v
        softmax.example = (q, k, v, mask)
        fn = compile_fresh(softmax)
        measure("attention", shape, "compiled softmax" + tag, lambda: fn(q, k, v, mask), nbytes, ref)
    return rows


# memory bandwidth (bytes/s) from the vendors' datasheets, matched to the GPU's name as train.peak_flops matches
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "B200": 8.0e12,
                  "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "L40S": 0.864e12, "L4": 0.3e12,
                  "RTX 4090": 1.008e12}


def peak_bandwidth(name):
    matches = [gpu for gpu in PEAK_BANDWIDTH if re.search(rf"\b{gpu}\b", name)]
    return PEAK_BANDWIDTH[max(matches, key=len)] if matches else None


def decode_bytes(model, loops, batch_size, positions):
    """
    The bytes a decoding step must read from memory, at the least: the bf16 matrices of every layer
    application (attention, MLP, value-embedding gate: a core block's once per loop), the injection's
    at every iteration and C once, the tied head; and for each sequence the bf16 keys and values of the
    `positions` it attends to, in every layer application. Left out, as a few kB: the norms' weights,
    A_log and dt_bias, and the embedding rows looked up.
    """
    c = model.config
    matrices = lambda module: sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    loops = loops if c.looped else 1
    weights = sum(map(matrices, [*model.prelude, *model.coda])) + loops * sum(map(matrices, model.core))
    if c.looped:
        weights += loops * matrices(model.injection) + matrices(model.C)
    weights += c.padded_vocab_size * c.n_embd                   # the head
    applications = c.n_prelude + loops * c.n_core + c.n_coda
    kv = batch_size * applications * 2 * positions * c.n_embd   # keys and values
    return 2 * (weights + kv)


GENERATION_TIMED = (136, 256)    # new tokens after a 128-token prompt: both runs end in the cache's second span


def time_generation(model, loops, batch_size, cuda_graph=True, prompt_len=128, timed=GENERATION_TIMED,
                    shared_cache=False):
    """Decoding speed as sample.py decodes, one-time costs left out (common.decoding_rate: the time of
    timed[1] new tokens less that of timed[0]), and memory: the cache, and the peak over those runs."""
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rate, _ = common.decoding_rate(model, prompt, timed, loops=loops, cuda_graph=cuda_graph, shared_cache=shared_cache)
    c = model.config
    slots = c.n_prelude + (1 if shared_cache else loops) * c.n_core + c.n_coda
    cache_bytes = 2 * slots * batch_size * c.n_embd * c.block_size * 2      # k and v, bf16, the whole window
    # the timed steps attend to prompt_len + timed[0] + 1, ..., prompt_len + timed[1] positions
    step_bytes = decode_bytes(model, loops, batch_size, positions=prompt_len + sum(timed) / 2)
    bandwidth = peak_bandwidth(torch.cuda.get_device_name())
    return {"loops": loops, "batch_size": batch_size, "cuda_graph": cuda_graph,
            "kv_cache": "shared" if shared_cache else "full",
            "timed": list(timed), "new_tokens_per_sec": rate, "ms_per_token": 1000 * batch_size / rate,
            "step_gb": step_bytes / 1e9, "bound_tokens_per_sec": None if bandwidth is None else
            batch_size * bandwidth / step_bytes,
            "kv_cache_gb": cache_bytes / 1e9, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "extra_mem_gb": (torch.cuda.max_memory_allocated() - base) / 1e9}


def check_fused(model, loops, new_tokens=64, prompt_len=128):
    """Does sample.py --fused decode what plain decoding does, in bf16 on a GPU? On a copy of `model` whose
    matrices are all random (an initialised model's out-projections are zero: its blocks would add nothing),
    greedy tokens with and without the fused kernels after one random prompt, and the logits of both along
    the first one's tokens, through a cache each: how many tokens agree before the first that differs (a
    bf16 rounding may tip a near tie), and the largest logit difference relative to the largest logit."""
    import kernels
    plain = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if p.dim() == 2 and "value_embed" not in name and "wte" not in name:
                p.add_(plain.state_sigma * torch.randn_like(p))
    fused = kernels.fuse_for_decoding(copy.deepcopy(plain))
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
        tokens = [sample.generate(m, prompt, new_tokens, loops=loops, top_k=1)[0, prompt_len:]
                  for m in (plain, fused)]
        sequence = torch.cat([prompt[0], tokens[0]])[None]
        logits = [m.decode(sequence, KVCache(m, 1, loops=loops), loops=loops).float() for m in (plain, fused)]
    same = (tokens[0] == tokens[1]).long().cumprod(0).sum().item()
    return {"loops": loops, "new_tokens": new_tokens, "same_tokens_before_first_difference": same,
            "max_logit_difference": (logits[0] - logits[1]).abs().max().item() / logits[0].abs().max().item()}


def profile_decoding(model, loops, path, new_tokens=16):
    """A torch.profiler table of decoding steps at batch 1, each kernel launched from Python so that
    the profiler sees them one by one (a CUDA graph replays the same kernels): which kernels a new
    token costs, how many, and how long each runs on the GPU. On a GPU its first line also gives one
    decoding step's own share, the prefill's (profiled alone) taken off: its kernels and their GPU time,
    by kind. A CUDA graph replays them one after another, so a step takes at least that time."""
    model.eval()
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, 128), device=device)
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])

    def profiled(tokens):
        with torch.profiler.profile(activities=activities) as prof:
            sample.generate(model, prompt, tokens, loops=loops, cuda_graph=False)
            if on_gpu:
                torch.cuda.synchronize()
        return prof

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
        sample.generate(model, prompt, 4, loops=loops, cuda_graph=False)        # warm-up (and compiling)
        prefill, prof = profiled(1), profiled(new_tokens + 1)                   # the prompt; + new_tokens steps
    table, gpu, alone = prof.key_averages(), gpu_timeline(prof), gpu_timeline(prefill)
    step = {key: (gpu[key] - alone[key]) / new_tokens for key in ("kernels", "kernel_s")}
    kinds = sorted(((gpu["by_family_s"][k] - alone["by_family_s"].get(k, 0.0)) / new_tokens, k)
                   for k in gpu["by_family_s"])
    one = (f" One decoding step: {step['kernels']:.0f} kernels, {1e3 * step['kernel_s']:.2f} ms of GPU time ("
           + ", ".join(f"{kind} {1e3 * t:.2f}" for t, kind in reversed(kinds) if t > 0) + " ms)") if on_gpu else ""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"loops {loops}, batch 1: the prefill of 128 tokens and {new_tokens} decoding steps; {gpu['kernels']} "
                f"GPU kernels and copies, {1e3 * gpu['kernel_s']:.1f} ms of GPU time in all.{one}\n\n")
        f.write(table.table(sort_by="device_time_total" if on_gpu else "cpu_time_total", row_limit=50))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt_350m", "parcae_350m", "looped_add_350m",
                                                        "gpt_140m", "parcae_140m", "looped_add_140m"])
    parser.add_argument("--steps", type=int, help="timed steps (default 8; with --small 400, all timed)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step; 2 is what each GPU "
                        "does in the configs' 8-GPU recipe (grad_accum_steps 16 over 8 GPUs)")
    parser.add_argument("--vocab_size", type=int, default=50257, help="GPT-2's")
    parser.add_argument("--profile", action="store_true",
                        help="also write a torch.profiler kernel table per model to profiles/ beside --out")
    parser.add_argument("--skip_training", action="store_true", help="time generation only")
    parser.add_argument("--skip_generation", action="store_true", help="time training only")
    parser.add_argument("--cache_modes_only", action="store_true", help="only time decoding with the full and the "
                        "shared KV cache at 1, 8 and 16 loops (CUDA graph, not compiled; default --out: "
                        "bench/results/throughput_cache)")
    parser.add_argument("--layouts_only", action="store_true", help="only time one token's matmuls by row-major "
                        "and column-major bf16 weights (default --out: bench/results/throughput_layouts)")
    parser.add_argument("--large_only", action="store_true", help="only time training of the 770m and 1.3b "
                        "configs as each of 8 GPUs runs their recipe, under one-process DDP (see above; default "
                        "--models: gpt_770m parcae_770m gpt_1.3b parcae_1.3b, --out: bench/results/throughput_large)")
    parser.add_argument("--flops_ratio_only", action="store_true", help="only print, for each Parcae model, the "
                        "FLOPs ratio of the masked loop to the active-sequences loop (on any machine)")
    parser.add_argument("--decode_ops_only", action="store_true", help="only time one decoding token's matmuls and "
                        "attention at parcae_350m's shapes, by cuBLAS and cuDNN and as compiled reductions (default "
                        "--out: bench/results/throughput_decode_ops)")
    parser.add_argument("--small", action="store_true", help="only time the scaling sweep's small models in steady "
                        "state (default --out: bench/results/throughput_small)")
    parser.add_argument("--batch_size", type=int, help="with --small: sequences of 512 tokens a step (default: the "
                        "sweep's, bench/scaling.py)")
    parser.add_argument("--out", help="the results' path without .json / .md (default: bench/results/throughput)")
    args = parser.parse_args()
    default = ("throughput_layouts" if args.layouts_only else "throughput_cache" if args.cache_modes_only
               else "throughput_large" if args.large_only else "throughput_small" if args.small
               else "throughput_decode_ops" if args.decode_ops_only else "throughput")
    args.out = args.out or os.path.join(ROOT, "bench", "results", default)
    args.steps = args.steps or (400 if args.small else 8)
    if args.large_only and parser.get_default("models") == args.models:
        args.models = LARGE
    if args.flops_ratio_only:
        for name in [m for m in args.models if m.startswith("parcae")]:
            model, settings = build(name, args.vocab_size, device="cpu")
            print(f"{name}: the masked loop costs {masked_loop_flops_ratio(model, settings['batch_size']):.3f}× the "
                  f"active-sequences loop's training FLOPs at micro-batch {settings['batch_size']}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/throughput.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.small:
        import scaling      # the sweep's layout
        write = lambda results: common.write_results(os.path.dirname(args.out), os.path.basename(args.out), results,
                                                     small_markdown)
        sweep = scaling.SCALING["small"]
        results = time_small(args.steps, torch.device("cuda"), sweep["layers"], args.batch_size or
                             sweep["train"]["batch_size"], save=write,
                             profiles=os.path.join(os.path.dirname(args.out), "profiles") if args.profile else None)
        print(small_markdown(results))
        return
    if args.decode_ops_only:
        results = {**machine(torch.device("cuda")), "calls": 200}
        write = lambda rows: common.write_results(os.path.dirname(args.out), os.path.basename(args.out),
                                                  {**results, "decode_ops": rows}, decode_ops_markdown)
        print(write(time_decode_ops(calls=results["calls"], save=write)))
        return
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
               "cuda": torch.version.cuda, "commit": common.environment()["commit"], "steps": args.steps,
               "warmup": args.warmup, "accum": args.accum, "training": {}, "generation": []}

    def run(label, name, cls=GPT, **overrides):
        model, settings = build(name, args.vocab_size, cls, **overrides)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")      # a plain file name
        profile_to = os.path.join(os.path.dirname(args.out), "profiles", f"{safe}.txt") if args.profile else None
        r = time_training(model, settings["batch_size"], args.accum, args.steps, args.warmup, profile_to)
        if cls is MaskedLoopGPT:
            r["flops_ratio"] = masked_loop_flops_ratio(model, settings["batch_size"])
        results["training"][label] = r
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"{label:28s} {r['tokens_per_sec'] / 1e3:8.1f}k tok/s  {r['step_ms']:8.1f} ms/step  "
              f"MFU {mfu:>6s}  peak {r['peak_mem_gb']:.1f} GB", flush=True)
        del model
        torch._dynamo.reset()           # a fresh compile cache for the next model
        torch.cuda.empty_cache()
        save()

    def save():     # after every measurement, so a run cut short still leaves its numbers
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(results))

    if args.large_only:
        results["large"] = {}
        time_large(args, results["large"], save)
        print(markdown(results))
        return

    # the most important measurements first
    if not args.skip_training and not args.layouts_only and not args.cache_modes_only:
        for size in [m.split("_")[-1] for m in args.models if m.startswith("parcae")]:
            run(f"parcae_{size}", f"parcae_{size}")
            run(f"parcae_{size} (masked loop)", f"parcae_{size}", MaskedLoopGPT)
        for name in args.models:
            if name not in results["training"]:
                run(name, name)
            if name == "parcae_350m":
                run("parcae_350m mean_loops=32", "parcae_350m", mean_loops=32, backprop_loops=4)
    if args.layouts_only:
        results["weight_layouts"] = time_weight_layouts(1024, 1) + time_weight_layouts(1024, 8)
        save()

    def measure(model, loops, batch_size, graph, compiled, shared_cache=False, matmuls=None):
        g = time_generation(model, loops, batch_size, graph, shared_cache=shared_cache)
        g["compiled"], g["matmuls"] = compiled, matmuls
        g["weights"] = str(model.core[0].mlp.fc.weight.dtype).removeprefix("torch.")
        results["generation"].append(g)
        save()
        print(f"generate parcae_350m loops={loops:2d} batch={batch_size} {'graph' if graph else 'eager'}"
              f"{', compiled' if compiled else ''} {matmuls or ''}, {g['weights']} weights, "
              f"{g['kv_cache']} cache: "
              f"{g['new_tokens_per_sec']:8.1f} tok/s ({share(g)} of the bound)  cache {g['kv_cache_gb']:.2f} GB  "
              f"peak {g['peak_mem_gb']:.1f} GB",
              flush=True)

    if args.cache_modes_only:
        model, _ = build("parcae_350m", args.vocab_size)
        sample.bf16_weights(model)
        for shared in (False, True):
            for loops in (1, 8, 16):
                for batch_size in (1, 8):
                    measure(model, loops, batch_size, graph=True, compiled=False, shared_cache=shared)
    if not args.skip_generation and not args.layouts_only and not args.cache_modes_only:
        profiles = os.path.join(os.path.dirname(args.out), "profiles")

        # as sample.py decodes: bf16 linear weights, each step replayed as a CUDA graph; --compile adds compiling
        model, _ = build("parcae_350m", args.vocab_size)
        sample.bf16_weights(model)
        for loops in (1, 8, 16):
            for batch_size in (1, 8):
                measure(model, loops, batch_size, graph=True, compiled=False)
        for batch_size in (1, 8):       # every kernel launched from Python
            measure(model, 16, batch_size, graph=False, compiled=False)
        if args.profile:
            profile_decoding(model, 16, os.path.join(profiles, "generate_loops16.txt"))
        # sample.py --fused: the same, with kernels.py's kernels; and whether it decodes the same tokens
        import kernels
        results["fused_check"] = check_fused(model, loops=16)
        fused = kernels.fuse_for_decoding(copy.deepcopy(model))
        for loops in (1, 8, 16):
            for batch_size in (1, 8):
                measure(fused, loops, batch_size, graph=True, compiled=False, matmuls="fused")
        if args.profile:
            profile_decoding(fused, 16, os.path.join(profiles, "generate_loops16_fused.txt"))
        del fused
        sample.compile_for_decoding(model)     # last, as sample.py --compile does, inside the same graph
        for loops in (1, 8, 16):
            for batch_size in (1, 8):
                measure(model, loops, batch_size, graph=True, compiled=True, matmuls="reductions")
        if args.profile:
            profile_decoding(model, 16, os.path.join(profiles, "generate_loops16_compiled.txt"))
        # what each part of sample.py --compile gains: compiled as train.py compiles (each block apart,
        # cuBLAS's matmuls over bf16_weights' layout); the one-token reductions, each block still apart; and
        # what bf16 weights gain: sample.py --compile with the fp32 weights
        for matmuls in ("cuBLAS", "reductions per block", "reductions"):
            del model
            torch._dynamo.reset()
            model, _ = build("parcae_350m", args.vocab_size)
            if matmuls == "cuBLAS":
                train.compile_model(sample.bf16_weights(model))
            elif matmuls == "reductions per block":
                sample.compile_for_decoding(sample.bf16_weights(model, column_major=False), whole_iterations=False)
            else:
                sample.compile_for_decoding(model)      # the fp32 weights
            for batch_size in (1, 8):
                measure(model, 16, batch_size, graph=True, compiled=True, matmuls=matmuls)
        del model
    print(markdown(results))


def generation_timing(rows):
    """How a record's decoding speeds were timed: records made before GENERATION_TIMED timed one run of
    256 new tokens, its graphs' recording (and, with --compile, any compiling) included."""
    timed = {tuple(g["timed"]) for g in rows if "timed" in g}
    if not timed:
        return "256 new tokens"
    runs = ", ".join(f"{b} new tokens less that of {a}" for a, b in sorted(timed))
    return f"decoding steps only: the time of {runs} (both prefill the prompt and record the same CUDA graphs)"


def share(g):
    """A decoding figure's share of its bandwidth bound, as text ("–" where the GPU's bandwidth is unknown)."""
    bound = g.get("bound_tokens_per_sec")
    return f"{100 * g['new_tokens_per_sec'] / bound:.0f} %" if bound else "–"


LARGE = ["gpt_770m", "parcae_770m", "gpt_1.3b", "parcae_1.3b"]
GPUS = 8        # of the configs' recipe


def time_large(args, large, save):
    """--large_only: each config at its per-GPU share of the 8-GPU recipe, under one-process DDP, with its
    activation checkpointing and, where it has it on, without; into `large`, by label."""
    with socket.socket() as s:          # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for name in args.models:
            settings = train.parse_settings([os.path.join(ROOT, "config", name + ".py")])
            for checkpointing in dict.fromkeys([settings["activation_checkpoint"], False]):
                label = name + ("" if checkpointing == settings["activation_checkpoint"] else
                                " activation_checkpoint=False")
                accum = settings["grad_accum_steps"] // GPUS
                r = {"batch_size": settings["batch_size"], "accum": accum, "activation_checkpoint": checkpointing,
                     "run_tokens": settings["max_iters"] * settings["batch_size"] * settings["grad_accum_steps"]
                     * settings["block_size"]}
                try:
                    model, _ = build(name, args.vocab_size)
                    r.update(time_training(model, settings["batch_size"], accum, args.steps, args.warmup,
                                           activation_checkpoint=checkpointing, ddp=True))
                except torch.cuda.OutOfMemoryError:
                    r["out_of_memory"] = True
                    r["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
                model = None
                gc.collect()
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                large[label] = r
                save()
                print(f"{label:36s} " + ("out of memory" if r.get("out_of_memory") else
                      f"{r['tokens_per_sec'] / 1e3:8.1f}k tok/s  {r['step_ms']:8.1f} ms/step  peak "
                      f"{r['peak_mem_gb']:.1f} GB ({r['peak_reserved_gb']:.1f} reserved)"), flush=True)
    finally:
        torch.distributed.destroy_process_group()


def markdown(results):
    machine = (f"one {results['gpu']} (torch {results['torch']}, CUDA {results['cuda']}, "
               f"commit {results.get('commit')})")
    lines = []
    if results["training"]:
        lines += [f"Training on {machine}, bf16, compiled blocks, injection and head; a step is "
                  f"{results.get('accum', 1)} micro-batch(es) and one optimizer step; mean of {results['steps']} "
                  f"steps after {results['warmup']} warm-up steps:", "",
                  "| model | params | micro-batch | tokens/s | step (ms) | MFU | GPU busy | peak memory (GB) |",
                  "|---|---|---|---|---|---|---|---|"]
    for label, r in results["training"].items():
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] else "n/a"
        busy = f"{100 * r['gpu_busy_frac']:.0f} %" if r.get("gpu_busy_frac") else "–"
        lines.append(f"| {label} | {r['params'] / 1e6:.1f}M | {r['batch_size']}×{r['seq_len']} | "
                     f"{r['tokens_per_sec']:,.0f} | {r['step_ms']:.0f} | {mfu} | {busy} | {r['peak_mem_gb']:.1f} |")
    t = results["training"]
    for size in ("350m", "140m"):
        a, b = t.get(f"parcae_{size}"), t.get(f"parcae_{size} (masked loop)")
        if a and b:
            bound = f" (the FLOPs allow {b['flops_ratio']:.2f}×)" if "flops_ratio" in b else ""
            lines += ["", f"Active-sequences loop vs masked loop, parcae_{size}: "
                          f"{a['tokens_per_sec'] / b['tokens_per_sec']:.2f}× the tokens/s{bound}."]
    m8, m32 = t.get("parcae_350m"), t.get("parcae_350m mean_loops=32")
    if m8 and m32:
        lines += ["", f"Training memory depends on backprop_loops, not on the no-grad iterations: parcae_350m "
                      f"(backprop_loops 4) peaks at {m8['peak_mem_gb']:.1f} GB with mean_loops 8 and "
                      f"{m32['peak_mem_gb']:.1f} GB with mean_loops 32."]
    if results["generation"]:
        lines += ["" if lines else f"On {machine}.",
                  "", "Generation, parcae_350m, bf16, 128-token prompt, " + generation_timing(results["generation"])
                      + ", KV cache (KV cache: its size for the model's whole window of block_size tokens). "
                      "Of the bound: "
                      "the tokens/s over the most the GPU's memory bandwidth (its datasheet's) allows, if a "
                      "step only read what it must: the bf16 weights of every layer application, the head, "
                      "and the keys and values of the positions attended (decode_bytes; read per step):", "",
                  "| loops | batch | decoding | weights | new tokens/s | of the bound | read per step (GB) | "
                  "ms/token | KV cache (GB) | peak memory (GB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in results["generation"]:
            mode = ("CUDA graph" if g["cuda_graph"] else "eager") + (", compiled" if g.get("compiled") else "")
            mode += {"reductions": " (one-token matmuls as reductions, one graph per core iteration)",
                     "cuBLAS": " (cuBLAS matmuls)",
                     "reductions per block": " (reductions, each block its own graph)",
                     "fused": ", fused kernels (sample.py --fused)"}.get(g.get("matmuls"), "")
            mode += ", shared cache" if g.get("kv_cache") == "shared" else ""
            read = f"{g['step_gb']:.2f}" if "step_gb" in g else "–"
            lines.append(f"| {g['loops']} | {g['batch_size']} | {mode} | {g.get('weights', 'float32')} | "
                         f"{g['new_tokens_per_sec']:,.0f} | {share(g)} | {read} | "
                         f"{g['ms_per_token']:.1f} | {g['kv_cache_gb']:.2f} | {g['peak_mem_gb']:.1f} |")
        if results.get("fused_check"):
            f = results["fused_check"]
            lines += ["", f"sample.py --fused against plain decoding, at {f['loops']} loops, on the model with random "
                          f"matrices (check_fused): {f['same_tokens_before_first_difference']} of {f['new_tokens']} "
                          f"greedy tokens the same before the first that differs; logits along them within "
                          f"{f['max_logit_difference']:.1e} of the largest."]
    if results.get("large"):
        lines += ["" if lines else f"On {machine}.", "",
                  f"Training as each of {GPUS} GPUs runs the configs' recipe: the config's micro-batch, "
                  f"grad_accum_steps / {GPUS} micro-steps and one optimizer step, under DDP (one process: its "
                  f"gradient buckets count in the memory), bf16, compiled, random tokens; mean of "
                  f"{results['steps']} steps after {results['warmup']} warm-up steps. A run: the config's "
                  f"max_iters at {GPUS} × this rate, no scaling loss counted.", "",
                  "| config | params | micro-batch × steps | activation checkpointing | tokens/s | step (ms) | MFU | "
                  "peak memory (GB) | peak reserved (GB) | a run on 8 GPUs |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in results["large"].items():
            shape = f"{r['batch_size']}×2048 × {r['accum']}"
            ac = "yes" if r["activation_checkpoint"] else "no"
            if r.get("out_of_memory"):
                lines.append(f"| {label} | | {shape} | {ac} | out of memory | | | | {r['peak_reserved_gb']:.1f} | |")
                continue
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] else "n/a"
            days = r["run_tokens"] / (GPUS * r["tokens_per_sec"]) / 86400
            lines.append(f"| {label} | {r['params'] / 1e6:.1f}M | {shape} | {ac} | {r['tokens_per_sec']:,.0f} | "
                         f"{r['step_ms']:.0f} | {mfu} | {r['peak_mem_gb']:.1f} | {r['peak_reserved_gb']:.1f} | "
                         f"{days:.1f} days |")
    if results.get("weight_layouts"):
        lines += ["" if lines else f"On {machine}.", "",
                  "A matmul by a bf16 weight of parcae_350m's blocks, as decoding runs it "
                  "(µs, in a replayed CUDA graph):", "",
                  "| weight | batch | row-major | column-major |", "|---|---|---|---|"]
        lines += [f"| {r['weight']} | {r['batch_size']} | {r['row_major_us']:.2f} | {r['column_major_us']:.2f} |"
                  for r in results["weight_layouts"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
