"""
Train a looped GPT (Parcae) or one of its baselines: on a CPU, one GPU, or many with DDP.

    python prepare.py && python train.py            # the demo: a few minutes on a laptop CPU
    python train.py config/parcae_140m.py --max_iters=2000 --out_dir=out-try
    torchrun --nproc_per_node=8 train.py config/parcae_350m.py
    torchrun --nproc_per_node=8 train.py config/parcae_350m.py --init_from=resume

Every setting is a module-level name below; its value there is the default (the CPU demo:
a small char-level Parcae model of Python's standard library). A config file given as the
first argument (plain Python assignments) and then --key=value arguments override them.
Unknown names and values of the wrong type are refused, with the nearest valid name.

Writes out_dir/ckpt.pt (at each evaluation and at the end) and out_dir/metrics.jsonl (one
JSON object per log line, for scripts and plots). MODEL.md section 5 is the recipe.
"""
import ast
import builtins
import gc
import difflib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, fields
from types import MethodType, SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# settings (the defaults are the CPU demo: 3 to 5 minutes on 2 cores)
# I/O
out_dir = "out"
data_dir = "data/stdlib"         # train.bin, val.bin, meta.json, as written by prepare.py
init_from = "scratch"            # scratch (an out_dir with no ckpt.pt) | resume (from out_dir/ckpt.pt) | a pretrained
                                 # model to fine-tune (hub.py): SandyResearch/parcae-140m (@REVISION pins a branch,
                                 # tag or commit), or a folder of its files
save_checkpoint = True
seed = 1337
device = "auto"                  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps ...
dtype = "auto"                   # auto (bfloat16 autocast on cuda, float32 elsewhere) | bfloat16 | float32
compile = "auto"                 # torch.compile the blocks, injection and head: auto (on cuda only) | True | False
activation_checkpoint = False    # keep only each block's input, and run the block again in the backward:
                                 # less memory for one more forward of the blocks (checkpoint_blocks)
graph_iterations = False         # on a GPU, replay the loop's iterations without gradient as CUDA graphs
                                 # (GraphedIterations): faster where the host bounds a step, as in small
                                 # models; a memory pool of their own, and no gain at 350m
# model (the vocabulary size comes from the data's meta.json)
block_size = 128
n_embd = 96
n_head = 2
n_prelude = 1
n_core = 1
n_coda = 1
injection = "parcae"             # parcae | linear | add | none (plain Transformer)
prelude_norm = True
init_state = "normal"            # normal | zero
mean_loops = 4                   # μ_rec
backprop_loops = 2               # μ_bwd
depth_sampling = "per-sequence"  # per-sequence | per-batch | fixed
# batch: batch_size × grad_accum_steps sequences of block_size tokens per optimizer step
batch_size = 32                  # per process and micro-step
grad_accum_steps = 1             # over all processes: divided among the DDP ranks
# optimizer and schedule
max_iters = 500
lr = 1.5e-2                      # Muon's peak learning rate, and AdamW's unless adamw_lr is set
adamw_lr = 0.0                   # AdamW's own peak learning rate, on the same schedule (0: lr)
schedule = "trapezoid"           # trapezoid (warmup, constant, linear cool-down to 0) | cosine (to min_lr)
warmup_iters = 0
cooldown_frac = 0.5              # trapezoid: the last half of training decays to 0
min_lr = 0.0                     # cosine: where it ends
weight_decay = 0.2               # Muon's, decaying linearly to 0 over training
momentum_warmup_iters = 300      # Muon's momentum rises from 0.85 to 0.95 over these first steps
grad_clip = 1.0                  # on the global gradient norm; 0 turns clipping off
# evaluation and logging
eval_interval = 100
eval_iters = 10                  # validation batches per loop count
eval_loops = [1, 2, 4, 8]        # loop counts to evaluate at (the Transformer is evaluated once)
log_interval = 50

SETTINGS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, list))}
CHOICES = {"dtype": ("auto", "bfloat16", "float32"),
           "compile": ("auto", True, False), "schedule": ("trapezoid", "cosine")}
AT_LEAST_ONE = {"block_size", "batch_size", "grad_accum_steps", "max_iters", "eval_interval", "eval_iters",
                "log_interval", "eval_loops", "momentum_warmup_iters"}    # (for eval_loops: each of its entries)

# -----------------------------------------------------------------------------
# the configurator: defaults <- config file <- --key=value, every value checked


def check_setting(key, value, where):
    if key not in SETTINGS:
        close = difflib.get_close_matches(key, SETTINGS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "the settings are listed at the top of train.py"
        raise SystemExit(f"{where}: unknown setting {key!r} ({hint})")
    default = SETTINGS[key]
    if key in CHOICES:
        # compare types too, since True == 1 in Python
        ok = any(type(value) is type(c) and value == c for c in CHOICES[key])
        wanted = "one of " + ", ".join(map(repr, CHOICES[key]))
    else:
        ok = type(value) is type(default) or (type(default) is float and type(value) is int)
        wanted = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
                  list: "a list like [1, 2]"}[type(default)]
    if not ok:
        raise SystemExit(f"{where}: {key} must be {wanted}, got {value!r}")
    if key == "init_from":
        check_init_from(value, where)
    values = value if type(value) is list else [value]
    if key in AT_LEAST_ONE and not (values and all(type(v) is int and v >= 1 for v in values)):
        raise SystemExit(f"{where}: {key} must be {'whole numbers' if type(value) is list else 'a whole number'} "
                         f"of at least 1, got {value!r}")
    return float(value) if type(default) is float else value


def parse_override(arg):
    """--key=value as (key, checked value): a Python literal, or else a string."""
    if not arg.startswith("--") or "=" not in arg:
        raise SystemExit(f"expected --key=value, got {arg!r} (a config file goes first)")
    key, text = arg[2:].split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text        # a bare word such as --device=cpu is a string
    return key, check_setting(key, value, arg)


def model_config(settings, vocab_size):
    """The GPTConfig that a dict of settings describes, or a clear error."""
    try:
        return GPTConfig(vocab_size=vocab_size, **{f.name: settings[f.name] for f in fields(GPTConfig)
                                                   if f.name != "vocab_size"})
    except ValueError as e:
        raise SystemExit(f"bad model settings: {e}")


def read_config(path):
    """Run a config file (plain Python assignments) and return its names; a mistake in it is one line."""
    namespace = {}
    try:
        with open(path, encoding="utf-8") as f:     # (builtins.compile: our `compile` setting hides the builtin)
            exec(builtins.compile(f.read(), path, "exec"), namespace)
    except SyntaxError as e:
        raise SystemExit(f"{path}, line {e.lineno}: {e.msg}; a config file holds plain Python assignments, "
                         "such as lr = 3e-3")
    except Exception as e:      # it is the user's code: a NameError, a ZeroDivisionError, a binary file...
        line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        where = f"{path}, line {line[-1]}" if line else path
        raise SystemExit(f"{where}: {type(e).__name__}: {e}")
    return namespace


def check_init_from(value, where):
    """scratch, resume, a folder, or a Hub name (owner/name): anything else is a typo, caught before any work."""
    if value in ("scratch", "resume") or "/" in value or os.path.isdir(value):
        return
    close = difflib.get_close_matches(value, ["scratch", "resume"], n=1)
    if not close and value.lower().startswith("parcae"):
        close = [f"SandyResearch/{value}"]      # a Hub name without its owner
    raise SystemExit(f"{where}: init_from must be scratch, resume, a folder holding a pretrained model's files, or "
                     f"a Hugging Face name such as SandyResearch/parcae-140m, not {value!r}"
                     + (f" (did you mean {close[0]!r}?)" if close else ""))


def parse_settings(argv):
    """The settings as a dict: defaults, then an optional config file (first argument), then --key=value."""
    settings = dict(SETTINGS)
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nsettings and their defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in SETTINGS.items()))
        raise SystemExit(0)
    if argv and not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
        if not os.path.isfile(path):
            raise SystemExit(f"no config file {path!r}")
        namespace = read_config(path)
        for key, value in namespace.items():
            if not key.startswith("_"):
                settings[key] = check_setting(key, value, path)
    for arg in argv:
        key, value = parse_override(arg)
        settings[key] = value
    return settings


# -----------------------------------------------------------------------------
# the optimizers (MODEL.md section 5)


def configure_optimizers(model, lr, weight_decay, device_type, adamw_lr=None):
    """Muon for the blocks' 2-D matrices, AdamW for everything else (embeddings, head,
    value embeddings, norms, the injection's A_log / dt_bias / B / W, and C)."""
    matrices = {id(m.weight) for b in model.blocks() for m in b.modules() if isinstance(m, torch.nn.Linear)}
    muon_params = [p for p in model.parameters() if id(p) in matrices]
    adam_params = [p for p in model.parameters() if id(p) not in matrices]
    # c_attn stacks q, k and v: Muon orthogonalises them apart, as the release's three matrices
    pieces = {id(b.attn.c_attn.weight): 3 for b in model.blocks()}
    muon = Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=0.95, pieces=pieces)
    adamw = torch.optim.AdamW(adam_params, lr=adamw_lr or lr, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                              fused=(device_type == "cuda"))
    return [muon, adamw]


class Muon(torch.optim.Optimizer):
    """
    Muon for the blocks' matrices: Nesterov momentum, then the update is orthogonalised (singular values
    pushed to about 1) by Newton–Schulz, its lr scaled by sqrt(max(1, rows/cols)), with decoupled weight
    decay. torch.optim.Muon's step (up to bf16 rounding), but matrices of one shape go through Newton–Schulz
    together: one at a time, the 350m models' 78 matrices took 30 ms of a 264 ms H200 step, ~20 kernels each.
    pieces, {id(parameter): n}, names the matrices that stack n of the same shape by rows (c_attn: q, k, v):
    each piece is orthogonalised and its lr scaled on its own, as n separate matrices would be.
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, ns_steps=5, pieces=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.pieces = pieces or {}

    @staticmethod
    def orthogonalize(G, steps):
        """X ← aX + (bA + cA²)X with A = XXᵀ, from X = G/‖G‖, for G (n, rows, cols), in bf16. These
        coefficients (Keller Jordan's) trade exactness for speed: 5 steps leave the singular values
        roughly in [0.7, 1.2] rather than at 1 (the very smallest stay lower); that trains as well."""
        a, b, c = 3.4445, -4.7750, 2.0315
        tall = G.size(-2) > G.size(-1)
        X = G.bfloat16().mT if tall else G.bfloat16()     # wide, so that A is the smaller square
        X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)     # spectral norm ≤ Frobenius = 1
        for _ in range(steps):
            A = X @ X.mT
            X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
        return X.mT if tall else X

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, beta, by_shape = group["lr"], group["momentum"], {}
            for p in (p for p in group["params"] if p.grad is not None):
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - beta)                                         # β·buf + (1-β)·g
                update = p.grad.lerp(buf, beta)                                     # Nesterov
                n = self.pieces.get(id(p), 1)
                for piece, u in zip(p.chunk(n), update.chunk(n)):       # views: the step writes into p
                    by_shape.setdefault(piece.shape, []).append((piece, u))
            for (rows, cols), pairs in by_shape.items():
                updates = self.orthogonalize(torch.stack([u for _, u in pairs]), group["ns_steps"])
                for (p, _), u in zip(pairs, updates):
                    p.mul_(1 - lr * group["weight_decay"]).add_(u, alpha=-lr * max(1, rows / cols) ** 0.5)


# -----------------------------------------------------------------------------
# data, schedules, evaluation, checkpoints


def read_meta(data_dir):
    """The data folder's meta.json, once the folder is seen to hold what prepare.py writes; else one line."""
    for name in ("train.bin", "val.bin", "meta.json"):
        if not os.path.exists(os.path.join(data_dir, name)):
            raise SystemExit(f"{os.path.join(data_dir, name)} not found: make the data first with "
                             "`python prepare.py` (`python prepare.py --help` lists the sources)")
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:      # a JSONDecodeError, or a UnicodeDecodeError: not text
        raise SystemExit(f"{path} is damaged ({e}): make the data again with prepare.py, which writes it last")
    if not (isinstance(meta, dict) and type(meta.get("vocab_size")) is int and meta["vocab_size"] > 0):
        raise SystemExit(f"{path} has no vocab_size: it is not a meta.json of prepare.py; make the data again with it")
    return meta


def load_tokens(path, block_size, vocab_size):
    """A token file as a read-only uint16 memmap, or a clear error if it cannot be one we train on."""
    size = os.path.getsize(path)
    if size % 2:
        raise SystemExit(f"{path} is {size:,} bytes, not a whole number of 2-byte tokens: it is truncated; "
                         "copy it again, or remake the data with `python prepare.py`")
    if size // 2 <= block_size:
        raise SystemExit(f"{path} holds {size // 2:,} tokens; training needs more than block_size={block_size}")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    # Token ids must fit the vocabulary (else an IndexError at the first forward). We check the largest
    # id of 64 evenly spread stretches, 2^24 tokens in all (the whole file if it is smaller; ~30 ms):
    # data from another tokenizer has too-large ids all through it (of GPT-2's tokens, 2 % are ≥ 32,768
    # and 1 in 7,000 is ≥ 50,000), so a sample this size finds thousands of them.
    n = 2**18
    starts = np.linspace(0, max(0, len(data) - n), 64).astype(np.int64)
    largest = max(int(data[s:s + n].max()) for s in starts)
    if largest >= vocab_size:
        raise SystemExit(f"{path} holds token id {largest}, but its meta.json says vocab_size={vocab_size}: the data "
                         "and meta.json come from different tokenizers; remake them together with `python prepare.py`")
    return data


def get_batch(data, split, step, micro, cfg, device):
    """
    Micro-batch number `micro` (counted over all ranks) of `step`. Everything random about
    it, its windows and (through torch's seed) its sampled depths and initial state, is a
    function of (seed, split, step, micro) alone. So a resumed run sees exactly the batches
    of an uninterrupted one, and 2 ranks × 1 micro-step read what 1 rank × 2 micro-steps read.
    Validation (split 1) leaves the seed out: runs that differ only in their seed are
    measured on the same windows, so their losses differ by training noise alone.
    """
    rng = np.random.default_rng([cfg.seed if split == 0 else 0, split, step, micro])
    torch.manual_seed(int(rng.integers(2**62)))     # the model samples depths and h_0 from torch's RNGs
    starts = rng.integers(0, len(data) - cfg.block_size, size=cfg.batch_size)
    windows = torch.from_numpy(data[starts[:, None] + np.arange(cfg.block_size + 1)].astype(np.int64))
    if device.type == "cuda":   # pinned memory lets the copy run asynchronously
        windows = windows.pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def lr_at(step, cfg):
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "trapezoid":
        cooldown = max(1, round(cfg.cooldown_frac * cfg.max_iters))
        return cfg.lr * min(1.0, (cfg.max_iters - step) / cooldown)
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def evaluate(model, data, cfg, rank, world, device, autocast):
    """
    Mean validation loss at each of eval_loops; the same eval_iters batches every time. Each rank
    writes the losses of its batches into a vector of zeros and the sum over the ranks collects them
    (adding zeros is exact), so the mean adds the same numbers in the same order on any number of ranks.
    """
    model.eval()
    losses = {}
    for loops in (cfg.eval_loops if model.config.looped else [1]):
        batch_losses = torch.zeros(cfg.eval_iters, device=device)
        for i in range(rank, cfg.eval_iters, world):
            x, y = get_batch(data, 1, i, 0, cfg, device)
            with autocast:
                _, loss = model(x, y, loops=loops)
            batch_losses[i] = loss.float()
        if world > 1:
            dist.all_reduce(batch_losses)
        losses[str(loops)] = batch_losses.mean().item()
    model.train()
    return losses


def save(path, checkpoint):
    tmp = path + ".tmp"         # write aside, then rename: a crash never leaves half a checkpoint
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train one first (python train.py ... --init_from=scratch)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"could not read the checkpoint {path} ({type(e).__name__}: {e}); it is damaged or not ours")
    if not (isinstance(ckpt, dict) and "model" in ckpt and "model_config" in ckpt):
        raise SystemExit(f"{path} is not a checkpoint of this train.py (no 'model' and 'model_config' in it)")
    return ckpt


def model_from_checkpoint(ckpt, path):
    """The model a checkpoint holds (on the CPU), or a clear error if this model.py cannot build it."""
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{path} does not fit this model.py ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "retrain it with this version of train.py")
    return model


def log_metrics(path, **record):
    # strict JSON: a non-finite number (a skipped step's gradient norm, say) is written as null
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    record = {k: {n: clean(x) for n, x in v.items()} if isinstance(v, dict) else clean(v) for k, v in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# dense bf16 peak rates (no sparsity) from the vendors' datasheets
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device=None):
    if not torch.cuda.is_available() or torch.device(device or "cuda").type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [gpu for gpu in PEAK_BF16_FLOPS if re.search(rf"\b{gpu}\b", name)]    # "L4" is not an "L40S"
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def estimate_mfu(model, tokens_per_sec, device=None):
    """Model FLOPs utilisation: model.py's FLOPs per token against the GPU's peak dense bf16 rate; None if unknown."""
    peak = peak_flops(device)
    return None if peak is None else model.flops_per_token() * tokens_per_sec / peak


class GraphedIterations:
    """
    The loop's iterations without gradient, each replayed as a CUDA graph: a copy in, one launch, a copy out.
    A small model's step is bound by the host, not the GPU: each compiled block call costs the CPU about a
    millisecond (guards, Python, launches) while the GPU finishes it sooner, and with per-sequence depths
    most iterations run without gradient on a shrinking prefix of the batch (at μ_rec 4, about 8 of a
    micro-batch's 10). A graph has fixed shapes, so the number of running sequences m is rounded up to a
    multiple of `rows`: the rows past m compute on whatever the last replay left there, and are dropped
    (a sequence's rows never meet another's). One graph per rounded shape (and length, dtypes) is recorded
    the first time it comes, all in one memory pool: at 128 sequences a step, 16 graphs instead of 128,
    for at most rows - 1 wasted sequences each. Replays read the parameters where they live, so optimizer
    steps, which update them in place, are seen. Iterations with gradient, on the CPU, or writing a KV
    cache run as before.
    """

    def __init__(self, iteration, rows=8):
        self.iteration, self.rows, self.graphs, self.pool = iteration, rows, {}, None

    def __call__(self, h, e, idx, cos, sin, slots=None):
        if torch.is_grad_enabled() or slots is not None or not h.is_cuda:
            return self.iteration(h, e, idx, cos, sin, slots)
        m = len(h)
        padded = -(-m // self.rows) * self.rows
        key = (padded,) + tuple((x.shape[1:], x.dtype) for x in (h, e, idx)) + \
              tuple((x.shape, x.dtype) for x in (cos, sin)) + (torch.is_autocast_enabled("cuda"),)
        if key not in self.graphs:
            pad = lambda x: torch.cat([x, x.new_zeros((padded - m,) + x.shape[1:])])
            self.graphs[key] = self.record((pad(h), pad(e), pad(idx), cos, sin))
        graph, static_inputs, out = self.graphs[key]
        for static, x in zip(static_inputs, (h, e, idx, cos, sin)):
            static[:len(x)].copy_(x)
        graph.replay()
        return out[:m].clone()  # the next replay overwrites `out`

    def record(self, inputs):
        static = [x.detach().clone() for x in inputs]
        # autocast's cache of bf16 weight copies is off while recording: the graph must cast the fp32
        # weights at every replay, not read a copy that is freed when the forward's autocast block ends
        autocast = torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False):
            side = torch.cuda.Stream()      # warm up on a side stream, as PyTorch asks, in the same state:
            side.wait_stream(torch.cuda.current_stream())   # compiling and cuBLAS's set-up happen here,
            with torch.cuda.stream(side):                   # not during the capture
                self.iteration(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph, out = capture(lambda: self.iteration(*static), self.pool)
        self.pool = graph.pool()
        return graph, static, out


def capture(step, pool=None):
    """Record step() as a CUDA graph, which runs nothing: the graph, and the tensors its replays write. Python's
    garbage collector waits meanwhile: it might free an older graph, which CUDA forbids while recording."""
    graph, collecting = torch.cuda.CUDAGraph(), gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = step()
    finally:
        if collecting:          # as the caller had it
            gc.enable()
    return graph, out


def checkpoint_blocks(model):
    """
    Activation checkpointing: a block run with gradient keeps only its inputs, not the activations
    inside it, and runs again in the backward to rebuild them (torch.utils.checkpoint). A block draws
    no random numbers, so the rerun computes them bit for bit and the gradients are a plain backward's
    (tests/test_train.py). The loop's no-grad iterations keep nothing anyway (truncated backprop through
    depth), so they run as they are. Changes the model in place; compile_model then compiles the
    checkpointed blocks, which keeps the rerun inside the compiled graph.
    """
    for block in model.blocks():
        def forward(*args, plain=block.forward):
            if not torch.is_grad_enabled():
                return plain(*args)
            return torch.utils.checkpoint.checkpoint(plain, *args, use_reentrant=False, preserve_rng_state=False)
        block.forward = forward


def wrap_ddp(model, device):
    """
    DDP over the processes torchrun started. The rotary tables are constants: no need to sync buffers
    before every forward. torch 2.13 renamed broadcast_buffers (now a FutureWarning on every rank) to
    forward_sync_buffers; torch 2.11 knows only the old name.
    """
    new_name = "forward_sync_buffers" in inspect.signature(DDP).parameters
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               **{"forward_sync_buffers" if new_name else "broadcast_buffers": False})


def compile_model(model):
    """
    torch.compile each block, the injection and the head, so the data-dependent loop stays in Python.
    Shapes start static; the first time a block sees another number of running sequences, Dynamo
    recompiles it once with that size symbolic, and no later depth compiles again.
    """
    for block in model.blocks():
        block.compile()
    if model.config.looped:
        model.injection.compile()      # a dozen small kernels per iteration, fused
    # the compiled head, bound to this model as a method is, hides GPT.head for this instance
    model.head = MethodType(torch.compile(GPT.head), model)
    # all blocks share Block.forward's cache of graphs, and it needs more than the default 8:
    # with or without a value embedding, gradient, fp32 or bf16 input, one sequence or more
    torch._dynamo.config.recompile_limit = 64


def pick_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"    # under torchrun, one GPU per process
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:1, mps ...")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device={name}, but this PyTorch sees no CUDA GPU: use --device=cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"device={name}, but MPS is not available here: use --device=cpu (or auto)")
    return device


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = SimpleNamespace(**parse_settings(sys.argv[1:] if argv is None else argv))
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them we are the only process
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = train(cfg, rank, world, device)
        if ddp:     # no rank tears down its connections while another is still saving or evaluating
            dist.barrier()
        return result
    finally:
        if ddp:
            dist.destroy_process_group()


def train(cfg, rank, world, device):
    master = rank == 0          # the one process that prints, logs and saves
    if cfg.grad_accum_steps % world:
        raise SystemExit(f"grad_accum_steps={cfg.grad_accum_steps} must be a multiple of the {world} processes")
    accum = cfg.grad_accum_steps // world
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    use_compile = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")

    # data
    meta = read_meta(cfg.data_dir)
    train_data, val_data = (load_tokens(os.path.join(cfg.data_dir, f"{s}.bin"), cfg.block_size, meta["vocab_size"])
                            for s in ("train", "val"))

    # model, optimizers, and the checkpoint to resume from
    config = model_config(vars(cfg), meta["vocab_size"])
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    if cfg.init_from != "resume" and os.path.exists(ckpt_path):
        raise SystemExit(f"{cfg.out_dir} already holds a run ({ckpt_path}); a new one would overwrite it: continue it "
                         "with --init_from=resume, or start another with a new --out_dir (or delete that one first)")
    ckpt = load_checkpoint(ckpt_path) if cfg.init_from == "resume" else None
    pretrained = None       # fine-tuning: the pretrained model's settings replace the model settings here
    if cfg.init_from not in ("scratch", "resume"):
        import hub
        if rank > 0:        # rank 0 downloads it first; the others then read its cache
            dist.barrier()
        try:
            pretrained = hub.load_for_data(cfg.init_from, meta, cfg.data_dir, cfg.block_size)
        finally:
            if rank == 0 and world > 1:
                dist.barrier()
        config = pretrained.config
    if ckpt and ckpt.get("pretrained"):
        config = GPTConfig(**ckpt["model_config"])      # a fine-tuned model keeps the pretrained one's settings
    elif ckpt:
        differ = [f"{k}={ckpt['model_config'].get(k)!r} there, {v!r} here"
                  for k, v in asdict(config).items() if ckpt["model_config"].get(k) != v]
        if differ:
            raise SystemExit(f"cannot resume from {ckpt_path}: the model settings differ: {'; '.join(differ)}")
    torch.manual_seed(cfg.seed)     # the same initial weights on every rank
    model = raw_model = (pretrained or GPT(config)).to(device)
    pretrained_name = cfg.init_from if pretrained else ckpt and ckpt.get("pretrained")    # kept in each checkpoint
    optimizers = configure_optimizers(raw_model, cfg.lr, cfg.weight_decay, device.type, cfg.adamw_lr)
    muon = optimizers[0]
    start_step, train_time, last_val, saved_step = 0, 0.0, None, None
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        start_step, train_time, last_val = ckpt["step"], ckpt["train_time"], ckpt["val_loss"]
        saved_step = start_step
        del ckpt

    def stop(step, why):        # a clear stop that says what the last good checkpoint holds
        kept = f"{ckpt_path} still holds step {saved_step}" if saved_step else "no checkpoint was saved"
        raise SystemExit(f"stopped at step {step}: {why} ({kept})")
    if cfg.activation_checkpoint:
        checkpoint_blocks(raw_model)
    if use_compile:
        compile_model(raw_model)
    if cfg.graph_iterations and raw_model.config.looped:      # (on a CPU, GraphedIterations runs them as they are)
        raw_model.core_iteration = GraphedIterations(raw_model.core_iteration)
    if world > 1:
        model = wrap_ddp(raw_model, device)

    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        # a pretrained tokenizer travels with the checkpoints: sample.py decodes with this copy on any machine
        tokenizer_copy = os.path.join(cfg.data_dir, "tokenizer.json")
        if "tokenizer_sha256" in meta and os.path.isfile(tokenizer_copy):
            shutil.copyfile(tokenizer_copy, os.path.join(cfg.out_dir, "tokenizer.json"))
        if start_step == 0 and os.path.exists(metrics_path):
            os.remove(metrics_path)         # a fresh run starts a fresh log
        elif os.path.exists(metrics_path):  # resuming: drop what a crashed run logged after its checkpoint
            with open(metrics_path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in lines
                             if r["step"] < start_step or (r["step"] == start_step and "val_loss" in r))
        tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
        loops = (f"{config.mean_loops} loops on average, {config.backprop_loops} with gradient" if config.looped
                 else "no loop")
        print((f"fine-tuning {pretrained_name}, " if pretrained_name else "") +
              f"{config.injection} model: {raw_model.num_params() / 1e6:.2f}M parameters, {loops} | "
              f"{tokens_per_step:,} tokens per step on {world} process(es) | {device}, "
              f"{'bfloat16' if bf16 else 'float32'}, {'compiled' if use_compile else 'not compiled'}"
              + (f" | resuming at step {start_step}" if start_step else ""))

    adamw_scale = cfg.adamw_lr / cfg.lr if cfg.adamw_lr and cfg.lr else 1.0     # (× 1.0 is exact)
    bar = tqdm(total=cfg.max_iters, initial=start_step, disable=not (master and sys.stdout.isatty()))
    t_start = t_log = time.time()
    steps_since_log = 0
    for step in range(start_step, cfg.max_iters + 1):
        last = step == cfg.max_iters
        # evaluate and save; not at step 0 (the untrained model's loss is about ln(vocab_size), and the
        # first training loss says so), nor again on the step we resumed at (that happened before)
        if (step % cfg.eval_interval == 0 or last) and step > start_step:
            t_eval = time.time()
            last_val = evaluate(raw_model, val_data, cfg, rank, world, device, autocast)
            if master:
                bar.write(f"step {step} | val loss " + ", ".join(f"{k} loops {v:.4f}" for k, v in last_val.items()))
                log_metrics(metrics_path, step=step, val_loss=last_val)
            # a loop that blows up only at a test-time depth is a finding, not a reason to stop
            trained = [str(config.mean_loops)] if str(config.mean_loops) in last_val else list(last_val)
            if not all(math.isfinite(last_val[k]) for k in trained):
                stop(step, "the validation loss is not finite")
            if master and cfg.save_checkpoint:
                save(ckpt_path, {"model": raw_model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                                 "model_config": asdict(config), "settings": vars(cfg), "meta": meta, "step": step,
                                 "pretrained": pretrained_name,
                                 "val_loss": last_val, "train_time": train_time + time.time() - t_start})
                saved_step = step
            t_log += time.time() - t_eval       # so that tokens/s counts training alone
        if last:
            break

        # the schedules: lr for both optimizers (AdamW's scaled to its own peak), Muon's momentum
        # warm-up and weight decay
        lr = lr_at(step, cfg)
        for opt, scale in zip(optimizers, (1.0, adamw_scale)):
            for group in opt.param_groups:
                group["lr"] = lr * scale
        for group in muon.param_groups:
            group["momentum"] = 0.85 + 0.10 * min(1.0, step / cfg.momentum_warmup_iters)
            group["weight_decay"] = cfg.weight_decay * (1 - step / cfg.max_iters)

        # forward and backward over the micro-batches; DDP averages the gradients over the
        # ranks, but only on the last micro-step (no_sync on the others saves the traffic)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = get_batch(train_data, 0, step, rank * accum + micro, cfg, device)
            with model.no_sync() if world > 1 and micro < accum - 1 else nullcontext():
                with autocast:
                    _, loss = model(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach()
        loss = loss_sum / accum
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        # the one host-device sync of a step: we must know whether the numbers are finite
        # before stepping. The gradient norm is the same on every rank, and so is the loss.
        loss_ok, grad_ok = torch.stack([loss, grad_norm.to(loss.dtype)]).isfinite().tolist()
        if not loss_ok:
            stop(step, f"the training loss is {loss.item()}")
        if grad_ok:
            for opt in optimizers:
                opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        bar.update(1)
        steps_since_log += 1

        if master and not grad_ok:
            bar.write(f"step {step} | skipped: the gradient norm is {grad_norm.item()}")
            log_metrics(metrics_path, step=step, skipped=True, loss=loss.item(), grad_norm=grad_norm.item())
        elif master and step % cfg.log_interval == 0:
            now = time.time()
            tokens_per_sec = steps_since_log * cfg.batch_size * cfg.grad_accum_steps * cfg.block_size / (now - t_log)
            t_log, steps_since_log = now, 0
            mfu = estimate_mfu(raw_model, tokens_per_sec / world, device)
            stats = raw_model.stability_stats()     # of the last micro-batch's loop
            line = [f"step {step}", f"loss {loss.item():.4f}", f"lr {lr:.1e}", f"{tokens_per_sec / 1e3:.1f}k tok/s"]
            line += [f"mfu {100 * mfu:.1f}%"] if mfu is not None else []
            line += [f"‖h‖ {stats['state_norm']:.2f}", f"Ā max {stats['a_max']:.3f}"] if stats else []
            bar.write(" | ".join(line + [f"grad {grad_norm.item():.3f}"]))
            log_metrics(metrics_path, step=step, loss=loss.item(), lr=lr, tokens_per_sec=tokens_per_sec, mfu=mfu,
                        grad_norm=grad_norm.item(), state_norm=stats.get("state_norm"), residual=stats.get("residual"),
                        a_max=stats.get("a_max"), a_mean=stats.get("a_mean"), time=train_time + now - t_start,
                        peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
    bar.close()
    if master:
        print("final val loss: " + ", ".join(f"{v:.4f} at {k} loops" for k, v in last_val.items()))
    return last_val


if __name__ == "__main__":
    main()
