"""
Sample from a model trained by train.py, looping its core as many times as you like.
generate() is the decoding loop: prefill, then one new token at a time with the KV cache.

    python sample.py                                 # out/ckpt.pt, the model's mean_loops
    python sample.py --loops 16 --start "def main():"
    python sample.py --out_dir=out-parcae-350m --loops 1 --start FILE:prompt.txt
    python sample.py --init_from=SandyResearch/parcae-140m --loops 16 --start "The sea"

The checkpoint carries its tokenizer (the data's meta.json), so the data folder is not needed.
--init_from samples one of the authors' pretrained models instead (hub.py).
"""
import argparse
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import train


@torch.no_grad()
def generate(model, idx, max_new_tokens, loops=None, temperature=1.0, top_k=None, cuda_graph=True):
    """
    Sample max_new_tokens after the prompt idx (B, L0), looping the core `loops` times (default: the
    model's mean_loops). The prompt is prefilled in one pass; then each new token costs one position
    through every layer application, thanks to the KV cache. On a GPU that decoding step is recorded
    once as a CUDA graph and replayed: at batch 1 it is hundreds of tiny kernels, too many to launch
    one by one from Python.
    """
    was_training = model.training
    model.eval()
    c = model.config
    loops = c.mean_loops if loops is None else loops
    cache = model.new_cache(idx.size(0), loops)      # bf16 under autocast
    token = idx[:, -1:].clone()         # the decoding step's input, at a fixed address for the graph

    def forward(tokens):                # the logits of the token after `tokens`
        return model(tokens, loops=loops, cache=cache)[0][:, -1]

    decode = None                       # once recorded: the CUDA graph of a decoding step
    logits = forward(idx[:, -c.block_size:])            # the prompt, in one pass
    for i in range(max_new_tokens):
        logits = logits[:, :c.vocab_size].float() / max(temperature, 1e-6)
        if top_k:                       # None or 0: every token may be drawn
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        token.copy_(torch.multinomial(F.softmax(logits, dim=-1), num_samples=1))
        idx = torch.cat([idx, token], dim=1)
        if i == max_new_tokens - 1:
            break
        if cache.length == c.block_size:    # the window is full: start again from the last half of the text
            cache.reset()
            logits = forward(idx[:, -(c.block_size // 2):])
        elif decode is not None:
            logits = decode()
        elif cuda_graph and idx.is_cuda:
            logits, decode = record_cuda_graph(lambda: forward(token), cache)
        else:
            logits = forward(token)
    model.train(was_training)
    return idx


def bf16_weights(model):
    """
    Store the linear layers' weights in bf16, for decoding under bf16 autocast on a GPU: the matmuls
    compute in bf16 anyway, so nothing changes but where the cast happens. Eager autocast casts each
    weight once and caches it, but a torch.compile'd block casts every weight again on every call,
    about a quarter of a decoding step at batch 1. Norms, embeddings and the injection's A_log /
    dt_bias stay in fp32, so the head, tied to the embedding, still casts it each token (~2 % of
    a step, compiled). The same matrices are also laid out column by column: for one
    token, cuBLAS multiplies by a d×d weight in 3.5 µs that way and in 7.2 µs row by row (an H200,
    bench/results/throughput_layouts.md). Returns the model, changed in place.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.bfloat16().t().contiguous().t()     # W, column-major
    return model


def record_cuda_graph(step, cache):
    """
    Run step() (one decoding step), then record it as a CUDA graph, which runs nothing. Returns the
    output and a function that replays the graph: the same kernels on the same memory, launched at
    once. Where the blocks are not compiled and a weight is fp32 (the tied head; every weight without
    bf16_weights), the graph reads the bf16 copy that autocast cast and cached during the eager steps;
    it lives as long as the caller's autocast block, which encloses all of generate().
    """
    side = torch.cuda.Stream()          # PyTorch asks for the warm-up on a side stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recorded = step()

    def replay():
        graph.replay()                  # writes the cache and `recorded` in place
        cache.length += 1               # the host-side bookkeeping of a step, which a replay skips
        return recorded
    return out, replay


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="the folder holding ckpt.pt (train.py's out_dir)")
    p.add_argument("--init_from", help="a pretrained model instead of out_dir's: a Hugging Face repo such as "
                   "SandyResearch/parcae-140m, or a folder holding its files (hub.py)")
    p.add_argument("--loops", type=int, help="core iterations per token (default: the model's mean_loops)")
    p.add_argument("--start", default="", help='the prompt, or FILE:path to read it from a file '
                                               '(default: the start of a new document)')
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="below 1 is more conservative, above more random")
    p.add_argument("--top_k", type=int, default=200, help="sample only among the k likeliest tokens (0: among all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps ...")
    p.add_argument("--no_cuda_graph", action="store_true",
                   help="on a GPU, launch every decoding step from Python instead of replaying a CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile blocks, injection and head first, as "
                   "train.py does: compiling takes a while, then decoding is faster on a GPU (README: generation)")
    args = p.parse_args(argv)
    if args.loops is not None and args.loops < 1:
        raise SystemExit("--loops must be at least 1")

    if args.init_from:
        import hub
        model, meta = hub.load_pretrained(args.init_from)
    else:
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
    if device.type == "cuda":
        bf16_weights(model)
    if args.compile:
        train.compile_model(model)

    start = args.start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise SystemExit(f"cannot read the prompt file {start[5:]!r}: {e.strerror}")
    # no prompt: begin as the training data begins a document: after its BOS token if the tokenizer has one
    # (the authors'), else after an end-of-text token
    try:
        prompt = encode(start) if start else [meta.get("bos_token", meta["eot_token"])]
    except ValueError as e:     # e.g. a character the char tokenizer never saw
        raise SystemExit(f"cannot encode the prompt: {e}")
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)

    torch.manual_seed(args.seed)
    with autocast:
        out = generate(model, idx, args.max_new_tokens, loops=args.loops, temperature=args.temperature,
                       top_k=args.top_k, cuda_graph=not args.no_cuda_graph)
    for row in out.tolist():
        print(decode(row if start else row[1:]))
        print("-" * 40)


if __name__ == "__main__":
    main()
