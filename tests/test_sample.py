"""sample.py: generate() on tiny random models, and the command line run as a user runs it on a
checkpoint of a tiny model."""
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, TINY, tiny, tokens, write_char_data
import sample as sample_py
from sample import KVCache, bf16_weights, generate

pytest.importorskip("prepare", reason="sample.py decodes with prepare.load_tokenizer")


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


@pytest.mark.parametrize("injection", ["parcae", "none"])
def test_greedy_generation_matches_argmax_of_full_forwards_even_past_the_window(injection):
    model = tiny(injection, init_state="zero", block_size=16).eval()
    prompt = tokens(B=2, L=5)[:, :-1]
    out = generate(model, prompt, max_new_tokens=20, loops=3, top_k=1)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    # replay: once the window of 16 is full, generation restarts from the last 8 tokens
    idx, start = prompt, 0
    with torch.no_grad():
        for _ in range(20):
            if idx.size(1) - start > 16:
                start = idx.size(1) - 8
            logits, _ = model(idx[:, start:], loops=3)
            idx = torch.cat([idx, logits[:, -1, :97].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


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
    with torch.no_grad():
        for a, b in [(0, prefill)] + [(i, i + 1) for i in range(prefill, x.size(1))]:
            logits.append(model(x[:, a:b], loops=loops, cache=cache, exit_threshold=eps)[0])
            used.append(model.last_state["loops_per_token"])
    return torch.cat(logits, dim=1), torch.cat(used, dim=1), cache


def test_the_teacher_forced_adaptive_forward_equals_adaptive_decoding_token_by_token():
    """One forward over the whole sequence with per-token exit (what bench/loops.py --adaptive
    measures as a validation loss) gives the logits and the exits of decoding one token at a time."""
    model, x = fp64_model(), tokens(B=2, L=12)[:, :-1]
    assert decisions_are_robust(model, x, 16, 0.02)
    whole, used_whole, _ = adaptive_decode(model, x, loops=16, eps=0.02, prefill=x.size(1))
    stepped, used_stepped, _ = adaptive_decode(model, x, loops=16, eps=0.02)
    assert len(set(used_whole.flatten().tolist())) >= 3     # tokens really exit at different iterations
    assert torch.equal(used_whole, used_stepped)
    # fp64: ~1e-15 relative per operation, over a few dozen layer applications
    torch.testing.assert_close(whole, stepped, rtol=0, atol=1e-10)


def test_an_exited_token_keeps_its_last_keys_and_values_in_every_later_core_slot():
    """The cache rule: a token that stops at iteration t has no keys and values of its own for the
    iterations after t; its slots for them hold those of iteration t."""
    model, x = fp64_model(), tokens(B=2, L=12)[:, :-1]
    _, used, cache = adaptive_decode(model, x, loops=16, eps=0.02)
    P, R = model.config.n_prelude, model.config.n_core
    for b in range(2):
        for i in range(x.size(1)):
            t = int(used[b, i])         # iterations run: the last one is t - 1
            for j in range(R):
                last = P + (t - 1) * R + j
                for r in range(t, 16):
                    for kv in (cache.k, cache.v):
                        assert torch.equal(kv[P + r * R + j][b, :, i], kv[last][b, :, i]), (b, i, j, r)
                if t > 1:       # (and they differ from its first iteration's: the check is not vacuous)
                    assert not torch.equal(cache.k[P + j][b, :, i], cache.k[last][b, :, i])


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
    for loops in (1, 8, 16):
        assert len(KVCache(model, 1, loops, shared=True).k) == c.n_prelude + c.n_core + c.n_coda
        assert len(KVCache(model, 1, loops).k) == c.n_prelude + loops * c.n_core + c.n_coda


def test_per_token_exit_needs_a_cache_and_a_looped_model(out_dir):
    model, x = fp64_model(), tokens(B=1, L=4)[:, :-1]
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(x, loops=4, exit_threshold=0.1)
    run = sample(f"--out_dir={out_dir}", "--loops=8", "--exit_threshold=0.05", "--kv_cache=shared",
                 "--start", "def f(", "--num_samples=2", "--max_new_tokens=10")
    assert run.returncode == 0, run.stderr
    mean = float(run.stdout.split("adaptive exit at 0.05: ")[1].split(" loops per token")[0])
    assert 1 <= mean <= 8
