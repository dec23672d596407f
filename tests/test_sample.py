"""sample.py, run as a user runs it, on a checkpoint of a tiny model."""
import subprocess
import sys

import pytest

import train
from conftest import ROOT, TINY, write_char_data

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
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


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
