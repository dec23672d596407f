"""
Turn a text corpus into the token files that train.py reads.

    python prepare.py                                   # stdlib, char tokenizer -> data/stdlib
    python prepare.py --source shakespeare              # gpt2 tokenizer -> data/shakespeare
    python prepare.py --source fineweb-edu --num_shards 2
    python prepare.py --input notes/ book.txt --tokenizer char
    python prepare.py --input $(python -c "import site; print(site.getsitepackages()[0])") \
        --suffix .py --tokenizer char --name sitepkg      # the Python sources of the installed packages
    python prepare.py --input $(python -c "import site; print(site.getsitepackages()[0])") \
        --suffix .py .h .hpp --tokenizer byte --name code # and their C/C++ headers, as UTF-8 bytes
    python prepare.py --source fineweb-edu --tokenizer SandyResearch/parcae-tokenizer
    python prepare.py --source fineweb-edu@<commit> --num_shards 14    # a pinned revision of the dataset

It writes data/<name>/train.bin and val.bin (flat uint16 token ids, one
end-of-text token after each document) and data/<name>/meta.json, which says
how to decode them: tokenizer ("char", "byte", "gpt2", or a pretrained model's:
see below), vocab_size, eot_token, train_tokens, val_tokens, train_docs, val_docs,
source (a description) and, for char, chars: the vocabulary as one string, where
a character's id is its position and the end-of-text id is len(chars). byte
needs no table: a token is one byte of the text's UTF-8 (ids 0-255), and the
end-of-text id is 256; so any text encodes, and a small model's LM head costs
next to nothing (257 logits).
load_tokenizer(meta) gives encode/decode for any of them. <name> defaults to the
source name ("text" for --input), with "-<tokenizer>" appended when the
tokenizer is not that source's default, so different tokenizations never
overwrite each other.

--tokenizer also takes a pretrained model's tokenizer, to fine-tune it (hub.py):
a Hugging Face repo name such as SandyResearch/parcae-tokenizer (the authors'
models'; NAME@REVISION pins a branch, tag or commit), or a folder holding a
tokenizer.json. Documents are then written as the authors' data loader packs
them, <|bos|> text <|eos|>; eot_token is <|eos|> and meta.json also records
bos_token. meta.json names the tokenizer so that the name works on any machine:
a repo by the commit it resolved to (SandyResearch/parcae-tokenizer@<commit>),
a folder's tokenizer.json by its content (sha256:<hex>); tokenizer_sha256 is
the file's hash, and a copy of it, tokenizer.json, goes beside meta.json.

Sources and how each is split into train/val:
  stdlib       (default, no download) the top-level *.py files of this Python's
               standard library (sysconfig.get_paths()["stdlib"], no subfolders),
               sorted by file name, one document per file. Documents 0, 10, 20, ...
               go to val (~14%, ~660 KB on Python 3.11). Default tokenizer: char.
  shakespeare  Tiny Shakespeare (one 1 MB file, downloaded once and kept in
               data/<name>/input.txt). The last 10% (cut at a line start) is val.
  fineweb-edu  --num_shards parquet files of sample/10BT of the Hugging Face
               dataset HuggingFaceFW/fineweb-edu (fineweb-edu@REVISION pins
               one), through huggingface_hub: into the shared Hub cache
               ($HF_HOME/hub), resumed, size- and hash-checked, and read from
               there by any later run or project. Each shard is tokenized (in
               parallel) once, kept in data/<name>/shards/, and skipped on a
               re-run, whatever the revision: delete that folder to start
               afresh. Val is the first 1% of the first shard's documents, so
               it stays the same whatever --num_shards is.
  --input      local text files or folders (searched recursively, sorted, hidden
               names skipped; binary or non-UTF-8 files are skipped and counted;
               in folders, --suffix .py keeps only names that end so). A file
               whose content was seen already (a vendored copy) is dropped.
               One file = one document, split like stdlib; a single document is
               split 90/10 like shakespeare.
The default tokenizer is gpt2 for everything but stdlib; --tokenizer overrides it.
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import urllib.error
import urllib.request
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

EOT_TEXT = "<|endoftext|>"  # how both tokenizers write the end-of-text token as text
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB = "HuggingFaceFW/fineweb-edu"  # a dataset repo on the Hub; its sample/10BT/ holds the shards
SOURCES = ("stdlib", "shakespeare", "fineweb-edu")

# -----------------------------------------------------------------------------
# tokenizers


def get_gpt2():
    """tiktoken's GPT-2 encoding. Its BPE files are downloaded on first use, so say what to do offline."""
    import tiktoken  # imported here so that char-only users never need it
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; ValueError = bad hash
        raise SystemExit(f"could not load the GPT-2 tokenizer files ({type(e).__name__}): connect to the internet "
                         "once so tiktoken can cache them, or set TIKTOKEN_CACHE_DIR to a folder that holds them")


def get_encoding(tokenizer, folder=None, sha256=None):
    """tiktoken Encoding of gpt2 or of a pretrained model's tokenizer, and meta.json's fields for it. A
    pretrained tokenizer is named as --tokenizer or meta.json names it; the copy of its tokenizer.json in
    folder, if its sha256 is the one given, is read first (hub.find_tokenizer)."""
    if tokenizer == "gpt2":
        enc = get_gpt2()
        return enc, dict(vocab_size=enc.n_vocab, eot_token=enc.eot_token)
    import hub  # only a pretrained model's tokenizer needs it
    return hub.load_tokenizer(tokenizer, folder, sha256)


def load_tokenizer(meta, folder=None):
    """(encode, decode) for a meta.json dict, whose pretrained tokenizer may be the tokenizer.json kept in
    folder (beside the data, or a checkpoint). Each tokenizer renders its special tokens as text (the
    end-of-text token as EOT_TEXT for char and gpt2, as <|eos|> for a pretrained model's) and
    encodes that text back to them, so decode(encode(s)) == s."""
    if meta["tokenizer"] == "byte":
        return byte_encode, byte_decode
    if meta["tokenizer"] != "char":
        enc = get_encoding(meta["tokenizer"], folder, meta.get("tokenizer_sha256"))[0]
        special = {EOT_TEXT} if meta["tokenizer"] == "gpt2" else "all"
        return (lambda s: enc.encode(s, allowed_special=special)), enc.decode
    chars, eot = meta["chars"], meta["eot_token"]
    encode_text, itos = char_encoder(chars), list(chars) + [EOT_TEXT]

    def encode(s):
        ids = []
        for i, part in enumerate(s.split(EOT_TEXT)):
            ids += ([eot] if i else []) + encode_text(part)
        return ids
    return encode, lambda ids: "".join(itos[i] for i in ids)


BYTE_EOT = 256      # the byte tokenizer's end-of-text id, after the 256 byte values


def byte_encode(s):
    ids = []
    for i, part in enumerate(s.split(EOT_TEXT)):
        ids += ([BYTE_EOT] if i else []) + list(part.encode("utf-8"))
    return ids


def byte_decode(ids):
    """Bytes back to text. A sampled sequence need not be valid UTF-8 (a character cut at the end, a byte
    the model got wrong): each invalid byte becomes U+FFFD rather than an error."""
    parts, run = [], []
    for i in ids:
        if i == BYTE_EOT:
            parts += [bytes(run).decode("utf-8", errors="replace"), EOT_TEXT]
            run = []
        else:
            run.append(i)
    return "".join(parts) + bytes(run).decode("utf-8", errors="replace")


def char_encoder(chars):
    """text -> the positions of its characters in chars (no special tokens)."""
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(text):
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char tokenizer's vocabulary") from None
    return encode


# -----------------------------------------------------------------------------
# sources: each returns (train documents, val documents, description)


def download(url, path, hint):
    """Fetch url to path unless path exists. The download goes to a .part file that is renamed
    only when complete, so an interrupted run never leaves a truncated file that looks finished."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"download {os.path.basename(path)}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, HTTPError, refused connection, no DNS, timeout are all OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        why = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise SystemExit(f"prepare.py: could not download {url} ({why}); {hint}")
    os.replace(tmp, path)


def split_every_10th(docs):
    return [d for i, d in enumerate(docs) if i % 10], docs[::10]


def split_90_10(text):
    """One long text -> ([first 90%], [last 10%]), cut at the start of a line when there is one."""
    k = len(text) * 9 // 10
    nl = text.rfind("\n", 0, k)
    cut = nl + 1 if nl >= 0 else k
    return [text[:cut]], [text[cut:]]


def stdlib_docs():
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py") and os.path.isfile(os.path.join(root, n)))
    docs = []
    for n in names:
        with open(os.path.join(root, n), encoding="utf-8") as f:  # PEP 3120: stdlib source is UTF-8
            docs.append(f.read())
    desc = f"Python {platform.python_version()} standard library: {len(docs)} top-level .py files of {root}"
    return *split_every_10th(docs), desc


def shakespeare_docs(folder, url):
    path = os.path.join(folder, "input.txt")
    download(url, path, "connect to the internet, or pass --input with a local copy of Tiny Shakespeare's input.txt")
    with open(path, encoding="utf-8") as f:
        return *split_90_10(f.read()), f"Tiny Shakespeare from {url}"


def text_docs(inputs, suffixes=()):
    files = []
    for p in inputs:
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skips .git and friends
                files += [os.path.join(root, n) for n in sorted(names)
                          if not n.startswith(".") and (not suffixes or n.endswith(tuple(suffixes)))]
        else:
            raise SystemExit(f"prepare.py: {p} is not a file or folder; check the --input path")
    docs, skipped, seen, duplicates = [], 0, set(), 0
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
            if not data or b"\0" in data:  # a NUL byte: almost surely binary, even if it decodes
                raise ValueError
            text = data.decode("utf-8")
        except (OSError, ValueError):  # unreadable (a broken link, say); UnicodeDecodeError is a ValueError
            skipped += 1
            continue
        # the same content twice (vendored copies of a package, say) would put a document in
        # both train and val, and weigh it double: keep the first in path order
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in seen:
            duplicates += 1
        else:
            seen.add(digest)
            docs.append(text)
    if skipped:
        print(f"skipped {skipped} unreadable, empty, binary or non-UTF-8 file(s)")
    if duplicates:
        print(f"dropped {duplicates} file(s) whose content an earlier file has")
    if not docs:
        raise SystemExit(f"prepare.py: no text files in {' '.join(inputs)} ({skipped} skipped as unreadable, empty, "
                         "binary or non-UTF-8); pass UTF-8 text files or folders that contain some")
    split = split_90_10(docs[0]) if len(docs) == 1 else split_every_10th(docs)
    kept = f" named *{' *'.join(suffixes)} in folders" if suffixes else ""
    return *split, (f"{len(docs)} local text file(s){kept} from {', '.join(inputs)} "
                    f"({duplicates} duplicate(s) dropped)")


# -----------------------------------------------------------------------------
# fineweb-edu: too big for memory, so it streams through per-shard token files


def framed(stats, docs):
    """Each document's ids as the tokenizer's data have them: after its BOS token if it has one, then EOT.
    A pretrained model's tokenizer has both: <|bos|> text <|eos|>, as the authors' data loader packs
    documents, and as their evaluation and sampling begin one."""
    bos = [stats["bos_token"]] if "bos_token" in stats else []
    return [bos + d + [stats["eot_token"]] for d in docs]


def _encode_batch(job):
    """Pool worker: (tokenizer, its folder, a batch of documents) -> one uint16 array of the framed documents."""
    tokenizer, folder, texts = job
    enc, stats = get_encoding(tokenizer, folder)  # cached, so this is cheap after the first call in each worker
    return len(texts), next(bpe_token_chunks(texts, enc, stats, batch=max(1, len(texts))))


def tokenize_parquet(src, dst, num_proc, tokenizer, folder):
    try:
        import pyarrow.parquet as pq  # only this source reads parquet
    except ImportError:
        raise SystemExit("prepare.py: the fineweb-edu source needs pyarrow to read parquet files: pip install pyarrow")
    try:
        pf = pq.ParquetFile(src)
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        pf = None
    if pf is None or "text" not in pf.schema_arrow.names:
        raise SystemExit(f"prepare.py: {src} is not a parquet file with a 'text' column; delete it and run again")
    tmp = dst + ".tmp"
    with Pool(num_proc) as pool, open(tmp, "wb") as f, \
            tqdm(total=pf.metadata.num_rows, unit="docs", desc=f"tokenize {os.path.basename(src)}") as bar:
        # a few thousand documents at a time: Pool.imap would read the whole shard into memory
        for batch in pf.iter_batches(batch_size=8192, columns=["text"]):
            texts = [t or "" for t in batch.column("text").to_pylist()]
            jobs = [(tokenizer, folder, texts[i:i + 256]) for i in range(0, len(texts), 256)]
            for n, ids in pool.imap(_encode_batch, jobs):
                ids.tofile(f)
                bar.update(n)
    os.replace(tmp, dst)


def doc_ends(path, eot):
    """Token offsets just past each end-of-text token in a uint16 file, read in chunks."""
    ends, offset = [np.zeros(0, dtype=np.int64)], 0
    with open(path, "rb") as f:
        while (chunk := np.fromfile(f, dtype=np.uint16, count=1 << 24)).size:
            ends.append(np.flatnonzero(chunk == eot) + offset + 1)
            offset += chunk.size
    return np.concatenate(ends)


def prepare_fineweb(folder, revision, num_shards, num_proc, tokenizer):
    """Download and tokenize the shards not done yet, then write train.bin/val.bin from them."""
    stats = get_encoding(tokenizer, folder)[1]  # fail early, before any download, if the tokenizer is missing
    eot = stats["eot_token"]
    shards = []
    for i in range(num_shards):
        name = f"{i:03d}_00000"
        tokens = os.path.join(folder, "shards", name + ".bin")
        if not os.path.exists(tokens):  # tokenized already: no download needed
            import hub  # huggingface_hub does the downloading (hub.hub_file)
            parquet = hub.hub_file(FINEWEB, f"sample/10BT/{name}.parquet", revision, repo_type="dataset")
            if parquet is None:
                raise SystemExit(f"prepare.py: {FINEWEB} has no sample/10BT/{name}.parquet: --num_shards={num_shards} "
                                 "is more than it holds")
            os.makedirs(os.path.dirname(tokens), exist_ok=True)
            tokenize_parquet(parquet, tokens, num_proc, tokenizer, folder)
        shards.append(tokens)
    ends = [doc_ends(p, eot) for p in shards]
    if len(ends[0]) < 2:
        raise SystemExit(f"prepare.py: {shards[0]} holds {len(ends[0])} document(s); need at least 2 to split off val")
    n_val = max(1, len(ends[0]) // 100)
    cut = int(ends[0][n_val - 1])  # token offset where shard 0's first train document starts

    def write_val(f):
        with open(shards[0], "rb") as s:
            np.fromfile(s, dtype=np.uint16, count=cut).tofile(f)

    def write_train(f):
        for i, p in enumerate(shards):
            with open(p, "rb") as s:
                s.seek(2 * cut if i == 0 else 0)
                shutil.copyfileobj(s, f)
    atomic_write(os.path.join(folder, "val.bin"), write_val)
    atomic_write(os.path.join(folder, "train.bin"), write_train)
    tokens, docs = sum(os.path.getsize(p) // 2 for p in shards), sum(len(e) for e in ends)
    return dict(stats, train_tokens=tokens - cut, train_docs=docs - n_val, val_tokens=cut, val_docs=n_val)


# -----------------------------------------------------------------------------


def atomic_write(path, fill):
    """Write via a temp file and os.replace, so a reader (or a crash) never sees a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        fill(f)
    os.replace(tmp, path)


def char_vocabulary(docs):
    """Every character that occurs in docs, sorted by code point, as one string (a character's id is its position)."""
    counts = np.zeros(0x110000, dtype=np.int64)     # one counter per Unicode code point
    for codes, _ in code_point_chunks(docs):
        counts += np.bincount(codes, minlength=counts.size)
    return "".join(map(chr, np.flatnonzero(counts)))


def code_point_chunks(docs, batch=1024):
    """(the code points of a batch of documents as one array, their lengths), a batch at a time. numpy reads
    the code points from the UTF-32 bytes: a Python loop over a few hundred million characters takes minutes."""
    for i in range(0, len(docs), batch):
        text = "".join(docs[i:i + batch]).encode("utf-32-le", errors="surrogatepass")
        yield np.frombuffer(text, dtype="<u4"), [len(d) for d in docs[i:i + batch]]


def char_token_chunks(docs, chars, eot, batch=1024):
    """uint16 ids of docs (each character's position in chars), an EOT after each document: the ids
    char_encoder gives, but by a lookup table indexed by code point."""
    table = np.zeros(0x110000, dtype=np.uint16)
    table[[ord(c) for c in chars]] = np.arange(len(chars))
    for codes, lengths in code_point_chunks(docs, batch):
        yield np.insert(table[codes], np.cumsum(lengths), eot)


def byte_token_chunks(docs, batch=1024):
    """uint16 ids of docs as their UTF-8 bytes, an EOT (256) after each document."""
    for i in range(0, len(docs), batch):
        data = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8) for d in docs[i:i + batch]]
        yield np.insert(np.concatenate(data).astype(np.uint16), np.cumsum([d.size for d in data]), BYTE_EOT)


def bpe_token_chunks(docs, enc, stats, batch=1024):
    """uint16 ids of docs by a tiktoken Encoding, each document framed as its tokenizer's data are."""
    for i in range(0, len(docs), batch):   # a batch at a time: the ids of all docs as Python ints would be huge
        # ordinary: a special token's text inside a document (a literal "<|endoftext|>") stays text
        yield np.array([t for d in framed(stats, enc.encode_ordinary_batch(docs[i:i + batch])) for t in d],
                       dtype=np.uint16)


def write_tokens(path, chunks):
    """Write the uint16 arrays one after another, atomically; return the number of tokens."""
    def fill(f):
        for ids in chunks:
            ids.tofile(f)
    atomic_write(path, fill)
    return os.path.getsize(path) // 2


def write_docs(folder, train_docs, val_docs, tokenizer):
    """Tokenize documents held in memory into train.bin/val.bin; return meta.json's numbers."""
    if tokenizer == "char":
        chars = char_vocabulary(train_docs + val_docs)
        stats = dict(vocab_size=len(chars) + 1, eot_token=len(chars))
        encode_all = lambda docs: char_token_chunks(docs, chars, stats["eot_token"])
    elif tokenizer == "byte":
        stats = dict(vocab_size=BYTE_EOT + 1, eot_token=BYTE_EOT)
        encode_all = byte_token_chunks
    else:
        enc, stats = get_encoding(tokenizer, folder)
        encode_all = lambda docs: bpe_token_chunks(docs, enc, stats)
    if stats["vocab_size"] > 1 << 16:
        raise SystemExit(f"prepare.py: a vocabulary of {stats['vocab_size']} does not fit the uint16 token "
                         "files (at most 65536); use --tokenizer gpt2, or text with fewer distinct characters")
    os.makedirs(folder, exist_ok=True)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        n = write_tokens(os.path.join(folder, f"{split}.bin"), encode_all(docs))
        stats.update({f"{split}_tokens": n, f"{split}_docs": len(docs)})
    if tokenizer == "char":
        stats["chars"] = chars  # last, as it is by far the longest field
    return stats


def prepare(source=None, inputs=None, tokenizer=None, name=None, out_dir="data",
            url=None, num_shards=1, num_proc=None, suffixes=()):
    """Prepare one corpus (see the module docstring) and return the folder it was written to."""
    if source and inputs:
        raise SystemExit("prepare.py: give either --source or --input, not both")
    if suffixes and not inputs:
        raise SystemExit("prepare.py: --suffix filters the files of --input folders; give --input too")
    source = "text" if inputs else (source or "stdlib")
    source, at, revision = source.partition("@")  # fineweb-edu@REVISION: the Hub dataset at that revision
    if at and source != "fineweb-edu":
        raise SystemExit(f"prepare.py: only fineweb-edu comes from the Hub, with a revision; {source} has none")
    if source not in SOURCES + ("text",):
        raise SystemExit(f"prepare.py: unknown source {source!r}; "
                         f"choose one of {', '.join(SOURCES)}, or pass --input FILES")
    default_tokenizer = "char" if source == "stdlib" else "gpt2"
    tokenizer = tokenizer or default_tokenizer
    if tokenizer not in ("char", "byte", "gpt2") and "/" not in tokenizer and not os.path.isdir(tokenizer):
        raise SystemExit(f"prepare.py: unknown tokenizer {tokenizer!r}; choose char, byte or gpt2, or a pretrained "
                         "model's: a Hugging Face repo such as SandyResearch/parcae-tokenizer, or a folder")
    if source == "fineweb-edu" and tokenizer == "char":
        raise SystemExit("prepare.py: fineweb-edu is not for the char tokenizer: its web text has thousands of "
                         "distinct characters, which make a poor (and possibly > 65536 entry) char vocabulary")
    if source == "fineweb-edu" and tokenizer == "byte":
        raise SystemExit("prepare.py: fineweb-edu is tokenized shard by shard with a BPE (gpt2 or a pretrained "
                         "model's); for bytes, pass local text files with --input")
    if num_shards < 1:
        raise SystemExit("prepare.py: --num_shards must be at least 1")
    if url and source != "shakespeare":
        raise SystemExit(f"prepare.py: --url is where shakespeare comes from; {source} has none (fineweb-edu comes "
                         "from the Hugging Face Hub: HF_ENDPOINT picks another Hub, fineweb-edu@REVISION a revision)")
    # SandyResearch/parcae-tokenizer@<revision> -> parcae-tokenizer
    suffix = os.path.basename(tokenizer.rstrip("/")).partition("@")[0]
    folder = os.path.join(out_dir, name or (source if tokenizer == default_tokenizer else f"{source}-{suffix}"))
    if tokenizer not in ("char", "byte", "gpt2"):  # a pretrained model's: found once, given a name that travels
        import hub
        path, tokenizer = hub.find_tokenizer(tokenizer)
        os.makedirs(folder, exist_ok=True)
        copy = os.path.join(folder, "tokenizer.json")  # the data carry their tokenizer: it needs no network
        if not (os.path.exists(copy) and os.path.samefile(path, copy)):
            shutil.copyfile(path, copy)

    if source == "fineweb-edu":  # too big for memory: streamed through per-shard token files
        desc = (f"FineWeb-Edu sample/10BT ({FINEWEB} at {revision or 'main'}), {num_shards} shard(s); "
                "val = first 1% of shard 0's documents")
        stats = prepare_fineweb(folder, revision or None, num_shards, num_proc or os.cpu_count(), tokenizer)
    else:
        if source == "stdlib":
            train_docs, val_docs, desc = stdlib_docs()
        elif source == "shakespeare":
            train_docs, val_docs, desc = shakespeare_docs(folder, url or SHAKESPEARE_URL)
        else:
            train_docs, val_docs, desc = text_docs(inputs, suffixes)
        stats = write_docs(folder, train_docs, val_docs, tokenizer)
    meta = {"tokenizer": tokenizer, "source": desc, **stats}
    # meta.json goes last: it is what says the folder is complete
    atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    print(f"{folder}: {tokenizer} tokenizer, vocab {meta['vocab_size']:,}; train {meta['train_tokens']:,} tokens "
          f"({meta['train_docs']:,} docs), val {meta['val_tokens']:,} tokens ({meta['val_docs']:,} docs)")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help=f"one of {', '.join(SOURCES)} (default: stdlib); fineweb-edu@REVISION pins "
                   "a branch, tag or commit of the dataset")
    p.add_argument("--input", nargs="+", metavar="PATH", help="local text files or folders instead of a source")
    p.add_argument("--suffix", nargs="+", action="extend", default=[], metavar="SUFFIX",
                   help="--input folders: read only the files whose names end so, e.g. --suffix .py .pyi")
    p.add_argument("--tokenizer", help="char | byte | gpt2 | a pretrained model's: a Hugging Face repo such as "
                   "SandyResearch/parcae-tokenizer (NAME@REVISION pins one), or a folder with a tokenizer.json "
                   "(default: char for stdlib, gpt2 otherwise)")
    p.add_argument("--name", help="output folder name (default: the source name)")
    p.add_argument("--out_dir", default="data")
    p.add_argument("--url", help="shakespeare: the file to download (default: Tiny Shakespeare on GitHub)")
    p.add_argument("--num_shards", type=int, default=1, help="fineweb-edu: how many parquet shards")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="fineweb-edu: tokenizer processes")
    a = p.parse_args(argv)
    prepare(a.source, a.input, a.tokenizer, a.name, a.out_dir, a.url, a.num_shards, a.num_proc, a.suffix)


if __name__ == "__main__":
    main()
