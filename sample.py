"""
Sample from a model trained by train.py, looping its core as many times as you like.
generate() is the decoding loop: prefill, then one new token at a time with the KV cache.

    python sample.py                                 # out/ckpt.pt, the model's mean_loops
    python sample.py --loops 16 --start "def main():"
    python sample.py --out_dir=out-parcae-350m --loops 1 --start FILE:prompt.txt
    python sample.py --init_from=SandyResearch/parcae-140m --loops 16 --start "The sea"

The checkpoint carries its tokenizer (the data's meta.json names it; a pretrained one's tokenizer.json
is copied beside ckpt.pt), so the data folder is not needed. --init_from samples one of the authors'
pretrained models instead (hub.py; NAME@REVISION pins a branch, tag or commit).
"""
import argparse
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import train


class KVCache:
    """
    Keys and values for decoding, one slot per layer application, handed out in the order the layers
    run (next_slot). The full cache (the release's) gives every application its own slot: prelude
    layer i, core layer j at iteration r, coda layer i, so its memory grows linearly with the loops.
    The shared cache (shared=True) gives core layer j one slot that every iteration overwrites, so its
    memory does not depend on the loops; a later token then sees an earlier token's keys and values
    of its last iteration only, whatever iteration it is at itself. The two agree at one loop.

    Shapes never change, so a decoding step can be recorded once as a CUDA graph and replayed, and a
    compiled block needs no Python state: each slot spans the window, a mask hides the positions not
    written yet, and the next position lives on the device (`pos`, advanced in place); `length`
    counts the same positions on the host. Keys and values are bf16 under autocast, else the weights'
    dtype, unless `dtype` says otherwise.
    """

    def __init__(self, model, batch_size, loops=None, shared=False, dtype=None):
        c, device = model.config, model.wte.weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else model.wte.weight.dtype
        loops = (loops or c.mean_loops) if c.looped else 1
        P, R = c.n_prelude, c.n_core
        core = R if shared else loops * R                   # the core's slots
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        # zeros, not garbage: a masked-out NaN would still poison the attention
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(P + core + c.n_coda)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(P + core + c.n_coda)]
        # the slot of each layer application, in the order they run
        self.order = [*range(P), *(P + i % core for i in range(loops * R)), *range(P + core, P + core + c.n_coda)]
        self.n_core = R
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.max_len, self.length = c.block_size, 0
        self.applied = 0
        self.positions = self.mask = None       # of the forward under way

    def start(self, L):
        """A forward of L new tokens begins: their positions, and which keys each of them may see."""
        if self.length + L > self.max_len:
            raise ValueError(f"the cache holds {self.length} of {self.max_len} positions, no room for {L} more")
        device = self.pos.device
        self.applied, self.positions = 0, self.pos + torch.arange(L, device=device)
        self.mask = torch.arange(self.max_len, device=device) <= self.positions[:, None]     # (L, max_len)
        self.pos += L
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self.length += L        # (recording a CUDA graph runs nothing: its replays count themselves)
        return self.positions

    def next_slot(self, exited=None):
        """
        The next layer application's (k, v, positions, mask, exited): its block writes the new keys and
        values into k and v at `positions`, in place, then attends to all of k and v through `mask`.
        exited (B, L), for a core layer under per-token exit (GPT.recur_adaptive): the tokens that have
        left the loop. They keep what the slot holds at their position, so first this layer's keys and
        values of the previous iteration are copied there (the shared cache holds them already).
        """
        if self.applied == len(self.order):
            raise ValueError(f"the cache has slots for {len(self.order)} layer applications: more loops than "
                             "it was made for (make a new one: KVCache(model, batch_size, loops))")
        slot = self.order[self.applied]
        if exited is not None:
            self.carry_forward(slot, self.order[self.applied - self.n_core])
            exited = exited[:, None, :, None]           # (B, heads, L, head_dim), broadcast
        self.applied += 1
        return self.k[slot], self.v[slot], self.positions, self.mask, exited

    def carry_forward(self, slot, previous):
        if slot != previous:
            for kv in (self.k, self.v):
                kv[slot].index_copy_(2, self.positions, kv[previous][:, :, self.positions])

    def skip(self, iterations):
        """Every token has left the loop with `iterations` to go: their core slots get, at this
        forward's positions, the keys and values of the last iteration run."""
        for _ in range(iterations * self.n_core):
            self.carry_forward(self.order[self.applied], self.order[self.applied - self.n_core])
            self.applied += 1

    def reset(self):
        """Forget every position: the next forward starts the window again at position 0."""
        self.pos.zero_()
        self.length = 0


@torch.no_grad()
def generate(model, idx, max_new_tokens, loops=None, temperature=1.0, top_k=None, cuda_graph=True,
             exit_threshold=None, shared_cache=False, stats=None):
    """
    Sample max_new_tokens after the prompt idx (B, L0), looping the core `loops` times (default: the
    model's mean_loops). The prompt is prefilled in one pass; then each new token costs one position
    through every layer application, thanks to the KV cache. On a GPU that decoding step is recorded
    once as a CUDA graph and replayed: at batch 1 it is hundreds of tiny kernels, too many to launch
    one by one from Python. With an exit_threshold, each token loops only until its state converges
    (at most `loops` times); the loop then ends on a host-side test, which a graph cannot replay, so
    decoding launches its kernels from Python. stats, a dict, receives "loops_per_token" (B, new tokens).
    """
    was_training = model.training
    model.eval()
    c = model.config
    loops = c.mean_loops if loops is None else loops
    cache = KVCache(model, idx.size(0), loops, shared=shared_cache)      # bf16 under autocast
    token = idx[:, -1:].clone()         # the decoding step's input, at a fixed address for the graph
    used = []                           # loops run by each new token, under exit_threshold

    def forward(tokens):                # the logits of the token after `tokens`
        logits = model(tokens, loops=loops, cache=cache, exit_threshold=exit_threshold)[0][:, -1]
        if exit_threshold is not None:
            used.append(model.last_state["loops_per_token"][:, -1])
        return logits

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
        elif cuda_graph and idx.is_cuda and exit_threshold is None:
            logits, decode = record_cuda_graph(lambda: forward(token), cache)
        else:
            logits = forward(token)
    model.train(was_training)
    if stats is not None and used:
        stats["loops_per_token"] = torch.stack(used, dim=1)
    return idx


def bf16_weights(model):
    """
    Store the linear layers' weights in bf16, for decoding under bf16 autocast on a GPU: the matmuls
    compute in bf16 anyway, so nothing changes but where the cast happens. Eager autocast casts each
    weight once and caches it, but a torch.compile'd block casts every weight again on every call,
    about a quarter of a decoding step at batch 1. The value-embedding tables too: their rows join v,
    which is bf16 there, so each row is rounded once here instead of at every lookup. Norms, the
    token embedding (the residual stream keeps its fp32) and the injection's A_log / dt_bias stay in
    fp32, so the head, tied to the embedding, still casts it each token (~2 % of a step, compiled).
    The matrices are also laid out column by column: for one token, cuBLAS multiplies by a d×d weight
    in 3.5 µs that way and in 7.2 µs row by row (an H200, bench/results/throughput_layouts.md).
    Returns the model, changed in place.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.bfloat16().t().contiguous().t()     # W, column-major
    for block in model.blocks():
        if block.value_embed is not None:
            block.value_embed.weight.data = block.value_embed.weight.data.bfloat16()
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
                   "SandyResearch/parcae-140m (@REVISION pins one), or a folder holding its files (hub.py)")
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
    p.add_argument("--exit_threshold", type=float, help="adaptive exit: a token stops looping once its state "
                   "changes by less than this (relative), at most --loops times; e.g. 0.01 (README: adaptive exit)")
    p.add_argument("--kv_cache", choices=("full", "shared"), default="full", help="full: one slot per layer "
                   "application (memory grows with the loops); shared: one per core layer, whatever the loops")
    p.add_argument("--compile", action="store_true", help="torch.compile blocks, injection and head first, as "
                   "train.py does: compiling takes a while, then decoding is faster on a GPU (README: generation)")
    args = p.parse_args(argv)
    if args.loops is not None and args.loops < 1:
        raise SystemExit("--loops must be at least 1")
    if args.exit_threshold is not None and not args.exit_threshold >= 0:
        raise SystemExit("--exit_threshold must be a number of at least 0 (0: never exit early)")

    if args.init_from:
        import hub
        path = folder = args.init_from          # a folder may hold the model's own tokenizer.json
        model, meta = hub.load_pretrained(path)
    else:
        folder = args.out_dir                   # which holds the copy of a pretrained tokenizer
        path = f"{args.out_dir}/ckpt.pt"
        ckpt = train.load_checkpoint(path)
        model = train.model_from_checkpoint(ckpt, path)
        meta = ckpt.get("meta") or {}
        if "tokenizer" not in meta:
            raise SystemExit(f"{path} does not say which tokenizer its data used; retrain it with this train.py")
    if args.exit_threshold is not None and not model.config.looped:
        raise SystemExit(f"{path} holds a plain Transformer: it has no loop to exit early (drop --exit_threshold)")

    from prepare import load_tokenizer      # here, so that --help works without prepare's dependencies
    encode, decode = load_tokenizer(meta, folder if os.path.isdir(folder) else None)
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
    stats = {}
    with autocast:
        out = generate(model, idx, args.max_new_tokens, loops=args.loops, temperature=args.temperature,
                       top_k=args.top_k, cuda_graph=not args.no_cuda_graph, exit_threshold=args.exit_threshold,
                       shared_cache=args.kv_cache == "shared", stats=stats)
    for row in out.tolist():
        print(decode(row if start else row[1:]))
        print("-" * 40)
    if "loops_per_token" in stats:
        cap = args.loops or model.config.mean_loops
        print(f"adaptive exit at {args.exit_threshold:g}: {stats['loops_per_token'].float().mean().item():.2f} "
              f"loops per token on average (at most {cap})")


if __name__ == "__main__":
    main()
