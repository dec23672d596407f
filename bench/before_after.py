"""
Training tokens/s of this checkout against a copy of the code from before a change, in one GPU job:
did the change make training slower? Each model is timed as bench/throughput.py times it (its
time_training: compiled, bf16, the same data and depth draws), each side by its own code, in a fresh
process, before and after in turn for each model so that a drift of the GPU's clocks touches both.

    git archive REV model.py train.py sample.py prepare.py config bench | tar -x -C .before    # (ignored)
    python bench/before_after.py --before .before --before_commit REV
    # writes bench/results/throughput_before_after.{json,md}
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# run in a fresh process, with `root`'s files first on the path: its model, train and bench/throughput
TIME_ONE = """
import json, sys
root, name, steps, warmup, accum, out = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
sys.path[:0] = [root + "/bench", root]
import torch, throughput
torch.backends.cuda.matmul.allow_tf32 = True
model, settings = throughput.build(name, 50257)
result = throughput.time_training(model, settings["batch_size"], accum, steps, warmup)
with open(out, "w") as f:
    json.dump(result, f)
"""


def time_in(root, name, steps, warmup, accum):
    """time_training of config `name` by the code in folder `root`, in a process of its own."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        run = subprocess.run([sys.executable, "-c", TIME_ONE, root, name, str(steps), str(warmup), str(accum), out],
                             cwd=root, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"timing {name} with the code in {root} failed:\n{run.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a folder holding the code before (model.py, train.py, "
                        "sample.py, prepare.py, config/, bench/)")
    parser.add_argument("--before_commit", required=True, help="the commit that folder was taken from")
    parser.add_argument("--models", nargs="+", default=["parcae_350m", "gpt_350m"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step (bench/throughput.py's)")
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"),
                        help="where throughput_before_after.{json,md} go")
    args = parser.parse_args()
    before = os.path.abspath(args.before)
    if not os.path.isfile(os.path.join(before, "bench", "throughput.py")):
        raise SystemExit(f"{args.before} holds no bench/throughput.py: make it with git archive (see --help)")
    if not torch.cuda.is_available():
        raise SystemExit("bench/before_after.py needs a CUDA GPU")
    results = {"environment": common.environment(), "command": common.command(__file__, None),
               "before_commit": args.before_commit, "steps": args.steps, "warmup": args.warmup, "accum": args.accum,
               "training": {}}
    for name in args.models:
        for side, root in (("before", before), ("after", ROOT)):
            r = time_in(root, name, args.steps, args.warmup, args.accum)
            results["training"].setdefault(name, {})[side] = r
            print(f"{name:12s} {side:6s} {r['tokens_per_sec']:10,.0f} tokens/s  {r['step_ms']:7.1f} ms/step  "
                  f"peak {r['peak_mem_gb']:.1f} GB", flush=True)
            # after each, so that a run cut short keeps its numbers
            common.write_results(args.results_dir, "throughput_before_after", results, markdown)
    print(markdown(results))


def markdown(results):
    lines = [f"Training before (the code of commit {results['before_commit']}) and after (this checkout), as "
             f"bench/throughput.py times it: bf16, compiled, {results['accum']} micro-batch(es) and one optimizer "
             f"step, the mean of {results['steps']} steps after {results['warmup']} warm-up steps, each side in a "
             "process of its own:", "",
             "| model | tokens/s before | tokens/s after | after / before | step (ms) | peak memory (GB) |",
             "|---|---|---|---|---|---|"]
    for name, r in results["training"].items():
        if "before" not in r or "after" not in r:
            continue
        a, b = r["before"], r["after"]
        lines.append(f"| {name} | {a['tokens_per_sec']:,.0f} | {b['tokens_per_sec']:,.0f} | "
                     f"{b['tokens_per_sec'] / a['tokens_per_sec']:.3f} | {a['step_ms']:.0f} → {b['step_ms']:.0f} | "
                     f"{a['peak_mem_gb']:.1f} → {b['peak_mem_gb']:.1f} |")
    return "\n".join(lines) + "\n" + common.provenance(results)


if __name__ == "__main__":
    main()
