"""sample.py: generate() on tiny random models, and the command line run as a user runs it on a
checkpoint of a tiny model."""
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, TINY, tiny, tokens, write_char_data
import sample as sample_py
from sample import bf16_weights, generate

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
    model = tiny(init_state="zero", block_size=16).cuda().eval()
    prompt = tokens(B=2, L=5)[:, :-1].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
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
    """sample.py stores the linear layers' weights in bf16 on a GPU: autocast computes them in bf16
    anyway, so the tokens are the same; the norms and the injection's own parameters stay fp32."""
    model = tiny(init_state="zero", block_size=16).eval()
    prompt = tokens(B=2, L=5)[:, :-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = generate(model, prompt, 8, loops=3, top_k=1)
        bf16_weights(model)
        after = generate(model, prompt, 8, loops=3, top_k=1)
    assert torch.equal(before, after)
    assert model.core[0].attn.c_q.weight.dtype == model.injection.B.weight.dtype == torch.bfloat16
    fc = model.core[0].mlp.fc
    assert fc.weight.shape == (fc.out_features, fc.in_features) and fc.weight.stride() == (1, fc.out_features)
    assert model.injection.A_log.dtype == model.norm_f.weight.dtype == model.wte.weight.dtype == torch.float32
