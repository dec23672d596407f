"""
Sample from a model trained by train.py, looping its core as many times as you like.

    python sample.py                                 # out/ckpt.pt, the model's mean_loops
    python sample.py --loops 16 --start "def main():"
    python sample.py --out_dir=out-parcae-350m --loops 1 --start FILE:prompt.txt

The checkpoint carries its tokenizer (the data's meta.json), so the data folder is not needed.
"""
import argparse
from contextlib import nullcontext

import torch

import train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="the folder holding ckpt.pt (train.py's out_dir)")
    p.add_argument("--loops", type=int, help="core iterations per token (default: the model's mean_loops)")
    p.add_argument("--start", default="", help='the prompt, or FILE:path to read it from a file '
                                               '(default: the start of a new document)')
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="below 1 is more conservative, above more random")
    p.add_argument("--top_k", type=int, default=200, help="sample only among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps ...")
    args = p.parse_args(argv)
    if args.loops is not None and args.loops < 1:
        raise SystemExit("--loops must be at least 1")

    path = f"{args.out_dir}/ckpt.pt"
    ckpt = train.load_checkpoint(path)
    model = train.model_from_checkpoint(ckpt, path)
    meta = ckpt.get("meta") or {}
    if "tokenizer" not in meta:
        raise SystemExit(f"{path} does not say which tokenizer its data used; retrain it with this train.py")

    from prepare import load_tokenizer      # here, so that --help works without prepare's dependencies
    encode, decode = load_tokenizer(meta)
    device = train.pick_device(args.device, local_rank=0)
    # bf16 autocast on cuda, as in training; fp32 elsewhere
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.to(device).eval()

    start = args.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    # no prompt: begin as the training data begins a document, after an end-of-text token
    try:
        prompt = encode(start) if start else [meta["eot_token"]]
    except ValueError as e:     # e.g. a character the char tokenizer never saw
        raise SystemExit(f"cannot encode the prompt: {e}")
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)

    torch.manual_seed(args.seed)
    with autocast:
        out = model.generate(idx, args.max_new_tokens, loops=args.loops,
                             temperature=args.temperature, top_k=args.top_k)
    for row in out.tolist():
        print(decode(row if start else row[1:]))
        print("-" * 40)


if __name__ == "__main__":
    main()
