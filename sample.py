"""
Sample from a model trained by train.py, looping its core as many times as you like.
generate() is the decoding loop: prefill, then one new token at a time with the KV cache (model.py),
or a few at a time by self-speculative decoding (--draft_loops).

    python sample.py                                 # out/ckpt.pt, the model's mean_loops
    python sample.py --loops 16 --start "def main():"
    python sample.py --loops 16 --draft_loops 4 --start "def main():"     # the same text, sooner
    python sample.py --out_dir=out-parcae-350m --loops 1 --start FILE:prompt.txt
    python sample.py --init_from=SandyResearch/parcae-140m --loops 16 --start "The sea"

The checkpoint carries its tokenizer (the data's meta.json names it; a pretrained one's tokenizer.json
is copied beside ckpt.pt), so the data folder is not needed. --init_from samples one of the authors'
pretrained models instead (hub.py; NAME@REVISION pins a branch, tag or commit).
"""
import argparse
import os
from contextlib import nullcontext
from types import MethodType, SimpleNamespace

import torch
import torch.nn.functional as F

import train
from model import GPT, KVCache
from prepare import load_tokenizer


class Decoder:
    """
    Decoding steps through one KV cache: decoder(tokens, loops) gives the logits (B, L, vocab) of tokens
    (B, L) that follow those the cache holds. On a GPU, a step of a new kind (its tokens, its loops, the
    span of the cache it reads) runs once from Python and is then recorded as a CUDA graph, which the
    steps of its kind replay: at batch 1 a step is hundreds of tiny kernels, too many to launch one by one
    from Python. Under per-token exit the loop ends on a test on the host, which no graph can hold, so the
    phases are recorded apart (the prelude; each core iteration, or one that every iteration replays with
    the shared cache; the coda and head), and the host reads each iteration's exit flag before the next.
    `used`: the loops that each token of the last step ran, under exit.
    """

    def __init__(self, model, cache, exit_threshold=None, cuda_graph=True):
        self.model, self.cache, self.threshold, self.used = model, cache, exit_threshold, None
        self.graphs = {} if cuda_graph and cache.pos.is_cuda else None

    def __call__(self, tokens, loops, graph=True):
        if self.graphs is None or not graph:
            logits = self.model.decode(tokens, self.cache, loops, self.threshold)
            self.used = self.model.last_state["loops_per_token"]
            return logits
        key = (tokens.size(1), loops, (self.cache.length + tokens.size(1) - 1) // self.cache.bucket)   # (its span)
        if key in self.graphs:
            tokens_in, replay = self.graphs[key]
            tokens_in.copy_(tokens)
            return replay()
        tokens_in, length = tokens.clone(), self.cache.length     # the graphs' input, at a fixed address
        logits = self.warm_up(tokens_in, loops)
        self.graphs[key] = tokens_in, (self.record if self.threshold is None else self.record_phases)(tokens_in, loops)
        self.cache.length = length + tokens.size(1)     # the warm-up's: recording ran nothing
        return logits

    def warm_up(self, tokens, loops):
        """The step itself, from Python, on a side stream as PyTorch asks of a CUDA graph's warm-up. The
        cache's host-side length is then set back, so that recording sees the step as it began (its span,
        its room in the cache); recording counts it again, replays count their own."""
        side, length = torch.cuda.Stream(), self.cache.length
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.model.decode(tokens, self.cache, loops, self.threshold)
            self.used = self.model.last_state["loops_per_token"]
        torch.cuda.current_stream().wait_stream(side)
        self.cache.length = length
        return logits

    def record(self, tokens, loops):
        """A whole decoding step as one graph; returns what replays it. Where the blocks are not compiled
        and a weight is fp32 (the tied head; every weight without bf16_weights), the graph reads the bf16
        copy that autocast cast and cached during the warm-up: it lives as long as the caller's autocast
        block, which encloses all of generate()."""
        graph, logits = train.capture(lambda: self.model.decode(tokens, self.cache, loops))

        def replay():
            graph.replay()                          # writes the cache and `logits` in place
            self.cache.length += tokens.size(1)     # the host-side bookkeeping of a step, which a replay skips
            return logits
        return replay

    def record_phases(self, tokens, loops):
        """A decoding step under per-token exit as graphs of its phases; returns what replays them."""
        m, cache = self.model, self.cache
        one = cache.shared or loops == 1            # then every iteration reads and writes the same slots
        start, s = train.capture(lambda: m.begin(tokens, cache, loops, self.threshold))
        iterations = [train.capture(lambda r=r: m.decode_iteration(s, r)) for r in range(1 if one else loops)]
        skips = [] if one else [train.capture(lambda r=r: cache.skip(r, loops))[0] for r in range(loops - 1)]
        finish, logits = train.capture(lambda: m.finish(s)[0])

        def replay():
            start.replay()
            for r in range(loops):
                graph, all_exited = iterations[0 if one else r]
                graph.replay()
                if all_exited.item():       # the host waits for iteration r: have all tokens exited?
                    break
            if skips and r < loops - 1:
                skips[r].replay()
            finish.replay()
            cache.length += tokens.size(1)
            self.used = s.used
            return logits
        return replay


@torch.no_grad()
def generate(model, idx, max_new_tokens, loops=None, temperature=1.0, top_k=None, cuda_graph=True,
             exit_threshold=None, shared_cache=False, draft_loops=None, draft_tokens=4, stats=None):
    """
    Sample max_new_tokens after the prompt idx (B, L0), looping the core `loops` times (default: the
    model's mean_loops). The prompt is prefilled in one pass; then each new token costs one position
    through every layer application, thanks to the KV cache, in steps that a GPU replays as CUDA graphs
    (Decoder). With an exit_threshold, each token loops only until its state converges, at most `loops`
    times. With draft_loops K, self-speculative decoding: rounds of draft_tokens tokens drafted at K loops
    and verified at `loops` (speculate). stats, a dict, receives "loops_per_token" (B, new tokens) under
    exit; with draft_loops, "rounds" of speculation, "drafted" tokens and those "accepted".
    """
    was_training = model.training
    model.eval()
    c = model.config
    loops = model.check_loops(loops) if c.looped else 1
    if draft_loops is not None and not (c.looped and 1 <= draft_loops < loops and exit_threshold is None):
        raise ValueError(f"draft_loops={draft_loops}: self-speculative decoding drafts at fewer loops than the "
                         f"{loops} it verifies at, and at least 1, in a looped model, without exit_threshold")
    if exit_threshold is not None and not c.looped:
        raise ValueError("a plain Transformer has no loop to exit early: drop exit_threshold")
    if draft_loops is not None and shared_cache:
        # a token decoded alone sees, in the shared cache, the last iteration of every token before it;
        # verified together, it would see the drafts' keys of its own iteration: other logits
        raise ValueError("self-speculative decoding needs the full KV cache (the shared one gives other tokens)")
    cache = KVCache(model, idx.size(0), loops, shared=shared_cache)      # bf16 under autocast
    decode = Decoder(model, cache, exit_threshold, cuda_graph)
    pick = lambda logits: probabilities(logits[..., :c.vocab_size], temperature, top_k)
    used, n_prompt = [], idx.size(1)
    p = pick(decode(idx[:, -c.block_size:], loops, graph=False)[:, -1])      # the prompt, in one pass
    while True:
        new = torch.multinomial(p, 1) if p is not None else new
        idx = torch.cat([idx, new], dim=1)
        if decode.used is not None:
            used.append(decode.used[:, -new.size(1):].clone())
        if idx.size(1) - n_prompt >= max_new_tokens:
            break
        if cache.length == c.block_size:    # the window is full: start again from the last half of the text
            cache.rollback(0)
            p = pick(decode(idx[:, -(c.block_size // 2):], loops, graph=False)[:, -1])
        elif draft_loops is not None:       # a few new tokens at once, drawn as plain steps would draw them;
            # a whole round even at the end (the tokens past max_new_tokens are dropped), so that the rounds
            # have one shape, and one CUDA graph each for drafting and verifying, until the window fills
            n = min(draft_tokens, c.block_size - cache.length - 1)
            new, p = speculate(decode, idx, loops, draft_loops, n, pick, stats), None
        else:
            p = pick(decode(idx[:, -1:], loops)[:, -1])
    model.train(was_training)
    if stats is not None and used:
        stats["loops_per_token"] = torch.cat(used, dim=1)
    return idx[:, :n_prompt + max_new_tokens]


def probabilities(logits, temperature, top_k):
    """The distribution that the next token is drawn from. Temperature 0 or top_k 1: all on the likeliest token
    (the first of a tie), exactly; a tiny temperature would still leave near-ties to chance."""
    if temperature == 0 or top_k == 1:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits.float() / max(temperature, 1e-6)     # (a tinier one would overflow)
    if top_k:                           # None or 0: every token may be drawn
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


def speculate(decode, idx, loops, draft_loops, n, pick, stats=None):
    """
    One round of self-speculative decoding: a looped model at fewer loops is its own draft model. The
    last token of idx, which the cache does not hold yet, and n drafts after it, each drawn at
    draft_loops, go through the verifier at `loops` in one forward; on a GPU at small batch that costs
    about as much as one token, since it reads the same weights. accept() keeps the drafts that the
    verifier would have drawn and adds one token of its own; the cache then forgets the others.
    Returns the new tokens (B, 1 ... n + 1).
    """
    start, token, drafts, q = decode.cache.length, idx[:, -1:], [], []
    for _ in range(n):
        q.append(pick(decode(token, draft_loops)[:, -1]))
        token = torch.multinomial(q[-1], 1)
        drafts.append(token)
    drafts = torch.cat([idx[:, :0], *drafts], dim=1)
    decode.cache.rollback(start)                    # the verifier writes its own keys and values there
    p = pick(decode(torch.cat([idx[:, -1:], drafts], dim=1), loops))        # (B, n + 1, vocab)
    new = accept(p, torch.stack(q, dim=1) if q else p[:, :0], drafts)
    decode.cache.rollback(start + new.size(1))      # the last token and the kept drafts stay
    if stats is not None:
        for key, count in (("rounds", 1), ("drafted", n), ("accepted", new.size(1) - 1)):
            stats[key] = stats.get(key, 0) + count
    return new


def accept(p, q, drafts):
    """
    The rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023). Draft i, drawn from q_i,
    is kept with probability min(1, p_i(d_i) / q_i(d_i)); the first one rejected is replaced by a draw
    from max(0, p_i - q_i), normalised; if all are kept, one more token is drawn from p_(n+1). Each token
    is then drawn from p given the ones before it, whatever q is. p (B, n + 1, vocab) are the verifier's
    distributions, q (B, n, vocab) the drafts', drafts (B, n). Every row keeps m drafts, as many as the
    row that keeps fewest, then one token: the draft it kept there, or its replacement. (Whether a row
    goes on past a token depends only on the tokens drawn so far, so each row still stops at a stopping
    time, and its tokens are still drawn from p.) Returns the new tokens (B, m + 1).
    """
    n = drafts.size(1)
    p_d, q_d = (t[:, :n].gather(-1, drafts[..., None])[..., 0] for t in (p, q))
    kept = torch.rand_like(p_d) * q_d < p_d                 # u < p/q (q_d > 0: the draft was drawn from it)
    m = int(kept.long().cumprod(dim=1).sum(dim=1).min()) if n else 0
    if m == n:
        return torch.cat([drafts, torch.multinomial(p[:, n], 1)], dim=1)
    residual = (p[:, m] - q[:, m]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, m])  # p = q only where kept
    last = torch.where(kept[:, m:m + 1], drafts[:, m:m + 1], torch.multinomial(residual, 1))
    return torch.cat([drafts[:, :m], last], dim=1)


def bf16_weights(model, column_major=True):
    """
    Store the linear layers' weights in bf16, for decoding under bf16 autocast on a GPU: the matmuls
    compute in bf16 anyway, so nothing changes but where the cast happens. Eager autocast casts each
    weight once and caches it, but a torch.compile'd block casts every weight again on every call,
    about a quarter of a decoding step at batch 1. The value-embedding tables too: their rows join v,
    which is bf16 there, so each row is rounded once here instead of at every lookup. Norms, the
    token embedding (the residual stream keeps its fp32) and the injection's A_log / dt_bias stay in
    fp32, so the head, tied to the embedding, casts it each token (compile_for_decoding casts it once).
    The matrices are also laid out column by column: for one token, cuBLAS multiplies by a d×d weight
    in 3.5 µs that way and in 7.2 µs row by row (an H200, bench/results/throughput_layouts.md);
    column_major=False keeps them row by row, as compile_for_decoding's reductions read them.
    Returns the model, changed in place.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data.bfloat16()
            module.weight.data = w.t().contiguous().t() if column_major else w.contiguous()
    for block in model.blocks():
        if block.value_embed is not None:
            block.value_embed.weight.data = block.value_embed.weight.data.bfloat16()
    return model


class OneTokenLinear(torch.nn.Linear):
    """
    nn.Linear whose product with a single token, under torch.compile, is written as a multiply and a sum
    over the row-major weight: Inductor makes that one reduction kernel, which reads the weight faster
    than cuBLAS's matrix-vector kernels at these sizes (an H200 at batch 1: a d×d weight in 1.9 µs against
    3.5, d×4d in 3.3 against 5.8; bench/results/throughput_decode_ops.md) and can take in the operations
    around it. Several tokens, or no compiling: the plain matmul. Inputs are cast as autocast's matmul
    casts them; the sum accumulates in fp32 either way, only its order differs.
    """

    def forward(self, x):
        if x.numel() != x.size(-1) or not torch.compiler.is_compiling():
            return super().forward(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        return (x.to(dtype).unsqueeze(-2) * self.weight.to(dtype)).sum(-1)


def compile_for_decoding(model, whole_iterations=True):
    """
    sample.py --compile: every linear layer a OneTokenLinear over its weight laid out row by row, as its
    reduction reads it (bf16_weights lays them out for cuBLAS), then compiled as train.py compiles. With
    whole_iterations, a core iteration (the injection and every core block) and the end of a step (C, the
    coda and the head) are also one compiled graph each, so that Inductor fuses across the blocks' seams:
    a residual add with the next norm, the injection with the first. Returns the model, changed in place.
    """
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneTokenLinear
            module.weight.data = module.weight.data.contiguous()        # row-major (a no-op if it was)
    train.compile_model(model)
    # the tied head: compiled, it would cast its fp32 table again at every step (87 µs of a 2.5 ms step for
    # parcae_350m at 16 loops; bench/results/profiles). GPT.head reads only norm_f and wte.weight of its
    # `self`, so it gets a stand-in whose table is cast once to the dtype of the other linear weights
    dtype = model.blocks()[0].attn.c_attn.weight.dtype
    if dtype != model.wte.weight.dtype:
        table = SimpleNamespace(weight=model.wte.weight.detach().to(dtype))
        model.head = MethodType(torch.compile(GPT.head), SimpleNamespace(norm_f=model.norm_f, wte=table))
    if whole_iterations and model.config.looped:
        # instance attributes hide GPT's methods, as train.compile_model's compiled head does
        model.core_iteration = MethodType(torch.compile(GPT.core_iteration), model)
        model.finish = MethodType(torch.compile(GPT.finish), model)
    return model


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
    p.add_argument("--draft_loops", type=int, help="self-speculative decoding: draft a few tokens at this many "
                   "loops, fewer than --loops, and verify them at once at --loops (README: speculative decoding)")
    p.add_argument("--compile", action="store_true", help="torch.compile for decoding: each core iteration, and the "
                   "coda with the head, one graph each, each one-token matmul a fused reduction "
                   "(compile_for_decoding): compiling takes a while, then decoding is faster on a GPU "
                   "(README: sampling)")
    p.add_argument("--fused", action="store_true", help="decode with kernels.py's fused Triton kernels instead of "
                   "compiling: a layer application's small ops in 5 launches instead of about 25, at once (GPU only)")
    args = p.parse_args(argv)
    for name, low in (("loops", 1), ("num_samples", 1), ("max_new_tokens", 0), ("top_k", 0), ("temperature", 0)):
        if getattr(args, name) is not None and not getattr(args, name) >= low:
            raise SystemExit(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if args.exit_threshold is not None and not args.exit_threshold >= 0:
        raise SystemExit("--exit_threshold must be a number of at least 0 (0: never exit early)")
    if args.fused and args.compile:
        raise SystemExit("--fused and --compile are two ways to fewer kernels a token: pick one")
    device = train.pick_device(args.device, local_rank=0)
    if args.fused and device.type != "cuda":
        raise SystemExit(f"--fused runs on a CUDA GPU, not on {device.type}: drop it there")

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
    if not model.config.looped and (args.exit_threshold is not None or args.draft_loops is not None):
        raise SystemExit(f"{path} holds a plain Transformer: it has no loop to exit early or to draft with "
                         "(drop --exit_threshold and --draft_loops)")
    loops = args.loops or model.config.mean_loops
    if args.draft_loops is not None and not 1 <= args.draft_loops < loops:
        raise SystemExit(f"--draft_loops must be at least 1 and fewer than the {loops} loops it verifies at")
    if args.draft_loops is not None and (args.exit_threshold is not None or args.kv_cache == "shared"):
        raise SystemExit("--draft_loops needs fixed loops and the full cache (drop --exit_threshold and "
                         "--kv_cache shared): verified together, tokens would see other keys than decoded alone")

    encode, decode = load_tokenizer(meta, folder if os.path.isdir(folder) else None)
    # bf16 autocast on cuda, as in training; fp32 elsewhere
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.to(device).eval()
    if device.type == "cuda":
        bf16_weights(model, column_major=not args.compile)      # each layout where its matmuls read it
    if args.compile:
        compile_for_decoding(model)
    if args.fused:
        try:
            import kernels
        except ImportError as e:
            raise SystemExit(f"--fused needs Triton ({e}): pip install triton (PyTorch's CUDA builds bring it)")
        kernels.fuse_for_decoding(model)

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
                       shared_cache=args.kv_cache == "shared", draft_loops=args.draft_loops, stats=stats)
    for row in out.tolist():
        print(decode(row if start else row[1:]))
        print("-" * 40)
    if "loops_per_token" in stats:
        print(f"adaptive exit at {args.exit_threshold:g}: {stats['loops_per_token'].float().mean().item():.2f} "
              f"loops per token on average (at most {loops})")
    if stats.get("drafted"):
        print(f"self-speculative decoding, drafts at {args.draft_loops} loops: {stats['accepted']} of "
              f"{stats['drafted']} drafted tokens kept ({100 * stats['accepted'] / stats['drafted']:.0f} %)")


if __name__ == "__main__":
    main()
