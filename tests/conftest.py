"""Shared fixtures: a tiny char-level dataset written to a temp folder, a tiny model's settings,
and a tiny random model with random tokens for it."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)    # so that tests import train, sample, model, prepare from the repo
from model import GPT, GPTConfig  # noqa: E402
from fake_hub import fake_hub  # noqa: E402,F401  (a fixture: a fake Hugging Face Hub)

# a few hundred thousand parameters less than the demo: each step takes milliseconds
TINY = dict(n_embd=32, n_head=2, n_prelude=1, n_core=1, n_coda=1, block_size=32, batch_size=8,
            mean_loops=2, backprop_loops=1, max_iters=30, lr=1e-2, eval_interval=10, eval_iters=2,
            eval_loops=[1, 2], log_interval=1, device="cpu")


def write_char_data(folder, text, val_text):
    """train.bin, val.bin and meta.json as prepare.py writes them for its char tokenizer."""
    chars = "".join(sorted(set(text + val_text)))
    eot = len(chars)
    os.makedirs(folder, exist_ok=True)
    for split, t in (("train", text), ("val", val_text)):
        ids = [chars.index(c) for c in t] + [eot]
        np.array(ids, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    meta = {"tokenizer": "char", "vocab_size": len(chars) + 1, "eot_token": eot,
            "train_tokens": len(text) + 1, "val_tokens": len(val_text) + 1, "chars": chars}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


@pytest.fixture
def tiny_data(tmp_path):
    """A folder of data made of one sentence repeated: easy to learn, so the loss falls fast."""
    folder = tmp_path / "data"
    sentence = "the quick brown fox jumps over the lazy dog. "
    write_char_data(str(folder), sentence * 400, sentence * 40)
    return folder


@pytest.fixture
def tiny_args(tmp_path, tiny_data):
    """tiny_args(**overrides) -> train.py's --key=value arguments for a tiny run on tiny_data."""
    def args(**overrides):
        settings = {**TINY, "data_dir": str(tiny_data), "out_dir": str(tmp_path / "out"), **overrides}
        return [f"--{k}={v!r}" for k, v in settings.items()]
    return args


# Tolerances: each comparison of floating-point results in these tests is either exact by construction
# or bounded by what rounding can do. U is fp32's unit roundoff: one rounding moves a value by at most
# U of itself.
U = 2.0 ** -24


def reordering_bound(n, layers):
    """How far apart, relative to their scale, two fp32 computations of the same values can land when
    they add sums of n terms in other orders (another kernel: a fused, a batched or a one-row one),
    through `layers` such sums in a row. Each rounding of a partial sum moves it by at most U of itself;
    over n terms the errors go up as often as down and add like a random walk, to about √n·U of the
    sum (the worst case, all in one direction, is n·U; Higham & Mary 2019 make this precise). We allow
    5 standard deviations per sum, and one sum per layer: a normalised layer passes on a relative error
    about as it gets it."""
    return 5 * math.sqrt(n) * U * layers


def tiny(injection="parcae", **kw):
    """A small model in fp32 whose weights are all random, so no block starts as the identity."""
    kw = {"vocab_size": 97, "block_size": 64, "n_embd": 32, "n_head": 2, "n_prelude": 1, "n_core": 2,
          "n_coda": 1, "mean_loops": 4, "backprop_loops": 2, "injection": injection, **kw}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "value_embed" not in name and "wte" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(B=3, L=12, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, L + 1), generator=g)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A char-level toy corpus for the benches: a repeating pattern with 20 % noise, so the loss falls fast."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pattern = np.tile(np.arange(40) % 13 + 3, 2_000)
    tokens = np.where(rng.random(pattern.size) < 0.2, rng.integers(0, 64, pattern.size), pattern).astype(np.uint16)
    tokens[:70_000].tofile(folder / "train.bin")
    tokens[70_000:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 64, "tokenizer": "char", "eot_token": 0}))
    return str(folder)
