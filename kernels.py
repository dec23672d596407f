"""
Fused Triton kernels for decoding without torch.compile (sample.py --fused).

At batch 1 a decoding step of parcae_350m at 16 loops is 72 layer applications of about 31 kernels each,
most of them elementwise ops on a single token: a cast, a flip, a multiply. Replayed as a CUDA graph each
still costs its ~2 µs (bench/results/profiles/generate_loops16.txt). Here the small ops of a layer
application, as the KV cache runs it, become 4 kernels (5 with a value embedding), beside its matmuls
(cuBLAS) and attention (SDPA):

    norm        h = RMSNorm(x), in the matmuls' dtype                        (norm_1; cast for c_attn)
    value_mix   v += 2 σ(h[:32] W_gateᵀ) ⊙ ve[idx]                           (value embeddings)
    rotary      q, k = QK-norm(RoPE(q, k)); k and v into the cache slot       (and q for attention)
    norm        x = x + attention;  h = RMSNorm(x)                           (residual add, norm_2)
    relu2       ½ relu(fc)²                                                  (the MLP's activation)

and the Parcae injection Ā ⊙ h + Δ ⊙ Be is one kernel (Ā and Δ computed once, when fused). Each kernel
computes as model.py's ops do under bf16 autocast: the same dtypes, the same roundings in the same order
(no fused multiply-adds: enable_fp_fusion=False); only the sums of the norms and of the value gate may
add in another order, which moves a result by an ulp or so of fp32 before its bf16 rounding.

fuse_for_decoding(model) makes each block and the injection use them whenever they run without gradient
on a KV cache; everything else runs as before. On a CPU, TRITON_INTERPRET=1 runs the kernels in numpy
(tests/test_kernels.py), in fp32 or fp64: its bf16 casts truncate rather than round, so the tests leave
bf16 to the GPU.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from model import ParcaeInjection

EXACT = dict(enable_fp_fusion=False)        # a * b + c rounds twice, as PyTorch's separate ops round it


@triton.jit
def norm_kernel(x_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, n, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """One row of n: s = x + y if ADD (stored to sum_ptr), else s = x; out = s / sqrt(mean(s²) + eps) · w,
    computed in w's dtype, stored in out's."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if ADD:                 # x + y in x's dtype, as PyTorch promotes a bf16 y to the fp32 residual stream
        x = x + tl.load(y_ptr + row * n + cols, mask=mask, other=0.0).to(x.dtype)
        tl.store(sum_ptr + row * n + cols, x, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask)
    x = x.to(w.dtype)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    tl.store(out_ptr + row * n + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def value_mix_kernel(h_ptr, gate_ptr, gate_row, gate_col, table_ptr, idx_ptr, qkv_ptr, n_head, head_dim,
                     CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Token `row`, head `head`: v += 2 σ(h[:32] · W_gate[head]) ve[idx], each op rounded to v's dtype as
    PyTorch rounds it (the gate's matmul, σ, the product, the sum), the arithmetic in CDT."""
    row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    act = qkv_ptr.dtype.element_ty
    c = tl.arange(0, 32)
    g = tl.sum(tl.load(h_ptr + row * n_head * head_dim + c).to(CDT)
               * tl.load(gate_ptr + head * gate_row + c * gate_col).to(CDT), axis=0).to(act)
    g = 2 * tl.sigmoid(g.to(CDT)).to(act).to(CDT)
    cols = tl.arange(0, BLOCK)
    mask = cols < head_dim
    token = tl.load(idx_ptr + row)
    ve = tl.load(table_ptr + token * n_head * head_dim + head * head_dim + cols, mask=mask).to(act).to(CDT)
    v_ptr = qkv_ptr + (row * 3 * n_head + 2 * n_head + head) * head_dim + cols        # v: the last n_head heads
    v = tl.load(v_ptr, mask=mask).to(CDT) + (g * ve).to(act).to(CDT)
    tl.store(v_ptr, v.to(act), mask=mask)


@triton.jit
def rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, L, n_head, head_dim, window, eps,
                  CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Token `row` (sequence b, new token l), head `head` of qkv's 3·n_head: a q or k head is rotated (RoPE on
    interleaved pairs, in CDT, rounded to qkv's dtype), RMS-normed without weight (in CDT, rounded again) and
    stored to q (B, L, n_head, D) or to the cache's k at the token's position; a v head is stored to v."""
    row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, l = row // L, row % L
    pos = tl.load(pos_ptr + l)
    cols = tl.arange(0, BLOCK)
    mask = cols < head_dim
    src = qkv_ptr + (row * 3 * n_head + head) * head_dim
    x = tl.load(src + cols, mask=mask, other=0.0)
    if head < 2 * n_head:
        partner = tl.load(src + (cols ^ 1), mask=mask, other=0.0)       # channel 2i's is 2i+1, and back
        cos = tl.load(cos_ptr + l * head_dim + cols, mask=mask, other=0.0).to(CDT)
        sin = tl.load(sin_ptr + l * head_dim + cols, mask=mask, other=0.0).to(CDT)
        r = (x.to(CDT) * cos + partner.to(CDT) * sin).to(x.dtype).to(CDT)
        r = (r * tl.rsqrt(tl.sum(r * r, axis=0) / head_dim + eps)).to(x.dtype)
        if head < n_head:
            tl.store(q_ptr + (row * n_head + head) * head_dim + cols, r, mask=mask)
        else:
            slot = ((b * n_head + head - n_head) * window + pos) * head_dim
            tl.store(k_ptr + slot + cols, r.to(k_ptr.dtype.element_ty), mask=mask)
    else:
        slot = ((b * n_head + head - 2 * n_head) * window + pos) * head_dim
        tl.store(v_ptr + slot + cols, x.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu2_kernel(x_ptr, out_ptr, n, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """out = ½ relu(x)², squared in CDT (autocast squares in fp32), stored in out's dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r = tl.maximum(tl.load(x_ptr + i, mask=i < n).to(CDT), 0.0)
    tl.store(out_ptr + i, (0.5 * (r * r)).to(out_ptr.dtype.element_ty), mask=i < n)


@triton.jit
def inject_kernel(a_ptr, h_ptr, delta_ptr, be_ptr, out_ptr, n, d, BLOCK: tl.constexpr):
    """out = Ā ⊙ h + Δ ⊙ Be over rows of d, in out's dtype: two products and a sum, each rounded."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    dt = out_ptr.dtype.element_ty
    a, delta = tl.load(a_ptr + i % d, mask=mask).to(dt), tl.load(delta_ptr + i % d, mask=mask).to(dt)
    u = a * tl.load(h_ptr + i, mask=mask).to(dt) + delta * tl.load(be_ptr + i, mask=mask).to(dt)
    tl.store(out_ptr + i, u, mask=mask)


def triton_dtype(dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def matmul_dtype(x):
    """The dtype the matmuls compute in: autocast's, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def norm(x, weight, eps, dtype, y=None):
    """RMSNorm(x) (RMSNorm(x + y) with y, then also x + y) with weight, in `dtype`."""
    rows, n = x.numel() // x.size(-1), x.size(-1)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    total = torch.empty_like(x) if y is not None else x
    norm_kernel[(rows,)](x, x if y is None else y, weight, total, out, n, eps, ADD=y is not None,
                         BLOCK=triton.next_power_of_2(n))
    return (total, out) if y is not None else out


def fused_block(block, x, idx, cos, sin, slot):
    """Block.forward of new tokens x (B, L, d) through their cache slot, with the kernels above: the same
    steps as model.py's Block, CausalSelfAttention, CacheSlot.update and MLP, in fewer launches."""
    attn, cache, (B, L, d) = block.attn, slot.cache, x.shape
    H, D, act = attn.n_head, attn.head_dim, matmul_dtype(x)
    compute = torch.promote_types(act, torch.float32)       # rotary's tables are fp32; fp64 stays fp64
    x = x.contiguous()
    h = norm(x, block.norm_1.weight, block.norm_1.eps, act)
    qkv = F.linear(h, attn.c_attn.weight).contiguous()
    if block.value_embed is not None:
        gate = attn.ve_gate.weight
        value_mix_kernel[(B * L, H)](h, gate, gate.stride(0), gate.stride(1), block.value_embed.weight,
                                     idx.contiguous(), qkv, H, D, CDT=triton_dtype(compute),
                                     BLOCK=triton.next_power_of_2(D), **EXACT)
    # QK-norm's eps is PyTorch's default for the dtype it normalises in: CUDA's autocast runs rms_norm in
    # fp32; otherwise it is qkv's
    eps = torch.finfo(torch.float32 if x.is_cuda and torch.is_autocast_enabled("cuda") else qkv.dtype).eps
    q = torch.empty((B, L, H, D), dtype=qkv.dtype, device=x.device)
    rotary_kernel[(B * L, 3 * H)](qkv, cos.contiguous(), sin.contiguous(), cache.positions, q, slot.k, slot.v,
                                  L, H, D, slot.k.size(2), eps, CDT=triton_dtype(compute),
                                  BLOCK=triton.next_power_of_2(D), **EXACT)
    k, v = slot.k[:, :, :cache.span], slot.v[:, :, :cache.span]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=cache.mask)
    x, h = norm(x, block.norm_2.weight, block.norm_2.eps, act, y=attn.c_proj(y.transpose(1, 2).reshape(B, L, d)))
    a = block.mlp.fc(h).contiguous()
    out = torch.empty(a.shape, dtype=act, device=x.device)
    relu2_kernel[(triton.cdiv(a.numel(), 1024),)](a, out, a.numel(), CDT=triton_dtype(compute), BLOCK=1024)
    return x + block.mlp.proj(out)


def fused_injection(injection, h, e, A_bar, delta):
    be = injection.B(e).contiguous()
    out = torch.empty(h.shape, dtype=torch.promote_types(torch.promote_types(A_bar.dtype, h.dtype), be.dtype),
                      device=h.device)
    inject_kernel[(triton.cdiv(h.numel(), 1024),)](A_bar, h.contiguous(), delta, be, out, h.numel(), h.size(-1),
                                                   BLOCK=1024, **EXACT)
    return out


def fuse_for_decoding(model):
    """
    sample.py --fused: each block runs with the kernels above whenever it runs without gradient on a KV
    cache (GPT.decode), and the Parcae injection whenever it runs without gradient, on a GPU (or on a CPU
    with TRITON_INTERPRET=1). Otherwise, and where per-token exit must keep an exited token's keys and
    values (CacheSlot.update: a batch of several tokens), they run as before. Call it on the model as it
    will decode (its device and weights): Ā and Δ are computed here, once. Changes the model in place and
    returns it.
    """
    device = next(model.parameters()).device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the fused kernels run on a CUDA GPU, not on {device.type}")
    for block in model.blocks():
        def forward(x, idx, cos, sin, slot=None, block=block, plain=block.forward):
            cache = slot.cache if slot is not None else None
            keeps = cache is not None and slot.previous is not None and cache.exited is not None \
                and cache.exited.numel() > 1        # an exited token keeps its keys: CacheSlot.update does that
            if cache is None or keeps or torch.is_grad_enabled():
                return plain(x, idx, cos, sin, slot)
            return fused_block(block, x, idx, cos, sin, slot)
        block.forward = forward
    injection = getattr(model, "injection", None)
    if isinstance(injection, ParcaeInjection):
        with torch.no_grad():
            A_bar, delta = (t.contiguous() for t in injection.discretize())

        def inject(h, e, plain=injection.forward):
            if torch.is_grad_enabled():
                return plain(h, e)
            return fused_injection(injection, h, e, A_bar, delta)
        injection.forward = inject
    return model
