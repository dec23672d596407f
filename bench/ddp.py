"""
Multi-GPU scaling: the same training at 1, 2, 4, 8 GPUs with the same global batch.

    python bench/ddp.py --data_dir data/fineweb-edu                 # every GPU count this node has
    python bench/ddp.py --gpus 1 2 --models parcae_350m --steps 100
    python bench/ddp.py --device cpu --gpus 1 2 --set n_embd=64 --set block_size=64 ...   # the logic, on a CPU

For each config and GPU count it runs `torchrun --nproc_per_node=N train.py config/<model>.py`
with the same global batch (batch_size × grad_accum_steps sequences, split among the ranks),
then reports tokens/s per GPU, the scaling efficiency against one GPU, peak memory and how
far the loss curves of the different GPU counts are apart. Every micro-batch's windows and
depth draws depend only on (seed, step, micro-batch index over all ranks), so the curves
agree: exactly on a CPU, and on GPUs up to the order of floating-point sums (the reduction over
the GPUs, kernels that accumulate atomically). Last, it resumes the largest run's
checkpoint on one GPU and trains a few more steps, to show a checkpoint moves between GPU
counts. Writes bench/results/ddp.json and ddp.md. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0).
"""

import argparse
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(n_gpus, model, out_dir, args, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}",
           os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", model + ".py"),
           f"--data_dir={args.data_dir}", f"--out_dir={out_dir}", f"--max_iters={args.steps}",
           f"--batch_size={args.batch_size}", f"--grad_accum_steps={args.micro_steps}",
           f"--eval_interval={args.steps}", "--eval_iters=8", "--eval_loops=[8]", "--log_interval=5", f"--device={args.device}",
           *(f"--{kv}" for kv in args.set), *extra]
    # CPU threads per process: on a CPU (--device cpu), the same number in every run, that of the largest.
    # A CPU matmul's rounding depends on how many threads split its sums, so only then do 1 and N
    # processes compute the same numbers, and their losses agree to the last bit
    threads = (os.cpu_count() or 2) // (max(args.gpus) if args.device == "cpu" else n_gpus)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "OMP_NUM_THREADS": str(max(1, threads))}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        with open(os.path.join(out_dir, "log.txt")) as log:
            lines = log.readlines()
        # rarely (once in over 50 runs on 2 CPU processes under gloo), a process aborts in PyTorch's own
        # teardown after train.py has destroyed its process group: the run had ended, evaluated and saved,
        # so nothing is lost and the bench goes on; any other failure stops it
        steps = int([a for a in cmd if a.startswith("--max_iters=")][-1].split("=", 1)[1])   # a resume's own
        _, evals, _ = common.read_metrics(out_dir)
        ended = evals and evals[-1]["step"] == steps and os.path.exists(os.path.join(out_dir, "ckpt.pt"))
        if ended and any("terminate called without an active exception" in line for line in lines):
            print(f"warning: {out_dir}: a process aborted in PyTorch's teardown (exit {result.returncode}) after "
                  "the run had ended and saved its checkpoint; its results stand")
            return
        # what the processes printed, without torchrun's own report of their failure that follows it
        agent = next((i for i, line in enumerate(lines) if "torch/distributed/elastic" in line), len(lines))
        tail = "".join(lines[:agent][-30:] or lines[-30:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {result.returncode}); from {out_dir}/log.txt:\n{tail}")


def summarize(out_dir, skip_frac=0.3):
    """Median tokens/s and peak memory over the logged steps, after the compile warm-up."""
    train, evals, _ = common.read_metrics(out_dir)
    steady = train[int(len(train) * skip_frac):] or train
    return {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in steady),
            "peak_mem_gb": max((r.get("peak_mem_gb") or 0) for r in train),
            "losses": {r["step"]: r["loss"] for r in train},
            "val_loss": evals[-1]["val_loss"] if evals else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: one gloo process per 'GPU', to check the logic without GPUs")
    parser.add_argument("--gpus", type=common.at_least(1), nargs="+",
                        help="process counts (default: 1, 2, 4, 8 up to the GPUs here)")
    parser.add_argument("--models", nargs="+", default=["gpt_350m", "parcae_350m"])
    parser.add_argument("--data_dir", default="data/fineweb-edu")
    parser.add_argument("--steps", type=common.at_least(1), default=200)
    parser.add_argument("--batch_size", type=common.at_least(1), default=8, help="sequences per micro-step and GPU")
    parser.add_argument("--micro_steps", type=common.at_least(1), default=8, help="micro-batches per step over all "
                        "GPUs (the global batch is batch_size × micro_steps sequences)")
    parser.add_argument("--resume_steps", type=common.at_least(1), default=20)
    parser.add_argument("--work_dir", default="out/bench-ddp")
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train.py setting for every run (repeat for more)")
    args = parser.parse_args(argv)
    common.read_meta(args.data_dir)     # a missing or damaged data folder: one line here, not torchrun's log
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count()
    args.gpus = args.gpus or [n for n in (1, 2, 4, 8) if n <= available]
    if not args.gpus or max(args.gpus) > available:
        raise SystemExit(f"this node has {available} GPU(s); --gpus asks for {args.gpus}")
    if any(args.micro_steps % n for n in args.gpus):
        raise SystemExit(f"--micro_steps={args.micro_steps} must be a multiple of every GPU count in {args.gpus}")

    results = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
               "commit": common.environment()["commit"], "steps": args.steps,
               "global_batch": f"{args.batch_size * args.micro_steps} sequences", "runs": {}}
    for model in args.models:
        for n in args.gpus:
            out_dir = os.path.join(args.work_dir, f"{model}-{n}gpu")
            if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
                os.remove(os.path.join(out_dir, "ckpt.pt"))     # this bench's own run of an earlier call
            torchrun(n, model, out_dir, args)
            r = summarize(out_dir)
            r["tokens_per_sec_per_gpu"] = r["tokens_per_sec"] / n
            one = results["runs"].get(f"{model} {args.gpus[0]}", r)
            r["scaling_efficiency"] = r["tokens_per_sec_per_gpu"] / (one["tokens_per_sec"] / args.gpus[0])
            steps = sorted(set(r["losses"]) & set(one["losses"]))
            r["max_loss_gap"] = max(abs(r["losses"][s] - one["losses"][s]) for s in steps)
            results["runs"][f"{model} {n}"] = r
            write(results, args)        # after every run, so a run cut short still leaves its numbers
            print(f"{model} on {n} {'GPU' if args.device == 'cuda' else 'process'}(es): {r['tokens_per_sec'] / 1e3:.1f}k tok/s, "
                  f"{r['tokens_per_sec_per_gpu'] / 1e3:.1f}k per GPU, {100 * r['scaling_efficiency']:.0f} % efficiency, "
                  f"peak {r['peak_mem_gb']:.1f} GB, loss gap {r['max_loss_gap']:.4f}", flush=True)
        # a checkpoint written by the largest run continues on one GPU
        largest = os.path.join(args.work_dir, f"{model}-{max(args.gpus)}gpu")
        torchrun(1, model, largest, args, [f"--max_iters={args.steps + args.resume_steps}", "--init_from=resume"])
        after = [r for r in common.read_metrics(largest)[0] if r["step"] >= args.steps]
        results["runs"][f"{model} {max(args.gpus)}"]["resumed_on_1_gpu"] = {r["step"]: r["loss"] for r in after}
        write(results, args)
        print(f"{model}: resumed the {max(args.gpus)}-process checkpoint on 1 process, losses "
              + ", ".join(f"{r['loss']:.3f}" for r in after), flush=True)
    print(markdown(results))
    return results


def write(results, args):
    os.makedirs(args.results_dir, exist_ok=True)
    common.write_results(args.results_dir, "ddp", results, markdown)


def markdown(results):
    lines = [f"{results['gpu']}, torch {results['torch']}, commit {results.get('commit')}, {results['steps']} steps, "
             f"global batch {results['global_batch']}:", "",
             "| model | GPUs | tokens/s | per GPU | scaling efficiency | peak memory (GB) | max loss gap | resumed on 1 GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in results["runs"].items():
        model, n = key.split()
        resumed = r.get("resumed_on_1_gpu")
        resumed = ", ".join(f"{v:.3f}" for v in resumed.values()) if resumed else "–"
        # cut_at_step and note are annotations a person adds to ddp.json when a run was cut short
        n += f" (steps 0-{r['cut_at_step']} only)" if r.get("cut_at_step") else ""
        lines.append(f"| {model} | {n} | {r['tokens_per_sec']:,.0f} | {r['tokens_per_sec_per_gpu']:,.0f} | "
                     f"{100 * r['scaling_efficiency']:.0f} % | {r['peak_mem_gb']:.1f} | {r['max_loss_gap']:.4f} | {resumed} |")
    lines += ["", results["note"]] if results.get("note") else []
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
