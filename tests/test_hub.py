"""
hub.py against a fake Hugging Face Hub on 127.0.0.1 (no test touches the network): one of our tiny models,
written out under the release's names with a config.json in its format, comes back computing the same logits;
a tokenizer.json trained here by `tokenizers` with the authors' recipe tokenizes as its tiktoken conversion
does; downloads resume, refuse corrupt files and names that leave the cache; and sample.py, train.py and
bench/loops.py take --init_from. tests/official/ holds config.json as the release's save_pretrained writes it
for its 140m models.
"""
import hashlib
import http.server
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import hub
import prepare
import sample
import train
from conftest import ROOT, tiny, tokens
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


def safetensors_bytes(tensors):
    """The safetensors format, written by hand: header length (8 bytes, little-endian), JSON header, data."""
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def weights_file(weights, filename, tmp_path):
    if filename.endswith(".safetensors"):
        return safetensors_bytes({k: v for k, v in weights.items() if k != "lm_head.weight"})   # shared: left out
    torch.save(weights, tmp_path / filename)
    return (tmp_path / filename).read_bytes()


# -----------------------------------------------------------------------------
# a fake Hub


class FakeHub:
    """
    Serves {"owner/name/file": bytes} as the Hub does: HEAD or GET .../resolve/main/<file> answers a small
    file itself (with a git hash as ETag), and redirects a weights file to storage elsewhere (here
    localhost instead of 127.0.0.1), giving its size and sha256 on the redirect (X-Linked-Size,
    X-Linked-Etag). Storage honours Range. `cut` serves a file's first n bytes once, then closes;
    `corrupt` serves other bytes than the sha256 says; a `private` repo answers 401. `requests` logs
    (method, path, headers).
    """

    def __init__(self):
        self.files, self.cut, self.corrupt, self.private, self.requests = {}, {}, set(), set(), []
        hub_ = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                hub_.requests.append((self.command, self.path, dict(self.headers)))
                if self.path.startswith("/storage/"):
                    return self.storage(self.path.removeprefix("/storage/"), body)
                repo, _, file = self.path.lstrip("/").partition("/resolve/main/")
                key = f"{repo}/{file}"
                if repo in hub_.private:
                    return self.reply(401, {}, b"Invalid credentials")
                if key not in hub_.files:
                    return self.reply(404, {}, b"Entry not found")
                data = hub_.files[key]
                if file in hub.WEIGHTS:
                    sha = hashlib.sha256(data).hexdigest()
                    return self.reply(302, {"Location": f"http://localhost:{hub_.port}/storage/{key}",
                                            "X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{sha}"'}, b"")
                etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                self.reply(200, {"ETag": f'"{etag}"', "Content-Length": str(len(data))}, data if body else b"")

            def storage(self, key, body):
                data = hub_.files[key]
                if key in hub_.corrupt:
                    data = data[::-1]
                start = int(self.headers.get("Range", "bytes=0-")[6:-1] or 0)
                status = 206 if start else 200
                headers = {"Content-Length": str(len(data) - start)}
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if key in hub_.cut:                 # the connection drops early
                    data = data[:hub_.cut.pop(key)]
                self.reply(status, headers, data[start:] if body else b"")

            def reply(self, status, headers, data):
                self.send_response(status)
                headers.setdefault("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def add_model(self, repo, model, tmp_path, weights="model.safetensors", **config_changes):
        self.files[f"{repo}/config.json"] = json.dumps(official_config(model, **config_changes)).encode()
        self.files[f"{repo}/{weights}"] = weights_file(official_weights(model), weights, tmp_path)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A fake Hub as HF_ENDPOINT, and an empty cache as HF_HOME."""
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.load_encoding.cache_clear()     # tokenizers are cached by name: each test has its own Hub
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def cached(name):
    return Path(hub.cache_root(), *name.split("/"))


# -----------------------------------------------------------------------------
# (1) the release's files convert to a model that computes the same logits


@pytest.mark.parametrize("injection, weights", [("parcae", "model.safetensors"), ("linear", "pytorch_model.bin"),
                                                ("add", "model.pt"), ("none", "model.safetensors")])
def test_a_downloaded_model_gives_the_original_logits_at_1_4_and_16_loops(fake_hub, tmp_path, injection, weights):
    original = tiny(injection, prelude_norm=injection == "parcae").eval()
    fake_hub.add_model(MODEL, original, tmp_path, weights)
    with open(hub.find_file(MODEL, ("config.json",))) as f:
        converted = hub.official_to_gpt(json.load(f), hub.read_weights(hub.find_file(MODEL, hub.WEIGHTS))).eval()
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


def test_safetensors_of_mixed_dtypes_read_back_exactly(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(7), "c": torch.randn(2, 3).half()}
    (tmp_path / "w.safetensors").write_bytes(safetensors_bytes(tensors))     # b starts at an odd byte
    back = hub.read_safetensors(str(tmp_path / "w.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    (tmp_path / "bad.safetensors").write_bytes(safetensors_bytes(tensors)[:-4])
    with pytest.raises(SystemExit, match="bad.safetensors is not a safetensors file we can read"):
        hub.read_safetensors(str(tmp_path / "bad.safetensors"))


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
    fake_hub.add_model(MODEL, tiny("parcae"), tmp_path, logit_softcap=30.0)
    with pytest.raises(SystemExit, match=f"^{MODEL}: cannot convert config.json: logit_softcap=30.0") as e:
        sample.main([f"--init_from={MODEL}"])
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# (3) downloads: resumed, checked, cached, and only where they should go


def test_an_interrupted_download_resumes_where_it_stopped(fake_hub, tmp_path):
    fake_hub.add_model(MODEL, tiny("parcae"), tmp_path)
    size = len(fake_hub.files[f"{MODEL}/model.safetensors"])
    fake_hub.cut[f"{MODEL}/model.safetensors"] = size // 3
    with pytest.raises(SystemExit, match=f"stopped at {size // 3:,} of {size:,} bytes.*run the same command again"):
        hub.find_file(MODEL, hub.WEIGHTS)
    part = cached(MODEL) / "model.safetensors.part"
    assert part.stat().st_size == size // 3 and not (cached(MODEL) / "model.safetensors").exists()
    path = hub.find_file(MODEL, hub.WEIGHTS)
    assert Path(path).read_bytes() == fake_hub.files[f"{MODEL}/model.safetensors"] and not part.exists()
    gets = [h for method, p, h in fake_hub.requests if method == "GET" and p.startswith("/storage/")]
    assert "Range" not in gets[0] and gets[1]["Range"] == f"bytes={size // 3}-"


def test_a_corrupt_download_is_refused_and_not_kept(fake_hub, tmp_path):
    fake_hub.add_model(MODEL, tiny("parcae"), tmp_path)
    fake_hub.corrupt.add(f"{MODEL}/model.safetensors")
    with pytest.raises(SystemExit, match="arrived corrupt .*sha256.*deleted it: run the same command again"):
        hub.find_file(MODEL, hub.WEIGHTS)
    assert list(cached(MODEL).iterdir()) == []
    # so is a left-over partial file that was not the start of this one: the next run starts afresh
    fake_hub.corrupt.clear()
    (cached(MODEL) / "model.safetensors.part").write_bytes(b"something else")
    with pytest.raises(SystemExit, match="arrived corrupt"):
        hub.find_file(MODEL, hub.WEIGHTS)
    assert Path(hub.find_file(MODEL, hub.WEIGHTS)).read_bytes() == fake_hub.files[f"{MODEL}/model.safetensors"]


def test_a_cached_model_or_a_folder_loads_with_no_network(fake_hub, tmp_path, hf_tokenizer):
    fake_hub.add_model(MODEL, tiny("parcae", vocab_size=hf_tokenizer.n_vocab), tmp_path)
    model, meta = hub.load_pretrained(MODEL)
    fake_hub.httpd.shutdown()           # the Hub is gone: the cache is enough
    fake_hub.httpd.server_close()
    again, meta_again = hub.load_pretrained(MODEL)
    assert meta_again == meta and all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        src = cached(MODEL if name != "tokenizer.json" else TOKENIZER) / name
        (folder / name).write_bytes(src.read_bytes())
    from_folder, folder_meta = hub.load_pretrained(str(folder))
    assert folder_meta == {**meta, "tokenizer": str(folder)}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), from_folder.parameters()))


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../b", "owner/name/../../x", "a/b/c", "onlyone",
                                  "ow ner/name", "owner/..", "ówner/name"])
def test_a_name_that_could_leave_the_cache_is_refused(fake_hub, name):
    with pytest.raises(SystemExit, match="neither a folder nor a Hugging Face repo name"):
        hub.find_file(name, ("config.json",))
    assert not fake_hub.requests


def test_plain_http_is_refused_except_on_this_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://example.com")
    with pytest.raises(SystemExit, match="refusing to download http://example.com/.*only https://"):
        hub.find_file(MODEL, ("config.json",))


def test_hf_token_goes_to_the_hub_only_and_is_never_printed(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    fake_hub.add_model(MODEL, tiny("parcae"), tmp_path)
    hub.find_file(MODEL, hub.WEIGHTS)
    auth = {(method, path.split("/")[1]): h.get("Authorization") for method, path, h in fake_hub.requests}
    assert auth[("HEAD", "SandyResearch")] == auth[("GET", "SandyResearch")] == "Bearer hf_secret123"
    assert auth[("GET", "storage")] is None         # not sent on to where the Hub redirects the download
    fake_hub.private.add("SandyResearch/private")
    with pytest.raises(SystemExit, match="HTTP 401.*set HF_TOKEN") as e:     # errors name the file, not the token
        hub.find_file("SandyResearch/private", ("config.json",))
    printed = capsys.readouterr()
    assert "hf_secret123" not in str(e.value) + printed.out + printed.err


def test_a_missing_repo_or_file_says_what_to_do(fake_hub):
    with pytest.raises(SystemExit, match="SandyResearch/nothing has no config.json"):
        hub.load_pretrained("SandyResearch/nothing")
    assert hub.find_file(MODEL, hub.WEIGHTS) is None     # each of the three names answered 404


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
    fake_hub.files[f"{TOKENIZER}/tokenizer.json"] = (tmp_path / "tokenizer.json").read_bytes()
    enc = hub.load_encoding(TOKENIZER)
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
    fake_hub.add_model(MODEL, model, tmp_path)
    return model


@pytest.fixture
def parcae_data(pretrained, tmp_path):
    """prepare.py's folder of some text, tokenized with the authors' tokenizer."""
    (tmp_path / "text").mkdir()
    for i in range(20):
        (tmp_path / "text" / f"{i}.txt").write_text(f"Document {i}. " + VARIED[i:] * 2, encoding="utf-8")
    return Path(prepare.prepare(inputs=[str(tmp_path / "text")], tokenizer=TOKENIZER, out_dir=tmp_path / "data"))


def test_prepare_frames_each_document_with_bos_and_eos_as_the_authors_data_loader(parcae_data, hf_tokenizer):
    meta = json.loads((parcae_data / "meta.json").read_text())
    bos, eos = hf_tokenizer.encode_single_token("<|bos|>"), hf_tokenizer.encode_single_token("<|eos|>")
    assert parcae_data.name == "text-parcae-tokenizer"
    assert {k: meta[k] for k in ("tokenizer", "vocab_size", "bos_token", "eot_token")} == \
        {"tokenizer": TOKENIZER, "vocab_size": 384, "bos_token": bos, "eot_token": eos}
    val = np.fromfile(parcae_data / "val.bin", dtype=np.uint16).tolist()
    first = "Document 0. " + VARIED * 2             # val holds documents 0 and 10
    assert val[:val.index(eos) + 1] == [bos] + hf_tokenizer.hf.encode(first, add_special_tokens=False).ids + [eos]
    assert val.count(bos) == val.count(eos) == meta["val_docs"] == 2


def test_sample_py_samples_a_pretrained_model_at_16_loops(pretrained, capsys):
    sample.main([f"--init_from={MODEL}", "--loops", "16", "--start", "def f(x):", "--num_samples", "2",
                 "--max_new_tokens", "12", "--device", "cpu"])
    samples = capsys.readouterr().out.split("-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("def f(x):") for s in samples[:2])
    sample.main([f"--init_from={MODEL}", "--num_samples", "1", "--max_new_tokens", "5", "--device", "cpu"])
    assert capsys.readouterr().out.endswith("-" * 40 + "\n")      # no prompt: a document starts after <|bos|>


def test_train_py_fine_tunes_a_pretrained_model_and_resumes_it(pretrained, parcae_data, tmp_path, capsys):
    args = [f"--data_dir={parcae_data}", f"--out_dir={tmp_path / 'out'}", f"--init_from={MODEL}", "--device=cpu",
            "--block_size=32", "--batch_size=4", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
            "--eval_loops=[1, 4]", "--log_interval=1", "--lr=1e-3"]
    before = train.main(args)
    assert f"fine-tuning {MODEL}, parcae model" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert GPTConfig(**ckpt["model_config"]) == pretrained.config and ckpt["pretrained"] == MODEL
    assert all(np.isfinite(v) for v in before.values())
    # the weights moved, from the pretrained ones
    assert not torch.equal(ckpt["model"]["core.0.attn.c_attn.weight"], pretrained.core[0].attn.c_attn.weight)
    train.main([a for a in args if not a.startswith(("--init_from", "--max_iters"))] + ["--init_from=resume",
                                                                                         "--max_iters=3"])
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 3


def test_train_py_refuses_data_tokenized_otherwise_naming_both(pretrained, tiny_data, tmp_path):
    with pytest.raises(SystemExit, match=f"{tiny_data} was tokenized with char .*but {MODEL} reads {TOKENIZER} "
                                         f".*--tokenizer {TOKENIZER}"):
        train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", f"--init_from={MODEL}",
                    "--device=cpu", "--block_size=32"])


def test_bench_loops_measures_a_pretrained_model_at_each_depth(pretrained, parcae_data, tmp_path):
    results = loops.main(["--data_dir", str(parcae_data), "--preset", "tiny", "--init_from", MODEL,
                          "--loops", "1", "2", "4", "8", "--batches", "1", "--results_dir", str(tmp_path / "results")])
    (m,) = results["models"]
    assert m["model"] == MODEL and m["mean_loops"] == 4 and list(m["losses"]) == ["1", "2", "4", "8"]
    assert all(np.isfinite(v) for v in m["losses"].values()) and m["fit"] is not None
    assert (tmp_path / "results" / "loops.png").exists()


def test_bench_loops_adaptive_measures_a_pretrained_model(pretrained, parcae_data, tmp_path):
    results = loops.main(["--data_dir", str(parcae_data), "--preset", "tiny", "--init_from", MODEL, "--adaptive",
                          "--cap", "4", "--thresholds", "0.1", "0", "--batches", "1", "--decode_batches", "1",
                          "--results_dir", str(tmp_path / "results")])
    (m,) = results["models"]
    assert m["model"] == MODEL and [a["threshold"] for a in m["adaptive"]] == [0.1, 0]
    assert m["adaptive"][1]["mean_loops"] == 4 and (tmp_path / "results" / "adaptive.md").exists()
