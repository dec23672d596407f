"""kernels.py, the fused decoding kernels, run on the CPU by Triton's interpreter (numpy), in fp64 and fp32.
The interpreter's bf16 casts truncate instead of rounding to nearest as a GPU does, so bf16 is left to the
GPU (bench/throughput.py times the fused decoding and checks its tokens there)."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"        # read when kernels.py defines its kernels
pytest.importorskip("triton", reason="the fused kernels need Triton (pip install triton)")

import kernels  # noqa: E402
import sample as sample_py  # noqa: E402
from conftest import tiny, tokens  # noqa: E402
from model import KVCache, apply_rotary  # noqa: E402
from sample import generate  # noqa: E402
from test_sample import decisions_are_robust  # noqa: E402

UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24}      # one rounding moves a value by ≤ this of it


def reordered(n, sums, dtype):
    """conftest.reordering_bound in `dtype`: two computations of `sums` sums of n terms in a row, added in
    other orders, land about √n units apart each (a random walk of roundings); 5 standard deviations."""
    return 5 * math.sqrt(n) * UNIT[dtype] * sums


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_elementwise_kernels_round_exactly_as_the_ops_they_replace(dtype):
    """½ relu(x)², Ā ⊙ h + Δ ⊙ Be and the residual add of the norm kernel have no sums: the kernels do the
    same operations in the same order, so the results are equal bit for bit."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 40, generator=g, dtype=dtype)
    out = torch.empty_like(a)
    kernels.relu2_kernel[(1,)](a, out, a.numel(), CDT=kernels.triton_dtype(dtype), BLOCK=1024)
    assert torch.equal(out, 0.5 * F.relu(a).square())

    model = tiny().to(dtype).eval()
    h, e = (torch.randn(3, 5, 32, generator=g, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        A_bar, delta = model.injection.discretize()
        assert torch.equal(kernels.fused_injection(model.injection, h, e, A_bar, delta), model.injection(h, e))

    y, w = torch.randn(3, 5, 32, generator=g, dtype=dtype), torch.rand(32, generator=g, dtype=dtype) + 0.5
    total, normed = kernels.norm(h, w, 1e-5, dtype, y=y)
    assert torch.equal(total, h + y)
    scale = F.rms_norm(h + y, (32,), w, 1e-5)
    # one sum of 32 squares, in another order: its rounding moves the norm by half as much
    assert (normed - scale).abs().max() <= reordered(32, 1, dtype) * scale.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", ["core.0", "core.1"])
def test_a_fused_block_computes_what_the_block_does_and_writes_the_same_cache(dtype, layer):
    """Block.forward of 3 new tokens after 4 cached ones, with and without a value embedding (core.0 has one):
    the output and the slot's keys and values. Only the sums of the two norms (d terms), the QK-norm (head_dim)
    and the value gate (32) are added in another order; each normalised step passes a relative error on about
    as it gets it, so 4 reordered sums of at most d terms bound the difference (v too: it is c_attn of the
    first norm's output)."""
    model = tiny().to(dtype).eval()
    block = model.get_submodule(layer)
    assert (block.value_embed is not None) == (layer == "core.0")
    B, L, d = 2, 3, model.config.n_embd
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, d, generator=g, dtype=dtype)
    idx = torch.randint(0, 97, (B, L), generator=g)
    results = []
    for run in (block.forward, lambda *a: kernels.fused_block(block, *a)):
        cache = KVCache(model, B, loops=2)
        cache.exited = None
        slot = cache.core[0][0 if layer == "core.0" else 1]
        slot.k.copy_(torch.randn(slot.k.shape, generator=torch.Generator().manual_seed(2)))    # 4 earlier tokens
        slot.v.copy_(torch.randn(slot.v.shape, generator=torch.Generator().manual_seed(3)))
        cache.rollback(4)
        positions = cache.start(L, 2)
        with torch.no_grad():
            results.append((run(x, idx, model.cos[positions], model.sin[positions], slot), slot.k.clone(),
                            slot.v.clone()))
    (out, k, v), (fused_out, fused_k, fused_v) = results
    bound = reordered(d, 4, dtype)
    assert (fused_out - out).abs().max() <= bound * out.abs().max()
    for fused_kv, kv in ((fused_k, k), (fused_v, v)):
        assert (fused_kv - kv).abs().max() <= bound * kv.abs().max()


def test_the_fused_kernels_reproduce_the_models_tokens_and_logits_in_fp64():
    """sample.py --fused, in fp64: the kernels differ from the model's ops only in the order of a few sums
    (the test above), by about 5√n·2^-53 of each, 1e-14 here; through the tiny model it stays far below
    1e-9 of the logits, which are of order 1, and far from changing a greedy token. Plain, self-speculative
    (several tokens a forward), adaptive decoding at batch 1, and at batch 2 (where an exited token must keep
    its keys, which the plain CacheSlot.update does), and the shared cache: each gives the model's own
    tokens, and the same exits, none lying within 1e-9 of the threshold."""
    model = tiny(init_state="zero", block_size=32).double().eval()
    prompt, pair = tokens(B=1, L=5)[:, :-1], tokens(B=2, L=5, seed=3)[:, :-1]
    runs = {"plain": dict(loops=3), "drafted": dict(loops=3, draft_loops=1),
            "shared": dict(loops=3, shared_cache=True), "adaptive": dict(loops=12, exit_threshold=0.03),
            "adaptive, batch 2": dict(loops=12, exit_threshold=0.03)}
    expected = {}
    for name, kw in runs.items():
        stats = {}
        expected[name] = generate(model, pair if "batch 2" in name else prompt, 6, top_k=1, stats=stats, **kw), \
            stats.get("loops_per_token")
    for name in ("adaptive", "adaptive, batch 2"):
        assert decisions_are_robust(model, expected[name][0][:, :-1], 12, 0.03)
    logits = model(expected["plain"][0][:, :-1], loops=3)[0]

    kernels.fuse_for_decoding(model)
    for name, kw in runs.items():
        stats = {}
        got = generate(model, pair if "batch 2" in name else prompt, 6, top_k=1, stats=stats, **kw)
        assert torch.equal(got, expected[name][0]), name
        if expected[name][1] is not None:
            assert torch.equal(stats["loops_per_token"], expected[name][1]), name
    seq, cache = expected["plain"][0], KVCache(model, 1, loops=3)
    fused = torch.cat([model.decode(seq[:, i:i + 1], cache, loops=3) for i in range(seq.size(1) - 1)], 1)
    assert torch.allclose(fused, logits, rtol=0, atol=1e-9)


def test_fused_models_train_as_before_and_need_a_gpu(monkeypatch):
    """With gradient on, blocks and the injection run model.py's own ops: the loss and its gradients are
    those of the unfused model, exactly. Without a GPU (and the interpreter), fusing is refused."""
    model, fresh = tiny(), tiny()
    x, y = tokens()[:, :-1], tokens()[:, 1:]
    kernels.fuse_for_decoding(model)
    losses = []
    for m in (fresh, model):
        torch.manual_seed(0)
        losses.append(m(x, y, depths=torch.tensor([3, 1, 2]))[1])
        losses[-1].backward()
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(fresh.parameters(), model.parameters()))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="run on a CUDA GPU, not on cpu"):
        kernels.fuse_for_decoding(tiny())


def test_sample_py_fused_says_what_it_needs(capsys):
    with pytest.raises(SystemExit, match="--fused and --compile"):
        sample_py.main(["--fused", "--compile", "--out_dir", "nowhere"])
    with pytest.raises(SystemExit, match="--fused runs on a CUDA GPU"):
        sample_py.main(["--fused", "--device", "cpu", "--out_dir", "nowhere"])


def test_the_benchs_check_of_the_fused_kernels_finds_the_same_tokens_in_fp64():
    """bench/throughput.py's check_fused, on the CPU in fp64: on the model with random matrices, the greedy
    tokens are the same (the fp64 test above), and the logits within 1e-9 of the largest."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import throughput
    model = tiny(init_state="zero", block_size=32).double()
    check = throughput.check_fused(model, loops=3, new_tokens=8, prompt_len=5)
    assert check["same_tokens_before_first_difference"] == 8 and check["max_logit_difference"] < 1e-9
    assert "forward" not in vars(model.core[0])         # it fused copies, not the model itself
