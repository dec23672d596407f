"""
A looped ("recurrent-depth") GPT with the Parcae stable injection, in one file.

    tokens -> prelude blocks -> e = norm(prelude output)
           -> h_0 ~ N(0, σ²), truncated at ±3σ                 (the recurrent state)
           -> repeat T times:  h <- core_blocks(Ā ⊙ h + Δ ⊙ (e Bᵀ))   (Parcae injection)
           -> C h_T -> coda blocks -> norm -> logits (tied with the input embedding)

Ā = exp(-Δ ⊙ exp(A_log)) with Δ = softplus(dt_bias) lies in (0, 1) for every value of the
parameters, so the linearised loop cannot blow up: that is the whole trick. The same class
builds the baselines: the plain Transformer (injection "none"), the naive looped model
(h + e) and the Huginn-style adapter (W [h; e]). MODEL.md is the account of it; its "official" is
the authors' release, and this file computes as the release does. Also here: RMSNorm,
interleaved RoPE, QK-norm, ReLU² MLP, value embeddings, zero-init out-projections, per-sequence
depths with truncated backprop through depth, the KV cache and per-token adaptive exit at inference.
"""

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    """Learnable RMSNorm, computed in the weight's fp32 even for bf16 input (bf16 sums of squares are too coarse)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_hi = x.to(torch.promote_types(x.dtype, self.weight.dtype))      # bf16 -> fp32; fp32, fp64 stay
        return F.rms_norm(x_hi, (x.size(-1),), self.weight, self.eps).type_as(x)


def rotary_tables(head_dim, max_len, base=50_000.0):
    """cos and sin per channel, (max_len, head_dim) fp32, of the angle position / base^(2i/head_dim) of pair
    (2i, 2i+1), rounded as the release rounds it; sin is negated on channel 2i, as it enters the rotation there."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)     # not base^(-2i/d)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rotary(x, cos, sin):
    """Rotate the interleaved pairs of channels of x (B, L, heads, D) by their angle, in the tables' fp32:
    (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i+1 cos + x_2i sin), as x·cos + (x, pairs swapped)·sin."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)       # (x_2i+1, x_2i)
    return (x * cos[:, None] + swapped * sin[:, None]).type_as(x)   # the tables broadcast over the heads


class CausalSelfAttention(nn.Module):

    def __init__(self, config, has_value_embed):
        super().__init__()
        d, self.n_head = config.n_embd, config.n_head
        self.head_dim = d // self.n_head
        # q, k and v in one matmul: c_attn's rows are the release's c_q, c_k and c_v stacked, each
        # initialised and orthogonalised by Muon on its own (reset_parameters, train.configure_optimizers)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        # value embeddings: a per-head gate mixes the token's own embedding (a separate table) into v
        self.ve_gate = nn.Linear(32, self.n_head, bias=False) if has_value_embed else None

    def forward(self, x, ve, cos, sin, slot=None):
        B, L, d = x.shape
        qkv = self.c_attn(x).view(B, L, 3 * self.n_head, self.head_dim)      # the heads of q, then k, then v
        qk, v = qkv.split((2 * self.n_head, self.n_head), dim=2)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :32]))    # (B, L, n_head), in (0, 2)
            v = v + gate.unsqueeze(-1) * ve.view_as(v).type_as(v)
        # RoPE, then a parameter-free RMS norm of q and k (QK-norm keeps logits tame) with PyTorch's default
        # eps, as the release computes it; q and k in one go, then in v's dtype, as autocast's attention would
        qk = F.rms_norm(apply_rotary(qk, cos, sin), (self.head_dim,)).type_as(v)
        q, k = qk.split(self.n_head, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H, L, D)
        # decoding: the cache slot keeps the new keys and values, and gives back all there are to see
        k, v, mask = (k, v, None) if slot is None else slot.update(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=slot is None)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, d))


class KVCache:
    """Keys and values for decoding, a CacheSlot per layer application: prelude[i], core[r][j] (layer j at
    iteration r), coda[i]; the shared cache's core[r] are one set for all r (MODEL.md section 7). Fixed shapes,
    for CUDA graphs: slots span the window (zeros: a masked NaN still poisons attention), the next position
    is on the device (`pos`; `length` on the host), attention reads `span`, the filled part rounded up to `bucket`."""

    def __init__(self, model, batch_size, loops=None, shared=False, bucket=256):
        c, w = model.config, model.wte.weight
        self.dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        zeros = lambda *n: torch.zeros((*n, *shape), dtype=self.dtype, device=w.device)
        new = lambda: CacheSlot(self, zeros(), zeros())
        self.loops, self.shared, self.bucket = model.check_loops(loops) if c.looped else 1, shared, bucket
        self.prelude, self.coda = [new() for _ in range(c.n_prelude)], [new() for _ in range(c.n_coda)]
        n = 1 if shared else self.loops     # core layer j: the keys, and values, of all n iterations in one tensor
        self.stacks = [(zeros(n), zeros(n)) for _ in range(c.n_core)]      # (n, B, ...): core[r][j] views row r
        self.core = [[CacheSlot(self, k[r], v[r]) for k, v in self.stacks] for r in range(n)]
        for r, j in ((r, j) for r in range(n) for j in range(c.n_core)):     # whose keys an exited token keeps
            self.core[r][j].previous = self.core[r][j] if shared else self.core[r - 1][j] if r else None
        self.core *= self.loops // n        # the shared cache: the same slots at every iteration
        self.pos, self.length, self.max_len = torch.zeros((), dtype=torch.long, device=w.device), 0, c.block_size

    def start(self, L, loops):
        """A forward of L new tokens at `loops` begins: their positions, and which keys each of them may see."""
        if self.length + L > self.max_len or loops > self.loops:
            raise ValueError(f"the cache, made for {self.loops} loops, holds {self.length} of {self.max_len} "
                             f"positions: no room for {L} more tokens at {loops} loops")
        self.span = min(self.max_len, -(-(self.length + L) // self.bucket) * self.bucket)      # rounded up
        self.positions = self.pos + torch.arange(L, device=self.pos.device)
        hidden = torch.arange(self.span, device=self.pos.device) > self.positions[:, None]     # (L, span)
        self.mask = torch.zeros_like(hidden, dtype=self.dtype).masked_fill_(hidden, -math.inf)    # additive: made once
        self.pos += L
        self.length += L
        return self.positions

    def skip(self, r, loops):
        """All tokens left the loop after iteration r of `loops`: the later iterations' slots get those of r."""
        for stack in (t for kv in ([] if self.shared else self.stacks) for t in kv):
            stack[r + 1:loops, :, :, self.positions] = stack[r, :, :, self.positions]

    def rollback(self, length):
        self.pos.fill_(length)              # forget every position from `length` on (0: all of them)
        self.length = length


class CacheSlot:
    """One layer application's keys and values (B, heads, window, head_dim); a core layer's `previous`: its
    slot at the iteration before (the shared cache's: itself), whose keys and values an exited token keeps."""

    def __init__(self, cache, k, v):
        self.cache, self.k, self.v, self.previous = cache, k, v, None

    def update(self, k, v):
        """Write the new tokens' keys and values (B, H, L, D), an exited token's as they were; return all to see."""
        c = self.cache      # (GPT.begin sets `exited`; a step of one token runs no iteration past its exit)
        if self.previous is not None and c.exited is not None and c.exited.numel() > 1:
            exited = c.exited[:, None, :, None]                 # (B, L) -> (B, H, L, D), broadcast
            k = torch.where(exited, self.previous.k[:, :, c.positions], k)
            v = torch.where(exited, self.previous.v[:, :, c.positions], v)
        self.k.index_copy_(2, c.positions, k.to(self.k.dtype))      # the cache may keep another dtype
        self.v.index_copy_(2, c.positions, v.to(self.v.dtype))
        return self.k[:, :, :c.span], self.v[:, :, :c.span], c.mask


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(0.5 * F.relu(self.fc(x)).square())       # ReLU², halved


class Block(nn.Module):
    """A pre-norm transformer block; it may own a value-embedding table."""

    def __init__(self, config, has_value_embed):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, has_value_embed)
        self.norm_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)
        self.value_embed = nn.Embedding(config.padded_vocab_size, config.n_embd) if has_value_embed else None

    def forward(self, x, idx, cos, sin, slot=None):
        ve = self.value_embed(idx) if self.value_embed is not None else None
        x = x + self.attn(self.norm_1(x), ve, cos, sin, slot)
        return x + self.mlp(self.norm_2(x))

# -----------------------------------------------------------------------------
# injections: how the input embedding e enters the state h at every iteration

class ParcaeInjection(nn.Module):
    """u = Ā ⊙ h + Δ ⊙ (e Bᵀ),   Δ = softplus(dt_bias),   Ā = exp(-Δ ⊙ exp(A_log)).

    A = -exp(A_log) is a negative diagonal continuous-time matrix; discretising it with
    step Δ (zero-order hold) gives Ā = exp(Δ A). Since Δ > 0 and exp(A_log) > 0, the
    exponent is negative and 0 < Ā < 1 whatever A_log and dt_bias are: the state decays
    rather than grows, so the loop is stable by construction. B̄ = Δ B is an Euler step."""

    def __init__(self, d):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        # start at Δ = ln √5 so that Ā = exp(-ln √5) = 1/√5 ≈ 0.447 on every channel
        self.dt_bias = nn.Parameter(torch.full((d,), math.log(math.expm1(math.log(math.sqrt(5))))))
        self.B = nn.Linear(d, d, bias=False)
        nn.init.eye_(self.B.weight)                 # B = I: e enters every channel as is

    def discretize(self):
        delta = F.softplus(self.dt_bias)
        return torch.exp(-delta * torch.exp(self.A_log)), delta      # Ā, Δ

    def forward(self, h, e):
        A_bar, delta = self.discretize()
        return A_bar * h + delta * self.B(e)

    def transition_stats(self):
        A_bar = self.discretize()[0].detach()
        return {"a_max": A_bar.max(), "a_mean": A_bar.mean()}


class LinearInjection(nn.Module):
    """u = W [h; e] (RDM / Huginn-style adapter): here Ā = W_x is unconstrained."""

    def __init__(self, d):
        super().__init__()
        self.W = nn.Linear(2 * d, d, bias=False)
        sigma = math.sqrt(2 / (5 * d))
        nn.init.trunc_normal_(self.W.weight, std=sigma, a=-3 * sigma, b=3 * sigma)

    def forward(self, h, e):
        return self.W(torch.cat([h, e.type_as(h)], dim=-1)).type_as(h)    # the state keeps its dtype

    def transition_stats(self):
        W_x = self.W.weight.detach()[:, : self.W.out_features].float()
        return {"a_max": torch.linalg.matrix_norm(W_x, ord=2)}      # top singular value


class AddInjection(nn.Module):
    """u = h + e (naive looping): Ā = I, only marginally stable."""

    def __init__(self, d):
        super().__init__()

    def forward(self, h, e):
        return h + e

    def transition_stats(self):
        return {"a_max": torch.tensor(1.0)}


INJECTIONS = {"parcae": ParcaeInjection, "linear": LinearInjection, "add": AddInjection}

# -----------------------------------------------------------------------------
# the model

@dataclass
class GPTConfig:
    vocab_size: int = 50257          # the tokenizer's; the tables are padded to a multiple of 64
    block_size: int = 1024
    n_embd: int = 768
    n_head: int = 6
    n_prelude: int = 2
    n_core: int = 2
    n_coda: int = 2
    injection: str = "parcae"        # parcae | linear | add | none (plain Transformer, every layer once)
    prelude_norm: bool = True        # RMSNorm on the prelude output (removes late loss spikes)
    init_state: str = "normal"       # h_0: normal (truncated, fresh each forward) | zero
    mean_loops: int = 8              # μ_rec: mean depth in training, default depth at evaluation
    backprop_loops: int = 4          # μ_bwd: iterations (at most) that carry gradient
    depth_sampling: str = "per-sequence"   # per-sequence | per-batch | fixed

    def __post_init__(self):
        choices = {"injection": ("parcae", "linear", "add", "none"), "init_state": ("normal", "zero"),
                   "depth_sampling": ("per-sequence", "per-batch", "fixed")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.n_embd < 32 or self.n_head < 1 or self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must be at least 32 (the value-embedding gate reads 32 channels) "
                             f"and split into n_head={self.n_head} heads of even size")
        if self.looped and min(self.n_core, self.mean_loops, self.backprop_loops) < 1:
            raise ValueError("a looped model needs n_core, mean_loops and backprop_loops of at least 1")

    @property
    def looped(self):
        return self.injection != "none"

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / 64) * 64     # multiples of 64 make faster matmuls

    @property
    def n_layer(self):
        return self.n_prelude + self.n_core + self.n_coda


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        # every other layer, ending with the last, owns a value-embedding table (a core layer's serves every loop)
        ve = [i % 2 == (c.n_layer - 1) % 2 for i in range(c.n_layer)]
        self.wte = nn.Embedding(c.padded_vocab_size, c.n_embd)
        self.prelude = nn.ModuleList(Block(c, ve[i]) for i in range(c.n_prelude))
        self.core = nn.ModuleList(Block(c, ve[c.n_prelude + i]) for i in range(c.n_core))
        self.coda = nn.ModuleList(Block(c, ve[c.n_prelude + c.n_core + i]) for i in range(c.n_coda))
        if c.looped:
            self.prelude_norm = RMSNorm(c.n_embd) if c.prelude_norm else nn.Identity()
            self.injection = INJECTIONS[c.injection](c.n_embd)
            self.C = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.norm_f = RMSNorm(c.n_embd)
        for name, table in zip(("cos", "sin"), rotary_tables(c.n_embd // c.n_head, c.block_size)):
            self.register_buffer(name, table, persistent=False)
        self.state_sigma = math.sqrt(2 / (5 * c.n_embd))
        self.last_state = {}            # read-outs of the last forward's loop, see stability_stats()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The official "scaled-zero" init: orthogonal matrices at entry RMS σ, out-projections zero."""
        def orthogonal(weight, gain=1.0):
            nn.init.orthogonal_(weight)
            weight.mul_(gain * self.state_sigma * math.sqrt(max(weight.shape)))     # each entry now has RMS gain·σ

        orthogonal(self.wte.weight)     # also the LM head (tied)
        for block in self.blocks():
            for w in block.attn.c_attn.weight.chunk(3):     # q, k and v: three orthogonal matrices
                orthogonal(w, math.sqrt(0.4))
            orthogonal(block.mlp.fc.weight, math.sqrt(1.6))
            # zero out-projections: every block starts as the identity on the residual stream
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
            if block.value_embed is not None:
                nn.init.normal_(block.value_embed.weight)               # N(0, 1)
                block.attn.ve_gate.reset_parameters()                  # PyTorch's default Linear init
        if self.config.looped:
            orthogonal(self.C.weight, math.sqrt(0.4))   # the injections initialise themselves

    def blocks(self):
        return [*self.prelude, *self.core, *self.coda]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())   # the head is tied, so counted once

    # -------------------------------------------------------------------------
    # forward

    def sample_depths(self, batch_size):
        """Training depths T per sequence (CPU ints), sorted from deepest to shallowest: which row gets which depth
        does not matter (the windows are random), and sorted, the sequences still running are a prefix."""
        c = self.config
        if c.depth_sampling == "fixed":
            return torch.full((batch_size,), c.mean_loops)
        n = batch_size if c.depth_sampling == "per-sequence" else 1
        T = torch.poisson(torch.full((n,), float(c.mean_loops))).long().clamp(min=1)
        return T.sort(descending=True).values.expand(batch_size)

    def check_loops(self, loops):       # one rule for every path
        if loops is not None and loops < 1:
            raise ValueError(f"loops={loops}: a looped model runs its core at least once")
        return self.config.mean_loops if loops is None else loops

    def forward(self, idx, targets=None, loops=None, depths=None):
        """Whole sequences idx, targets (B, L): (logits, mean loss or None). Depths: sampled in training (mode 1),
        else `depths` (B,) if given (mode 2), else `loops` each, default mean_loops (mode 3). Cached: decode()."""
        s, B = self.begin(idx, loops=loops), idx.size(0)
        if self.config.looped:
            if depths is None:
                depths = self.sample_depths(B) if self.training and loops is None else [s.loops] * B
            depths = torch.as_tensor(depths).cpu()
            if depths.shape != (B,) or depths.min() < 1:
                raise ValueError(f"need one depth of at least 1 per sequence, got {depths.tolist()} for {B}")
            n_grad = self.config.backprop_loops if self.training else int(depths.max())
            s.h = self.recur(s.e, idx, depths, n_grad, s.cos, s.sin)
        return self.finish(s, targets)

    def begin(self, idx, cache=None, loops=None, exit_threshold=None):
        """Embedding and prelude (a plain Transformer: all but the coda), writing the cache if there is one: the
        state s that the loop and finish() read; decoding draws h_0 here, and per-token exit keeps its record."""
        c, L = self.config, idx.size(1)
        if L > c.block_size:
            raise ValueError(f"sequence of {L} tokens is longer than block_size={c.block_size}")
        loops = self.check_loops(loops) if c.looped else 0
        s = SimpleNamespace(idx=idx, cache=cache, loops=loops, threshold=exit_threshold)
        positions = slice(0, L) if cache is None else cache.start(L, s.loops)    # the tokens' positions
        s.cos, s.sin, s.x = self.cos[positions], self.sin[positions], self.wte(idx)
        slots = [None] * c.n_layer if cache is None else [*cache.prelude, *cache.core[0]]
        for block, slot in zip([*self.prelude, *([] if c.looped else self.core)], slots):
            s.x = block(s.x, idx, s.cos, s.sin, slot)
        s.e = self.prelude_norm(s.x) if c.looped else None
        if cache is not None:           # (the cache reads `exited` too: an exited token keeps its keys and values)
            s.h, exiting = self.initial_state(s.e) if s.loops else None, exit_threshold is not None
            s.exited = cache.exited = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device) if exiting else None
            s.used = torch.zeros(idx.shape, device=idx.device) if exiting else None
        return s

    def finish(self, s, targets=None):
        """C h_T, the coda and the head: (logits, loss or None)."""
        x = self.C(s.h).type_as(s.x) if self.config.looped else s.x    # the residual stream keeps its dtype
        for block, slot in zip(self.coda, [None] * self.config.n_coda if s.cache is None else s.cache.coda):
            x = block(x, s.idx, s.cos, s.sin, slot)
        return self.head(x, targets)

    def head(self, x, targets=None):
        """Logits (tied head, logit scale 1) and, given targets, the mean cross-entropy in fp32. Compiled
        (train.py), the fp32 upcast fuses into the log-softmax: no fp32 copy of the (B, L, 50k) logits."""
        logits = F.linear(self.norm_f(x), self.wte.weight)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def recur(self, e, idx, depths, n_grad, cos, sin):
        """Run the core blocks depths[b] times on sequence b, injecting e at every iteration. The iterations are
        right-aligned: all sequences finish on the last step, and one of depth T joins at step T_max - T. Gradient
        is on only for the last n_grad steps, so each sequence backpropagates through its last min(T, n_grad)
        iterations (truncated backprop through depth); the earlier ones run under no_grad and keep no activations. e
        always carries gradient back to the prelude. Sorted by depth, the running sequences are a prefix h[:m]:
        every step computes only those, instead of padding them all to the deepest."""
        depths, order = depths.sort(descending=True, stable=True)
        permuted = not torch.equal(order, torch.arange(len(order)))
        h = self.initial_state(e)
        if permuted:
            order = order.to(e.device)
            e, idx, h = e[order], idx[order], h[order]
        T_max, norms = int(depths[0]), []
        for step in range(T_max):
            m = int((depths >= T_max - step).sum())     # sequences running at this step
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= T_max - n_grad):
                h_prev = h
                u = self.core_iteration(h[:m], e[:m], idx[:m], cos, sin)
                h = u if m == len(h) else torch.cat([u, h[m:]])
            norms.append(u.detach().float().norm(dim=-1).mean())
        # cheap stability read-outs, kept as tensors: no host sync until someone logs them
        residual = (h - h_prev).detach().float().norm(dim=-1).mean() / norms[-1]
        self.last_state = {"norms": norms, "residual": residual}
        return h[torch.argsort(order)] if permuted else h

    def core_iteration(self, h, e, idx, cos, sin, slots=None):
        """One iteration of the loop, h <- core_blocks(inject(h, e)), decoding writing the cache slots of its core
        layers if given. (With graph_iterations, train.py replays it as a CUDA graph where it runs without gradient.)"""
        u = self.injection(h, e)
        for block, slot in zip(self.core, slots or [None] * len(self.core)):
            u = block(u, idx, cos, sin, slot)
        return u

    # -------------------------------------------------------------------------
    # decoding through a KV cache: fixed loops (mode 4) or per-token exit (mode 5)

    @torch.no_grad()
    def decode(self, idx, cache, loops=None, exit_threshold=None):
        """Logits (B, L, vocab) of new tokens idx (B, L) after those the cache holds, which keeps their keys and
        values: `loops` iterations each (default mean_loops), or with an exit_threshold at most that many."""
        s = self.begin(idx, cache, loops, exit_threshold)
        for r in range(s.loops):
            if self.decode_iteration(s, r):     # a host sync: has every token exited?
                cache.skip(r, s.loops)
                break
        self.last_state = {"loops_per_token": s.used}
        return self.finish(s)[0]

    def decode_iteration(self, s, r):
        """Core iteration r of decoding state s and, under per-token exit, the whole rule: token i leaves the loop
        once ‖h_r - h_(r-1)‖ / ‖h_r‖ < threshold, and its state, keys and values (CacheSlot.update) then stay as
        they are. Every row runs until all have exited (MODEL.md section 7): returns whether they have."""
        u = self.core_iteration(s.h, s.e, s.idx, s.cos, s.sin, s.cache.core[r])
        if s.threshold is None:
            s.h = u
            return False
        change = (u - s.h).float().norm(dim=-1) / u.float().norm(dim=-1)
        s.h.copy_(torch.where(s.exited[..., None], s.h, u))     # in place: the state a CUDA graph replays
        s.used += ~s.exited
        s.exited |= change < s.threshold
        return s.exited.all()

    def initial_state(self, e):
        if self.config.init_state == "zero":
            return torch.zeros_like(e)
        s = self.state_sigma
        return nn.init.trunc_normal_(torch.empty_like(e), std=s, a=-3 * s, b=3 * s)

    @torch.no_grad()
    def stability_stats(self):
        """‖h‖ after each step of the last forward's loop (mean per-token L2 norm over the sequences running then),
        ‖h_T‖, the last residual ‖h_T - h_(T-1)‖ / ‖h_T‖ and max / mean of Ā (linear: W_x's top singular value)."""
        if not self.config.looped or "norms" not in self.last_state:
            return {}
        norms = [n.item() for n in self.last_state["norms"]]
        return {"state_norm": norms[-1], "state_norms": norms, "residual": self.last_state["residual"].item(),
                **{k: v.item() for k, v in self.injection.transition_stats().items()}}

    def flops_per_token(self, seq_len=None, loops=None, backward=True):
        """Matmul FLOPs per token: 2 per weight a token meets (value-embedding lookups cost none) plus the
        causal half of attention's QKᵀ and AV over seq_len keys. The forward runs the core `loops` times
        (default mean_loops). With backward, training's count: the backward costs 2 × the forward of what
        carries gradient, so of the loop only the last backprop_loops iterations count three times."""
        c, L = self.config, self.config.block_size if seq_len is None else seq_len
        def cost(*modules):     # 2 per 2-D weight (no value-embedding table), and each block's attention
            weights = sum(p.numel() for m in modules for n, p in m.named_parameters()
                          if p.dim() == 2 and "value_embed" not in n)
            return 2 * weights + sum(isinstance(m, Block) for m in modules) * 2 * L * c.n_embd

        head = 2 * c.n_embd * c.padded_vocab_size       # tied with wte, whose lookup costs nothing
        if not c.looped:
            return (3 if backward else 1) * (cost(*self.blocks()) + head)
        T = self.check_loops(loops)
        once, loop = cost(*self.prelude, self.C, *self.coda) + head, cost(*self.core, self.injection)
        forward = once + T * loop
        return forward + 2 * (once + min(c.backprop_loops, T) * loop) if backward else forward
