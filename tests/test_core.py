"""
bench/core.py, the CORE score: prompts rendered as the release renders them, the continuation found in
the tokens, few-shot draws and seeds, centring, and every accuracy and the CORE value of a synthetic
bundle (in the real layout) scored by a stand-in model whose log-likelihoods are known; the one-line
errors; and the command line end to end on a tiny trained checkpoint.
"""
import json
import math
import os
import random
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY, write_char_data

sys.path.insert(0, os.path.join(ROOT, "bench"))
import core  # noqa: E402
import train  # noqa: E402
from prepare import load_tokenizer  # noqa: E402

# A char vocabulary for the stand-in model: a character's id is its position; BOS (the end-of-text
# token, as our char data begin documents) is len(CHARS). Id 0, the padding, is a character no text uses.
CHARS = "# abcdefghijklmnopqrstuvwxyz\n"
META = {"tokenizer": "char", "chars": CHARS, "eot_token": len(CHARS), "vocab_size": len(CHARS) + 1}
ENCODE = load_tokenizer(META)[0]
BOS = len(CHARS)


class Successor(torch.nn.Module):
    """A stand-in model with known log-likelihoods: after token a it gives token a + 1 (mod the vocabulary:
    ' ' → 'a' → 'b' ...) the logit T, the loops it was asked to run, and every other token 0. So a token
    that follows its predecessor costs log(e^T + V − 1) − T nats, any other log(e^T + V − 1), whatever
    came before. It keeps the batches it saw."""

    def __init__(self, block_size=64, looped=True):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, looped=looped, mean_loops=4)
        self.seen = []

    def forward(self, idx, loops=None):
        self.seen.append(idx.clone())
        logits = torch.zeros(*idx.shape, len(CHARS) + 1)
        logits.scatter_(-1, ((idx + 1) % (len(CHARS) + 1))[..., None], float(loops))
        return logits, None


def nll(T, follows):
    V = len(CHARS) + 1
    return math.log(math.exp(T) + V - 1) - (T if follows else 0)


# -----------------------------------------------------------------------------
# a bundle in the real layout: core.yaml, eval_data/<file>.jsonl, eval_meta_data.csv

MC = [{"query": "x", "choices": ["a", "b", "c", "d"], "gold": 0},       # 'a' follows ' ': right
      {"query": "y", "choices": ["c", "ab", "b", "d"], "gold": 1},      # 'a', 'b' both follow: right
      {"query": "z", "choices": ["b", "c", "a", "d"], "gold": 0}]       # the model picks 'a': wrong
SCHEMA = [{"context_options": ["ab", "ax"], "continuation": "cd", "gold": 0},   # 'c' follows 'b': right
          {"context_options": ["xb", "yz"], "continuation": "cd", "gold": 1}]   # the model picks "xb": wrong
LM = [{"context": "abc", "continuation": "def"},          # right
      {"context": " ab ", "continuation": "cd"},          # the context is stripped: right
      {"context": "abc", "continuation": "dx"},           # 'x' does not follow 'd': wrong
      {"context": "xy", "continuation": "z"}]             # right
BBQ = [{"query": q, "choices": ["b", "a"], "gold": g} for q, g in zip("pqrs", (1, 1, 1, 0))]   # 3 of 4 right

# label, file, type, shots, delimiter, baseline (percent; None: no row in the CSV), items
TASKS = [("mc", "mine/mc.jsonl", "multiple_choice", 2, " ", 25, MC),
         ("schema", "mine/schema.jsonl", "schema", 1, "", 50, SCHEMA),
         ("lm", "mine/lm.jsonl", "language_modeling", 1, "", 0, LM)]


def write_bundle(folder, tasks=TASKS, extra=()):
    """core.yaml lists `tasks`; `extra` are Core-Extended tasks, present as files only."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "core.yaml"), "w") as f:
        f.write("icl_tasks:\n")
        for label, file, kind, shots, delimiter, _, _ in tasks:
            f.write(f"- label: {label}\n  dataset_uri: {file}\n  num_fewshot: [{shots}, 99]\n"
                    f"  icl_task_type: {kind}\n  continuation_delimiter: {json.dumps(delimiter)}\n")
    with open(os.path.join(folder, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Random baseline,Description\n")
        f.writelines(f"{label},test,{b},\"a task, with a comma\"\n" for label, *_, b, _ in [*tasks, *extra]
                     if b is not None)
    for _, file, _, _, _, _, items in [*tasks, *extra]:
        path = os.path.join(folder, "eval_data", file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    return str(folder)


def run(tmp_path, monkeypatch, *args, model=None, meta=META):
    """core.main on the stand-in model (or `model`), one seed unless told."""
    model = model or Successor()
    monkeypatch.setattr(core, "load_model", lambda _: (model, meta, "stub"))
    argv = ["--results_dir", str(tmp_path / "results"), "--device", "cpu", *args]
    if "--seeds" not in args:
        argv += ["--seeds", "1234"]
    return core.main(argv)


# -----------------------------------------------------------------------------
# prompts, tokens, the continuation


def test_each_type_renders_its_few_shot_examples_then_the_item_as_the_release_does():
    mc = {"type": "multiple_choice", "delimiter": " "}
    shots = [{"query": "Q1", "choices": ["A", "B"], "gold": 1}, {"query": "Q2", "choices": ["C", "D"], "gold": 0}]
    assert core.render(mc, {"query": "Q", "choices": ["x", "y"]}, shots) == ["Q1 B\n\nQ2 C\n\nQ x",
                                                                              "Q1 B\n\nQ2 C\n\nQ y"]
    mmlu = {"type": "multiple_choice", "delimiter": "\nAnswer: "}
    assert core.render(mmlu, {"query": "Q", "choices": ["x"]}, shots[:1]) == ["Q1\nAnswer: B\n\nQ\nAnswer: x"]
    schema = {"type": "schema", "delimiter": " "}
    shots = [{"context_options": ["C1", "C2"], "continuation": "K1", "gold": 1}]
    assert core.render(schema, {"context_options": ["o1", "o2"], "continuation": "K"}, shots) == [
        "C2 K1\n\no1 K", "C2 K1\n\no2 K"]
    # language modelling: contexts stripped; the prompt without the continuation stripped as a whole
    lm = {"type": "language_modeling", "delimiter": " "}
    shots = [{"context": "  c1 ", "continuation": "k1"}]
    assert core.render(lm, {"context": " c ", "continuation": "k"}, shots) == ["c1 k1\n\nc", "c1 k1\n\nc k"]
    assert core.render(lm, {"context": "\nc", "continuation": "k"}, []) == ["c", "c k"]


def test_the_continuation_follows_the_common_prefix_is_the_common_suffix_or_follows_the_short_prompt():
    ids = lambda s: [BOS] + ENCODE(s)      # noqa: E731
    # multiple choice: after the tokens all choices' prompts share
    assert core.locate("multiple_choice", ["q a", "q bc"], ENCODE, BOS) == [(ids("q a"), 3, 4), (ids("q bc"), 3, 5)]
    # schema: the tokens all options' prompts end with
    assert core.locate("schema", ["ab cd", "x cd"], ENCODE, BOS) == [(ids("ab cd"), 3, 6), (ids("x cd"), 2, 5)]
    # language modelling: after the prompt without the continuation, which must be a prefix of the full one
    assert core.locate("language_modeling", ["ab", "ab cd"], ENCODE, BOS) == [(ids("ab cd"), 3, 6)]
    with pytest.raises(ValueError, match="not a prefix"):
        core.locate("language_modeling", ["ab", "ab cd"], lambda s: [len(s)], BOS)


def test_a_long_sequence_loses_its_first_tokens_and_its_continuation_moves_with_them():
    tokens = list(range(10))
    assert core.crop([(tokens, 6, 10)], 16) == [(tokens, 6, 10)]
    assert core.crop([(tokens, 6, 10)], 8) == [(tokens[2:], 4, 8)]
    assert core.crop([(tokens, 6, 10)], 5) == [(tokens[5:], 1, 5)]     # one token left to predict the first
    with pytest.raises(ValueError, match="continuation of 4 tokens does not fit in a context of 4"):
        core.crop([(tokens, 6, 10)], 4)


def test_the_stand_in_models_log_likelihoods_come_out_of_score():
    seqs = core.locate("multiple_choice", ["y c", "y ab", "y ax"], ENCODE, BOS)
    for T in (1, 3):
        mean_nll, greedy = core.score(Successor(), seqs, T, torch.device("cpu"))
        expected = [nll(T, False), nll(T, True), (nll(T, True) + nll(T, False)) / 2]
        # fp32 log-softmax of 29 logits and a mean of at most 2 terms: a few roundings of 2^-24 each
        assert mean_nll.tolist() == pytest.approx(expected, rel=1e-6)
        assert greedy.tolist() == [False, True, False]


# -----------------------------------------------------------------------------
# items, few-shot draws, seeds


@pytest.mark.parametrize("n", [5, 50, 300])      # random.sample has two algorithms, below and above ~100
def test_few_shot_examples_are_the_releases_draw_among_the_other_items(n):
    items = [{"id": j} for j in range(n)]
    for seed in (1234, 2345):
        for i in range(n):
            for shots in (0, 1, 4):
                others = [j for j in range(n) if j != i]
                expected = [items[j] for j in random.Random(seed + i).sample(others, shots)]
                assert core.fewshot(items, i, shots, seed) == expected


def test_another_seed_draws_other_few_shot_examples():
    items = [{"id": j} for j in range(50)]
    draws = {s: [[e["id"] for e in core.fewshot(items, i, 3, s)] for i in range(50)] for s in core.SEEDS}
    assert core.SEEDS == (1234, 2345, 3456)
    for a, b in ((1234, 2345), (2345, 3456), (1234, 3456)):
        assert sum(x != y for x, y in zip(draws[a], draws[b])) >= 45      # almost every item's
    assert draws[1234] == [[e["id"] for e in core.fewshot(items, i, 3, 1234)] for i in range(50)]
    assert all(i not in d and len(set(d)) == 3 for i, d in enumerate(draws[1234]))


def test_items_are_shuffled_once_with_seed_1337_then_cut(tmp_path):
    many = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(40)]
    bundle = write_bundle(tmp_path / "b", [("mc", "mc.jsonl", "multiple_choice", 3, " ", 50, many)])
    expected = list(many)
    random.Random(1337).shuffle(expected)
    (task,), _ = core.read_bundle(bundle)
    assert task["items"] == expected and task["shots"] == 3        # num_fewshot's first count
    (task,), _ = core.read_bundle(bundle, max_per_task=10)
    assert task["items"] == expected[:10]


def test_centring_is_zero_at_chance_and_one_when_always_right():
    for baseline in (0, 25, 50, 100 / 3):
        assert core.centered(0.01 * baseline, baseline) == 0
        assert core.centered(1.0, baseline) == 1
    assert core.centered(0.5, 25) == 1 / 3          # (0.5 − 0.25) / 0.75: exact operands, one rounding
    assert core.centered(0.0, 25) == -1 / 3


# -----------------------------------------------------------------------------
# scoring a bundle


def expected_centred(accuracy, baseline):
    return (accuracy - baseline / 100) / (1 - baseline / 100)


def test_every_accuracy_and_core_of_a_bundle_scored_by_a_known_model(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "b")
    r = run(tmp_path, monkeypatch, "--bundle", bundle, "--loops", "2", "4", "--seeds", "1234", "2345")
    accuracy = {"mc": 2 / 3, "schema": 1 / 2, "lm": 3 / 4}
    centred = {"mc": (2 / 3 - 0.25) / 0.75, "schema": 0.0, "lm": 0.75}
    for label, acc in accuracy.items():      # the baselines 25, 50 and 0 % are exact: so is the formula
        assert centred[label] == expected_centred(acc, r["tasks"][label]["baseline"])
    assert list(r["loops"]) == ["2", "4"]
    for T in ("2", "4"):
        for seed in ("1234", "2345"):
            run_ = r["loops"][T]["seeds"][seed]
            assert run_["tasks"] == {k: {"accuracy": accuracy[k], "centered": centred[k]} for k in accuracy}
            # the mean of three centred accuracies, added in the same order as numpy adds them
            assert run_["core"] == (centred["mc"] + centred["schema"] + centred["lm"]) / 3
            assert "core_extended" not in run_
        mean = r["loops"][T]["mean"]
        assert mean["core"] == {"mean": run_["core"], "std": 0.0}
        assert mean["tasks"]["mc"]["accuracy"] == {"mean": 2 / 3, "std": 0.0}
    for name in ("core_stub.json", "core_stub.md", "core_stub.png"):
        assert (tmp_path / "results" / name).stat().st_size > 500
    md = (tmp_path / "results" / "core_stub.md").read_text()
    assert f"| 2 | {100 * run_['core']:.2f} ± 0.00 |" in md and "| lm | LM | 1 | 0 |" in md
    with open(tmp_path / "results" / "core_stub.json") as f:
        assert core.markdown(json.load(f)) == md


def test_core_extended_adds_the_further_tasks_in_the_same_pass(tmp_path, monkeypatch):
    bbq = ("bbq", "safety/bbq.jsonl", "multiple_choice", 3, " ", None, BBQ)     # no CSV row: 25 %
    bundle = write_bundle(tmp_path / "b", extra=[bbq])
    core_only = run(tmp_path, monkeypatch, "--bundle", bundle)["loops"]["4"]["seeds"]["1234"]
    r = run(tmp_path, monkeypatch, "--bundle", bundle, "--suite", "core_extended")
    ext = r["loops"]["4"]["seeds"]["1234"]       # the stand-in's mean_loops
    assert r["tasks"]["bbq"] == {"type": "multiple_choice", "shots": 3, "delimiter": " ", "baseline": 25.0,
                                 "core": False, "items": 4}
    assert len(r["skipped"]) == 23 and "bbq" not in r["skipped"]
    assert ext["tasks"]["bbq"] == {"accuracy": 0.75, "centered": expected_centred(0.75, 25)}
    # CORE over core.yaml's tasks is the same number either way; Core-Extended is over all four
    assert ext["core"] == core_only["core"]
    assert {k: ext["tasks"][k] for k in core_only["tasks"]} == core_only["tasks"]
    centred = [ext["tasks"][k]["centered"] for k in ("mc", "schema", "lm", "bbq")]
    assert ext["core_extended"] == sum(centred) / 4
    assert "Core-Extended" in (tmp_path / "results" / "core_stub.md").read_text()


def test_items_packed_into_right_padded_batches_score_as_one_item_per_forward(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "b")
    alone, packed = Successor(), Successor()
    one = run(tmp_path, monkeypatch, "--bundle", bundle, "--batch_tokens", "1", model=alone)["loops"]["4"]
    many = run(tmp_path, monkeypatch, "--bundle", bundle, "--batch_tokens", "100", model=packed)["loops"]["4"]
    for k in ("tasks", "core", "sequences", "tokens"):
        assert one["seeds"]["1234"][k] == many["seeds"]["1234"][k]
    assert len(alone.seen) == len(MC) + len(SCHEMA) + len(LM) > len(packed.seen)
    for idx in packed.seen:
        assert idx.numel() <= 100 and (idx[:, 0] == BOS).all()
        for row in idx:         # right-padded with 0: nothing but padding after the text
            n = int((row != core.PAD).sum())
            assert (row[n:] == core.PAD).all()


def test_a_prompt_longer_than_the_block_is_cut_from_the_left(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "b")
    full, short = Successor(), Successor(block_size=5)
    a = run(tmp_path, monkeypatch, "--bundle", bundle, model=full)
    b = run(tmp_path, monkeypatch, "--bundle", bundle, model=short)
    assert max(idx.shape[1] for idx in full.seen) > 5 == max(idx.shape[1] for idx in short.seen)
    # the stand-in looks at one token back: what the crop removed never mattered
    assert a["loops"]["4"]["mean"] == b["loops"]["4"]["mean"]


def test_the_seed_also_fixes_h0_so_a_real_model_repeats_exactly(tmp_path, monkeypatch):
    from conftest import tiny
    model = tiny(vocab_size=len(CHARS) + 1)        # init_state normal: a fresh h_0 in every forward
    draws, initial_state = [], model.initial_state
    monkeypatch.setattr(model, "initial_state", lambda e: draws.append(initial_state(e)) or draws[-1])
    bundle = write_bundle(tmp_path / "b")
    runs = {}
    for seed in ("1234", "1234", "2345"):
        draws.clear()
        r = run(tmp_path, monkeypatch, "--bundle", bundle, "--loops", "2", "--seeds", seed, model=model)
        runs.setdefault(seed, []).append((r["loops"]["2"]["seeds"][seed]["tasks"], [d.clone() for d in draws]))
    (tasks_a, h0_a), (tasks_b, h0_b) = runs["1234"]
    assert tasks_a == tasks_b and len(h0_a) == len(h0_b) > 0
    assert all(torch.equal(a, b) for a, b in zip(h0_a, h0_b))
    other = runs["2345"][0][1][0]      # another seed: other draws from the first number on
    assert (h0_a[0].flatten()[:8] != other.flatten()[:8]).all()


# -----------------------------------------------------------------------------
# bad input: one line each


def test_a_missing_bundle_says_where_the_release_gets_it(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"no CORE bundle at .*nowhere.*eval_bundle\.zip.*unzip it into"):
        run(tmp_path, monkeypatch, "--bundle", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("yaml_text, message", [
    ("icl_tasks: [\n", "core.yaml is not readable YAML"),
    ("tasks: []\n", "has no list of icl_tasks"),
    ("icl_tasks:\n- label: mc\n  icl_task_type: multiple_choice\n  num_fewshot: [0]\n",
     r"icl_tasks\[0\] needs label, dataset_uri"),
    ("icl_tasks:\n- {label: mc, dataset_uri: mine/mc.jsonl, icl_task_type: ranking, num_fewshot: [0]}\n",
     "icl_task_type 'ranking', not one of"),
    ("icl_tasks:\n- {label: mc, dataset_uri: mine/mc.jsonl, icl_task_type: schema, num_fewshot: 3}\n",
     "num_fewshot 3, not a list"),
])
def test_a_malformed_core_yaml_is_one_line(tmp_path, monkeypatch, yaml_text, message):
    bundle = write_bundle(tmp_path / "b")
    (tmp_path / "b" / "core.yaml").write_text(yaml_text)
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, monkeypatch, "--bundle", bundle)


@pytest.mark.parametrize("item, message", [
    ({"query": "q", "choices": ["a", "b"]},
     "line 2: a multiple_choice item needs query, choices, gold; this one has no gold"),
    ({"query": "q", "choices": "ab", "gold": 0}, "line 2: its choices is not a list of texts"),
    ({"query": "q", "choices": ["a", "b"], "gold": 2}, "line 2: its gold 2 is not the index of one of its 2 options"),
    ("not json", "line 2: not a JSON object"),
])
def test_a_task_file_whose_items_lack_their_fields_is_one_line(tmp_path, monkeypatch, item, message):
    bundle = write_bundle(tmp_path / "b")
    path = tmp_path / "b" / "eval_data" / "mine" / "mc.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = item if isinstance(item, str) else json.dumps(item)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=f"mc.jsonl, {message}"):
        run(tmp_path, monkeypatch, "--bundle", bundle)


def test_a_bundle_without_its_files_or_baselines_is_one_line(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "b")
    os.remove(tmp_path / "b" / "eval_data" / "mine" / "lm.jsonl")
    with pytest.raises(SystemExit, match="cannot read .*lm.jsonl .*unpack it again"):
        run(tmp_path, monkeypatch, "--bundle", bundle)
    os.remove(tmp_path / "b" / "eval_meta_data.csv")
    with pytest.raises(SystemExit, match="cannot read .*eval_meta_data.csv"):
        run(tmp_path, monkeypatch, "--bundle", bundle)
    bundle = write_bundle(tmp_path / "c", [(*TASKS[0][:5], None, MC)])
    with pytest.raises(SystemExit, match="eval_meta_data.csv has no row for core.yaml's task 'mc'"):
        run(tmp_path, monkeypatch, "--bundle", bundle)


def test_a_tokenizer_that_cannot_write_the_text_is_refused_before_any_scoring(tmp_path, monkeypatch):
    odd = [*LM, {"context": "where?", "continuation": "here"}]
    bundle = write_bundle(tmp_path / "b", [*TASKS[:2], (*TASKS[2][:6], odd)])
    model = Successor()
    with pytest.raises(SystemExit, match=r"stub's tokenizer cannot encode the text of task lm \(character '\?' is "
                                         "not in this char tokenizer's vocabulary\\): a char-level model"):
        run(tmp_path, monkeypatch, "--bundle", bundle, model=model)
    assert model.seen == []


def test_other_impossible_requests_are_one_line(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "b")
    with pytest.raises(SystemExit, match="task mc has 2 items: too few to draw 2 .*raise --max_per_task"):
        run(tmp_path, monkeypatch, "--bundle", bundle, "--max_per_task", "2")
    with pytest.raises(SystemExit, match="stub is a plain Transformer: it has no loop to vary"):
        run(tmp_path, monkeypatch, "--bundle", bundle, "--loops", "8", model=Successor(looped=False))
    with pytest.raises(SystemExit, match=r"stub cannot score item \d+ of mc: its continuation of 2 tokens does "
                                         "not fit in a context of 2"):
        run(tmp_path, monkeypatch, "--bundle", bundle, model=Successor(block_size=2))


def test_a_transformer_is_scored_once_as_train_py_evaluates_it(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "b")
    r = run(tmp_path, monkeypatch, "--bundle", bundle, model=Successor(looped=False))
    assert list(r["loops"]) == ["1"] and r["mean_loops"] is None


def test_download_unpacks_the_zip_into_the_bundle_folder(tmp_path, monkeypatch):
    source = write_bundle(tmp_path / "src" / "eval_bundle")
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for folder, _, files in os.walk(source):
            for name in files:
                path = os.path.join(folder, name)
                z.write(path, os.path.relpath(path, tmp_path / "src"))
    monkeypatch.setattr(core, "BUNDLE_URL", archive.as_uri())
    bundle = tmp_path / "cache" / "eval_bundle"
    r = run(tmp_path, monkeypatch, "--bundle", str(bundle), "--download")
    assert (bundle / "core.yaml").exists() and not (tmp_path / "cache" / "eval_bundle.zip").exists()
    assert r["loops"]["4"]["seeds"]["1234"]["tasks"]["mc"]["accuracy"] == 2 / 3
    monkeypatch.setattr(core, "BUNDLE_URL", (tmp_path / "missing.zip").as_uri())
    with pytest.raises(SystemExit, match="^could not download .*missing.zip.*download it by hand and unzip it"):
        run(tmp_path, monkeypatch, "--bundle", str(tmp_path / "other" / "eval_bundle"), "--download")


# -----------------------------------------------------------------------------
# end to end: the command line on a tiny checkpoint of our own


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo bundle, and a tiny char model trained for a few steps on text made of its characters."""
    root = tmp_path_factory.mktemp("core")
    bundle = str(root / "bundle")
    core.main(["--make_demo_bundle", bundle])
    tasks, _ = core.read_bundle(bundle, "core")
    text = "\n\n".join(p for t in tasks for item in t["items"] for p in core.render(t, item, []))
    write_char_data(str(root / "data"), text, text[:4000])
    settings = {**TINY, "data_dir": str(root / "data"), "out_dir": str(root / "out"), "block_size": 64,
                "max_iters": 6, "eval_interval": 6, "compile": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny matmuls: one thread is fastest, and leaves the others' cores alone
    try:
        train.main([f"--{k}={v!r}" for k, v in settings.items()])
    finally:
        torch.set_num_threads(threads)
    return {"bundle": bundle, "out": str(root / "out"), "results": str(root / "results"), "tasks": tasks}


def test_the_command_line_scores_a_checkpoint_on_the_demo_bundle(demo):
    assert [len(t["items"]) for t in demo["tasks"]] == [300, 300, 300]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "core.py"), "--bundle", demo["bundle"], "--out_dir", demo["out"],
           "--loops", "1", "2", "--seeds", "1234", "2345", "--max_per_task", "12", "--device", "cpu",
           "--results_dir", demo["results"]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(demo["results"], "core_out.json")) as f:
        r = json.load(f)
    assert r["mean_loops"] == TINY["mean_loops"] and list(r["loops"]) == ["1", "2"]
    assert r["command"].startswith("python bench/core.py --bundle") and r["environment"]["device"] == "cpu"
    for T, at_T in r["loops"].items():
        for seed, s in at_T["seeds"].items():
            assert set(s["tasks"]) == {"demo_brackets", "demo_signatures", "demo_attributes"}
            for label, t in s["tasks"].items():
                assert t["accuracy"] in [k / 12 for k in range(13)]       # 12 items, each right or wrong
                assert t["centered"] == core.centered(t["accuracy"], r["tasks"][label]["baseline"])
            # three terms, added in order by numpy as by sum()
            assert s["core"] == sum(t["centered"] for t in s["tasks"].values()) / 3
    assert os.path.getsize(os.path.join(demo["results"], "core_out.png")) > 1000
    assert "| 2 |" in open(os.path.join(demo["results"], "core_out.md")).read()
