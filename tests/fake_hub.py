"""
A fake Hugging Face Hub on 127.0.0.1 that answers what huggingface_hub asks of the real one (its HEAD and
GET requests on resolve URLs, with the headers it reads), so that tests of hub.py and prepare.py never
touch the network. The fixture `fake_hub` (registered in conftest.py) points huggingface_hub at it.
"""
import hashlib
import http.server
import re
import threading
from urllib.parse import unquote

import pytest

LFS = (".safetensors", ".bin", ".pt", ".parquet")      # large files: in Git LFS on the Hub; the rest in git


def git_hash(data):
    """The Hub's ETag of a file kept in git: git's object hash of it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """
    Repos and their commits, served as the Hub serves them. HEAD or GET of
    <endpoint>/<repo>/resolve/<revision>/<file> (a dataset's under /datasets/) says which commit the
    revision is at (X-Repo-Commit), and:
      - for a file kept in git, answers with it, its git hash as ETag;
      - for an LFS file, redirects to storage on another host (localhost, not 127.0.0.1), with the file's
        sha256 and size on the redirect (X-Linked-Etag, X-Linked-Size);
      - for what is not there, answers as the Hub answers a request without a token: 401 RepoNotFound for
        an unknown (or private) repo, 401 GatedRepo for a gated one unless the request carries `token`,
        404 RevisionNotFound, 404 EntryNotFound.
    Every answer honours a Range request. cut[file] = n: the next GET of that file stops after n bytes
    and closes the connection; a file in `corrupt` is served as other bytes of the same size. `requests`
    logs (method, path, headers with lower-case names).
    """
    token = "hf_secret123"

    def __init__(self):
        self.repos, self.gated, self.cut, self.corrupt, self.requests = {}, set(), {}, set(), []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append((self.command, self.path, headers))
                if m := re.fullmatch(r"/storage/(.+)/([0-9a-f]{40})/(.+)", self.path):
                    repo, commit, file = m.groups()
                    return self.send_file(file, dict(fake.repos[repo])[commit][file], {}, body)
                m = re.fullmatch(r"/(?:datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
                if m is None:       # (huggingface_hub also asks the Hub for things that downloads do not need)
                    return self.reply(404, {})
                repo, revision, file = m[1], unquote(m[2]), unquote(m[3])
                if repo not in fake.repos:
                    return self.reply(401, {"X-Error-Code": "RepoNotFound"})
                if repo in fake.gated and headers.get("authorization") != f"Bearer {fake.token}":
                    return self.reply(401, {"X-Error-Code": "GatedRepo"})
                commit = fake.repos[repo][-1][0] if revision == "main" else revision
                files = dict(fake.repos[repo]).get(commit)
                if files is None:
                    return self.reply(404, {"X-Error-Code": "RevisionNotFound"})
                if file not in files:
                    return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
                data = files[file]
                if file.endswith(LFS):
                    return self.reply(302, {"Location": f"http://localhost:{fake.port}/storage/{repo}/{commit}/{file}",
                                            "X-Repo-Commit": commit, "ETag": f'"{git_hash(data)}"',
                                            "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                            "X-Linked-Size": str(len(data))})
                self.send_file(file, data, {"X-Repo-Commit": commit, "ETag": f'"{git_hash(data)}"'}, body)

            def send_file(self, file, data, headers, body):
                if file in fake.corrupt:
                    data = bytes(255 - b for b in data)
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-"))[1])
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                headers["Content-Length"] = str(len(data) - start)
                sent = data[start:] if body else b""
                if body and file in fake.cut:           # the connection drops early
                    sent = sent[:fake.cut.pop(file)]
                self.reply(206 if start else 200, headers, sent)

            def reply(self, status, headers, data=b""):
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
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def commit(self, repo, files):
        """A new commit of repo: its last commit's files, with `files` added or replaced. main moves to it."""
        history = self.repos.setdefault(repo, [])
        sha = hashlib.sha1(f"{repo} {len(history)}".encode()).hexdigest()
        history.append((sha, {**(history[-1][1] if history else {}), **files}))
        return sha

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """
    A fake Hub as the endpoint, an empty Hub cache (HF_HOME = tmp_path/hf_home) and no token.
    huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when it is imported, into its
    constants: so the constants are set as those variables would have set them, and the variables too,
    for the commands a test runs.
    """
    import huggingface_hub.constants

    import hub
    server = FakeHub()
    home = tmp_path / "hf_home"
    constants = dict(ENDPOINT=server.url,
                     HUGGINGFACE_CO_URL_TEMPLATE=server.url + "/{repo_id}/resolve/{revision}/{filename}",
                     HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_TOKEN_PATH=str(home / "token"),
                     HF_STORED_TOKENS_PATH=str(home / "stored_tokens"), HF_HUB_OFFLINE=False,
                     AGENT_HARNESSES_PATH=str(home / ".agent_harnesses.json"))
    for name, value in constants.items():
        monkeypatch.setattr(huggingface_hub.constants, name, value, raising=False)   # (older versions lack some)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    hub.cached_tokenizer.cache_clear()      # tokenizers are cached by name: each test has its own Hub
    yield server
    server.stop()
