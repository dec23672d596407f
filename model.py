"""
A looped ("recurrent-depth") GPT with the Parcae stable injection, in one file.

    tokens -> prelude blocks -> e = norm(prelude output)
           -> h_0 ~ N(0, σ²), truncated at ±3σ                 (the recurrent state)
           -> repeat T times:  h <- core_blocks(Ā ⊙ h + Δ ⊙ (e Bᵀ))   (Parcae injection)
           -> C h_T -> coda blocks -> norm -> logits (tied with the input embedding)

Ā = exp(-Δ ⊙ exp(A_log)) with Δ = softplus(dt_bias) lies in (0, 1) for every value of the
parameters, so the linearised loop cannot blow up: that is the whole trick. The same class
builds the baselines: the plain Transformer (injection "none"), the naive looped model
(h + e) and the Huginn-style adapter (W [h; e]). The spec is PARCAE.md; its "official" is the
authors' release, and this file computes as the release does. Also here: RMSNorm,
interleaved RoPE, QK-norm, ReLU² MLP, value embeddings, zero-init out-projections, per-sequence
depths with truncated backprop through depth, and per-token adaptive exit at inference.
"""

import math
from dataclasses import dataclass

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

    def forward(self, x, ve, cos, sin, kv=None):
        B, L, d = x.shape
        qkv = self.c_attn(x).view(B, L, 3 * self.n_head, self.head_dim)      # the heads of q, then k, then v
        qk, v = qkv.split((2 * self.n_head, self.n_head), dim=2)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :32]))    # (B, L, n_head), in (0, 2)
            v = v + gate.unsqueeze(-1) * ve.view_as(v).type_as(v)
        # RoPE first, then a parameter-free RMS norm of q and k (QK-norm keeps logits tame), with
        # PyTorch's default eps (the dtype's machine epsilon), as the release computes it; q and k in
        # one go, then in v's dtype, as attention would cast them under autocast
        qk = F.rms_norm(apply_rotary(qk, cos, sin), (self.head_dim,)).type_as(v)
        q, k = qk.split(self.n_head, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H, L, D)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:       # generation: store the new keys and values in this layer's cache slot, attend to it all
            k_cache, v_cache, positions, mask, exited = kv
            if exited is not None:      # a token that has left the loop keeps the keys and values it has
                k = torch.where(exited, k_cache[:, :, positions], k)
                v = torch.where(exited, v_cache[:, :, positions], v)
            k_cache.index_copy_(2, positions, k.to(k_cache.dtype))     # the cache may keep another dtype
            v_cache.index_copy_(2, positions, v.to(v_cache.dtype))
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, d))


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

    def forward(self, x, idx, cos, sin, kv=None):
        ve = self.value_embed(idx) if self.value_embed is not None else None
        x = x + self.attn(self.norm_1(x), ve, cos, sin, kv)
        return x + self.mlp(self.norm_2(x))

# -----------------------------------------------------------------------------
# injections: how the input embedding e enters the state h at every iteration

class ParcaeInjection(nn.Module):
    """
    u = Ā ⊙ h + Δ ⊙ (e Bᵀ),   Δ = softplus(dt_bias),   Ā = exp(-Δ ⊙ exp(A_log)).

    A = -exp(A_log) is a negative diagonal continuous-time matrix; discretising it with
    step Δ (zero-order hold) gives Ā = exp(Δ A). Since Δ > 0 and exp(A_log) > 0, the
    exponent is negative and 0 < Ā < 1 whatever A_log and dt_bias are: the state decays
    rather than grows, so the loop is stable by construction. B̄ = Δ B is an Euler step.
    """

    def __init__(self, d):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        # start at Δ = ln √5 so that Ā = exp(-ln √5) = 1/√5 ≈ 0.447 on every channel
        self.dt_bias = nn.Parameter(torch.full((d,), math.log(math.expm1(math.log(math.sqrt(5))))))
        self.B = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.B.weight.copy_(torch.eye(d))       # B = I: e enters every channel as is

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
        if self.n_head < 1 or self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size")
        if self.n_embd < 32:
            raise ValueError(f"n_embd={self.n_embd} is too small: the value-embedding gate reads 32 channels")
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
        # number the unique layers prelude, core, coda; every other one, ending with
        # the last, owns a value-embedding table (a core layer reuses its table each loop)
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
        cos, sin = rotary_tables(c.n_embd // c.n_head, c.block_size)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.state_sigma = math.sqrt(2 / (5 * c.n_embd))
        self.last_state = {}            # read-outs of the last forward's loop, see stability_stats()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The official "scaled-zero" init: orthogonal matrices at entry RMS σ, out-projections zero."""
        sigma = self.state_sigma

        def orthogonal(weight, gain=1.0):
            nn.init.orthogonal_(weight)
            weight.mul_(gain * sigma * math.sqrt(max(weight.shape)))   # each entry now has RMS gain·σ

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
        """Training depths T per sequence, sorted from deepest to shallowest (CPU ints)."""
        c = self.config
        if c.depth_sampling == "fixed":
            return torch.full((batch_size,), c.mean_loops)
        n = batch_size if c.depth_sampling == "per-sequence" else 1
        T = torch.poisson(torch.full((n,), float(c.mean_loops))).long().clamp(min=1)
        # Which row gets which depth does not matter (the windows are random), so we sort:
        # then the sequences still running at any step are a prefix of the batch.
        return T.sort(descending=True).values.expand(batch_size)

    def forward(self, idx, targets=None, loops=None, depths=None, cache=None, exit_threshold=None):
        """idx, targets: (B, L) token ids; returns (logits, loss or None). Depth: `depths` (B,) if given,
        else `loops` for every sequence, else sampled (training) or mean_loops (evaluation). With an
        exit_threshold (and a cache, sample.KVCache), each token loops until its state converges, at
        most `loops` times (recur_adaptive)."""
        c = self.config
        B, L = idx.shape
        if cache is None and L > c.block_size:
            raise ValueError(f"sequence of {L} tokens is longer than block_size={c.block_size}")
        positions = slice(0, L) if cache is None else cache.start(L)    # the tokens' positions
        cos, sin = self.cos[positions], self.sin[positions]

        x = self.wte(idx)
        for block in self.prelude:      # with a cache, each layer application gets its own slot of it
            x = block(x, idx, cos, sin, None if cache is None else cache.next_slot())
        if c.looped and exit_threshold is not None:
            if cache is None:
                raise ValueError("per-token exit needs a KV cache: exited tokens keep their keys and values there")
            h = self.recur_adaptive(self.prelude_norm(x), idx, loops or c.mean_loops, exit_threshold, cos, sin, cache)
            x = self.C(h).type_as(x)
        elif c.looped:
            if depths is None and loops is None and self.training:
                depths = self.sample_depths(B)
            elif depths is None:
                depths = torch.full((B,), c.mean_loops if loops is None else loops)
            depths = torch.as_tensor(depths).cpu()
            if depths.shape != (B,) or depths.min() < 1:
                raise ValueError(f"need one depth of at least 1 per sequence, got {depths.tolist()} for {B}")
            if cache is not None and depths.min() != depths.max():
                raise ValueError("the KV cache needs the same number of loops for every sequence")
            n_grad = c.backprop_loops if self.training else int(depths.max())
            h = self.recur(self.prelude_norm(x), idx, depths, n_grad, cos, sin, cache)
            x = self.C(h).type_as(x)      # the residual stream keeps its dtype (fp32 under autocast)
        else:
            for block in self.core:
                x = block(x, idx, cos, sin, None if cache is None else cache.next_slot())
        for block in self.coda:
            x = block(x, idx, cos, sin, None if cache is None else cache.next_slot())

        return self.head(x, targets)

    def head(self, x, targets=None):
        """Logits (tied head, logit scale 1) and, given targets, the mean cross-entropy in fp32. Compiled
        (train.py), the fp32 upcast fuses into the log-softmax: no fp32 copy of the (B, L, 50k) logits."""
        logits = F.linear(self.norm_f(x), self.wte.weight)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def recur(self, e, idx, depths, n_grad, cos, sin, cache=None):
        """Run the core blocks depths[b] times on sequence b, injecting e at every iteration.

        The iterations are right-aligned: all sequences finish on the last step, and one of depth T
        joins at step T_max - T. Gradient is on only for the last n_grad steps, so each sequence
        backpropagates through its last min(T, n_grad) iterations (truncated backprop through depth);
        the earlier ones run under no_grad and keep no activations. e always carries gradient back
        to the prelude. Sorted by depth, the running sequences are a prefix h[:m]: every step
        computes only those, instead of padding them all to the deepest."""
        depths, order = depths.sort(descending=True, stable=True)
        permuted = not torch.equal(order, torch.arange(len(order)))
        h = self.initial_state(e)
        if permuted:
            order = order.to(e.device)
            e, idx, h = e[order], idx[order], h[order]
        T_max = int(depths[0])
        norms = []
        for step in range(T_max):
            m = int((depths >= T_max - step).sum())     # sequences running at this step
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= T_max - n_grad):
                h_prev = h
                u = self.core_iteration(h[:m], e[:m], idx[:m], cos, sin, cache)
                h = u if m == len(h) else torch.cat([u, h[m:]])
            norms.append(u.detach().float().norm(dim=-1).mean())
        # cheap stability read-outs, kept as tensors: no host sync until someone logs them
        residual = (h - h_prev).detach().float().norm(dim=-1).mean() / norms[-1]
        self.last_state = {"norms": norms, "residual": residual}
        return h[torch.argsort(order)] if permuted else h

    def core_iteration(self, h, e, idx, cos, sin, cache=None):
        """One iteration of the loop, h <- core_blocks(inject(h, e)). (train.py replays it as a CUDA graph
        where it runs without gradient: see train.GraphedIterations.)"""
        u = self.injection(h, e)
        for block in self.core:
            u = block(u, idx, cos, sin, None if cache is None else cache.next_slot())
        return u

    @torch.no_grad()
    def recur_adaptive(self, e, idx, loops, threshold, cos, sin, cache):
        """Inference with per-token exit: token i stops once its state stops moving,
        ‖h_t - h_(t-1)‖ / ‖h_t‖ < threshold, or after `loops` iterations. Its state then stays as it
        is, and so do its keys and values: in every later core slot it holds those of its last
        iteration (KVCache.next_slot copies them forward), so a token that loops further attends to
        it as it was when it stopped. Every row is computed until all have exited; at decoding batch
        sizes the matmuls cost the time of reading the weights, so dropping rows would save nothing."""
        h = self.initial_state(e)
        exited = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)    # (B, L)
        used = torch.zeros(h.shape[:2], device=h.device)                         # iterations per token
        for step in range(loops):
            u = self.injection(h, e)
            for block in self.core:     # (before the first iteration no token has exited)
                u = block(u, idx, cos, sin, cache.next_slot(exited if step else None))
            change = (u - h).float().norm(dim=-1) / u.float().norm(dim=-1)
            h = torch.where(exited[..., None], h, u)
            used += ~exited
            exited |= change < threshold
            if exited.all():            # a host sync each iteration: no CUDA graph can hold this loop
                cache.skip(loops - step - 1)
                break
        self.last_state = {"loops_per_token": used}
        return h

    def initial_state(self, e):
        if self.config.init_state == "zero":
            return torch.zeros_like(e)
        s = self.state_sigma
        return nn.init.trunc_normal_(torch.empty_like(e), std=s, a=-3 * s, b=3 * s)

    @torch.no_grad()
    def stability_stats(self):
        """‖h‖ after each step of the last forward's loop (mean per-token L2 norm over the sequences
        running at that step), its last value ‖h_T‖, the last-step residual ‖h_T - h_(T-1)‖ / ‖h_T‖,
        and max / mean of Ā (for "linear": W_x's top singular value; "add": 1). {} without a loop."""
        if not self.config.looped or "norms" not in self.last_state:
            return {}
        norms = [n.item() for n in self.last_state["norms"]]
        stats = {"state_norm": norms[-1], "state_norms": norms, "residual": self.last_state["residual"].item()}
        stats.update({k: v.item() for k, v in self.injection.transition_stats().items()})
        return stats

    def flops_per_token(self, seq_len=None, loops=None):
        """Training FLOPs per token (matmuls only): the forward runs the core `loops` times (default
        mean_loops), but only the last backprop_loops iterations are backpropagated (backward = 2 ×
        forward of what carries gradient). Attention counts the causal half; value-embedding lookups cost none."""
        c = self.config
        T = loops or c.mean_loops
        L = seq_len or c.block_size
        block = self.prelude[0] if c.n_prelude else self.core[0]
        block_params = sum(p.numel() for n, p in block.named_parameters()
                           if n.endswith("weight") and p.dim() == 2 and "value_embed" not in n)
        per_block = 2 * block_params + 2 * L * c.n_embd        # matmuls + causal QKᵀ and AV
        head = 2 * c.n_embd * c.padded_vocab_size
        if not c.looped:
            return 3 * (c.n_layer * per_block + head)
        inj = {"parcae": 2 * c.n_embd ** 2, "linear": 4 * c.n_embd ** 2, "add": 0}[c.injection]
        once = (c.n_prelude + c.n_coda) * per_block + 2 * c.n_embd ** 2 + head    # prelude, coda, C, head
        loop = c.n_core * per_block + inj
        return (once + T * loop) + 2 * (once + min(c.backprop_loops, T) * loop)
