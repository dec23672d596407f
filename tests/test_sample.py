"""sample.py: generate() on tiny random models, and the command line run as a user runs it on a
checkpoint of a tiny model."""
import math
import re
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, TINY, tiny, tokens, write_char_data
import sample as sample_py
from model import GPT, KVCache
from sample import accept, bf16_weights, generate


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    write_char_data(str(folder / "data"), "def f(x):\n    return x\n\n" * 300, "def f(x):\n    return x\n\n" * 30)
    settings = {**TINY, "max_iters": 40, "eval_interval": 40, "data_dir": str(folder / "data"),
                "out_dir": str(folder / "out")}
    train.main([f"--{k}={v!r}" for k, v in settings.items()])
    (folder / "data" / "train.bin").unlink()        # sample.py must not need the data
    return folder / "out"


def sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("loops", [["--loops", "1"], ["--loops=16"]])
def test_samples_continue_the_prompt_at_any_number_of_loops(out_dir, loops):
    run = sample(f"--out_dir={out_dir}", *loops, "--start", "def f(", "--num_samples", "2", "--max_new_tokens", "30")
    assert run.returncode == 0, run.stderr
    samples = run.stdout.split("-" * 40 + "\n")
    assert samples[-1] == "" and len(samples) == 3          # two samples, each followed by the separator
    for s in samples[:2]:
        assert s.startswith("def f(") and len(s) >= len("def f(") + 30
        assert set(s) <= set("def f(x):\n    return x\n<|endoftext|>")   # only characters it was trained on


def test_a_prompt_can_come_from_a_file_and_no_prompt_starts_a_document(out_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text("    return")
    run = sample(f"--out_dir={out_dir}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=1", "--max_new_tokens=5")
    assert run.returncode == 0 and run.stdout.startswith("    return"), run.stderr
    run = sample(f"--out_dir={out_dir}", "--num_samples=1", "--max_new_tokens=5")
    assert run.returncode == 0 and len(run.stdout.split("\n" + "-" * 40)[0]) >= 5, run.stderr


def test_a_missing_checkpoint_is_a_one_line_error_saying_what_to_run(tmp_path):
    run = sample(f"--out_dir={tmp_path}")
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "python train.py" in run.stderr


@pytest.mark.parametrize("arg", ["--loops=0", "--num_samples=0", "--max_new_tokens=-1", "--top_k=-1",
                                 "--temperature=-0.5"])
def test_a_count_below_its_least_value_is_refused(arg):
    name, value = arg.split("=")
    with pytest.raises(SystemExit, match=f"^{name} must be at least [01], got {re.escape(value)}$"):
        sample_py.main([arg])


def test_a_prompt_outside_the_vocabulary_is_a_clear_error(out_dir):
    run = sample(f"--out_dir={out_dir}", "--start", "Ω")
    assert run.returncode == 1 and "cannot encode the prompt" in run.stderr


def test_a_byte_level_model_samples_any_prompt_and_prints_invalid_utf8_as_replacement_characters(tmp_path, capsys):
    """Byte ids drawn one at a time need not form UTF-8 (a barely trained model draws bytes ≥ 0x80 at random):
    sample.py prints them as U+FFFD instead of failing. Any text is a valid prompt."""
    import prepare
    (tmp_path / "a.py").write_text("def f(x):\n    return x\n\n" * 200)
    data = prepare.prepare(inputs=[str(tmp_path / "a.py")], tokenizer="byte", out_dir=tmp_path / "data")
    settings = {**TINY, "max_iters": 2, "eval_interval": 2, "data_dir": data, "out_dir": str(tmp_path / "out")}
    train.main([f"--{k}={v!r}" for k, v in settings.items()])
    capsys.readouterr()
    sample_py.main([f"--out_dir={tmp_path / 'out'}", "--start", "Ω =", "--num_samples=2", "--max_new_tokens=200",
                    "--temperature=2", "--top_k=0"])
    out = capsys.readouterr().out
    assert out.count("-" * 40) == 2 and all(s.lstrip("\n").startswith("Ω =") for s in out.split("-" * 40)[:2])
    assert "\ufffd" in out


def test_a_missing_prompt_file_is_a_clear_error(out_dir, tmp_path):
    with pytest.raises(SystemExit, match="cannot read the prompt file .*nowhere.txt"):
        sample_py.main([f"--out_dir={out_dir}", f"--start=FILE:{tmp_path / 'nowhere.txt'}"])


def greedy_by_full_forwards(model, prompt, new_tokens, loops, block_size):
    """Greedy decoding replayed by full forwards, restarting from the last half of the text whenever
    the window is full (as generate() does), and the smallest gap between the two likeliest tokens."""
    idx, start, gap = prompt, 0, math.inf
    with torch.no_grad():
        for _ in range(new_tokens):
            if idx.size(1) - start > block_size:
                start = idx.size(1) - block_size // 2
            top = model(idx[:, start:], loops=loops)[0][:, -1, :97].topk(2)
            gap = min(gap, (top.values[:, 0] - top.values[:, 1]).min().item())
            idx = torch.cat([idx, top.indices[:, :1]], dim=1)
    return idx, gap


@pytest.mark.parametrize("injection", ["parcae", "none"])
def test_greedy_generation_matches_argmax_of_full_forwards_even_past_the_window(injection):
    model = tiny(injection, init_state="zero", block_size=16).eval()
    prompt = tokens(B=2, L=5)[:, :-1]
    out = generate(model, prompt, max_new_tokens=20, loops=3, top_k=1)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    # replay: once the window of 16 is full, generation restarts from the last 8 tokens
    assert torch.equal(out, greedy_by_full_forwards(model, prompt, 20, loops=3, block_size=16)[0])


def test_generated_tokens_stay_inside_the_real_vocabulary():
    model = tiny().eval()
    out = generate(model, tokens(B=4, L=3)[:, :-1], max_new_tokens=30, temperature=2.0)
    assert out.max() < 97


def test_top_k_0_samples_among_all_tokens_and_top_k_1_is_greedy():
    model, x = tiny().eval(), tokens(B=2, L=3)[:, :-1]
    runs = {}
    for k in (None, 0, 1):
        torch.manual_seed(0)
        runs[k] = generate(model, x, max_new_tokens=20, temperature=2.0, top_k=k)
    torch.manual_seed(0)      # h_0 is drawn afresh each forward: the same draws, or the logits differ
    greedy = generate(model, x, max_new_tokens=20, temperature=0.0)
    assert torch.equal(runs[0], runs[None]) and torch.equal(runs[1], greedy)
    assert not torch.equal(runs[0], greedy)      # at temperature 2, all 97 tokens have a real chance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a GPU")
def test_decoding_replayed_as_a_cuda_graph_matches_eager_decoding():
    """In fp32: cuBLAS may pick other kernels inside a graph capture, which round differently. In bf16
    that flipped a near-tie of this random model's greedy choice (seen on an H200); in fp32 such a
    difference is ~1e-6 of the logits, far below the gaps between them."""
    model = tiny(init_state="zero", block_size=16).cuda().eval()
    prompt = tokens(B=2, L=5)[:, :-1].cuda()
    graphed = generate(model, prompt, 20, loops=3, top_k=1, cuda_graph=True)
    eager = generate(model, prompt, 20, loops=3, top_k=1, cuda_graph=False)
    assert torch.equal(graphed, eager)


def test_compiled_blocks_generate_the_same_tokens_and_compile_nothing_new_for_more_loops():
    """With torch.compile'd blocks (as on a GPU), the cache's Python bookkeeping stays out of the
    graphs: generation matches eager mode, no block breaks its graph at the cache, and more loops
    (more cache slots) need no new graph."""
    from torch._dynamo.utils import counters
    counters.clear()
    model = tiny(init_state="zero", block_size=16).eval()
    prompt = tokens(B=2, L=5)[:, :-1]
    eager = {loops: generate(model, prompt, 6, loops=loops, top_k=1) for loops in (2, 5)}
    train.compile_model(model)
    try:
        assert torch.equal(generate(model, prompt, 6, loops=2, top_k=1), eager[2])
        graphs = counters["stats"]["unique_graphs"]
        assert torch.equal(generate(model, prompt, 6, loops=5, top_k=1), eager[5])
        assert counters["stats"]["unique_graphs"] == graphs
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_a_one_token_linear_is_a_multiply_and_sum_only_for_one_token_under_compiling(monkeypatch):
    """OneTokenLinear's two paths, taken in eager mode with torch.compile's flag set by hand: one token
    is exactly the multiply-and-sum, several are exactly nn.Linear's matmul."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    layer.__class__ = sample_py.OneTokenLinear
    one, many = torch.randn(1, 1, 16), torch.randn(2, 3, 16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(layer(one), (one.unsqueeze(-2) * layer.weight).sum(-1))
    assert torch.equal(layer(many), torch.nn.functional.linear(many, layer.weight))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert torch.equal(layer(one), torch.nn.functional.linear(one, layer.weight))


def test_compiling_for_decoding_generates_the_same_tokens_and_logits_up_to_the_order_of_sums():
    """sample.py --compile: in fp64, the one-token reductions and the matmuls they replace differ only in
    the order of their sums, each off by at most n·2^-53 of Σ|x_i w_i| (n ≤ 128 terms here) per matmul,
    and Inductor's fusions across blocks reorder no more than that; through a few blocks it stays many
    orders below 1e-9 of the logits, which are of order 1, and far from changing a greedy token. Plain,
    self-speculative (several tokens per forward) and adaptive decoding all run the compiled iteration;
    the exits are those of the uncompiled model, as none lies within 1e-9 of the threshold."""
    model = tiny(init_state="zero", block_size=32).double().eval()
    prompt = tokens(B=1, L=5)[:, :-1]
    eager = generate(model, prompt, 6, loops=3, top_k=1)
    drafted = generate(model, prompt, 6, loops=3, top_k=1, draft_loops=1)
    stats = {}
    adaptive = generate(model, prompt, 6, loops=12, top_k=1, exit_threshold=0.03, stats=stats)
    assert decisions_are_robust(model, adaptive[:, :-1], 12, 0.03)
    assert len(set(stats["loops_per_token"].flatten().tolist())) >= 2    # tokens exit at different iterations
    expected = model(eager[:, :-1], loops=3)[0]
    sample_py.compile_for_decoding(model)
    try:
        fc = model.core[0].mlp.fc
        assert type(fc) is sample_py.OneTokenLinear and fc.weight.is_contiguous()
        assert model.core_iteration.__self__ is model and model.head.__self__ is model   # fp64 table: no copy
        assert torch.equal(generate(model, prompt, 6, loops=3, top_k=1), eager)
        cache = KVCache(model, 1, loops=3)
        logits = torch.cat([model.decode(eager[:, i:i + 1], cache, loops=3) for i in range(eager.size(1) - 1)], 1)
        assert torch.allclose(logits, expected, rtol=0, atol=1e-9)
        assert torch.equal(generate(model, prompt, 6, loops=3, top_k=1, draft_loops=1), drafted)
        compiled_stats = {}
        assert torch.equal(generate(model, prompt, 6, loops=12, top_k=1, exit_threshold=0.03,
                                    stats=compiled_stats), adaptive)
        assert torch.equal(compiled_stats["loops_per_token"], stats["loops_per_token"])
    finally:
        torch._dynamo.reset()


def test_compiling_for_decoding_casts_the_tied_head_once_to_the_weights_dtype():
    """With bf16 linear weights, the compiled head reads a bf16 copy of the tied table made once; under
    autocast the matmul casts the fp32 table to bf16 by the same rounding, so the logits are exactly those
    of the model's own head (both run eagerly here)."""
    model = bf16_weights(tiny().eval(), column_major=False)
    sample_py.compile_for_decoding(model)
    try:
        stand_in = model.head.__self__
        assert stand_in.norm_f is model.norm_f
        assert torch.equal(stand_in.wte.weight, model.wte.weight.detach().bfloat16())
        x = torch.randn(2, 3, model.config.n_embd)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(GPT.head(stand_in, x)[0], GPT.head(model, x)[0])
    finally:
        torch._dynamo.reset()


def test_bf16_weights_change_nothing_under_bf16_autocast():
    """sample.py stores the linear layers' weights and the value-embedding tables in bf16 on a GPU: autocast
    computes in bf16 with them anyway, so the tokens are the same; the norms and the injection's own
    parameters stay fp32."""
    model = tiny(init_state="zero", block_size=16).eval()
    prompt = tokens(B=2, L=5)[:, :-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = generate(model, prompt, 8, loops=3, top_k=1)
        bf16_weights(model)
        after = generate(model, prompt, 8, loops=3, top_k=1)
    assert torch.equal(before, after)
    assert model.core[0].attn.c_attn.weight.dtype == model.injection.B.weight.dtype == torch.bfloat16
    fc = model.core[0].mlp.fc
    assert fc.weight.shape == (fc.out_features, fc.in_features) and fc.weight.stride() == (1, fc.out_features)
    assert model.core[0].value_embed.weight.dtype == torch.bfloat16
    assert model.injection.A_log.dtype == model.norm_f.weight.dtype == model.wte.weight.dtype == torch.float32
    row_major = bf16_weights(tiny(), column_major=False).core[0].mlp.fc.weight     # for --compile's reductions
    assert row_major.dtype == torch.bfloat16 and row_major.stride() == (row_major.size(1), 1)

# -----------------------------------------------------------------------------
# per-token adaptive exit, and the shared cache
#
# These run in fp64 with h_0 = 0, so that two ways of computing the same thing differ by ~1e-15
# relative. An exit decision could only differ if a token's state change lay that close to the
# threshold; decisions_are_robust() checks that none lies within 1e-9 of it, so the decisions, hence
# the loops per token, must be identical.


def fp64_model(**kw):
    return tiny(init_state="zero", **kw).double().eval()


def decisions_are_robust(model, x, loops, eps):
    """The same exits at eps·(1 ± 1e-9): no token's change comes within 1e-9 (relative) of eps."""
    used = [adaptive_decode(model, x, loops, eps * f, prefill=x.size(1))[1] for f in (1 - 1e-9, 1, 1 + 1e-9)]
    return torch.equal(used[0], used[1]) and torch.equal(used[1], used[2])


def adaptive_decode(model, x, loops, eps, shared=False, prefill=1):
    """Logits and loops per token of x through a new cache: `prefill` tokens at once, then one at a time."""
    cache = KVCache(model, len(x), loops, shared=shared)
    logits, used = [], []
    for a, b in [(0, prefill)] + [(i, i + 1) for i in range(prefill, x.size(1))]:
        logits.append(model.decode(x[:, a:b], cache, loops, exit_threshold=eps))
        used.append(model.last_state["loops_per_token"])
    return torch.cat(logits, dim=1), torch.cat(used, dim=1), cache


@pytest.mark.parametrize("B", [1, 2])
def test_the_teacher_forced_adaptive_forward_equals_adaptive_decoding_token_by_token(B):
    """One forward over the whole sequence with per-token exit (what bench/loops.py --adaptive
    measures as a validation loss) gives the logits and the exits of decoding one token at a time."""
    model, x = fp64_model(), tokens(B=B, L=12)[:, :-1]
    assert decisions_are_robust(model, x, 16, 0.02)
    whole, used_whole, _ = adaptive_decode(model, x, loops=16, eps=0.02, prefill=x.size(1))
    stepped, used_stepped, _ = adaptive_decode(model, x, loops=16, eps=0.02)
    assert len(set(used_whole.flatten().tolist())) >= 2     # tokens really exit at different iterations
    assert torch.equal(used_whole, used_stepped)
    # fp64: ~1e-15 relative per operation, over a few dozen layer applications
    torch.testing.assert_close(whole, stepped, rtol=0, atol=1e-10)


@pytest.mark.parametrize("B", [1, 2])
def test_an_exited_token_keeps_its_last_keys_and_values_in_every_later_core_slot(B):
    """The cache rule: a token that stops at iteration t has no keys and values of its own for the
    iterations after t; its slots for them hold those of iteration t. (A step of one token runs no
    iteration past its exit; in a batch, tokens that have exited are computed and kept as they were.)"""
    model, x = fp64_model(), tokens(B=B, L=12)[:, :-1]
    _, used, cache = adaptive_decode(model, x, loops=16, eps=0.02)
    for b in range(B):
        for i in range(x.size(1)):
            t = int(used[b, i])         # iterations run: the last one is t - 1
            for j in range(model.config.n_core):
                last = cache.core[t - 1][j]
                for r in range(t, 16):
                    for kv in ("k", "v"):
                        assert torch.equal(getattr(cache.core[r][j], kv)[b, :, i], getattr(last, kv)[b, :, i]), \
                            (b, i, j, r)
                if t > 1:       # (and they differ from its first iteration's: the check is not vacuous)
                    assert not torch.equal(cache.core[0][j].k[b, :, i], last.k[b, :, i])


def test_exit_threshold_0_gives_exactly_the_tokens_of_the_cap():
    model, prompt = fp64_model(block_size=16), tokens(B=2, L=5)[:, :-1]
    stats = {}
    adaptive = generate(model, prompt, 20, loops=6, top_k=1, exit_threshold=0.0, stats=stats)
    assert torch.equal(adaptive, generate(model, prompt, 20, loops=6, top_k=1))
    assert (stats["loops_per_token"] == 6).all() and stats["loops_per_token"].shape == (2, 20)


def test_a_threshold_so_large_that_every_token_exits_after_one_loop_equals_one_loop():
    model, prompt = fp64_model(block_size=16), tokens(B=2, L=5)[:, :-1]
    stats = {}
    adaptive = generate(model, prompt, 20, loops=6, top_k=1, exit_threshold=float("inf"), stats=stats)
    assert torch.equal(adaptive, generate(model, prompt, 20, loops=1, top_k=1))
    assert (stats["loops_per_token"] == 1).all()


def test_rows_that_exit_at_different_iterations_give_the_tokens_each_row_gives_alone():
    model = fp64_model(block_size=32)
    prompt = tokens(B=2, L=6)[:, :-1]
    stats = {}
    together = generate(model, prompt, 12, loops=16, top_k=1, exit_threshold=0.02, stats=stats)
    assert not torch.equal(stats["loops_per_token"][0], stats["loops_per_token"][1])
    assert decisions_are_robust(model, together[:, :-1], 16, 0.02)
    for b in range(2):
        alone = generate(model, prompt[b:b + 1], 12, loops=16, top_k=1, exit_threshold=0.02)
        assert torch.equal(alone[0], together[b])


def test_the_shared_cache_at_one_loop_is_the_full_cache_and_its_memory_does_not_grow_with_loops():
    model, x = fp64_model(), tokens(B=2, L=10)[:, :-1]
    full, _, _ = adaptive_decode(model, x, loops=1, eps=0.0)
    shared, _, _ = adaptive_decode(model, x, loops=1, eps=0.0, shared=True)
    assert torch.equal(full, shared)
    c = model.config
    buffers = lambda cache: len({id(s.k) for s in [*cache.prelude, *sum(cache.core, []), *cache.coda]})
    for loops in (1, 8, 16):
        assert buffers(KVCache(model, 1, loops, shared=True)) == c.n_prelude + c.n_core + c.n_coda
        assert buffers(KVCache(model, 1, loops)) == c.n_prelude + loops * c.n_core + c.n_coda


def test_per_token_exit_needs_a_looped_model(out_dir):
    with pytest.raises(ValueError, match="no loop to exit early"):
        generate(tiny("none").eval(), tokens(B=1, L=4)[:, :-1], 3, exit_threshold=0.1)
    run = sample(f"--out_dir={out_dir}", "--loops=8", "--exit_threshold=0.05", "--kv_cache=shared",
                 "--start", "def f(", "--num_samples=2", "--max_new_tokens=10")
    assert run.returncode == 0, run.stderr
    mean = float(run.stdout.split("adaptive exit at 0.05: ")[1].split(" loops per token")[0])
    assert 1 <= mean <= 8

# -----------------------------------------------------------------------------
# self-speculative decoding
#
# Greedy: in fp64 with h_0 = 0. h_0 = 0 makes the verifier compute what plain decoding computes:
# drawn fresh each forward, h_0 would differ between a plain step and the verifier's forward, and
# so would the tokens. The verifier's forward of several tokens and plain decoding's forwards of
# one add the same terms in other orders, ~1e-15 of the logits apart; the likeliest token could
# change only where two logits come within that, and greedy_by_full_forwards checks that none
# come within 1e-9: the tokens must be identical.


@pytest.mark.parametrize("draft_loops, draft_tokens", [(1, 4), (3, 1), (5, 6)])
def test_greedy_self_speculative_decoding_gives_the_tokens_of_plain_decoding_even_past_the_window(draft_loops,
                                                                                                  draft_tokens):
    model, prompt = fp64_model(block_size=16), tokens(B=2, L=5)[:, :-1]
    plain = generate(model, prompt, 30, loops=6, top_k=1)
    assert torch.equal(plain, greedy_by_full_forwards(model, prompt, 30, loops=6, block_size=16)[0])
    assert greedy_by_full_forwards(model, prompt, 30, loops=6, block_size=16)[1] > 1e-9
    for greedy in (dict(top_k=1), dict(temperature=0.0)):
        stats = {}
        fast = generate(model, prompt, 30, loops=6, draft_loops=draft_loops, draft_tokens=draft_tokens, stats=stats,
                        **greedy)
        assert torch.equal(fast, plain)
        assert 0 < stats["accepted"] <= stats["drafted"]
        assert (stats["accepted"] < stats["drafted"]) == (draft_loops < 5)     # at 5 loops of 6, all are kept


def bernstein_bound(p, n, cells, failure=1e-6):
    """How far the frequency of an outcome of probability p can land from p in n independent draws: by
    Bernstein's inequality, P(|f - p| > t) <= 2 exp(-n t^2 / (2 p (1 - p) + 2t/3)), which with the
    failure probability shared among `cells` outcomes (a union bound) gives t below. With failure 1e-6
    a correct sampler fails this test once in a million runs, on any machine."""
    log = math.log(2 * cells / failure)
    return (2 * p * (1 - p) * log / n) ** 0.5 + 2 * log / (3 * n)


def test_the_speculative_rule_draws_each_token_from_the_verifiers_distribution():
    """accept() on fixed distributions p_1..p_4 (the verifier's) and q_1..q_3 (the drafts'), over a
    vocabulary of 4, in 20,000 rounds of two rows: each row's i-th new token, among the rounds that
    reach it, must be drawn from p_i, including the token drawn after the last draft."""
    g = torch.Generator().manual_seed(0)
    p = torch.distributions.Dirichlet(torch.full((4,), 2.0)).sample((4,))
    q = (p[:3] + 0.6 * torch.distributions.Dirichlet(torch.ones(4)).sample((3,)))
    q = q / q.sum(-1, keepdim=True)         # drafts near the verifier, but not equal: some are rejected
    counts, rounds = torch.zeros(4, 4), 20_000
    torch.manual_seed(0)
    for _ in range(rounds):
        drafts = torch.multinomial(q, 2, replacement=True, generator=g).T      # (2 rows, 3 drafts)
        new = accept(p.expand(2, 4, 4), q.expand(2, 3, 4), drafts)
        for i in range(new.size(1)):
            counts[i].index_put_((new[:, i],), torch.ones(2), accumulate=True)
    n = counts.sum(-1)
    assert n[0] == 2 * rounds and n[3] > 2_000          # every round gives a first token; many go to the end
    bound = torch.tensor([[bernstein_bound(p[i, t].item(), n[i].item(), 16) for t in range(4)] for i in range(4)])
    assert ((counts / n[:, None] - p).abs() <= bound).all()
    assert ((q - p[:3]).abs() > 2 * bound[:3]).any()    # drawing the drafts themselves would fail


def test_self_speculative_sampling_draws_from_the_distribution_of_plain_decoding():
    """The first two new tokens of 10,000 rows, the second from a round of speculation (one draft at 1
    loop, verified at 3), against their exact distribution p(t1) p(t2 | t1) at 3 loops, from full
    forwards. h_0 = 0, so that the distribution is a fixed one."""
    model = tiny(init_state="zero", vocab_size=5, block_size=8, n_core=1).eval()
    prompt = tokens(B=1, L=3, vocab=5)[:, :-1]
    rows = 10_000
    torch.manual_seed(0)
    out = generate(model, prompt.expand(rows, -1), 3, loops=3, temperature=1.0, draft_loops=1, draft_tokens=1)
    with torch.no_grad():
        first = model(prompt, loops=3)[0][0, -1, :5].softmax(-1)
        pairs = torch.cat([prompt.expand(5, -1), torch.arange(5)[:, None]], dim=1)
        exact = first[:, None] * model(pairs, loops=3)[0][:, -1, :5].softmax(-1)      # (t1, t2)
        drafted = first[:, None] * model(pairs, loops=1)[0][:, -1, :5].softmax(-1)
    n = prompt.size(1)
    freq = torch.zeros(5, 5).index_put_((out[:, n], out[:, n + 1]), torch.ones(rows), accumulate=True) / rows
    bound = torch.tensor([[bernstein_bound(exact[a, b].item(), rows, 25) for b in range(5)] for a in range(5)])
    assert ((freq - exact).abs() <= bound).all()
    assert ((drafted - exact).abs() > 2 * bound).any()       # the drafts' own distribution would fail


def test_self_speculative_decoding_refuses_what_it_cannot_do_exactly(out_dir):
    model, prompt = fp64_model(), tokens(B=1, L=4)[:, :-1]
    for bad in (dict(draft_loops=4), dict(draft_loops=0), dict(draft_loops=2, exit_threshold=0.1)):
        with pytest.raises(ValueError, match="drafts at fewer loops"):
            generate(model, prompt, 3, loops=4, **bad)
    with pytest.raises(ValueError, match="needs the full KV cache"):
        generate(model, prompt, 3, loops=4, draft_loops=2, shared_cache=True)
    with pytest.raises(ValueError, match="drafts at fewer loops"):
        generate(tiny("none").eval(), prompt, 3, draft_loops=1)
    run = sample(f"--out_dir={out_dir}", "--loops=2", "--draft_loops=2")
    assert run.returncode == 1 and "--draft_loops must be at least 1 and fewer than the 2" in run.stderr
    run = sample(f"--out_dir={out_dir}", "--loops=4", "--draft_loops=1", "--kv_cache=shared")
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0 and "full cache" in run.stderr
    run = sample(f"--out_dir={out_dir}", "--loops=4", "--draft_loops=2", "--start", "def f(", "--num_samples=2",
                 "--max_new_tokens=20")
    assert run.returncode == 0 and run.stdout.startswith("def f("), run.stderr
    assert "drafted tokens kept" in run.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a GPU")
@pytest.mark.parametrize("mode", [dict(exit_threshold=0.02), dict(exit_threshold=0.02, shared_cache=True),
                                  dict(draft_loops=2)], ids=["exit-full", "exit-shared", "speculative"])
def test_adaptive_and_speculative_decoding_replayed_as_cuda_graphs_match_eager_decoding(mode):
    """The phases of an adaptive step (one graph per iteration, or one for all with the shared cache,
    and the copies after an early exit) and the draft and verify steps, replayed, give the tokens of
    eager decoding, past the window and across spans of the cache. In fp32, as the test above."""
    model = tiny(init_state="zero", block_size=32).cuda().eval()
    prompt = tokens(B=2, L=5)[:, :-1].cuda()
    runs = []
    for graph in (True, False):
        stats = {}
        runs.append((generate(model, prompt, 40, loops=6, top_k=1, cuda_graph=graph, stats=stats, **mode), stats))
    (graphed, graph_stats), (eager, eager_stats) = runs
    assert torch.equal(graphed, eager)
    for key in ("loops_per_token", "accepted"):
        if key in eager_stats:
            assert torch.equal(torch.as_tensor(graph_stats[key]), torch.as_tensor(eager_stats[key]))
