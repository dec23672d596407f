"""Behaviour of model.py: the Parcae injection, the loop, the cache, the init and the bookkeeping."""

import copy
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.throughput import MaskedLoopGPT
from conftest import ROOT, U, reordering_bound, tiny, tokens
from model import GPT, CausalSelfAttention, GPTConfig, KVCache, ParcaeInjection, apply_rotary, rotary_tables
from train import Muon, configure_optimizers

INJECTIONS = ["parcae", "linear", "add", "none"]


def count_core_calls(model):
    """Record the batch size of every call of the first core block (one call = one iteration)."""
    calls = []
    model.core[0].register_forward_hook(lambda mod, args, out: calls.append((args[0].size(0), torch.is_grad_enabled())))
    return calls

# -----------------------------------------------------------------------------
# building blocks


def test_rotary_embedding_rotates_interleaved_pairs_and_keeps_only_relative_position():
    cos, sin = rotary_tables(head_dim=8, max_len=40)
    # base 50,000: fp32's pow and cos are each within an ulp (U near 1), rounding math.cos half of one;
    # channels 2 and 3 are pair 1, of angle position·50000^(-2/8)
    assert torch.allclose(cos[1, 2:4], torch.tensor(math.cos(50_000 ** (-2 / 8))), rtol=0, atol=4 * U)
    assert torch.equal(sin[:, 2], -sin[:, 3]) and torch.equal(cos[:, 2], cos[:, 3])
    rot = lambda x, p: apply_rotary(x, cos[p:p + 1], sin[p:p + 1])
    # channels 2i and 2i+1 rotate together as one complex number: (1, 0) becomes (cos, sin), exactly
    x = torch.zeros(1, 1, 1, 8)
    x[..., 2] = 1.0
    assert torch.equal(rot(x, 3)[..., 2:4].flatten(), torch.stack([cos[3, 2], sin[3, 3]]))
    # q·k depends on the distance between the positions only. Up to the tables' rounding: the angle
    # p·θ_i (θ_i ≤ 1) is rounded by up to p·U, cos and sin by an ulp each, and the rotation and the sum
    # of 8 products add a few U more, so each side is within (p_q + p_k + 18)·U·‖q‖‖k‖ of exact.
    q, k = torch.randn(2, 1, 1, 1, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    bound = ((5 + 2 + 18) + (30 + 27 + 18)) * U * q.norm() * k.norm()
    assert torch.allclose((rot(q, 5) * rot(k, 2)).sum(), (rot(q, 30) * rot(k, 27)).sum(), rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_is_the_pairwise_rotation_in_fp32_bit_for_bit(dtype):
    """apply_rotary computes x·cos + (x, pairs swapped)·(∓sin): for each pair the same two fp32 products
    and one sum, rounded once each, as the rotation written pair by pair (the release's formula):
    x_2i+1·(-sin) rounds to -(x_2i+1·sin), a + (-b) is a - b, and a sum does not depend on its order.
    bf16 input is rounded back to bf16 after, as autocast's q and k are."""
    cos, sin = rotary_tables(head_dim=16, max_len=40)
    x = torch.randn(2, 40, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    c, s = cos[:, None, 0::2], sin[:, None, 1::2]
    want = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(dtype)
    assert torch.equal(apply_rotary(x, cos, sin), want)


def test_attention_reads_q_k_and_v_from_the_rows_of_c_attn_in_that_order():
    """c_attn stacks the release's c_q, c_k and c_v: attention computed from three separate matrices as
    the release does (each projection, RoPE, QK-norm, causal softmax, c_proj), written out here in fp64.
    Both compute the same sums in other orders (one fused matmul or three; the softmax in or out of a
    kernel): over 64 terms, about 8·2⁻⁵³ ≈ 1e-15 of values of order 1 each, through a few sums in a row,
    so 1e-12 holds with room; q and k swapped, or v from other rows, is off by order 1."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_embd=64, n_head=2, block_size=16), has_value_embed=False).double()
    Wq, Wk, Wv, Wo = torch.randn(4, 64, 64, dtype=torch.float64) / 8
    with torch.no_grad():
        attn.c_attn.weight.copy_(torch.cat([Wq, Wk, Wv]))
        attn.c_proj.weight.copy_(Wo)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    cos, sin = (t[:10].double() for t in rotary_tables(32, 16))
    c, s = cos[:, None, 0::2], sin[:, None, 1::2]

    def heads(W, rotate):
        t = (x @ W.T).view(2, 10, 2, 32)
        if rotate:
            t1, t2 = t[..., 0::2], t[..., 1::2]
            t = F.rms_norm(torch.stack((t1 * c - t2 * s, t1 * s + t2 * c), dim=-1).flatten(-2), (32,))
        return t.transpose(1, 2)            # (B, heads, L, head_dim)
    q, k, v = heads(Wq, True), heads(Wk, True), heads(Wv, False)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(32)).masked_fill(torch.ones(10, 10).triu(1).bool(), -math.inf)
    want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 64) @ Wo.T
    with torch.no_grad():
        assert torch.allclose(attn(x, None, cos, sin), want, rtol=0, atol=1e-12)


# -----------------------------------------------------------------------------
# the Parcae injection


def test_A_bar_stays_in_open_unit_interval_for_any_parameter_values():
    inj = ParcaeInjection(4096).double()
    with torch.no_grad():
        # a grid from tiny to huge decay rates, plus random draws: every value stays in (0, 1)
        a_log, dt = torch.meshgrid(torch.linspace(-12, 4, 64), torch.linspace(-12, 4, 64), indexing="ij")
        inj.A_log.copy_(a_log.flatten())
        inj.dt_bias.copy_(dt.flatten())
        A_bar, delta = inj.discretize()
        assert (A_bar > 0).all() and (A_bar < 1).all() and (delta > 0).all()
        inj.A_log.uniform_(-12, 4)
        inj.dt_bias.uniform_(-12, 4)
        A_bar, _ = inj.discretize()
        assert (A_bar > 0).all() and (A_bar < 1).all()
    # in fp32, far-out values saturate at exactly 0 or 1 but never leave [0, 1] or turn NaN,
    # so the injected state can shrink but never grow
    a_log, dt = torch.meshgrid(torch.tensor([-1e4, -100.0, 0.0, 80.0]), torch.tensor([-80.0, 0.0, 100.0, 1e4]),
                               indexing="ij")
    inj = ParcaeInjection(16)
    with torch.no_grad():
        inj.A_log.copy_(a_log.flatten())
        inj.dt_bias.copy_(dt.flatten())
        A_bar, _ = inj.discretize()
    assert torch.isfinite(A_bar).all() and (A_bar >= 0).all() and (A_bar <= 1).all()


def test_parcae_starts_at_A_bar_one_over_sqrt5_and_B_identity():
    model = GPT(GPTConfig(vocab_size=97, n_embd=32, n_head=2, block_size=16))
    A_bar, delta = model.injection.discretize()
    # dt_bias is the fp32 rounding of an fp64 value, and softplus and exp each round once more (by
    # an ulp at most, U for values below 1): a few U from the exact values
    assert torch.allclose(A_bar, torch.full_like(A_bar, 1 / math.sqrt(5)), rtol=0, atol=4 * U)
    assert torch.allclose(delta, torch.full_like(delta, math.log(math.sqrt(5))), rtol=0, atol=4 * U)
    assert torch.equal(model.injection.A_log, torch.zeros(32))
    assert torch.equal(model.injection.B.weight, torch.eye(32))


def test_official_init_zero_out_projections_and_scaled_orthogonal_matrices():
    model = GPT(GPTConfig(vocab_size=97, n_embd=64, n_head=2, block_size=16))
    sigma = math.sqrt(2 / (5 * 64))
    # Householder QR (orthogonal_) in fp32 leaves rows orthonormal to about n·U = 64·U ≈ 4e-6 (measured
    # 5e-7); the RMS is taken in fp64 so that summing 4096 squares adds nothing. 1e-4 leaves 25 times
    # that, and a wrong gain is off by 10 % or more.
    rms = lambda w: w.double().pow(2).mean().sqrt().item()
    for block in model.blocks():
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.proj.weight.abs().max() == 0
        assert rms(block.mlp.fc.weight) == pytest.approx(math.sqrt(1.6) * sigma, rel=1e-4)
        for w in block.attn.c_attn.weight.chunk(3):     # q, k and v: each orthogonal on its own, as in the release
            assert rms(w) == pytest.approx(math.sqrt(0.4) * sigma, rel=1e-4)
            w = w.double() / (math.sqrt(0.4) * sigma * 8)     # orthogonal once rescaled
            assert torch.allclose(w @ w.T, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-4)
    assert rms(model.wte.weight) == pytest.approx(sigma, rel=1e-4)
    assert rms(model.C.weight) == pytest.approx(math.sqrt(0.4) * sigma, rel=1e-4)
    # value embeddings on every other layer, ending with the last (layers 0..5: 1, 3, 5)
    assert [b.value_embed is not None for b in model.blocks()] == [False, True, False, True, False, True]
    assert model.wte.weight.size(0) == 128          # 97 padded to a multiple of 64


def test_parameter_counts_match_the_paper_table():
    expected = {("parcae", 768, 6, 2): 144.3e6, ("none", 768, 6, 2): 143.1e6,
                ("parcae", 1024, 8, 4): 388.0e6, ("none", 1024, 8, 4): 385.9e6,
                ("parcae", 1280, 10, 6): 776.7e6, ("none", 1280, 10, 6): 773.4e6,
                ("parcae", 1536, 12, 8): 1338.6e6, ("none", 1536, 12, 8): 1333.9e6}
    for (injection, d, heads, n), count in expected.items():
        with torch.device("meta"):          # shapes only: no memory, no init time
            model = GPT(GPTConfig(vocab_size=32768, block_size=2048, n_embd=d, n_head=heads,
                                  n_prelude=n, n_core=n, n_coda=n, injection=injection))
        assert model.num_params() == pytest.approx(count, abs=0.05e6), (injection, d)   # the table's rounding

# -----------------------------------------------------------------------------
# the loop


@pytest.mark.parametrize("loops", [1, 3, 7])
def test_core_runs_exactly_loops_times(loops):
    model = tiny().eval()
    calls = count_core_calls(model)
    model(tokens()[:, :-1], loops=loops)
    assert [b for b, _ in calls] == [3] * loops


def test_per_sequence_sampling_gives_each_sequence_its_own_depth():
    model = tiny(mean_loops=5).train()
    calls = count_core_calls(model)
    torch.manual_seed(3)
    depths = model.sample_depths(64)
    assert len(set(depths.tolist())) > 3 and depths.min() >= 1           # many different depths
    assert abs(depths.float().mean().item() - 5) < 1.0     # the mean of 64 Poisson(5) draws: σ = √5/8 ≈ 0.28
    torch.manual_seed(3)
    x = tokens(B=64)
    model(x[:, :-1], x[:, 1:])
    # one call per step of the deepest sequence; each sequence is computed exactly T times
    assert len(calls) == depths.max()
    assert sum(b for b, _ in calls) == depths.sum()
    per_batch = tiny(depth_sampling="per-batch").sample_depths(16)
    assert len(set(per_batch.tolist())) == 1


def test_gradient_flows_through_only_the_last_k_iterations_of_each_sequence():
    model = tiny(backprop_loops=2).train()
    depths = torch.tensor([6, 1, 3, 2, 5])
    forward, backward = [], []
    model.core[0].register_forward_hook(lambda m, a, o: forward.append((a[0].size(0), torch.is_grad_enabled())))
    model.core[0].register_full_backward_hook(lambda m, gi, go: backward.append(go[0].size(0)))
    x = tokens(B=5)
    _, loss = model(x[:, :-1], x[:, 1:], depths=depths)
    loss.backward()
    # steps run 6 of them; only the last 2 record a graph
    assert [g for _, g in forward] == [False] * 4 + [True] * 2
    # each sequence is backpropagated through min(T, 2) iterations: 2 + 1 + 2 + 2 + 2
    assert sum(backward) == int(depths.clamp(max=2).sum())
    # and the prelude still gets gradient through e
    assert model.prelude[0].attn.c_attn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("injection", ["parcae", "linear", "add"])
def test_active_sequences_loop_equals_masked_reference(injection):
    """Computing only the running sequences gives the same loss and gradients as the release's
    loop, which pads every sequence to the deepest and freezes finished ones with a mask."""
    model = tiny(injection, backprop_loops=3).train()
    reference = MaskedLoopGPT(model.config).train()
    reference.load_state_dict(model.state_dict())
    depths = torch.tensor([2, 7, 1, 4, 7, 3])     # deliberately unsorted
    x = tokens(B=6)
    results = []
    for m in (model, reference):
        torch.manual_seed(5)            # the same initial state h_0 for both
        _, loss = m(x[:, :-1], x[:, 1:], depths=depths)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (loss_a, grad_a), (loss_b, grad_b) = results
    # The same sums, some in other orders: a matmul over the running rows only may add up its ≤ 128
    # terms otherwise than one over all rows, and the weight gradients sum over other row sets.
    # The deepest sequence's forward is 16 block applications and the head; its backward another
    # ~10 (3 loops of 2 core blocks, the coda, the head, the prelude).
    torch.testing.assert_close(loss_a, loss_b, rtol=reordering_bound(n=128, layers=17), atol=0)
    for name in grad_a:
        assert grad_a[name] is not None, name
        bound = reordering_bound(n=128, layers=27) * grad_b[name].abs().max().item()     # of the tensor's scale
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=0, atol=bound, msg=name)


def test_no_grad_iterations_keep_no_activations():
    """Training memory depends on backprop_loops, not on how many iterations run before."""
    saved = {}
    for mean_loops in (2, 8, 32):
        model = tiny(mean_loops=mean_loops, backprop_loops=2, depth_sampling="fixed").train()
        x = tokens(B=2)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x[:, :-1], x[:, 1:])
        saved[mean_loops] = total[0]
    assert saved[2] == saved[8] == saved[32]


def test_evaluation_depth_defaults_to_mean_loops_and_is_deterministic_with_zero_state():
    model = tiny(init_state="zero").eval()
    calls = count_core_calls(model)
    x = tokens()[:, :-1]
    a, _ = model(x)
    b, _ = model(x, loops=4)
    assert len(calls) == 8 and torch.equal(a, b)
    assert not torch.equal(a, model(x, loops=5)[0])


def test_stability_stats_report_state_norm_residual_and_A_bar():
    model = tiny().eval()
    states = []     # h after each iteration: the output of the last core block
    model.core[-1].register_forward_hook(lambda m, a, out: states.append(out.detach()))
    model(tokens()[:, :-1], loops=5)
    stats = model.stability_stats()
    # the same fp32 arithmetic as the model's on the same tensors, so the same numbers
    norm = lambda h: h.norm(dim=-1).mean()
    assert stats["state_norms"] == [norm(h).item() for h in states]
    assert stats["state_norm"] == stats["state_norms"][-1]
    assert stats["residual"] == (norm(states[-1] - states[-2]) / norm(states[-1])).item()
    # a mean of 32 values is at most their max, up to the fp32 sum's rounding: at most 31·U of it
    assert 0 < stats["a_mean"] <= stats["a_max"] * (1 + 31 * U) and stats["a_max"] < 1
    linear = tiny("linear").eval()
    linear(tokens()[:, :-1], loops=2)
    W_x = linear.injection.W.weight.detach()[:, :32]
    assert linear.stability_stats()["a_max"] == torch.linalg.matrix_norm(W_x, ord=2).item()    # its top singular value
    assert tiny("none").stability_stats() == {}

# -----------------------------------------------------------------------------
# the KV cache (generation itself: tests/test_sample.py)


def decode_with_cache(model, x, loops, prefill=6, bucket=256):
    """The logits of x from a new cache: the first `prefill` tokens in one forward, then one at a time."""
    cache = KVCache(model, batch_size=len(x), loops=loops, bucket=bucket)
    parts = [model.decode(x[:, :prefill], cache, loops)]
    parts += [model.decode(x[:, i:i + 1], cache, loops) for i in range(prefill, x.size(1))]
    return torch.cat(parts, dim=1), cache


def slots(cache):
    """Every slot of the cache once, in the order the layers run."""
    core = cache.core[:1] if cache.shared else cache.core
    return [*cache.prelude, *(s for iteration in core for s in iteration), *cache.coda]


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("loops", [1, 3, 16])
def test_kv_cache_gives_the_same_logits_as_a_full_forward(injection, loops):
    model = tiny(injection, init_state="zero").eval()
    x = tokens(B=2, L=10)[:, :-1]
    with torch.no_grad():
        full, _ = model(x, loops=loops)
        cached, _ = decode_with_cache(model, x, loops)
    # the same sums in other orders: attention over the cached keys, matmuls of one row, through the
    # prelude, `loops` iterations of 2 core blocks, the coda and the head
    layers = 1 + 2 * loops + 1 + 1
    assert torch.allclose(cached, full, rtol=0, atol=reordering_bound(n=128, layers=layers) * full.abs().max())


def test_attention_over_the_filled_part_of_the_cache_gives_the_logits_of_the_whole_window():
    """Attention reads the cache's first `span` positions, the filled ones rounded up to a multiple of
    `bucket`: here 4, so the span grows 8, 12, ..., where a bucket of the window reads all 64 behind the
    mask. In fp64 both differ only in how the softmax sums the masked-out zeros, ~1e-16 relative."""
    model = tiny(init_state="zero").double().eval()
    x = tokens(B=2, L=14)[:, :-1]
    windowed, _ = decode_with_cache(model, x, loops=3, bucket=64)
    bucketed, cache = decode_with_cache(model, x, loops=3, bucket=4)
    assert cache.span == 16 and cache.length == 14 and slots(cache)[0].k.size(2) == 64
    torch.testing.assert_close(bucketed, windowed, rtol=0, atol=1e-12)


def test_the_cache_keeps_its_memory_fills_in_chunks_and_refuses_to_overflow():
    """What replaying a CUDA graph relies on: the buffers and the position tensor never move (they
    are updated in place), and the host-side length follows the positions written."""
    model = tiny(init_state="zero", block_size=16).eval()
    x = tokens(B=2, L=16)[:, :-1]
    cache = KVCache(model, batch_size=2, loops=3)
    with torch.no_grad():
        full, _ = model(x, loops=3)
        buffers = [t.data_ptr() for s in slots(cache) for t in (s.k, s.v)] + [cache.pos.data_ptr()]
        parts = [model.decode(x[:, :5], cache, 3)]
        parts += [model.decode(x[:, 5:9], cache, 3), model.decode(x[:, 9:10], cache, 3)]
        assert [t.data_ptr() for s in slots(cache) for t in (s.k, s.v)] + [cache.pos.data_ptr()] == buffers
        assert cache.length == int(cache.pos) == 10
        bound = reordering_bound(n=128, layers=1 + 2 * 3 + 1 + 1) * full.abs().max()     # as in the test above
        assert torch.allclose(torch.cat(parts, dim=1), full[:, :10], rtol=0, atol=bound)
        with pytest.raises(ValueError, match="holds 10 of 16 positions: no room for 7 more"):
            model.decode(x[:, :7], cache, 3)
        cache.rollback(0)
        assert cache.length == int(cache.pos) == 0
        with pytest.raises(ValueError, match="made for 3 loops.*at 4 loops"):
            model.decode(x[:, :1], cache, 4)


def test_a_rolled_back_cache_forgets_the_positions_after_it():
    """Self-speculative decoding rolls the cache back past the drafts it rejects: what follows is then
    computed as if those had never been written. Exact: the same one-token forwards on the same cached
    keys and values, with stale ones beyond the position where nothing may attend."""
    model = tiny(init_state="zero").eval()
    x, other = tokens(B=2, L=10)[:, :-1], tokens(B=2, L=10, seed=2)[:, :-1]
    with torch.no_grad():
        clean, _ = decode_with_cache(model, x, loops=3)
        cache = KVCache(model, batch_size=2, loops=3)
        model.decode(x[:, :6], cache, 3)
        model.decode(other[:, 6:9], cache, 3)           # three tokens that are then taken back
        cache.rollback(6)
        again = torch.cat([model.decode(x[:, i:i + 1], cache, 3) for i in range(6, 9)], dim=1)
    assert torch.equal(again, clean[:, 6:9])


def test_the_cache_stores_what_the_model_computes_in():
    """fp32 without autocast; bf16 under bf16 autocast, where cached decoding still gives the full
    forward's logits up to bf16 rounding. Each matmul rounds its fp32 sums to bf16 (8 bits), and where
    the two paths' sums differ a little, one may round an entry to the neighbouring bf16 value, 2^-7 of
    it away. Such a flip in one of the 6 layer applications (prelude, 2 loops of 2 core blocks, coda)
    or in the logits moves a logit by up to about 2^-7 of the logits' scale."""
    model = tiny(init_state="zero").eval()
    assert KVCache(model, batch_size=1, loops=2).prelude[0].k.dtype == torch.float32
    x = tokens(B=2, L=10)[:, :-1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(x, loops=2)
        cached, cache = decode_with_cache(model, x, loops=2)
    c = model.config
    assert len(slots(cache)) == c.n_prelude + 2 * c.n_core + c.n_coda
    assert cache.prelude[0].k.dtype == cache.coda[0].v.dtype == torch.bfloat16
    assert cache.prelude[0].k.shape == (2, c.n_head, c.block_size, c.n_embd // c.n_head)
    assert torch.allclose(cached.float(), full.float(), rtol=0, atol=7 * 2**-7 * full.float().abs().max())

# -----------------------------------------------------------------------------
# training helpers


@pytest.mark.parametrize("injection", INJECTIONS)
def test_every_variant_trains_a_step(injection):
    model = tiny(injection).train()
    optimizers = configure_optimizers(model, lr=1e-2, weight_decay=0.2, device_type="cpu")
    x = tokens(B=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    for opt in optimizers:
        opt.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)          # every parameter received a gradient and moved


def test_optimizer_groups_muon_for_block_matrices_adamw_for_the_rest():
    model = tiny()
    muon, adamw = configure_optimizers(model, lr=8e-3, weight_decay=0.2, device_type="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adam_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert muon_names | adam_names == set(names.values()) and not muon_names & adam_names
    assert all(n.split(".")[-2] in {"c_attn", "c_proj", "fc", "proj", "ve_gate"} for n in muon_names)
    for n in ("wte.weight", "injection.A_log", "injection.dt_bias", "injection.B.weight", "C.weight",
              "core.0.value_embed.weight", "norm_f.weight"):
        assert n in adam_names
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["weight_decay"] == 0


def torch_newton_schulz(G, steps=5):
    """torch.optim.Muon's own Newton–Schulz (bf16), one matrix at a time, for each matrix of G."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz
    return torch.stack([_zeropower_via_newtonschulz(g, (DEFAULT_A, DEFAULT_B, DEFAULT_C), steps, EPS) for g in G])


def newton_schulz_fp64(g, steps=5):
    """The same iteration on one matrix in fp64: what the bf16 ones approximate."""
    from torch.optim._muon import DEFAULT_A as a, DEFAULT_B as b, DEFAULT_C as c
    tall = g.size(0) > g.size(1)
    X = g.double().T if tall else g.double()
    X = X / X.norm()
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def test_muon_takes_the_steps_of_torch_optim_muon_given_the_same_orthogonalisation(monkeypatch):
    """Wide, tall and square matrices, two of some shapes, over steps with momentum and weight decay,
    and on from a torch.optim.Muon checkpoint: the same weights to the last bit. Exact by construction:
    with torch's Newton–Schulz in place of our batched one, the rest of our step (Nesterov momentum,
    the lr's scaling, weight decay) does torch's fp32 operations in torch's order. (The batched
    Newton–Schulz itself: the next test.)"""
    monkeypatch.setattr(Muon, "orthogonalize", staticmethod(torch_newton_schulz))
    torch.manual_seed(0)
    shapes = [(16, 48), (48, 16), (16, 48), (24, 24), (48, 16)]
    start = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    opts = [Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.9),
            torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9)]

    def step_both(ours):        # the same random gradient for both, then a step of each
        for a, b, s in zip(ours, theirs, shapes):
            a.grad = torch.randn(s)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    for _ in range(3):
        step_both(ours)
    for a, b, w in zip(ours, theirs, start):
        assert not torch.equal(a, w) and torch.equal(a, b)
    # a checkpoint saved with torch.optim.Muon resumes: its state loads, and the steps stay the same
    resumed = [torch.nn.Parameter(b.detach().clone()) for b in theirs]
    opts[0] = Muon(resumed, lr=0.02, weight_decay=0.1, momentum=0.9)
    opts[0].load_state_dict(copy.deepcopy(opts[1].state_dict()))    # as from a file: no shared buffers
    step_both(resumed)
    assert all(torch.equal(a, b) for a, b in zip(resumed, theirs))


def test_muon_steps_c_attn_as_the_three_matrices_it_stacks():
    """The fused model's Muon steps equal those of the release's separate q, k and v, to the last bit.
    Exact by construction: c_attn's three pieces enter Newton–Schulz as three d×d matrices, in the
    stack, and at the place in it, where c_q, c_k and c_v would (so the batched matmuls see the same
    input), with the lr scaling of a d×d matrix; momentum and weight decay are elementwise, and every
    size here is a multiple of the vector width, so no element takes another code path in a 3d×d tensor."""
    model = tiny()
    muon, _ = configure_optimizers(model, lr=0.02, weight_decay=0.1, device_type="cpu")
    fused = muon.param_groups[0]["params"]
    assert sum(muon.pieces.get(id(p), 1) == 3 for p in fused) == len(model.blocks())     # each c_attn
    pieces = lambda tensors: [t for p, w in zip(fused, tensors) for t in w.chunk(muon.pieces.get(id(p), 1))]
    separate = [torch.nn.Parameter(w.clone()) for w in pieces([p.detach() for p in fused])]
    reference = Muon(separate, lr=0.02, weight_decay=0.1, momentum=0.95)
    start = [w.detach().clone() for w in separate]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in fused:
            p.grad = torch.randn(p.shape, generator=g)
        for s, grad in zip(separate, pieces([p.grad for p in fused])):
            s.grad = grad.clone()
        muon.step()
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(pieces([p.detach() for p in fused]), separate))
    buffers = lambda opt, params: [opt.state[p]["momentum_buffer"] for p in params]
    assert all(torch.equal(a, b) for a, b in zip(pieces(buffers(muon, fused)), buffers(reference, separate)))
    assert not any(torch.equal(a, b) for a, b in zip(separate, start))       # and the steps moved them all


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (24, 24)], ids=["wide", "tall", "square"])
def test_batched_newton_schulz_is_each_matrix_own_up_to_bf16_rounding(shape):
    """Muon.orthogonalize runs Newton–Schulz on a stack of same-shape matrices at once, each with its
    own norm, tall ones transposed. In bf16 a batched matmul now and then rounds an entry to the
    neighbouring value where one matmul per matrix does not (on an AMD EPYC, in 1 of these 300
    matrices), and the iteration can grow such a flip (its polynomial's slope reaches 3.4), so the
    arithmetic's worst case gives no useful bound. We measure instead what bf16 costs anyway: how far
    torch's one-matrix Newton–Schulz lands from the same iteration in fp64 (1-4 % of the result), and
    require ours to be nearer than that to torch's. Measured: within 0.3 of that distance, where a
    mistake in the batching (a norm over the whole stack, a step more or fewer) is 9-17 times it away."""
    for G in torch.randn(50, 2, *shape, generator=torch.Generator().manual_seed(0)):    # 50 pairs
        for g, ours, theirs in zip(G, Muon.orthogonalize(G, 5), torch_newton_schulz(G)):
            bf16_error = (theirs.double() - newton_schulz_fp64(g)).norm()
            assert (ours.double() - theirs.double()).norm() < bf16_error


@pytest.mark.parametrize("injection", INJECTIONS)
def test_flops_count_is_the_matmuls_pytorch_counts(injection):
    """PyTorch's own FLOP counter agrees with the count exactly (whole numbers from the shapes), over a
    forward alone and over a forward and backward at 3 loops. The counter skips attention on a CPU, so
    we add the causal 2·L·d per layer application (and twice it per application going backward)."""
    model = tiny(injection, mean_loops=3, backprop_loops=3).eval()
    x = tokens(B=2, L=64)
    c = model.config
    applications = c.n_prelude + c.n_coda + (3 if c.looped else 1) * c.n_core
    attention = applications * 2 * 64 * c.n_embd
    for backward in (False, True):
        with FlopCounterMode(display=False) as counter:
            _, loss = model(x[:, :-1], x[:, 1:], loops=3)
            if backward:
                loss.backward()
        counts = counter.get_flop_counts()["Global"]
        assert not any("attention" in str(op) for op in counts)
        counted = sum(counts.values()) / (2 * 64)
        passes = 3 if backward else 1          # the backward costs two forwards
        assert model.flops_per_token(seq_len=64, loops=3, backward=backward) == counted + passes * attention


def test_flops_backward_covers_only_backprop_loops():
    # each loop costs a forward; only the last backprop_loops cost a backward (2 forwards) too
    f = lambda mean, bwd: tiny(mean_loops=mean, backprop_loops=bwd).flops_per_token()
    one_loop = f(2, 1) - f(1, 1)
    assert f(8, 2) - f(2, 2) == 6 * one_loop
    assert f(8, 4) - f(8, 2) == 2 * 2 * one_loop


@pytest.mark.parametrize("loops", [0, -1])
def test_fewer_than_one_loop_is_refused_alike_by_every_path_and_the_flops_count(loops):
    """0 loops is not "the default" anywhere: whole sequences, decoding at fixed depth and with per-token
    exit, a cache's size and the FLOP count say the same, and a refused step writes nothing in the cache."""
    model = tiny().eval()
    x = tokens(B=2)[:, :-1]
    message = f"^loops={loops}: a looped model runs its core at least once$"
    cache = KVCache(model, 2, loops=1)
    paths = {"fixed": lambda: model(x, loops=loops), "decoding": lambda: model.decode(x, cache, loops=loops),
             "adaptive": lambda: model.decode(x, cache, loops=loops, exit_threshold=0.1),
             "cache": lambda: KVCache(model, 2, loops=loops), "flops": lambda: model.flops_per_token(loops=loops)}
    for path in paths.values():
        with pytest.raises(ValueError, match=message):
            path()
    assert cache.length == 0
    assert model.flops_per_token(loops=1) > 0
    assert model(x, loops=1)[0].shape == (*x.shape, model.config.padded_vocab_size)


def test_bad_config_values_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="parcae, linear, add, none"):
        GPTConfig(injection="parcea")
    for bad in (dict(n_embd=30, n_head=4), dict(n_head=0)):
        with pytest.raises(ValueError, match="heads"):
            GPTConfig(**bad)
    with pytest.raises(ValueError, match="32 channels"):
        GPTConfig(n_embd=16, n_head=2)
    with pytest.raises(ValueError, match="n_core, mean_loops and backprop_loops"):
        GPTConfig(n_core=0)


def test_bad_depths_are_refused_instead_of_silently_ignored():
    model = tiny().eval()
    x = tokens(B=3)[:, :-1]
    for depths in ([2, 2], [2, 0, 1]):
        with pytest.raises(ValueError, match="one depth of at least 1 per sequence"):
            model(x, depths=torch.tensor(depths))


def test_readme_line_pointers_name_what_is_on_those_lines():
    """The README maps each equation to a line of model.py, e.g. `model.py:139   (discretize)` or
    `model.py:145, 360   (A_bar, injection)`: after an edit of model.py, each named identifier must
    still be on the line it points to, and no pointer goes without a name."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = open(os.path.join(ROOT, "model.py"), encoding="utf-8").read().splitlines()
    pointers = []
    for numbers, names in re.findall(r"model\.py:(\d+(?:, \d+)*)\s+\(([\w.]+(?:, [\w.]+)*)\)", readme):
        assert len(numbers.split(", ")) == len(names.split(", ")), f"model.py:{numbers} ({names})"
        pointers += zip(numbers.split(", "), names.split(", "))                          # equation block
    pointers += [(n, name) for name, n in re.findall(r"`([\w.]+)`,\s+model\.py:(\d+)", readme)]  # `recur`, model.py:339
    every_number = [n for ns in re.findall(r"model\.py:(\d+(?:, \d+)*)", readme) for n in ns.split(", ")]
    assert sorted(n for n, _ in pointers) == sorted(every_number), "a README pointer to model.py names nothing"
    for number, name in pointers:
        assert name.split(".")[-1] in lines[int(number) - 1], f"README points to model.py:{number} for {name}"
