"""What prepare.py writes, how it splits train/val, and how it fails. CPU only, offline, a few seconds.

The gpt2 tests need tiktoken's GPT-2 BPE files; offline they come from TIKTOKEN_CACHE_DIR,
and the tests skip (saying so) when the files cannot be loaded.
"""
import http.server
import json
import socket
import sys
import sysconfig
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare  # noqa: E402

EOT = prepare.EOT_TEXT


def read(folder):
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    return meta, *(np.fromfile(folder / f"{split}.bin", dtype=np.uint16) for split in ("train", "val"))


def joined(docs):
    """What a split decodes to: each document followed by the end-of-text token."""
    return "".join(d + EOT for d in docs)


def gpt2_or_skip():
    try:
        return prepare.get_gpt2()
    except SystemExit as e:
        pytest.skip(f"GPT-2 BPE files unavailable (set TIKTOKEN_CACHE_DIR to a folder holding them): {e}")


@pytest.fixture
def corpus(tmp_path):
    """A folder of 12 text files (one in a subfolder) and some files prepare.py must skip."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = []
    for i in range(12):
        text = f"Document {i}: héllo wörld ✓\nsecond line {i * 7}\n"
        (root / (f"doc{i:02d}.txt" if i < 11 else "sub/zz.md")).write_text(text, encoding="utf-8")
        docs.append(text)
    (root / "image.bin").write_bytes(bytes(range(256)))  # binary
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))  # not UTF-8
    (root / "empty.txt").write_bytes(b"")
    (root / ".hidden").write_text("hidden files are not read")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("neither are hidden folders")
    return root, docs


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the folder .www; .requests lists every path asked for."""
    www, requests = tmp_path / "www", []
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep the test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield SimpleNamespace(www=www, url=f"http://127.0.0.1:{httpd.server_address[1]}/", requests=requests)
    httpd.shutdown()
    httpd.server_close()


def test_char_tokenizer_on_a_folder_one_document_per_file(corpus, tmp_path):
    root, docs = corpus
    folder = prepare.prepare(inputs=[str(root)], tokenizer="char", out_dir=tmp_path / "data")
    assert Path(folder) == tmp_path / "data" / "text-char"  # a non-default tokenizer is named in the folder
    meta, train, val = read(folder)
    chars = "".join(sorted(set("".join(docs))))
    assert meta["tokenizer"] == "char" and meta["chars"] == chars
    assert meta["eot_token"] == len(chars) and meta["vocab_size"] == len(chars) + 1
    # files in sorted path order (subfolders included, skipped files left out); documents 0, 10, ... are val
    val_docs, train_docs = [docs[0], docs[10]], docs[1:10] + docs[11:]
    assert (meta["train_docs"], meta["val_docs"]) == (10, 2)
    assert (meta["train_tokens"], meta["val_tokens"]) == (train.size, val.size)
    encode, decode = prepare.load_tokenizer(meta)
    assert decode(train.tolist()) == joined(train_docs)
    assert decode(val.tolist()) == joined(val_docs)
    assert encode(joined(val_docs)) == val.tolist()


def test_char_tokenizer_ids_are_positions_in_chars_and_unknown_characters_are_named():
    meta = {"tokenizer": "char", "chars": "cab \n", "eot_token": 5, "vocab_size": 6}
    encode, decode = prepare.load_tokenizer(meta)
    assert encode("ab c\n") == [1, 2, 3, 0, 4]
    assert encode(f"a{EOT}b") == [1, 5, 2]  # the end-of-text marker encodes to the EOT id ...
    assert decode([1, 5, 2]) == f"a{EOT}b"  # ... and decodes back to it
    with pytest.raises(ValueError, match="character 'z' is not in"):
        encode("abz")


def test_byte_tokenizer_writes_each_files_utf8_bytes_then_256(corpus, tmp_path):
    root, docs = corpus
    (root / "header.h").write_text("int f(void); // ✓\n")
    (root / "util.hpp").write_text("template <class T> T g(T);\n")
    prepare.main(["--input", str(root), "--suffix", ".txt", ".h", ".hpp", "--tokenizer", "byte",
                  "--out_dir", str(tmp_path / "data")])
    meta, train, val = read(tmp_path / "data" / "text-byte")
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("byte", 257, 256) and "chars" not in meta
    # in path order: doc00-doc10, header.h, util.hpp (empty.txt and latin1.txt skipped, sub/zz.md not asked for)
    kept = docs[:11] + ["int f(void); // ✓\n", "template <class T> T g(T);\n"]
    assert (meta["val_docs"], meta["train_docs"]) == (2, 11)
    assert val.tobytes() == b"".join(np.array(list(d.encode()) + [256], dtype=np.uint16).tobytes()
                                     for d in kept[::10])
    encode, decode = prepare.load_tokenizer(meta)
    train_docs = [d for i, d in enumerate(kept) if i % 10]
    assert decode(train.tolist()) == joined(train_docs) and encode(joined(train_docs)) == train.tolist()


def test_bytes_that_are_not_utf8_decode_as_replacement_characters():
    """A model's bytes need not form UTF-8: ✓ is 3 bytes, cut after 2 by the end of a sample or by a
    document's end; a lone continuation byte is invalid anywhere. Each becomes U+FFFD, not an error."""
    encode, decode = prepare.load_tokenizer({"tokenizer": "byte", "vocab_size": 257, "eot_token": 256})
    check = list("✓".encode())
    assert encode(f"a✓{EOT}b") == [97, *check, 256, 98] and decode(encode(f"a✓{EOT}b")) == f"a✓{EOT}b"
    assert decode([97, *check[:2]]) == "a\ufffd"
    assert decode([*check[:2], 256, 98]) == f"\ufffd{EOT}b"     # the end-of-text token does not join bytes
    assert decode([0x80, 97]) == "\ufffda"


def test_gpt2_tokenizer_on_a_folder(corpus, tmp_path):
    gpt2_or_skip()
    root, docs = corpus
    folder = prepare.prepare(inputs=[str(root)], out_dir=tmp_path)  # gpt2 is the default for --input
    assert Path(folder) == tmp_path / "text"
    meta, train, val = read(folder)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    assert "chars" not in meta
    assert train.max() < 50257 and val.max() < 50257
    assert (train == 50256).sum() == 10 and (val == 50256).sum() == 2 and train[-1] == val[-1] == 50256
    encode, decode = prepare.load_tokenizer(meta)
    assert decode(val.tolist()) == joined([docs[0], docs[10]])
    assert encode(joined([docs[0], docs[10]])) == val.tolist()


@pytest.mark.parametrize("tokenizer", ["char", "byte", "gpt2"])
def test_a_literal_endoftext_inside_a_file_is_text_not_a_document_boundary(tokenizer, tmp_path):
    if tokenizer == "gpt2":
        gpt2_or_skip()
    for name in "ab":
        (tmp_path / name).write_text(f"file {name} mentions {EOT} in passing\n")
    meta, train, val = read(prepare.prepare(inputs=[str(tmp_path / "a"), str(tmp_path / "b")],
                                            tokenizer=tokenizer, out_dir=tmp_path / "data"))
    assert (train == meta["eot_token"]).sum() == 1 and (val == meta["eot_token"]).sum() == 1


def test_a_single_file_is_split_90_10_at_a_line_start(tmp_path):
    text = "".join(f"line {i}: to be, or not to be\n" for i in range(100))
    (tmp_path / "play.txt").write_text(text)
    meta, train, val = read(prepare.prepare(inputs=[str(tmp_path / "play.txt")], tokenizer="char",
                                            out_dir=tmp_path / "data"))
    _, decode = prepare.load_tokenizer(meta)
    train_text, val_text = decode(train.tolist()), decode(val.tolist())
    assert train_text.endswith(EOT) and val_text.endswith(EOT)
    assert train_text.removesuffix(EOT) + val_text.removesuffix(EOT) == text
    # cut at the last line start before 90 %: val is 10 % of the text plus less than a line
    val_size, longest_line = len(val_text.removesuffix(EOT)), max(map(len, text.splitlines(True)))
    assert val_text.startswith("line ") and 0 <= val_size - len(text) / 10 < longest_line
    assert (meta["train_docs"], meta["val_docs"]) == (1, 1)


def test_default_run_is_the_python_stdlib_with_the_char_tokenizer(tmp_path):
    prepare.main(["--out_dir", str(tmp_path)])
    meta, train, val = read(tmp_path / "stdlib")
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.is_file())
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(meta["chars"]) + 1
    assert meta["train_docs"] + meta["val_docs"] == len(files) and meta["val_docs"] == len(files[::10])
    assert (val == meta["eot_token"]).sum() == meta["val_docs"]
    # every 10th file: about a tenth of the tokens, how much more or less depends on which files they
    # are in this Python's stdlib, hence a broad range
    assert 0.05 < val.size / (train.size + val.size) < 0.25 and val.size > 100_000
    # val holds files 0, 10, 20, ... in name order, so it starts with the first file
    first = files[0].read_text(encoding="utf-8")
    _, decode = prepare.load_tokenizer(meta)
    assert decode(val[:len(first) + 1].tolist()) == first + EOT


def fineweb_shards(fake_hub, shards):
    """FineWeb-Edu's dataset repo on the fake Hub, holding these shards (lists of documents) in sample/10BT/;
    returns the commit's hash."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    files = {}
    for s, docs in enumerate(shards):
        out = pa.BufferOutputStream()
        pq.write_table(pa.table({"text": docs, "id": [f"{s}-{i}" for i in range(len(docs))]}), out, row_group_size=40)
        files[f"sample/10BT/{s:03d}_00000.parquet"] = out.getvalue().to_pybytes()
    return fake_hub.commit(prepare.FINEWEB, files)


def test_fineweb_edu_downloads_through_the_hub_tokenizes_and_skips_finished_shards(fake_hub, tmp_path):
    gpt2_or_skip()
    shards = [[f"Shard {s}, document {i}. " * (1 + i % 5) for i in range(150)] for s in range(2)]
    commit = fineweb_shards(fake_hub, shards)
    folder = tmp_path / "data" / "fineweb-edu"
    (folder / "shards").mkdir(parents=True)  # a shard whose tokenizing was cut short is never taken for done
    (folder / "shards" / "000_00000.bin.tmp").write_bytes(b"half a shard")
    kwargs = dict(source="fineweb-edu", num_shards=2, num_proc=2, out_dir=tmp_path / "data")

    assert Path(prepare.prepare(**kwargs)) == folder
    meta, train, val = read(folder)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    # val is the first 1% (at least one) of shard 0's documents; train is the rest of shard 0, then shard 1
    assert (meta["val_docs"], meta["train_docs"]) == (1, 299)
    _, decode = prepare.load_tokenizer(meta)
    assert decode(val.tolist()) == joined(shards[0][:1])
    assert decode(train.tolist()) == joined(shards[0][1:] + shards[1])
    # each shard: the Hub says where it is (HEAD), then it comes from storage, into the shared cache
    asked = [(method, path.split("/")[1]) for method, path, _ in fake_hub.requests if not path.startswith("/api/")]
    assert asked == [("HEAD", "datasets"), ("GET", "storage")] * 2
    cache = tmp_path / "hf_home" / "hub" / "datasets--HuggingFaceFW--fineweb-edu" / "snapshots" / commit
    cache = cache / "sample" / "10BT"
    assert sorted(p.name for p in cache.iterdir()) == ["000_00000.parquet", "001_00000.parquet"]

    outputs = {name: (folder / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    asked = len(fake_hub.requests)
    prepare.prepare(**kwargs)  # a re-run: both shards are tokenized already, so nothing is asked of the Hub
    assert len(fake_hub.requests) == asked
    assert outputs == {name: (folder / name).read_bytes() for name in outputs}


def test_fineweb_edu_at_a_revision_and_more_shards_than_there_are(fake_hub, tmp_path):
    gpt2_or_skip()
    old = fineweb_shards(fake_hub, [["an old document", "and another"]])
    fineweb_shards(fake_hub, [["a new document", "and another"]])           # main moves on
    meta, _, val = read(prepare.prepare(source=f"fineweb-edu@{old}", num_proc=1, out_dir=tmp_path))
    assert prepare.load_tokenizer(meta)[1](val.tolist()) == joined(["an old document"])
    assert f"at {old}" in meta["source"]
    with pytest.raises(SystemExit, match="has no sample/10BT/001_00000.parquet: --num_shards=2 is more than it holds"):
        prepare.prepare(source="fineweb-edu", num_shards=2, num_proc=1, out_dir=tmp_path)


def test_shakespeare_is_downloaded_once_and_split_90_10(server, tmp_path):
    text = "".join(f"CITIZEN {i}:\nSpeak, speak.\n\n" for i in range(50))
    (server.www / "input.txt").write_text(text)
    kwargs = dict(source="shakespeare", tokenizer="char", url=server.url + "input.txt", out_dir=tmp_path)
    for _ in range(2):
        meta, train, val = read(prepare.prepare(**kwargs))
    assert server.requests == ["/input.txt"]
    assert (tmp_path / "shakespeare-char" / "input.txt").read_text() == text
    _, decode = prepare.load_tokenizer(meta)
    train_text, val_text = decode(train.tolist()), decode(val.tolist())
    assert train_text.removesuffix(EOT) + val_text.removesuffix(EOT) == text
    # 10 % of the text plus less than a line, as above
    assert 0 <= len(val_text.removesuffix(EOT)) - len(text) / 10 < max(map(len, text.splitlines(True)))
    assert (meta["train_docs"], meta["val_docs"]) == (1, 1)


def refused_url():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/input.txt"


@pytest.mark.parametrize("kwargs, message", [
    (dict(source="nope"), "unknown source 'nope'; choose one of stdlib, shakespeare, fineweb-edu"),
    (dict(inputs=["EMPTY"]), "no text files in .*; pass UTF-8 text files or folders that contain some"),
    (dict(inputs=["no/such/path"]), "no/such/path is not a file or folder; check the --input path"),
    (dict(source="stdlib", inputs=["EMPTY"]), "give either --source or --input, not both"),
    (dict(source="fineweb-edu", tokenizer="char"), "fineweb-edu is not for the char tokenizer"),
    (dict(source="fineweb-edu", tokenizer="byte"), "for bytes, pass local text files with --input"),
    (dict(source="shakespeare", url="REFUSED"),
     "could not download .*refused.*; connect to the internet, or pass --input with a local copy"),
    (dict(source="fineweb-edu", url="REFUSED"), "--url is where shakespeare comes from; fineweb-edu has none"),
    (dict(source="stdlib@main"), "only fineweb-edu comes from the Hub, with a revision; stdlib has none"),
])
def test_user_errors_exit_with_one_line_that_says_what_to_do(kwargs, message, tmp_path):
    (tmp_path / "empty").mkdir()
    kwargs = {k: refused_url() if v == "REFUSED" else v for k, v in kwargs.items()}
    kwargs = {k: [str(tmp_path / "empty")] if v == ["EMPTY"] else v for k, v in kwargs.items()}
    with pytest.raises(SystemExit, match=message) as e:
        prepare.prepare(out_dir=tmp_path / "data", **kwargs)
    assert str(e.value).startswith("prepare.py: ") and "\n" not in str(e.value)


def test_a_missing_download_names_the_http_error(server, tmp_path):
    with pytest.raises(SystemExit, match="could not download .*missing.txt \\(HTTP 404"):
        prepare.prepare(source="shakespeare", url=server.url + "missing.txt", out_dir=tmp_path)
    assert not list(tmp_path.rglob("*.part"))  # no half-written download left behind


def test_a_char_vocabulary_too_big_for_uint16_is_refused(tmp_path):
    chars = [chr(c) for c in range(0x20, 0x20 + 70_000) if not 0xD800 <= c < 0xE000]  # no surrogates
    (tmp_path / "many.txt").write_text("".join(chars), encoding="utf-8")
    with pytest.raises(SystemExit, match="vocabulary of 67953 does not fit the uint16 token files"):
        prepare.prepare(inputs=[str(tmp_path / "many.txt")], tokenizer="char", out_dir=tmp_path / "data")


def test_a_rerun_replaces_the_files_atomically(corpus, tmp_path):
    root, docs = corpus
    folder = Path(prepare.prepare(inputs=[str(root)], tokenizer="char", out_dir=tmp_path / "data"))
    before = np.memmap(folder / "train.bin", dtype=np.uint16, mode="r")  # e.g. a running train.py
    old = np.array(before)
    (root / "doc01.txt").write_text("a changed document, longer than it was before\n")
    prepare.main(["--input", str(root), "--tokenizer", "char", "--out_dir", str(tmp_path / "data")])
    # the new files replaced the old ones (os.replace), so a reader of the old file still sees it whole
    assert np.array_equal(before, old)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no temp files
    meta, train, _ = read(folder)
    _, decode = prepare.load_tokenizer(meta)
    assert decode(train.tolist()).startswith(f"a changed document, longer than it was before\n{EOT}")


def test_a_downloaded_shard_that_is_not_parquet_is_reported(fake_hub, tmp_path):
    pytest.importorskip("pyarrow")
    gpt2_or_skip()
    fake_hub.commit(prepare.FINEWEB, {"sample/10BT/000_00000.parquet": b"<html>a login page, say</html>"})
    with pytest.raises(SystemExit, match="000_00000.parquet is not a parquet file with a 'text' column"):
        prepare.prepare(source="fineweb-edu", num_proc=1, out_dir=tmp_path)
