"""
The authors' pretrained Parcae models and their tokenizer, from the Hugging Face Hub, as this
project's GPT and a tiktoken Encoding.

    python sample.py --init_from=SandyResearch/parcae-140m --loops 16 --start "The sea"
    python prepare.py --source fineweb-edu --tokenizer SandyResearch/parcae-tokenizer
    python train.py CONFIG --data_dir=data/fineweb-edu-parcae-tokenizer --init_from=SandyResearch/parcae-140m
    python bench/loops.py --data_dir=data/fineweb-edu-parcae-tokenizer --init_from=SandyResearch/parcae-140m@main

The models are parcae-140m, parcae-370m, parcae-770m and parcae-1.3b. NAME@REVISION pins a branch, tag
or commit (the default is main); --init_from also takes a folder holding config.json and the weights. A
model repo holds the fields of the release's ParcaeConfig (or GPTConfig) in config.json, and a state dict
in model.safetensors, pytorch_model.bin or model.pt. official_to_gpt() turns the two into our GPT, and
refuses, naming the field, anything model.py does not compute exactly as the release does.

Files come through huggingface_hub, as every Hub user's do: from the shared cache ($HF_HOME/hub, which
`hf download` fills too) when it holds them, else downloaded into it; with the token of `hf auth login`
(or HF_TOKEN) for a gated or private repo; from HF_ENDPOINT if set; from the cache alone under
HF_HUB_OFFLINE=1. All of a model's files come from one commit. Weights are data, never code: safetensors,
or a pickle read with torch.load(weights_only=True).
"""
import functools
import hashlib
import importlib
import json
import os
import re

import torch

from model import GPT, GPTConfig, rotary_tables

TOKENIZER = "SandyResearch/parcae-tokenizer"    # the tokenizer of all the authors' models
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pt")    # the first one a repo has is read
BOS_TEXT, EOS_TEXT = "<|bos|>", "<|eos|>"       # how the tokenizer writes its special tokens

# -----------------------------------------------------------------------------
# the Hub, through huggingface_hub


def package(name):
    """Import huggingface_hub or safetensors where a path needs them: the rest runs without them."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise SystemExit(f"this needs the {name.partition('.')[0]} package: pip install -r requirements.txt")


def split_name(name):
    """owner/name[@revision] -> (owner/name, revision or None), or a clear error for anything else (nothing
    that could name a path outside the cache: the cache keeps a revision's commit in refs/<revision>)."""
    repo, at, revision = name.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo, re.ASCII) or ".." in name \
            or (at and not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", revision, re.ASCII)):
        raise SystemExit(f"{name!r} is neither a folder nor a Hugging Face repo name such as "
                         "SandyResearch/parcae-140m (or SandyResearch/parcae-140m@<branch, tag or commit>)")
    return repo, revision or None


def hub_file(repo, filename, revision=None, repo_type=None):
    """
    The local path of `filename` in a Hub repo at `revision` (a branch, tag or commit; default main), or
    None if the repo has no such file. huggingface_hub asks the Hub which commit the revision is at (unless
    it is a commit already cached, or we are offline) and serves that commit's file from the shared cache,
    downloading it there first if need be: a dropped connection resumes with a Range request, and the size
    is checked. The cache keeps each file under the Hub's hash of it (a large file's sha256, a small one's
    git object hash); since the library checks only the size, a file new to the cache is checked against
    that hash here. Every failure is one line that says what to do.
    """
    hf = package("huggingface_hub")
    from huggingface_hub import constants, errors
    what = f"{repo}{'@' + revision if revision else ''}/{filename}"
    dataset = repo_type == "dataset"
    page = constants.ENDPOINT + ("/datasets/" if dataset else "/") + repo
    before = hf.try_to_load_from_cache(repo, filename, revision=revision, repo_type=repo_type)
    try:
        path = hf.hf_hub_download(repo, filename, revision=revision, repo_type=repo_type)
    except errors.GatedRepoError:    # (a kind of RepositoryNotFoundError: first)
        raise SystemExit(f"{repo} is gated: accept its conditions at {page} while logged in, then log in "
                         "here too (`hf auth login`, or set HF_TOKEN)")
    except errors.RepositoryNotFoundError:
        raise SystemExit(f"{page} is not a repo you can read: check the name; if it is private, log in "
                         "(`hf auth login`, or set HF_TOKEN)")
    except errors.RevisionNotFoundError:
        raise SystemExit(f"{repo} has no revision {revision!r}: give one of its branches, tags or commits")
    except errors.LocalEntryNotFoundError:       # (a kind of EntryNotFoundError: before it)
        if constants.HF_HUB_OFFLINE:
            download = f"hf download {repo}" + (" --repo-type dataset" if dataset else "")
            raise SystemExit(f"HF_HUB_OFFLINE is set and the cache ({constants.HF_HUB_CACHE}) does not hold "
                             f"{what}: run once with a connection (or `{download}`), or unset HF_HUB_OFFLINE")
        raise SystemExit(f"could not reach {constants.ENDPOINT} for {what}, and the cache does not hold it: "
                         "check your connection (and HF_ENDPOINT)" +
                         ("" if dataset else ", or pass a folder that holds the files"))
    except errors.EntryNotFoundError:
        return None
    except errors.HfHubHTTPError as e:
        raise SystemExit(f"the Hub answered HTTP {getattr(e.response, 'status_code', '?')} for {what}: try again "
                         "later")
    except OSError as e:        # the size did not match, the disk is full, ...
        raise SystemExit(f"could not download {what} ({str(e).splitlines()[0]}): run the same command again")
    except Exception as e:
        # a connection that keeps failing ends in the HTTP client's own error (httpx2; httpx or requests
        # in older huggingface_hub versions); anything else is a bug, and keeps its traceback
        if type(e).__module__.partition(".")[0] not in ("httpx2", "httpx", "requests", "urllib3"):
            raise
        raise SystemExit(f"the download of {what} failed ({type(e).__name__}: {e}): run the same command again")
    if not (isinstance(before, str) and os.path.samefile(before, path)):
        check_hash(path, what)
    return path


def check_hash(path, what):
    """Refuse, and delete, a file of the cache whose content is not the hash it is kept under."""
    blob = os.path.realpath(path)
    want = os.path.basename(blob)
    if re.fullmatch(r"[0-9a-f]{64}", want):
        h = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", want):
        h = hashlib.sha1(b"blob %d\0" % os.path.getsize(blob))     # git's hash of a file
    else:
        return      # a cache on a file system without links keeps the file itself, under its own name
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != want:
        for p in {blob, path}:
            os.remove(p)
        raise SystemExit(f"{what} arrived corrupt (its hash is {h.hexdigest()}, the Hub's {want}): deleted it; "
                         "run the same command again")


def snapshot_commit(path):
    """The commit a cached file belongs to: the cache keeps each commit's files in snapshots/<commit>/."""
    return os.path.basename(os.path.dirname(path))


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# a model's files, and its weights: data, never code


def model_files(name):
    """(config.json, weights, its own tokenizer.json or None) of a folder, or of a Hub repo at one commit."""
    if os.path.isdir(name):
        found = lambda f: os.path.join(name, f) if os.path.isfile(os.path.join(name, f)) else None
        return found("config.json"), next(filter(None, map(found, WEIGHTS)), None), found("tokenizer.json")
    repo, revision = split_name(name)
    config = hub_file(repo, "config.json", revision)
    if config is None:
        return None, None, None
    commit = snapshot_commit(config)        # the weights come from the config's commit, whatever main is now
    hf = package("huggingface_hub")
    cached = [hf.try_to_load_from_cache(repo, f, revision=commit) for f in WEIGHTS]
    weights = next((p for p in cached if isinstance(p, str)), None)     # (which works offline, too)
    for f in WEIGHTS:
        if weights is None:
            weights = hub_file(repo, f, commit)
    return config, weights, None


def read_weights(path):
    if path.endswith(".safetensors"):
        safetensors = package("safetensors.torch")
        try:
            return safetensors.load_file(path)
        except Exception as e:      # safetensors raises its own SafetensorError for a damaged file
            raise SystemExit(f"{path} is not a safetensors file we can read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}): delete it and download it again")
    try:        # weights_only: a pickle that would run code is refused
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"could not read {path} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         "delete it and download it again")
    if not (isinstance(state_dict, dict) and all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise SystemExit(f"{path} is not a state dict (a dict of tensors)")
    return state_dict


# -----------------------------------------------------------------------------
# the release's config.json and weights -> our GPT (MODEL.md sections 2-4, 6; the release's Parcae and GPT classes)

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


def find_tokenizer(name, folder=None, sha256=None):
    """
    (path, portable name) of the tokenizer.json that `name` means: a folder holding one, named then by its
    content (sha256:<hex>), since a folder is one machine's; a Hub repo owner/name[@revision], named by the
    commit it resolves to (owner/name@<commit>); or either portable name, as meta.json records it. A copy in
    `folder` whose sha256 is the one expected (`sha256`, or the name's own) comes first, and needs no
    network: prepare.py keeps one beside the data, and train.py one beside each checkpoint.
    """
    if name.startswith("sha256:"):
        sha256 = name.removeprefix("sha256:")
    copy = os.path.join(folder, "tokenizer.json") if folder else None
    if sha256 and copy and os.path.isfile(copy):
        if file_sha256(copy) != sha256:
            raise SystemExit(f"{copy} is not the tokenizer {name} (its sha256 differs): put that one there, or "
                             "remake the data with prepare.py")
        return copy, name
    if name.startswith("sha256:"):
        raise SystemExit(f"the tokenizer {name[:19]}… was a local tokenizer.json, and {copy or 'no folder'} holds "
                         "no copy of it: copy the tokenizer.json of the data folder there")
    if os.path.isdir(name):
        path = os.path.join(name, "tokenizer.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{name} has no tokenizer.json")
        return path, "sha256:" + file_sha256(path)
    repo, revision = split_name(name)
    path = hub_file(repo, "tokenizer.json", revision)
    if path is None:
        raise SystemExit(f"{name} has no tokenizer.json")
    return path, f"{repo}@{snapshot_commit(path)}"


def load_tokenizer(name, folder=None, sha256=None):
    """
    (tiktoken Encoding, meta.json's fields) of a pretrained tokenizer (find_tokenizer's arguments): its
    portable name and sha256, its size, and its end- and beginning-of-document tokens. The authors' data
    loader packs documents as <|bos|> text <|eos|> (add_bos, add_eos: on by default), and their evaluation
    and unconditional sampling start from <|bos|>: so do prepare.py and sample.py.
    """
    enc, fields = cached_tokenizer(name, folder, sha256)
    return enc, dict(fields)


@functools.lru_cache(maxsize=None)      # prepare.py's workers ask for it once per batch of documents
def cached_tokenizer(name, folder, sha256):
    path, portable = find_tokenizer(name, folder, sha256)
    enc = tiktoken_from_json(path)
    if not {BOS_TEXT, EOS_TEXT} <= enc.special_tokens_set:
        raise SystemExit(f"{name}'s tokenizer has no {BOS_TEXT} or {EOS_TEXT} token to mark documents with")
    return enc, dict(tokenizer=portable, tokenizer_sha256=file_sha256(path), vocab_size=enc.n_vocab,
                     eot_token=enc.encode_single_token(EOS_TEXT), bos_token=enc.encode_single_token(BOS_TEXT))


# -----------------------------------------------------------------------------
# the three uses: sample.py, train.py and bench/loops.py


def load_pretrained(name):
    """
    (model, meta) of a Hub repo (owner/name[@revision]) or folder of the release: our GPT (fp32, on the
    CPU) and the meta.json fields of its tokenizer, which is the folder's own tokenizer.json if it has one,
    else the authors'.
    """
    config_path, weights_path, own_tokenizer = model_files(name)
    if config_path is None:
        raise SystemExit(f"{name} has no config.json: is it one of the authors' model repos or folders?")
    if weights_path is None:
        raise SystemExit(f"{name} has no weights: no {', '.join(WEIGHTS)}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        model = official_to_gpt(config, read_weights(weights_path))
    except ValueError as e:
        raise SystemExit(f"{name}: cannot convert {os.path.basename(config_path)}: {e}")
    _, meta = load_tokenizer(name if own_tokenizer else TOKENIZER)
    if meta["vocab_size"] != model.config.vocab_size:
        raise SystemExit(f"{name} has a vocabulary of {model.config.vocab_size:,} tokens, its tokenizer "
                         f"{meta['tokenizer']} one of {meta['vocab_size']:,}")
    return model, meta


def load_for_data(name, data_meta, data_dir, block_size=None):
    """The pretrained model, to train or evaluate on a prepare.py folder: refused if the data were tokenized
    otherwise (their token ids would mean other tokens to it), or if block_size is longer than its own. The
    same tokenizer is the same tokenizer.json, whatever it is called: the hashes are compared."""
    model, meta = load_pretrained(name)
    data = (data_meta.get("tokenizer_sha256"), data_meta["vocab_size"])
    if data != (meta["tokenizer_sha256"], meta["vocab_size"]):
        own = meta["tokenizer"].startswith("sha256:")       # the folder's own tokenizer.json
        raise SystemExit(f"{data_dir} was tokenized with {data_meta['tokenizer']} (vocab {data[1]:,}), but {name} "
                         f"reads {meta['tokenizer']} (vocab {meta['vocab_size']:,}): prepare the data with python "
                         f"prepare.py ... --tokenizer {name if own else TOKENIZER}")
    if block_size and block_size > model.config.block_size:
        raise SystemExit(f"block_size={block_size} is longer than {name}'s {model.config.block_size}")
    return model
