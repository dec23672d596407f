"""
hub.py against a fake Hugging Face Hub on 127.0.0.1 (no test touches the network): one of our tiny models,
written out under the release's names with a config.json in its format, comes back computing the same logits;
a tokenizer.json trained here by `tokenizers` with the authors' recipe tokenizes as its tiktoken conversion
does; files come through huggingface_hub (tests/fake_hub.py serves what it asks): revisions pin commits, a
dropped connection resumes, a corrupt file is refused, the cache serves a second load and offline mode, and
each failure is one line; tokenizers are named so that data and checkpoints work on another machine; and
sample.py, train.py and bench/loops.py take --init_from. tests/official/ holds config.json as the release's
save_pretrained writes it for its 140m models.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import hub
import prepare
import sample
import train
from conftest import ROOT, tiny, tokens
from fake_hub import git_hash
from model import GPT, GPTConfig

sys.path.insert(0, os.path.join(ROOT, "bench"))
import loops  # noqa: E402

OFFICIAL = Path(__file__).parent / "official"
MODEL, TOKENIZER = "SandyResearch/parcae-140m", hub.TOKENIZER


# -----------------------------------------------------------------------------
# the release's files, made from our models: written out here from the release's facts, independently of hub.py


def official_config(model, **changes):
    """config.json of the release for one of our models: its 140m sample, resized."""
    c = model.config
    kind = "parcae" if c.looped else "gpt"
    config = json.loads((OFFICIAL / f"{kind}-small-140m.config.json").read_text())
    config.update(block_size=c.block_size, n_embd=c.n_embd, intermediate_size=4 * c.n_embd,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_head, vocab_size=c.vocab_size,
                  padded_vocab_size=c.padded_vocab_size)
    if c.looped:
        config.update(injection_type={"parcae": "diagonal"}.get(c.injection, c.injection),
                      n_layers_in_prelude=c.n_prelude, n_layers_in_recurrent_block=c.n_core,
                      n_layers_in_coda=c.n_coda, state_init={"normal": "like-init"}[c.init_state],
                      recurrent_embedding_dimension=c.n_embd,
                      recurrent_intermediation_embedding_dimension=4 * c.n_embd, prelude_norm=c.prelude_norm,
                      mean_recurrence=c.mean_loops, mean_backprop_depth=c.backprop_loops)
    else:
        config.update(n_layer=c.n_layer)
    return {**config, **changes}


def official_weights(model):
    """Our model's weights under the release's names (its Parcae and GPT classes), with the tied lm_head
    and the RoPE table freqs_cis (cos, sin of shape (1, L, 1, D/2, 2)) that its state dict also holds."""
    c = model.config
    offset = {"prelude": 0, "core": c.n_prelude, "coda": c.n_prelude + c.n_core}
    groups = {"prelude": "transformer.prelude", "core": "transformer.core_block", "coda": "transformer.coda"}
    names = {"wte.weight": "transformer.wte.weight", "norm_f.weight": "transformer.ln_f.weight",
             "prelude_norm.weight": "transformer.ln_prelude.weight", "C.weight": "transformer.C.weight",
             "injection.A_log": "transformer.adapter.A_log", "injection.dt_bias": "transformer.adapter.dt_bias",
             "injection.B.weight": "transformer.adapter.B", "injection.W.weight": "transformer.adapter.adapter.weight"}
    ours = {}
    for name, w in model.state_dict().items():
        if name.endswith(".attn.c_attn.weight"):     # the release keeps q, k and v as three matrices
            ours.update({name.replace("c_attn", part): t for part, t in zip(("c_q", "c_k", "c_v"), w.chunk(3))})
        else:
            ours[name] = w
    weights = {}
    for name, w in ours.items():
        group, *rest = name.split(".")
        if group in offset:
            i, rest = int(rest[0]), ".".join(rest[1:])
            if rest == "value_embed.weight":
                key = f"value_embeds.{offset[group] + i}.weight"
            else:
                key = f"{groups[group]}.{i}.{rest}" if c.looped else f"transformer.h.{offset[group] + i}.{rest}"
        else:
            key = names[name]
        weights[key] = w.clone()
    weights["lm_head.weight"] = model.wte.weight.detach().clone()
    weights["freqs_cis"] = torch.stack([model.cos[:, 1::2], model.sin[:, 1::2]], dim=-1)[None, :, None]   # one per pair
    return weights


def weights_file(weights, filename, tmp_path):
    if filename.endswith(".safetensors"):      # (lm_head.weight is wte's tensor: safetensors keeps one of the two)
        return safetensors.torch.save({k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"})
    torch.save(weights, tmp_path / filename)
    return (tmp_path / filename).read_bytes()


def add_model(fake_hub, model, tmp_path, weights="model.safetensors", repo=None, **config_changes):
    """A commit of one of our models to a repo of the fake Hub (MODEL), as the release's files; its hash."""
    return fake_hub.commit(repo or MODEL, {"config.json": json.dumps(official_config(model, **config_changes)).encode(),
                                           weights: weights_file(official_weights(model), weights, tmp_path)})


def equal_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# -----------------------------------------------------------------------------
# (1) the release's files convert to a model that computes the same logits


@pytest.mark.parametrize("injection, weights", [("parcae", "model.safetensors"), ("linear", "pytorch_model.bin"),
                                                ("add", "model.pt"), ("none", "model.safetensors")])
def test_a_downloaded_model_gives_the_original_logits_at_1_4_and_16_loops(fake_hub, tmp_path, injection, weights):
    original = tiny(injection, prelude_norm=injection == "parcae").eval()
    add_model(fake_hub, original, tmp_path, weights)
    config, weights_path, _ = hub.model_files(MODEL)
    assert Path(weights_path).name == weights
    with open(config) as f:
        converted = hub.official_to_gpt(json.load(f), hub.read_weights(weights_path)).eval()
    if original.config.looped:      # (the Transformer comes back as one group of 4 blocks: the same function)
        assert converted.config == original.config
    x = tokens(B=2, L=20)[:, :-1]
    with torch.no_grad():
        for loops_ in (1, 4, 16):
            # exact by construction: the same fp32 weights, bit for bit, in the same model code; h_0 is drawn
            # from the same seed (init_state "normal" is the release's "like-init")
            torch.manual_seed(0)
            want = original(x, loops=loops_)[0]
            torch.manual_seed(0)
            assert torch.equal(converted(x, loops=loops_)[0], want), f"{injection} at {loops_} loops"


def test_bf16_weights_convert_to_fp32_and_a_torch_compiled_state_dict_too():
    model = tiny("parcae").eval()
    weights = {k.replace("transformer.", "transformer._orig_mod.", 1): v.bfloat16()
               for k, v in official_weights(model).items()}
    converted = hub.official_to_gpt(official_config(model), weights)
    assert converted.wte.weight.dtype == torch.float32
    assert torch.equal(converted.core[0].attn.c_attn.weight, model.core[0].attn.c_attn.weight.bfloat16().float())


def test_the_140m_release_names_every_weight_of_ours():
    """The key names of the release's parcae-small-140m: layers 1, 3 and 5 of the six own value embeddings."""
    config = json.loads((OFFICIAL / "parcae-small-140m.config.json").read_text())
    c = hub.gpt_config(config)
    with torch.device("meta"):
        ours = GPT(c).state_dict()
    block = ["norm_1.weight", "attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.c_proj.weight",
             "norm_2.weight", "mlp.fc.weight", "mlp.proj.weight"]
    want = {"transformer.wte.weight", "transformer.ln_prelude.weight", "transformer.adapter.A_log",
            "transformer.adapter.dt_bias", "transformer.adapter.B", "transformer.C.weight", "transformer.ln_f.weight",
            "value_embeds.1.weight", "value_embeds.3.weight", "value_embeds.5.weight",
            "transformer.prelude.1.attn.ve_gate.weight", "transformer.core_block.1.attn.ve_gate.weight",
            "transformer.coda.1.attn.ve_gate.weight"}
    want |= {f"transformer.{g}.{i}.{w}" for g in ("prelude", "core_block", "coda") for i in (0, 1) for w in block}
    assert {key for k in ours for key in hub.official_names(k, c)} == want
    assert hub.official_names("core.1.attn.c_attn.weight", c) == [       # c_attn's rows: q, then k, then v
        f"transformer.core_block.1.attn.{w}.weight" for w in ("c_q", "c_k", "c_v")]
    assert (c.n_embd, c.n_head, c.n_prelude, c.n_core, c.n_coda, c.vocab_size, c.mean_loops, c.backprop_loops,
            c.injection, c.init_state) == (768, 6, 2, 2, 2, 32768, 8, 4, "parcae", "normal")


def test_the_rope_table_is_the_releases_formula_bit_for_bit():
    """cos and sin of position / 50000^(2i/d), as the release computes them: an equivalent formula,
    50000^(-2i/d), rounds differently and moves cos by up to 1e-4 at 2048 positions."""
    from model import rotary_tables
    cos, sin = rotary_tables(128, 2048)
    angles = torch.outer(torch.arange(2048.0), 1.0 / (50000 ** (torch.arange(0, 128, 2).float() / 128)))
    for channel in (0, 1):      # both channels of a pair: its angle's cos, and its sin, negated on the first
        assert torch.equal(cos[:, channel::2], angles.cos())
        assert torch.equal(sin[:, channel::2], (2 * channel - 1) * angles.sin())


def test_safetensors_of_mixed_dtypes_read_back_exactly_and_a_damaged_file_is_one_line(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(7), "c": torch.randn(2, 3).half()}
    safetensors.torch.save_file(tensors, tmp_path / "w.safetensors")
    back = hub.read_weights(str(tmp_path / "w.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-4])
    with pytest.raises(SystemExit, match="bad.safetensors is not a safetensors file we can read") as e:
        hub.read_weights(str(tmp_path / "bad.safetensors"))
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# (4) what model.py cannot compute is refused, naming the field


@pytest.mark.parametrize("change, field", [
    (dict(num_key_value_heads=1), "num_key_value_heads"),
    (dict(nonlin_name="GELU"), "nonlin_name"),
    (dict(logit_softcap=15.0), "logit_softcap"),
    (dict(tie_embeddings=False), "tie_embeddings"),
    (dict(qk_norm=False), "qk_norm"),
    (dict(norm_eps=1e-6), "norm_eps"),
    (dict(intermediate_size=96), "intermediate_size"),
    (dict(init_strategy="takase"), "init_strategy"),
    (dict(state_init="normal"), "state_init"),
    (dict(sampling_scheme="poisson-full"), "sampling_scheme"),
    (dict(padded_vocab_size=256), "padded_vocab_size"),
    (dict(some_new_field=1), "some_new_field"),
    # one core layer with mean_backprop_depth 2: the release's gates then sit on other layers than its tables
    (dict(n_layers_in_recurrent_block=1), "n_layers_in_recurrent_block=1, mean_recurrence=4, mean_backprop_depth"),
])
def test_a_config_model_py_cannot_compute_is_refused_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        hub.official_to_gpt(official_config(tiny("parcae"), **change), {})


def test_weights_that_do_not_fit_are_refused_naming_the_weight():
    model = tiny("parcae")
    config, weights = official_config(model), official_weights(model)
    with pytest.raises(ValueError, match="the weights have no transformer.adapter.B"):
        hub.official_to_gpt(config, {k: v for k, v in weights.items() if k != "transformer.adapter.B"})
    with pytest.raises(ValueError, match="no place for: transformer.abacus.weight"):
        hub.official_to_gpt(config, {**weights, "transformer.abacus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hub.official_to_gpt(config, {**weights, "lm_head.weight": torch.zeros_like(weights["lm_head.weight"])})
    freqs = weights["freqs_cis"].clone()
    freqs[0, :, 0, 1:] = 1.0        # another base
    with pytest.raises(ValueError, match="rope_settings"):
        hub.official_to_gpt(config, {**weights, "freqs_cis": freqs})


def test_sample_py_says_what_it_cannot_convert_in_one_line(fake_hub, tmp_path):
    add_model(fake_hub, tiny("parcae"), tmp_path, logit_softcap=30.0)
    with pytest.raises(SystemExit, match=f"^{MODEL}: cannot convert config.json: logit_softcap=30.0") as e:
        sample.main([f"--init_from={MODEL}"])
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# (3) through huggingface_hub: revisions, the shared cache, resumed and checked downloads, offline mode,
# tokens, and one line for each thing that can go wrong


@pytest.fixture
def sleeps(monkeypatch):
    """huggingface_hub waits before it tries a request again: here it only records how long."""
    import time
    waited = []
    monkeypatch.setattr(time, "sleep", waited.append)
    return waited


def cache_folder(tmp_path, repo=MODEL):
    """Where huggingface_hub keeps a model repo in the fake_hub fixture's cache."""
    return tmp_path / "hf_home" / "hub" / ("models--" + repo.replace("/", "--"))


def test_a_revision_pins_a_commit_and_a_models_files_come_from_one_commit(fake_hub, tmp_path, hf_tokenizer):
    first, second = (tiny(injection, vocab_size=hf_tokenizer.n_vocab) for injection in ("parcae", "linear"))
    old = add_model(fake_hub, first, tmp_path)
    new = add_model(fake_hub, second, tmp_path)                # main moves on
    pinned, _ = hub.load_pretrained(f"{MODEL}@{old}")
    latest, meta = hub.load_pretrained(MODEL)
    assert pinned.config == first.config and equal_weights(pinned, first)
    assert latest.config == second.config and equal_weights(latest, second)
    # main is asked for once, for config.json; the weights come from the commit it was at
    asked = [path for method, path, _ in fake_hub.requests if method == "HEAD" and path.startswith(f"/{MODEL}/")]
    assert asked == [f"/{MODEL}/resolve/{old}/config.json", f"/{MODEL}/resolve/{old}/model.safetensors",
                     f"/{MODEL}/resolve/main/config.json", f"/{MODEL}/resolve/{new}/model.safetensors"]
    # and the tokenizer is named by the commit it came from
    assert meta["tokenizer"] == f"{TOKENIZER}@{fake_hub.repos[TOKENIZER][-1][0]}"


def test_a_dropped_connection_resumes_where_it_stopped(fake_hub, tmp_path, sleeps, monkeypatch):
    import huggingface_hub.constants
    # huggingface_hub writes what arrives in chunks of 10 MB, and resumes after the last whole one: here
    # the chunks are smaller than this small file
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 14)
    add_model(fake_hub, tiny("parcae"), tmp_path)
    data = fake_hub.repos[MODEL][-1][1]["model.safetensors"]
    fake_hub.cut["model.safetensors"] = 5 << 14
    _, weights, _ = hub.model_files(MODEL)
    assert Path(weights).read_bytes() == data
    ranges = [h.get("range") for method, path, h in fake_hub.requests
              if method == "GET" and path.startswith("/storage/")]
    assert ranges == [None, f"bytes={5 << 14}-"]      # the second request asks for the rest only


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_a_corrupt_file_is_refused_deleted_and_fetched_again(fake_hub, tmp_path, file):
    add_model(fake_hub, tiny("parcae"), tmp_path)
    fake_hub.corrupt.add(file)
    with pytest.raises(SystemExit, match=f"^{MODEL}(@[0-9a-f]+)?/{file} arrived corrupt .*deleted it; run the same "
                                         "command again") as e:
        hub.model_files(MODEL)
    assert "\n" not in str(e.value)
    blobs = cache_folder(tmp_path) / "blobs"
    hashes = lambda data: (git_hash(data), hashlib.sha256(data).hexdigest())
    assert all(p.name in hashes(p.read_bytes()) for p in blobs.iterdir())     # nothing corrupt is kept
    fake_hub.corrupt.clear()
    config, weights, _ = hub.model_files(MODEL)
    files = fake_hub.repos[MODEL][-1][1]
    assert Path(config).read_bytes() == files["config.json"]
    assert Path(weights).read_bytes() == files["model.safetensors"]


def test_a_second_load_comes_from_the_cache_with_the_hub_gone_and_a_folder_needs_no_hub(fake_hub, tmp_path,
                                                                                        hf_tokenizer):
    add_model(fake_hub, tiny("parcae", vocab_size=hf_tokenizer.n_vocab), tmp_path)
    model, meta = hub.load_pretrained(MODEL)
    fake_hub.stop()                     # the Hub is gone: the cache is enough
    hub.cached_tokenizer.cache_clear()
    again, meta_again = hub.load_pretrained(MODEL)
    assert meta_again == meta and equal_weights(model, again)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in (*hub.model_files(MODEL)[:2], hub.find_tokenizer(TOKENIZER)[0]):    # from the cache
        shutil.copy(path, folder)
    from_folder, folder_meta = hub.load_pretrained(str(folder))
    # the folder's own tokenizer.json, named by its content: the same tokenizer as the authors'
    assert folder_meta == {**meta, "tokenizer": "sha256:" + meta["tokenizer_sha256"]}
    assert equal_weights(model, from_folder)


def test_offline_mode_reads_the_cache_and_without_it_says_what_to_do_in_one_line(fake_hub, tmp_path, hf_tokenizer):
    add_model(fake_hub, tiny("parcae", vocab_size=hf_tokenizer.n_vocab), tmp_path)
    hub.load_pretrained(MODEL)          # fills the cache
    asked = len(fake_hub.requests)
    command = [sys.executable, "sample.py", f"--init_from={MODEL}", "--num_samples=1", "--max_new_tokens=4",
               "--device=cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}         # and HF_HOME, HF_ENDPOINT as the fixture set them
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    env["HF_HOME"] = str(tmp_path / "empty")
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"HF_HUB_OFFLINE is set and the cache ({tmp_path / 'empty' / 'hub'}) does not hold "
                                 f"{MODEL}/config.json: run once with a connection")
    assert len(fake_hub.requests) == asked             # offline: not one request


@pytest.mark.parametrize("case, message", [
    ("missing repo", r"^http://127.0.0.1:\d+/SandyResearch/nothing is not a repo you can read: check the name; if it "
                     r"is private, log in \(`hf auth login`, or set HF_TOKEN\)$"),
    ("gated repo", rf"^{MODEL} is gated: accept its conditions at http://127.0.0.1:\d+/{MODEL} while logged in, then "
                   r"log in here too \(`hf auth login`, or set HF_TOKEN\)$"),
    ("missing revision", rf"^{MODEL} has no revision 'v9': give one of its branches, tags or commits$"),
    ("missing file", r"^SandyResearch/notes has no config.json: is it one of the authors' model repos or folders\?$"),
    ("no weights", r"^SandyResearch/notes has no weights: no model.safetensors, pytorch_model.bin, model.pt$"),
    ("no network", rf"^could not reach http://127.0.0.1:\d+ for {MODEL}/config.json, and the cache does not hold it: "
                   r"check your connection \(and HF_ENDPOINT\), or pass a folder that holds the files$"),
])
def test_what_cannot_be_had_is_one_line_that_says_what_to_do(fake_hub, tmp_path, sleeps, case, message):
    add_model(fake_hub, tiny("parcae"), tmp_path)
    fake_hub.commit("SandyResearch/notes", {"README.md": b"no model here"})
    if case == "no weights":
        fake_hub.commit("SandyResearch/notes", {"config.json": b"{}"})
    if case == "gated repo":
        fake_hub.gated.add(MODEL)
    if case == "no network":
        fake_hub.stop()
    name = {"missing repo": "SandyResearch/nothing", "missing revision": f"{MODEL}@v9", "missing file":
            "SandyResearch/notes", "no weights": "SandyResearch/notes"}.get(case, MODEL)
    with pytest.raises(SystemExit, match=message):
        sample.main([f"--init_from={name}", "--device=cpu"])
    if case == "no network":            # after trying again, waiting longer each time
        assert len(sleeps) >= 3 and sleeps == sorted(sleeps)


@pytest.mark.parametrize("login", ["hf auth login", "HF_TOKEN"])
def test_the_users_token_opens_a_gated_repo_goes_to_the_hub_only_and_is_never_printed(fake_hub, tmp_path,
                                                                                    monkeypatch, capsys, login):
    import huggingface_hub.constants
    add_model(fake_hub, tiny("parcae"), tmp_path)
    fake_hub.gated.add(MODEL)
    if login == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    else:                               # where `hf auth login` saves it
        Path(huggingface_hub.constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(huggingface_hub.constants.HF_TOKEN_PATH).write_text(fake_hub.token)
    hub.model_files(MODEL)
    auth = {(method, path.split("/")[1]): h.get("authorization") for method, path, h in fake_hub.requests}
    assert auth[("HEAD", "SandyResearch")] == auth[("GET", "SandyResearch")] == f"Bearer {fake_hub.token}"
    assert auth[("GET", "storage")] is None         # not sent on to where the Hub redirects a download
    add_model(fake_hub, tiny("parcae"), tmp_path, repo="SandyResearch/parcae-370m")     # not in the cache
    fake_hub.gated.add("SandyResearch/parcae-370m")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong456")
    with pytest.raises(SystemExit, match="^SandyResearch/parcae-370m is gated") as e:
        hub.model_files("SandyResearch/parcae-370m")
    printed = capsys.readouterr()
    assert "hf_wrong456" not in str(e.value) + printed.out + printed.err


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../b", "owner/name/../../x", "a/b/c", "onlyone",
                                  "ow ner/name", "owner/..", "ówner/name", "owner/name@", "owner/name@../../x"])
def test_a_name_that_is_neither_a_folder_nor_a_repo_is_refused(fake_hub, name):
    with pytest.raises(SystemExit, match="neither a folder nor a Hugging Face repo name"):
        hub.load_pretrained(name)
    assert not fake_hub.requests


# -----------------------------------------------------------------------------
# (2) the authors' tokenizer.json as a tiktoken Encoding

SPLIT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*""" \
        r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
VARIED = ("Héllo, wörld! Ünïcödé — “quotes” and ‘apostrophes’; 日本語のテキスト, 한국어, emoji 🙂👍🏽 and ∑ x² ≥ 0.\n"
          "   runs   of\t\twhitespace \n\n\n  \r\n trailing   \n"
          "digits 1234567890 3.14159 -42 1e-5 0x1F 2024-06-01 $1,000,000\n"
          "def f(x):\n    return {'a': [1, 2], \"b\": x ** 2}  # comment\n\tif x != None:  pass\n"
          "I'm, you're, they'll, we've, he'd; DON'T SHOUT. can't won't\n")


def train_tokenizer_json(path, vocab_size=384):
    """A tokenizer.json made as the authors' scripts/tok_train.py makes theirs: a byte-level BPE over
    text split by a GPT-4-style regex (digits in ones and twos), special tokens <|bos|>, <|eos|>, <|pad|>."""
    tk = pytest.importorskip("tokenizers", reason="the tokenizer tests train one with Hugging Face's tokenizers "
                                                  "(pip install tokenizers): a test-only dependency")
    tokenizer = tk.Tokenizer(tk.models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(pattern=tk.Regex(SPLIT), behavior="isolated", invert=False),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"])
    corpus = [(Path(ROOT) / name).read_text(encoding="utf-8") for name in ("model.py", "README.md")]
    tokenizer.train_from_iterator(corpus + [VARIED], trainer=trainer)
    tokenizer.save(str(path))
    return tokenizer


@pytest.fixture
def hf_tokenizer(fake_hub, tmp_path):
    """The authors' tokenizer repo on the fake Hub; returns its tiktoken Encoding (with .hf, the original)."""
    hf = train_tokenizer_json(tmp_path / "tokenizer.json")
    fake_hub.commit(TOKENIZER, {"tokenizer.json": (tmp_path / "tokenizer.json").read_bytes()})
    enc = hub.load_tokenizer(TOKENIZER)[0]
    enc.hf = hf
    return enc


def test_tiktoken_encodes_and_decodes_exactly_as_the_hugging_face_tokenizer(hf_tokenizer):
    enc, hf = hf_tokenizer, hf_tokenizer.hf
    texts = [VARIED, VARIED[::-1], "x" * 50, " " * 17 + "\n" * 5, "12345678901234567890", "ab\u00a0cd\u2003ef", ""]
    for text in texts + [VARIED[i:i + 37] for i in range(0, len(VARIED), 37)]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert enc.encode_ordinary(text) == ids, text
        assert enc.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text
    # special tokens written as text are those tokens, as the Hugging Face tokenizer reads them
    text = "<|bos|>Once upon a time<|eos|><|pad|>"
    ids = hf.encode(text, add_special_tokens=False).ids
    assert enc.encode(text, allowed_special="all") == ids and ids[0] == hf.token_to_id("<|bos|>")
    assert enc.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text
    # any ids at all, even ones that cut a character's bytes apart, decode to the same text
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, enc.n_vocab, 12).tolist()
        assert enc.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert enc.n_vocab == hf.get_vocab_size() == 384


def test_another_kind_of_tokenizer_json_is_refused(tmp_path):
    train_tokenizer_json(tmp_path / "tokenizer.json")
    good = json.loads((tmp_path / "tokenizer.json").read_text())
    gpt2_style = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    for change, message in [(dict(model={**good["model"], "type": "WordPiece"}), "its model is WordPiece"),
                            (dict(pre_tokenizer=gpt2_style), "it does not just split the text by a regex"),
                            (dict(normalizer={"type": "NFC"}), "it does not just split the text by a regex")]:
        (tmp_path / "other.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(SystemExit, match=f"other.json: {message}.*only a byte-level BPE tokenizer.json"):
            hub.tiktoken_from_json(str(tmp_path / "other.json"))


# -----------------------------------------------------------------------------
# the three uses, against the fake Hub


@pytest.fixture
def pretrained(fake_hub, tmp_path, hf_tokenizer):
    """The authors' model repo on the fake Hub: a tiny Parcae model with their tokenizer's vocabulary."""
    model = tiny("parcae", vocab_size=hf_tokenizer.n_vocab, block_size=64)
    add_model(fake_hub, model, tmp_path)
    return model


@pytest.fixture
def parcae_data(pretrained, tmp_path):
    """prepare.py's folder of some text, tokenized with the authors' tokenizer."""
    (tmp_path / "text").mkdir()
    for i in range(20):
        (tmp_path / "text" / f"{i}.txt").write_text(f"Document {i}. " + VARIED[i:] * 2, encoding="utf-8")
    return Path(prepare.prepare(inputs=[str(tmp_path / "text")], tokenizer=TOKENIZER, out_dir=tmp_path / "data"))


def test_prepare_frames_each_document_with_bos_and_eos_as_the_authors_data_loader(parcae_data, hf_tokenizer,
                                                                                   fake_hub):
    meta = json.loads((parcae_data / "meta.json").read_text())
    bos, eos = hf_tokenizer.encode_single_token("<|bos|>"), hf_tokenizer.encode_single_token("<|eos|>")
    assert parcae_data.name == "text-parcae-tokenizer"
    tokenizer_json = fake_hub.repos[TOKENIZER][-1][1]["tokenizer.json"]
    # named by the commit it came from, and by its hash; its copy beside meta.json
    assert {k: meta[k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size", "bos_token", "eot_token")} == \
        {"tokenizer": f"{TOKENIZER}@{fake_hub.repos[TOKENIZER][-1][0]}", "vocab_size": 384, "bos_token": bos,
         "eot_token": eos, "tokenizer_sha256": hashlib.sha256(tokenizer_json).hexdigest()}
    assert (parcae_data / "tokenizer.json").read_bytes() == tokenizer_json
    val = np.fromfile(parcae_data / "val.bin", dtype=np.uint16).tolist()
    first = "Document 0. " + VARIED * 2             # val holds documents 0 and 10
    assert val[:val.index(eos) + 1] == [bos] + hf_tokenizer.hf.encode(first, add_special_tokens=False).ids + [eos]
    assert val.count(bos) == val.count(eos) == meta["val_docs"] == 2


def test_sample_py_samples_a_pretrained_model_at_16_loops(pretrained, capsys, fake_hub):
    sample.main([f"--init_from={MODEL}", "--loops", "16", "--start", "def f(x):", "--num_samples", "2",
                 "--max_new_tokens", "12", "--device", "cpu"])
    samples = capsys.readouterr().out.split("-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("def f(x):") for s in samples[:2])
    commit = fake_hub.repos[MODEL][-1][0]
    sample.main([f"--init_from={MODEL}@{commit}", "--num_samples", "1", "--max_new_tokens", "5", "--device", "cpu"])
    assert capsys.readouterr().out.endswith("-" * 40 + "\n")      # no prompt: a document starts after <|bos|>


def test_train_py_fine_tunes_a_pretrained_model_resumes_it_and_its_checkpoint_samples_with_no_hub(
        pretrained, parcae_data, tmp_path, capsys, fake_hub):
    name = f"{MODEL}@{fake_hub.repos[MODEL][-1][0]}"
    args = [f"--data_dir={parcae_data}", f"--out_dir={tmp_path / 'out'}", f"--init_from={name}", "--device=cpu",
            "--block_size=32", "--batch_size=4", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
            "--eval_loops=[1, 4]", "--log_interval=1", "--lr=1e-3"]
    before = train.main(args)
    assert f"fine-tuning {name}, parcae model" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert GPTConfig(**ckpt["model_config"]) == pretrained.config and ckpt["pretrained"] == name
    assert all(np.isfinite(v) for v in before.values())
    # the weights moved, from the pretrained ones
    assert not torch.equal(ckpt["model"]["core.0.attn.c_attn.weight"], pretrained.core[0].attn.c_attn.weight)
    train.main([a for a in args if not a.startswith(("--init_from", "--max_iters"))] + ["--init_from=resume",
                                                                                         "--max_iters=3"])
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 3
    # the checkpoint's tokenizer.json travels with it: sampling needs neither the Hub nor its cache
    fake_hub.stop()
    shutil.rmtree(tmp_path / "hf_home")
    hub.cached_tokenizer.cache_clear()
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path / 'out'}", "--start", "Document", "--num_samples=1", "--max_new_tokens=5",
                 "--device=cpu"])
    assert capsys.readouterr().out.startswith("Document")


def test_train_py_refuses_data_tokenized_otherwise_naming_both(pretrained, tiny_data, tmp_path):
    with pytest.raises(SystemExit, match=f"{tiny_data} was tokenized with char .*but {MODEL} reads {TOKENIZER}@"
                                         f".*--tokenizer {TOKENIZER}"):
        train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", f"--init_from={MODEL}",
                    "--device=cpu", "--block_size=32"])


def test_bench_loops_measures_a_pretrained_model_at_each_depth(pretrained, parcae_data, tmp_path):
    results = loops.main(["--data_dir", str(parcae_data), "--preset", "tiny", "--init_from", f"{MODEL}@main",
                          "--loops", "1", "2", "4", "8", "--batches", "1", "--results_dir", str(tmp_path / "results")])
    (m,) = results["models"]
    assert m["model"] == f"{MODEL}@main" and m["mean_loops"] == 4 and list(m["losses"]) == ["1", "2", "4", "8"]
    assert all(np.isfinite(v) for v in m["losses"].values()) and m["fit"] is not None
    assert (tmp_path / "results" / "loops.png").exists()


def test_bench_loops_adaptive_measures_a_pretrained_model(pretrained, parcae_data, tmp_path):
    results = loops.main(["--data_dir", str(parcae_data), "--preset", "tiny", "--init_from", MODEL, "--adaptive",
                          "--cap", "4", "--thresholds", "0.1", "0", "--batches", "1", "--decode_batches", "1",
                          "--results_dir", str(tmp_path / "results")])
    (m,) = results["models"]
    assert m["model"] == MODEL and [a["threshold"] for a in m["adaptive"]] == [0.1, 0]
    assert m["adaptive"][1]["mean_loops"] == 4 and (tmp_path / "results" / "adaptive.md").exists()


def test_data_and_checkpoints_of_a_local_tokenizer_name_it_by_content_and_work_on_another_machine(
        hf_tokenizer, tmp_path, capsys):
    mine = tmp_path / "my-tokenizer"
    mine.mkdir()
    shutil.copy(hub.find_tokenizer(TOKENIZER)[0], mine / "tokenizer.json")
    (tmp_path / "text").mkdir()
    for i in range(20):
        (tmp_path / "text" / f"{i}.txt").write_text(f"Document {i}. " + VARIED[i:], encoding="utf-8")
    data = Path(prepare.prepare(inputs=[str(tmp_path / "text")], tokenizer=str(mine), out_dir=tmp_path / "data"))
    meta_json = (data / "meta.json").read_text()
    assert data.name == "text-my-tokenizer" and str(mine) not in meta_json     # no folder of this machine
    meta = json.loads(meta_json)
    sha256 = hub.file_sha256(mine / "tokenizer.json")
    assert meta["tokenizer"] == "sha256:" + meta["tokenizer_sha256"] == "sha256:" + sha256
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--block_size=32", "--n_embd=32",
                "--batch_size=4", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--eval_loops=[1]"])
    # "another machine": the run folder alone, with the tokenizer folder and the data gone
    shutil.move(tmp_path / "out", tmp_path / "elsewhere")
    shutil.rmtree(mine)
    shutil.rmtree(data)
    hub.cached_tokenizer.cache_clear()
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path / 'elsewhere'}", "--start", "Document", "--num_samples=1",
                 "--max_new_tokens=5", "--device=cpu"])
    assert capsys.readouterr().out.startswith("Document")
    (tmp_path / "elsewhere" / "tokenizer.json").unlink()
    hub.cached_tokenizer.cache_clear()
    with pytest.raises(SystemExit, match="was a local tokenizer.json, and .*elsewhere/tokenizer.json holds no copy"):
        sample.main([f"--out_dir={tmp_path / 'elsewhere'}", "--device=cpu"])


def test_a_model_folder_with_the_same_tokenizer_json_reads_data_of_the_hub_tokenizer(pretrained, parcae_data,
                                                                                     tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in (*hub.model_files(MODEL)[:2], hub.find_tokenizer(TOKENIZER)[0]):
        shutil.copy(path, folder)
    meta = json.loads((parcae_data / "meta.json").read_text())
    model = hub.load_for_data(str(folder), meta, parcae_data)
    assert equal_weights(model, pretrained)
    with open(folder / "tokenizer.json", "a") as f:        # another tokenizer.json: refused
        f.write(" ")
    hub.cached_tokenizer.cache_clear()
    with pytest.raises(SystemExit, match=f"was tokenized with {TOKENIZER}@.*, but {folder} reads sha256:.*--tokenizer "
                                         f"{folder}$"):
        hub.load_for_data(str(folder), meta, parcae_data)


def test_train_sample_and_prepare_need_neither_package_until_a_path_does(monkeypatch, tmp_path):
    """The GPU machines have neither huggingface_hub nor safetensors: importing the scripts needs neither,
    and a path that needs one says how to install it, in one line."""
    code = ("import sys; sys.modules['huggingface_hub'] = sys.modules['safetensors'] = None; "
            "import train, sample, prepare, hub")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)      # (an import then fails)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(SystemExit, match="^this needs the huggingface_hub package: pip install -r requirements.txt$"):
        sample.main([f"--init_from={MODEL}"])
    with pytest.raises(SystemExit, match="^this needs the safetensors package: pip install -r requirements.txt$"):
        hub.read_weights(str(tmp_path / "model.safetensors"))
