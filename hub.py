"""
The authors' pretrained Parcae models and their tokenizer, from the Hugging Face Hub, as this
project's GPT and a tiktoken Encoding.

    python sample.py --init_from=SandyResearch/parcae-140m --loops 16 --start "The sea"
    python prepare.py --source fineweb-edu --tokenizer SandyResearch/parcae-tokenizer
    python train.py CONFIG --data_dir=data/fineweb-edu-parcae-tokenizer --init_from=SandyResearch/parcae-140m
    python bench/loops.py --data_dir=data/fineweb-edu-parcae-tokenizer --init_from=SandyResearch/parcae-140m

The models are parcae-140m, parcae-370m, parcae-770m and parcae-1.3b; --init_from also takes a folder
holding config.json and the weights. A model repo holds the fields of the release's ParcaeConfig (or
GPTConfig) in config.json, and a state dict in model.safetensors, pytorch_model.bin or model.pt.
official_to_gpt() turns the two into our GPT, and refuses, naming the field, anything model.py does not
compute exactly as the release does. Files are downloaded once, over HTTPS, into
$HF_HOME/parcae-gpt (HF_HOME defaults to ~/.cache/huggingface); after that, or from a folder, no network
is needed. HF_ENDPOINT picks another Hub, HF_TOKEN is sent to it for private or gated repos.
"""
import functools
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlparse

import torch
from tqdm import tqdm

from model import GPT, GPTConfig, rotary_tables

TOKENIZER = "SandyResearch/parcae-tokenizer"    # the tokenizer of all the authors' models
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pt")    # the first one a repo has is read
BOS_TEXT, EOS_TEXT = "<|bos|>", "<|eos|>"       # how the tokenizer writes its special tokens

# -----------------------------------------------------------------------------
# download and cache


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_root():
    """Our own folder in the Hugging Face cache: we never touch the files huggingface_hub keeps there."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "parcae-gpt")


def check_url(url):
    """Weights are only fetched over HTTPS. Plain http is allowed for this machine alone (127.0.0.1, localhost,
    ::1), where nothing travels over a network: the tests serve a fake Hub there."""
    u = urlparse(url)
    if not (u.scheme == "https" or (u.scheme == "http" and u.hostname in ("127.0.0.1", "localhost", "::1"))):
        raise SystemExit(f"refusing to download {url}: only https:// is allowed (check HF_ENDPOINT)")


def check_repo(name):
    """owner/name as the Hub spells it. Nothing else, so that no name can point outside our cache folder."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name, re.ASCII) or ".." in name:
        raise SystemExit(f"{name!r} is neither a folder nor a Hugging Face repo name such as "
                         "SandyResearch/parcae-140m")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None         # a redirect comes back as an HTTPError: request() follows it itself


_opener = urllib.request.build_opener(_NoRedirect)
REDIRECTS = (301, 302, 303, 307, 308)


def request(url, method="GET", start=0):
    """
    Open url, following redirects by hand: each hop must pass check_url, and HF_TOKEN goes only to the
    Hub's own host, never to the storage it redirects a download to. start > 0 asks for the bytes from
    there on (an HTTP Range request). A HEAD request returns the first answer, redirect or not: the Hub
    puts the size and sha256 of a large file on the redirect (X-Linked-Size, X-Linked-Etag).
    """
    token, home = os.environ.get("HF_TOKEN"), urlparse(endpoint()).netloc
    for _ in range(10):
        check_url(url)
        headers = {"Range": f"bytes={start}-"} if start else {}
        if token and urlparse(url).netloc == home:
            headers["Authorization"] = f"Bearer {token}"
        try:
            return _opener.open(urllib.request.Request(url, headers=headers, method=method), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code not in REDIRECTS:
                raise
            if method == "HEAD":
                return e
            url = urljoin(url, e.headers["Location"])
    raise SystemExit(f"too many redirects downloading {url}")


def expected(head):
    """(size, sha256) of a file as the Hub's answer to a HEAD request gives them; None where it gives none. A
    small file kept in git (config.json) has a git hash as its ETag, not a sha256: then only its size is
    checked. A redirect's own Content-Length is that of its message, not of the file."""
    headers = head.headers
    size = headers.get("X-Linked-Size") or (None if head.status in REDIRECTS else headers.get("Content-Length"))
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
    return (int(size) if size else None), (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)


def download(repo, filename, path):
    """
    Fetch repo's filename into path; None if the repo has no such file. The bytes go to path.part, which is
    renamed to path only once its size and sha256 are checked, so the cache never holds a partial or corrupt
    file under the real name. An interrupted download leaves path.part behind, and the next call resumes it.
    """
    url = f"{endpoint()}/{repo}/resolve/main/{filename}"
    try:
        head = request(url, "HEAD")
        head.close()
        size, sha256 = expected(head)
        part = path + ".part"
        done = os.path.getsize(part) if os.path.exists(part) else 0
        if size is not None and done > size:        # not the start of this file: start again
            done = 0
        if size is None or done < size:
            with request(url, start=done) as r:
                if done and r.status != 206:        # the server ignored the Range: it sends the whole file
                    done = 0
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(part, "ab" if done else "wb") as f, tqdm(total=size, initial=done, unit="B",
                                                                  unit_scale=True, desc=f"{repo}/{filename}") as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        hint = ("the repo does not exist, or it is private or gated: check the name, or set HF_TOKEN"
                if e.code in (401, 403) else "try again later")
        raise SystemExit(f"could not download {url} (HTTP {e.code} {e.reason}): {hint}")
    except (OSError, http.client.HTTPException) as e:   # no network, refused connection, timeout, a cut
        raise SystemExit(f"could not download {url} ({getattr(e, 'reason', e)}); run the same command again (a "
                         "partial download resumes), or pass a folder that holds the files")
    if size is not None and os.path.getsize(part) < size:      # the connection closed early, without an error
        raise SystemExit(f"the download of {url} stopped at {os.path.getsize(part):,} of {size:,} bytes; what "
                         "arrived is kept: run the same command again to resume")
    got = (os.path.getsize(part) if size else None, sha256_of(part) if sha256 else None)
    if got != (size, sha256):
        os.remove(part)
        raise SystemExit(f"{url} arrived corrupt (size {got[0]}, sha256 {got[1]}; the Hub says size {size}, "
                         f"sha256 {sha256}); deleted it: run the same command again")
    os.replace(part, path)
    return path


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def find_file(name, filenames):
    """The first of filenames that a folder or Hub repo holds, as a local path (downloaded if need be); None if
    it holds none. A folder, or a file already in the cache, needs no network."""
    if os.path.isdir(name):
        paths = [os.path.join(name, f) for f in filenames]
        return next((p for p in paths if os.path.isfile(p)), None)
    check_repo(name)
    folder = os.path.join(cache_root(), *name.split("/"))
    cached = [os.path.join(folder, f) for f in filenames if os.path.isfile(os.path.join(folder, f))]
    if cached:
        return cached[0]
    for f in filenames:
        if path := download(name, f, os.path.join(folder, f)):
            return path
    return None


# -----------------------------------------------------------------------------
# weights: data, never code

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    """A .safetensors file: an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range, then the raw bytes. Each tensor gets its own buffer: one a range of the file's
    bytes would not always be aligned for its dtype."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header, tensors = json.loads(f.read(n)), {}
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                if t["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{name} is {t['dtype']}, not one of {', '.join(SAFETENSORS_DTYPES)}")
                dtype, (begin, end) = SAFETENSORS_DTYPES[t["dtype"]], t["data_offsets"]
                buffer = bytearray(end - begin)
                f.seek(8 + n + begin)
                if f.readinto(buffer) != len(buffer) or len(buffer) != torch.Size(t["shape"]).numel() * dtype.itemsize:
                    raise ValueError(f"{name}'s bytes do not fit its shape, or the file")
                tensors[name] = torch.frombuffer(buffer, dtype=dtype).view(t["shape"])
        return tensors
    except (ValueError, KeyError, TypeError) as e:     # JSONDecodeError is a ValueError
        raise SystemExit(f"{path} is not a safetensors file we can read ({type(e).__name__}: {e}); delete it and "
                         "download it again")


def read_weights(path):
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:        # weights_only: a pickle that would run code is refused
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"could not read {path} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         "delete it and download it again")
    if not (isinstance(state_dict, dict) and all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise SystemExit(f"{path} is not a state dict (a dict of tensors)")
    return state_dict


# -----------------------------------------------------------------------------
# the release's config.json and weights -> our GPT (PARCAE.md; the release's Parcae and GPT classes)

# fields that do not change what the model computes: names, kernels, checkpointing, training RNG details
# (rope_settings too: the release's from_pretrained drops it; the RoPE it computes is the weights' freqs_cis)
IGNORED = {"name", "hf_config", "padding_multiple", "rope_settings", "attn_impl", "init_orthogonal",
           "skip_initialization", "use_fused_head", "debias_attention", "center_attention",
           "activation_checkpoint_impl", "simple_ops", "strategy", "_class_name", "lockstep_n", "lockstep_k",
           "curriculum_target", "model_class_name", "_is_recurrent_block_config"}
# fields model.py computes one way only: that way
FIXED = {"block_class_name": "TransformerPreNormBlock", "norm_class_name": "RMSNorm", "norm_eps": 1e-5,
         "mlp_class_name": "BaseMLP", "nonlin_name": "ReLU2", "bias": False, "qk_bias": False, "qk_norm": True,
         "clip_qkv": None, "logit_softcap": None, "use_abacus": False, "randomize_positions_from": None,
         "mup_model_scaling_factor": 1, "tie_embeddings": True}
# the rest: the architecture, which official_to_gpt reads
SHAPE = {"block_size", "n_embd", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
         "padded_vocab_size", "init_strategy"}
PARCAE = {"injection_type", "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda", "state_init",
          "prelude_norm", "mean_recurrence", "mean_backprop_depth", "sampling_scheme", "recurrent_iteration_method",
          "recurrent_embedding_dimension", "recurrent_intermediation_embedding_dimension",
          "recurrent_num_attention_heads"}
KNOWN = {"ParcaeConfig": IGNORED | set(FIXED) | SHAPE | PARCAE, "GPTConfig": IGNORED | set(FIXED) | SHAPE | {"n_layer"}}
# the init strategies that scale neither the embeddings nor the logits and draw h_0 with σ = sqrt(2/(5d))
# (any other only sets the weights' starting values, but these we checked)
PLAIN_INITS = ("scaled-zero", "scaled", "scaled-geiping", "scaled-stuck", "small")


def gpt_config(config):
    """Our GPTConfig for the release's config.json dict, or ValueError naming the field we cannot compute."""
    # (the release's evaluation code saves config.json without _class_name, and reads it as a ParcaeConfig)
    kind = config.get("_class_name") or ("ParcaeConfig" if "injection_type" in config else "GPTConfig")
    if kind not in KNOWN:
        raise ValueError(f"_class_name={kind!r}: only ParcaeConfig and GPTConfig models convert")
    unknown = sorted(set(config) - KNOWN[kind])
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}: they may change what the model computes")

    def get(field):
        if field not in config:
            raise ValueError(f"config.json has no {field}")
        return config[field]

    def need(field, want, why="model.py computes only that"):
        if get(field) != want:
            raise ValueError(f"{field}={config[field]!r}, not {want!r}: {why}")

    d, heads = get("n_embd"), get("num_attention_heads")
    for field, want in FIXED.items():
        need(field, want)
    if config.get("num_key_value_heads") is not None:
        need("num_key_value_heads", heads, "model.py has a key and a value head per query head")
    need("intermediate_size", 4 * d, "model.py's MLP is 4 n_embd wide")
    if get("init_strategy") not in PLAIN_INITS:
        raise ValueError(f"init_strategy={config['init_strategy']!r} may scale the embeddings or logits, or h_0's "
                         f"draw; model.py computes those as {', '.join(PLAIN_INITS)} do")
    if "Gemma" in config.get("name", ""):
        raise ValueError(f"name={config['name']!r}: the release gives a Gemma model's norms a unit offset")
    padded = get("padded_vocab_size")
    vocab = min(get("vocab_size"), padded)      # (as the release's config does)
    c = dict(vocab_size=vocab, block_size=get("block_size"), n_embd=d, n_head=heads)
    if GPTConfig(vocab_size=vocab).padded_vocab_size != padded:
        raise ValueError(f"padded_vocab_size={padded}: model.py pads vocab_size={vocab} to "
                         f"{GPTConfig(vocab_size=vocab).padded_vocab_size} rows")
    if kind == "GPTConfig":     # a Transformer runs every block once, so their grouping does not matter
        return GPTConfig(**c, injection="none", n_prelude=0, n_core=get("n_layer"), n_coda=0)

    need("recurrent_embedding_dimension", d, "model.py's recurrent state is n_embd wide")
    need("recurrent_intermediation_embedding_dimension", 4 * d, "model.py's MLP is 4 n_embd wide")
    if config.get("recurrent_num_attention_heads") is not None:
        need("recurrent_num_attention_heads", heads, "model.py's core blocks have the same heads")
    injection = {"diagonal": "parcae", "linear": "linear", "add": "add"}.get(get("injection_type"))
    if injection is None:
        raise ValueError(f"injection_type={config['injection_type']!r}: model.py has diagonal, linear and add")
    init_state = {"like-init": "normal", "zero": "zero"}.get(get("state_init"))    # "normal" there: σ = 1
    if init_state is None:
        raise ValueError(f"state_init={config['state_init']!r}: model.py draws h_0 as like-init (σ = sqrt(2/(5d)), "
                         "truncated at 3σ) or zero")
    sampling = (get("sampling_scheme"), get("recurrent_iteration_method"))
    if sampling != ("poisson-truncated-full", "per-sequence"):
        raise ValueError(f"sampling_scheme, recurrent_iteration_method = {sampling}: train.py draws training depths "
                         "one way, ('poisson-truncated-full', 'per-sequence')")
    P, R, C = get("n_layers_in_prelude"), get("n_layers_in_recurrent_block"), get("n_layers_in_coda")
    mean_rec, mean_bwd = get("mean_recurrence"), get("mean_backprop_depth")
    # Value embeddings: the release gives unique layer i (of P+R+C) a table when i % 2 == (P+R+C-1) % 2, but its
    # gate goes by the layer's id (a coda layer's is P + R·mean_recurrence + i) and R·mean_backprop_depth
    # layers. A layer with a table and no gate ignores the table; model.py gives every table a gate.
    n = P + R + C
    tables = [i % 2 == (n - 1) % 2 for i in range(n)]
    gates = [i % 2 == (R * mean_bwd - 1) % 2 for i in [*range(P + R), *range(P + R * mean_rec, P + R * mean_rec + C)]]
    if tables != gates:
        raise ValueError(f"n_layers_in_recurrent_block={R}, mean_recurrence={mean_rec}, mean_backprop_depth="
                         f"{mean_bwd}: the release then gives value-embedding gates to other layers than its "
                         "tables, and model.py gives each table a gate")
    return GPTConfig(**c, n_prelude=P, n_core=R, n_coda=C, injection=injection, prelude_norm=get("prelude_norm"),
                     init_state=init_state, mean_loops=mean_rec, backprop_loops=mean_bwd,
                     depth_sampling="per-sequence")


def official_name(name, c):
    """The release's name for one of our GPT's weights, or one that c_attn stacks (attn.c_q.weight, ...)."""
    group, _, rest = name.partition(".")
    if group in ("prelude", "core", "coda"):
        i, _, rest = rest.partition(".")
        layer = int(i) + {"prelude": 0, "core": c.n_prelude, "coda": c.n_prelude + c.n_core}[group]
        if rest == "value_embed.weight":        # numbered by the unique layer, in one dict of tables
            return f"value_embeds.{layer}.weight"
        if not c.looped:                        # the Transformer keeps its layers in one list
            return f"transformer.h.{layer}.{rest}"
        return f"transformer.{'core_block' if group == 'core' else group}.{i}.{rest}"
    return {"wte.weight": "transformer.wte.weight", "norm_f.weight": "transformer.ln_f.weight",
            "prelude_norm.weight": "transformer.ln_prelude.weight", "C.weight": "transformer.C.weight",
            "injection.A_log": "transformer.adapter.A_log", "injection.dt_bias": "transformer.adapter.dt_bias",
            "injection.B.weight": "transformer.adapter.B",      # a plain (d, d) parameter there, used as e @ B.T
            "injection.W.weight": "transformer.adapter.adapter.weight"}[name]


def official_names(name, c):
    """The release's names of the weights that make one of ours: c_attn's rows are its c_q, c_k and c_v."""
    if name.endswith(".attn.c_attn.weight"):
        return [official_name(name.replace("c_attn", part), c) for part in ("c_q", "c_k", "c_v")]
    return [official_name(name, c)]


def official_to_gpt(config: dict, state_dict: dict) -> GPT:
    """The release's model (its config.json as a dict, its state dict) as our GPT, in fp32 on the CPU.
    ValueError, naming the field or weight, for anything model.py does not compute exactly as the release."""
    c = gpt_config(config)
    with torch.device("meta"):      # no time spent initialising weights that are about to be replaced
        model = GPT(c)
    # torch.compile and DDP prefix the names of what they wrap
    theirs = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state_dict.items()}
    ours = {}
    for name in model.state_dict():
        keys = official_names(name, c)
        missing = [key for key in keys if key not in theirs]
        if missing:
            raise ValueError(f"the weights have no {missing[0]}")
        parts = [theirs.pop(key).float() for key in keys]
        ours[name] = torch.cat(parts) if len(parts) > 1 else parts[0]     # c_attn: q, k and v stacked by rows
    head = theirs.pop("lm_head.weight", None)       # the same tensor as the embedding (tie_embeddings)
    if head is not None and not torch.equal(head.float(), ours["wte.weight"]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight: the head is not tied")
    freqs = theirs.pop("freqs_cis", None)           # the release's RoPE table: cos and sin, (1, L, 1, D/2, 2)
    if theirs:
        raise ValueError(f"weights model.py has no place for: {', '.join(sorted(theirs)[:4])}")
    try:
        model.load_state_dict(ours, assign=True)
    except RuntimeError as e:
        raise ValueError(f"weights of the wrong shape: {str(e).splitlines()[-1].strip()}")
    # the RoPE tables are buffers, not weights: compute them for real
    model.cos, model.sin = rotary_tables(c.n_embd // c.n_head, c.block_size)
    if freqs is not None:
        L = min(freqs.size(1), c.block_size)
        table = torch.stack([model.cos[:L, 1::2], model.sin[:L, 1::2]], dim=-1)     # each pair's cos and sin
        # cos and sin of the same fp32 angles on another machine differ by a few ulps (< 1e-6); saved in a
        # narrower dtype they are rounded to its precision (eps/2 for values in [-1, 1]). Another base or
        # pairing differs by far more (O(1) at the far positions).
        atol = max(1e-5, torch.finfo(freqs.dtype).eps)
        if freqs.shape[2:] != (1, *table.shape[1:]) or not torch.allclose(freqs[0, :L, 0].float(), table, atol=atol):
            raise ValueError("rope_settings: the weights' RoPE table (freqs_cis) is not model.py's "
                             "(base 50,000, interleaved pairs)")
    return model


# -----------------------------------------------------------------------------
# the tokenizer: a Hugging Face tokenizer.json (byte-level BPE) as a tiktoken Encoding


def byte_level_chars():
    """GPT-2's byte-level alphabet, {character: byte}: the bytes that print (!..~, ¡..¬, ®..ÿ) stand for
    themselves; the others (controls, space, ...) are written as chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, others = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + others)] = b
            others += 1
    return chars


def tiktoken_from_json(path):
    """
    tiktoken Encoding of a tokenizer.json like the authors' (their scripts/tok_train.py): a BPE whose text is
    split by a GPT-4-style regex, then written in the byte-level alphabet. The Hugging Face BPE applies its
    merges in their order; tiktoken merges the pair of parts whose concatenation has the lowest rank. So the
    ranks are the ids, which must grow in merge order, each merge making a new token, and every token but
    the 256 bytes made by a merge (we check all three); then both number tokens alike. That they also split
    alike is what tests/test_hub.py checks, on varied text.
    """
    import tiktoken

    def refuse(why):
        raise SystemExit(f"{path}: {why}; only a byte-level BPE tokenizer.json like the authors' converts")
    try:
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
    except (OSError, ValueError) as e:      # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SystemExit(f"cannot read {path} ({type(e).__name__}: {e}): delete it and download it again")
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or [pre]
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        refuse(f"its model is {model.get('type')}, with subword prefixes or suffixes, not a plain BPE")
    if tok.get("normalizer") or [step.get("type") for step in steps] != ["Split", "ByteLevel"]:
        refuse("it does not just split the text by a regex, then write bytes (no normalizer; a pre_tokenizer "
               "of Split, then ByteLevel)")
    split, byte_level = steps
    if "Regex" not in (split.get("pattern") or {}) or split.get("behavior") != "Isolated" or split.get("invert") \
            or byte_level.get("add_prefix_space") or byte_level.get("use_regex", True):
        refuse("its Split or ByteLevel step has other options than the authors'")
    if (tok.get("decoder") or {}).get("type") != "ByteLevel":
        refuse("its decoder is not ByteLevel")
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = {t: i for t, i in (model.get("vocab") or {}).items() if t not in special}
    chars = byte_level_chars()
    if any(ch not in chars for t in vocab for ch in t):
        refuse("its vocabulary is not written in the byte-level alphabet")
    ranks = {bytes(chars[ch] for ch in t): i for t, i in vocab.items()}
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    if any(bytes([b]) not in ranks for b in range(256)):
        refuse("its vocabulary lacks some of the 256 bytes")
    last = -1
    for a, b in merges:
        rank = vocab.get(a + b, -1) if a in vocab and b in vocab else -1
        if rank <= last:
            refuse(f"merge {a!r} + {b!r} makes no new token, or one with a lower id than the merge before it")
        last = rank
    if len(ranks) != 256 + len(merges):
        refuse("its vocabulary has tokens that no merge makes")
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return tiktoken.Encoding(name, pat_str=split["pattern"]["Regex"], mergeable_ranks=ranks, special_tokens=special)


@functools.lru_cache(maxsize=None)
def load_encoding(name):
    """The tiktoken Encoding of a Hub tokenizer repo, or of a folder, holding tokenizer.json."""
    path = find_file(name, ("tokenizer.json",))
    if path is None:
        raise SystemExit(f"{name} has no tokenizer.json")
    return tiktoken_from_json(path)


def tokenizer_meta(name):
    """meta.json's fields for a tokenizer: its size, and its end- and beginning-of-document tokens. The authors'
    data loader packs documents as <|bos|> text <|eos|> (add_bos, add_eos: on by default), and their evaluation
    and unconditional sampling start from <|bos|>."""
    enc = load_encoding(name)
    if not {BOS_TEXT, EOS_TEXT} <= enc.special_tokens_set:
        raise SystemExit(f"{name}'s tokenizer has no {BOS_TEXT} or {EOS_TEXT} token to mark documents with")
    return dict(vocab_size=enc.n_vocab, eot_token=enc.encode_single_token(EOS_TEXT),
                bos_token=enc.encode_single_token(BOS_TEXT))


# -----------------------------------------------------------------------------
# the three uses: sample.py, train.py and bench/loops.py


def load_pretrained(name):
    """
    (model, meta) of a Hub repo or folder of the release: our GPT (fp32, on the CPU) and the meta.json
    fields of its tokenizer, which is the folder's own tokenizer.json if it has one, else the authors'.
    """
    config_path = find_file(name, ("config.json",))
    if config_path is None:
        raise SystemExit(f"{name} has no config.json: is it one of the authors' model repos or folders?")
    weights_path = find_file(name, WEIGHTS)
    if weights_path is None:
        raise SystemExit(f"{name} has no weights: no {', '.join(WEIGHTS)}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        model = official_to_gpt(config, read_weights(weights_path))
    except ValueError as e:
        raise SystemExit(f"{name}: cannot convert {os.path.basename(config_path)}: {e}")
    own = os.path.isdir(name) and os.path.isfile(os.path.join(name, "tokenizer.json"))
    tokenizer = os.path.abspath(name) if own else TOKENIZER
    meta = {"tokenizer": tokenizer, **tokenizer_meta(tokenizer)}
    if meta["vocab_size"] != model.config.vocab_size:
        raise SystemExit(f"{name} has a vocabulary of {model.config.vocab_size:,} tokens, its tokenizer "
                         f"{tokenizer} one of {meta['vocab_size']:,}")
    return model, meta


def load_for_data(name, data_meta, data_dir, block_size=None):
    """The pretrained model, to train or evaluate on a prepare.py folder: refused if the data were tokenized
    otherwise (their token ids would mean other tokens to it), or if block_size is longer than its own."""
    model, meta = load_pretrained(name)
    data, ours = (data_meta["tokenizer"], data_meta["vocab_size"]), (meta["tokenizer"], meta["vocab_size"])
    if data != ours:
        raise SystemExit(f"{data_dir} was tokenized with {data[0]} (vocab {data[1]:,}), but {name} reads "
                         f"{ours[0]} (vocab {ours[1]:,}): prepare the data with python prepare.py ... "
                         f"--tokenizer {ours[0]}")
    if block_size and block_size > model.config.block_size:
        raise SystemExit(f"block_size={block_size} is longer than {name}'s {model.config.block_size}")
    return model
