"""ember pull / models / rm and the default model, against a real loopback HTTP hub.

The hub is a ThreadingHTTPServer in the test laid out like Hugging Face:
``/REPO/resolve/main/FILE`` answers 302 with X-Linked-Etag (the LFS sha256)
to ``/cdn/FILE``, which serves the bytes with Range support and a non-sha
ETag. Switches make it cut the first transfer short, ignore Range, or
advertise the wrong sha256. Files are real GGUF bytes (stories260K, read
from the conformance folder) or random bytes.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ember.daemon import modelcache
from tests.daemon.emberd_proc import model_path
from tests.daemon.terminal import run_on_tty

REPO, FILE = "someone/tiny-GGUF", "tiny.Q8_0.gguf"


# ---------------------------------------------------------------------------
# The hub
# ---------------------------------------------------------------------------

class Hub:
    def __init__(self):
        self.files: dict[str, bytes] = {}       # "REPO/FILE" -> bytes
        self.cut_first_at: int | None = None    # first GET of the bytes stops after this many
        self.ignore_range = False
        self.wrong_sha = False
        self.linked_etag = True
        self.gets: list[str | None] = []        # Range header of every GET of the bytes
        self.requests = 0                       # every request, HEAD included
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        hub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                hub.requests += 1
                m = re.fullmatch(r"/(.+)/resolve/main/(.+)", self.path)
                if m:
                    return self._redirect(f"{m.group(1)}/{m.group(2)}")
                m = re.fullmatch(r"/cdn/(.+)", self.path)
                data = hub.files.get(m.group(1)) if m else None
                if data is None:
                    self.send_error(404)
                    return
                self._bytes(data, body)

            def _redirect(self, key: str):
                data = hub.files.get(key)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(302)
                self.send_header("Location", f"/cdn/{key}")
                if hub.linked_etag:
                    sha = hashlib.sha256(data + (b"x" if hub.wrong_sha else b"")).hexdigest()
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _bytes(self, data: bytes, body: bool):
                rng = self.headers.get("Range")
                start = 0
                if rng and not hub.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                if start >= len(data) and start:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", '"not-a-sha"')
                self.end_headers()
                if not body:
                    return
                hub.gets.append(rng)
                chunk = data[start:]
                if hub.cut_first_at is not None:
                    chunk, hub.cut_first_at = chunk[:hub.cut_first_at], None
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)   # the transfer dies here
                    return
                self.wfile.write(chunk)

        return H


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


@pytest.fixture
def payload() -> bytes:
    return os.urandom(3 * modelcache.CHUNK + 12345)


def _pull(hub, root, **kw):
    return modelcache.pull(REPO, FILE, root, hub.url, **kw)


# ---------------------------------------------------------------------------
# Download, resume, verification
# ---------------------------------------------------------------------------

def test_pull_verifies_with_linked_etag(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    got = _pull(hub, tmp_path)
    assert got.path == tmp_path / "someone--tiny-GGUF" / FILE
    assert got.path.read_bytes() == payload
    assert got.sha256 == hashlib.sha256(payload).hexdigest()
    assert got.verified == "server x-linked-etag" and got.resumed_from == 0
    assert os.stat(got.path).st_mode & 0o222 == 0, "cached models are read-only"
    assert not list(tmp_path.glob("*/*.part"))


def test_resume_after_interrupted_transfer(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    hub.cut_first_at = modelcache.CHUNK + 777
    with pytest.raises(modelcache.PullError, match="interrupted.*resume"):
        _pull(hub, tmp_path)
    part = tmp_path / "someone--tiny-GGUF" / (FILE + ".part")
    assert part.stat().st_size == modelcache.CHUNK + 777
    got = _pull(hub, tmp_path)
    assert hub.gets == [None, f"bytes={modelcache.CHUNK + 777}-"]
    assert got.resumed_from == modelcache.CHUNK + 777
    assert got.path.read_bytes() == payload and got.verified
    assert not part.exists()


def test_server_without_range_restarts(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    hub.cut_first_at, hub.ignore_range = 5000, True
    with pytest.raises(modelcache.PullError):
        _pull(hub, tmp_path)
    got = _pull(hub, tmp_path)
    assert got.resumed_from == 0 and got.path.read_bytes() == payload


def test_checksum_mismatch_refused_and_partial_removed(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    hub.wrong_sha = True
    with pytest.raises(modelcache.ChecksumMismatch, match="partial download was removed"):
        _pull(hub, tmp_path)
    assert list(tmp_path.iterdir()) == []          # no part file, and no empty folder


def test_resumed_corrupt_prefix_caught(hub, payload, tmp_path):
    """A part file whose bytes went bad on disk fails the whole-file hash and is removed."""
    hub.files[f"{REPO}/{FILE}"] = payload
    part = tmp_path / "someone--tiny-GGUF" / (FILE + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)
    with pytest.raises(modelcache.ChecksumMismatch):
        _pull(hub, tmp_path)
    assert not part.exists() and not (part.parent / FILE).exists()


def test_explicit_sha256_wins(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    with pytest.raises(modelcache.ChecksumMismatch, match="--sha256"):
        _pull(hub, tmp_path, sha256="0" * 64)
    got = _pull(hub, tmp_path, sha256=hashlib.sha256(payload).hexdigest().upper())
    assert got.verified == "--sha256"
    with pytest.raises(modelcache.PullError, match="64 hex"):
        _pull(hub, tmp_path, sha256="abc")


def test_unverifiable_download_says_so(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    hub.linked_etag = False                   # only the CDN's non-sha ETag is left
    r = _cli("pull", REPO, FILE, "--cache-dir", str(tmp_path), "--hub", hub.url)
    assert r.returncode == 0, r.stderr
    assert "NOT verified" in r.stdout
    r = _cli("models", "--cache-dir", str(tmp_path))
    assert f"{REPO}/{FILE}" in r.stdout and "not verified" in r.stdout


def test_bad_names_and_missing_files(hub, tmp_path):
    with pytest.raises(modelcache.PullError, match="OWNER/NAME"):
        modelcache.pull("../etc", FILE, tmp_path, hub.url)
    with pytest.raises(modelcache.PullError, match="plain file name"):
        modelcache.pull(REPO, "../x.gguf", tmp_path, hub.url)
    with pytest.raises(modelcache.PullError, match="404"):
        modelcache.pull(REPO, "absent.gguf", tmp_path, hub.url)


# ---------------------------------------------------------------------------
# The CLI: pull, models, rm
# ---------------------------------------------------------------------------

def _cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "ember.daemon.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def test_cli_pull_models_rm(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    r = _cli("pull", REPO, FILE, "--cache-dir", str(tmp_path), env={"EMBER_HUB": hub.url})
    assert r.returncode == 0 and "sha256 verified" in r.stdout, r.stderr
    r = _cli("models", "--cache-dir", str(tmp_path))
    assert f"{REPO}/{FILE}" in r.stdout and "server x-linked-etag" in r.stdout
    r = _cli("rm", f"{REPO}/{FILE}", "--cache-dir", str(tmp_path))
    assert r.returncode == 0 and "removed" in r.stdout
    assert modelcache.entries(tmp_path) == []
    r = _cli("rm", f"{REPO}/{FILE}", "--cache-dir", str(tmp_path))
    assert r.returncode == 2 and "not in the cache" in r.stderr and "Traceback" not in r.stderr


def test_cli_pull_offline_is_one_line(tmp_path):
    r = _cli("pull", REPO, FILE, "--cache-dir", str(tmp_path), "--hub", _dead_url())
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_cache_dir_locations(tmp_path):
    assert modelcache.cache_dir({"CACHE_DIRECTORY": "/var/cache/ember"}) == \
        Path("/var/cache/ember/models")
    assert modelcache.cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/ember/models")
    assert modelcache.cache_dir({"HOME": "/h"}, override=str(tmp_path)) == tmp_path


# ---------------------------------------------------------------------------
# emberd without --model: the default model
# ---------------------------------------------------------------------------

def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def _emberd(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "ember.daemon.emberd", "--backend", "reference",
                           "--bind", "tcp://127.0.0.1:*", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_offline_start_explains_itself(tmp_path):
    r = _emberd("--cache-dir", str(tmp_path), env={"EMBER_HUB": _dead_url()})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"ember pull {modelcache.DEFAULT_REPO} {modelcache.DEFAULT_FILE} --cache-dir {tmp_path}" \
        in r.stderr
    assert "cannot reach" in r.stderr and "--model demo" in r.stderr
    r = _emberd("--cache-dir", str(tmp_path), "--no-pull")
    assert r.returncode == 2 and f"ember pull {modelcache.DEFAULT_REPO}" in r.stderr
    assert "--model demo" in r.stderr
    assert list(tmp_path.iterdir()) == []          # the failed pull left no folder behind


def test_first_start_pulls_the_default_model(hub, tmp_path):
    """The hub serves a real GGUF under the default name; emberd pulls, verifies and serves it."""
    from tests.daemon.emberd_proc import _read_endpoints
    from ember.daemon.client import Client
    hub.files[f"{modelcache.DEFAULT_REPO}/{modelcache.DEFAULT_FILE}"] = model_path().read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "ember.daemon.emberd", "--backend", "reference",
                             "--bind", "tcp://127.0.0.1:*", "--cache-dir", str(tmp_path),
                             "--hub", hub.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ep = _read_endpoints(proc, 1, 60)[0]
        with Client(ep, timeout=20) as c:
            assert c.call("hello")[0]["model"] == modelcache.DEFAULT_FILE
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert b"pulling the default model" in err
    cached = modelcache.entries(tmp_path)
    assert [(e.repo, e.file, e.verified) for e in cached] == \
        [(modelcache.DEFAULT_REPO, modelcache.DEFAULT_FILE, "server x-linked-etag")]


def test_cli_progress_bar_only_on_a_terminal(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    pull = [sys.executable, "-m", "ember.daemon.cli", "pull", REPO, FILE, "--hub", hub.url,
            "--cache-dir"]
    rc, shown, out = run_on_tty(pull + [str(tmp_path / "a")], stderr=True)
    assert rc == 0 and b"sha256 verified" in out
    bar = [ln for ln in shown.decode().replace("\r", "\n").splitlines() if ln.strip()][-1]
    # name, percent, size, elapsed<ETA, rate (tqdm's byte units)
    assert re.search(rf"{re.escape(FILE)}: 100%.*3\.01M/3\.01M \[\d\d:\d\d<\d\d:\d\d, .*B/s\]",
                     bar), bar
    r = _cli("pull", REPO, FILE, "--cache-dir", str(tmp_path / "b"), "--hub", hub.url)
    assert r.returncode == 0 and "%" not in r.stderr and r.stderr == ""    # a pipe gets no bar
    rc, shown, _ = run_on_tty(pull + [str(tmp_path / "c"), "--quiet"], stderr=True)
    assert rc == 0 and shown == b""                                          # --quiet: none


def test_a_verified_cached_file_is_not_downloaded_again(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    first = _pull(hub, tmp_path)
    served = hub.requests
    again = _pull(hub, tmp_path)
    assert again.cached and again.path == first.path and again.sha256 == first.sha256
    assert hub.requests == served                                 # not one request
    r = _cli("pull", REPO, FILE, "--cache-dir", str(tmp_path), "--hub", hub.url)
    assert r.returncode == 0 and "already in the cache" in r.stdout and hub.requests == served
    other = hashlib.sha256(b"another file").hexdigest()         # a different --sha256: fetch
    with pytest.raises(modelcache.ChecksumMismatch):
        _pull(hub, tmp_path, sha256=other)
    assert hub.requests > served and first.path.read_bytes() == payload


def test_failed_pulls_leave_no_empty_folders(hub, tmp_path):
    with pytest.raises(modelcache.PullError, match="HTTP 404"):
        modelcache.pull(REPO, "absent.gguf", tmp_path, hub.url)
    with pytest.raises(modelcache.PullError, match="cannot reach"):
        modelcache.pull(REPO, FILE, tmp_path, _dead_url())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Model names: what --model and `ember run` accept
# ---------------------------------------------------------------------------

def test_names_resolve_to_cached_files(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = payload
    hub.files[f"{REPO}/tiny.Q4_K_M.gguf"] = payload[:1000]
    a = _pull(hub, tmp_path).path
    b = modelcache.pull(REPO, "tiny.Q4_K_M.gguf", tmp_path, hub.url).path
    assert modelcache.resolve(f"{REPO}/{FILE}", tmp_path) == a          # as `ember models` prints
    assert modelcache.resolve(FILE, tmp_path) == a
    assert modelcache.resolve(f"{REPO}:Q8_0", tmp_path) == a            # Ollama's REPO:QUANT
    assert modelcache.resolve(f"{REPO.upper()}:q4_k_m", tmp_path) == b
    assert modelcache.resolve("demo", tmp_path) == modelcache.DEMO_PATH
    assert modelcache.resolve(str(a), tmp_path) == a                     # a path stays a path
    with pytest.raises(modelcache.ModelNotFound, match=r"Q4_K\b.*ember pull someone/tiny-GGUF"):
        modelcache.resolve(f"{REPO}:Q4_K", tmp_path)                     # Q4_K is not Q4_K_M
    with pytest.raises(modelcache.ModelNotFound, match="--model demo"):
        modelcache.resolve("nothing", tmp_path)


def test_models_lists_names_that_run_and_emberd_accept(hub, payload, tmp_path):
    hub.files[f"{REPO}/{FILE}"] = model_path().read_bytes()
    _pull(hub, tmp_path)
    r = _cli("models", "--cache-dir", str(tmp_path))
    names = [ln.split()[0] for ln in r.stdout.splitlines() if ln and not ln.startswith(" ")]
    assert names == ["demo", f"{REPO}/{FILE}"]
    env = {"XDG_CACHE_HOME": str(tmp_path.parent / "xdg")}
    (tmp_path.parent / "xdg" / "ember").mkdir(parents=True)
    os.symlink(tmp_path, tmp_path.parent / "xdg" / "ember" / "models")
    for name in names + [f"{REPO}:Q8_0"]:
        r = _cli("run", name, "-p", "Once upon a time", "-n", "4", "--temp", "0", env=env)
        assert r.returncode == 0 and r.stdout.strip(), (name, r.stderr)
    from tests.daemon.emberd_proc import _read_endpoints
    from ember.daemon.client import Client
    proc = subprocess.Popen([sys.executable, "-m", "ember.daemon.emberd", "-m", f"{REPO}:q8_0",
                             "--bind", "tcp://127.0.0.1:*", "--cache-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with Client(_read_endpoints(proc, 1, 60)[0], timeout=20) as c:
            assert c.hello()["model"] == FILE
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
