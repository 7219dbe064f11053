"""The model cache: `ember pull` downloads, `ember models` lists, `ember rm` removes.

Design. Models live in one folder: $CACHE_DIRECTORY/models under systemd
(CacheDirectory=ember gives /var/cache/ember), else
$XDG_CACHE_HOME/ember/models (~/.cache/ember/models). A model pulled as
REPO FILE is stored as ``models/<owner>--<name>/<FILE>``, so names from two
repositories never collide and the cache can be listed without an index.

Download. Files come from ``{hub}/{repo}/resolve/main/{file}``, where hub is
$EMBER_HUB (a mirror; the tests serve a loopback one) or huggingface.co.
Bytes go to ``FILE.part`` next to the final path; an interrupted transfer
resumes from the part's size with an HTTP Range request (a server that
ignores Range answers 200 and the transfer restarts from zero). The sha256
is computed over the whole file, the resumed prefix included, and compared
with the expected one: `--sha256` if given, else the server's X-Linked-Etag
or ETag when it is a 64-hex-digit sha256 (what Hugging Face serves for LFS
files), else the file is kept and reported as not verified. A mismatch
removes the part file and refuses. Only a verified-or-accepted file is
renamed into place, read-only (emberd refuses writable model files).

The default model (`emberd` without --model) is TinyLlama-1.1B-Chat-v1.0 in
Q4_K_M: llama architecture, SentencePiece tokenizer and the Q4_K/Q6_K mix,
all of which the conformance suite covers.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ember.formats.errors import UserError

DEFAULT_HUB = "https://huggingface.co"
DEFAULT_REPO = "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF"
DEFAULT_FILE = "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf"
CHUNK = 1 << 20
TIMEOUT_S = 30
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")


class PullError(UserError):
    """A download failed or was refused; the message says why and what to do."""


class ChecksumMismatch(PullError):
    """The downloaded bytes are not the file that was asked for."""


# ---------------------------------------------------------------------------
# Where things live
# ---------------------------------------------------------------------------

def cache_dir(environ=None, override: str | None = None) -> Path:
    """The models folder (not created here)."""
    env = os.environ if environ is None else environ
    if override:
        return Path(override)
    if env.get("CACHE_DIRECTORY"):                 # systemd: may list several, ':'-separated
        return Path(env["CACHE_DIRECTORY"].split(":")[0]) / "models"
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ember" / "models"


def hub_url(environ=None, override: str | None = None) -> str:
    env = os.environ if environ is None else environ
    return (override or env.get("EMBER_HUB") or DEFAULT_HUB).rstrip("/")


def check_names(repo: str, file: str) -> None:
    if not _REPO.fullmatch(repo) or ".." in repo:
        raise PullError(f"repository {repo!r}: expected OWNER/NAME")
    if not _FILE.fullmatch(file) or ".." in file:
        raise PullError(f"file {file!r}: expected a plain file name such as model.Q4_K_M.gguf")


def model_path(repo: str, file: str, root: Path) -> Path:
    check_names(repo, file)
    return root / repo.replace("/", "--") / file


def file_url(hub: str, repo: str, file: str) -> str:
    return f"{hub}/{repo}/resolve/main/{urllib.parse.quote(file)}"


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------

@dataclass
class Pulled:
    path: Path
    sha256: str
    verified: str          # "--sha256" | "server etag" | "" (not verified)
    resumed_from: int
    size: int


def pull(repo: str, file: str, root: Path, hub: str, sha256: str | None = None,
         progress: Callable[[int, int | None], None] | None = None) -> Pulled:
    """Download repo/file into root (resuming a part file); verify; rename into place."""
    dest = model_path(repo, file, root)
    if sha256 is not None and not _SHA256.fullmatch(sha256.lower()):
        raise PullError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = file_url(hub, repo, file)
    head = _head(url)
    expected, source = _expected(sha256, head)
    start = part.stat().st_size if part.exists() else 0
    digest, start = _transfer(url, part, start, progress)
    got = digest.hexdigest()
    if expected is not None and got != expected:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{repo}/{file}: sha256 {got} does not match the expected "
                               f"{expected} ({source}); the partial download was removed")
    os.chmod(part, 0o444)
    os.replace(part, dest)
    _write_sidecar(dest, got, source if expected else "")
    return Pulled(dest, got, source if expected else "", start, dest.stat().st_size)


def _expected(sha256: str | None, head: dict) -> tuple[str | None, str]:
    if sha256:
        return sha256.lower(), "--sha256"
    for name in ("x-linked-etag", "etag"):
        tag = head.get(name, "").strip().removeprefix("W/").strip('"').lower()
        if _SHA256.fullmatch(tag):
            return tag, f"server {name}"
    return None, ""


def _head(url: str) -> dict:
    """Headers of the first response (not following redirects: HF puts X-Linked-Etag there)."""
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, method="HEAD", headers=_headers())
    try:
        with opener.open(req, timeout=TIMEOUT_S) as r:
            return {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        if e.code in (301, 302, 303, 307, 308):
            return {k.lower(): v for k, v in e.headers.items()}
        raise _http_error(url, e) from None
    except (urllib.error.URLError, OSError) as e:
        raise _net_error(url, e) from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


def _headers(start: int = 0) -> dict:
    h = {"User-Agent": "ember-pull/0.1"}
    if os.environ.get("HF_TOKEN"):
        h["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    if start:
        h["Range"] = f"bytes={start}-"
    return h


def _transfer(url: str, part: Path, start: int, progress) -> tuple["hashlib._Hash", int]:
    """Append the rest of the file to part; returns the sha256 of the whole and the resume point."""
    req = urllib.request.Request(url, headers=_headers(start))
    try:
        r = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:          # the part is already complete (or bigger)
            part.unlink(missing_ok=True)
            return _transfer(url, part, 0, progress)
        raise _http_error(url, e) from None
    except (urllib.error.URLError, OSError) as e:
        raise _net_error(url, e) from None
    with r:
        if r.status != 206:                  # no Range support: start over
            start = 0
        total = _total(r, start)
        digest = _hash_prefix(part, start)
        with open(part, "r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            _copy(r, out, digest, start, total, progress, url)
    return digest, start


def _total(r, start: int) -> int | None:
    rng = r.headers.get("Content-Range", "")
    if rng and "/" in rng and rng.rsplit("/", 1)[1].isdigit():
        return int(rng.rsplit("/", 1)[1])
    length = r.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def _hash_prefix(part: Path, n: int):
    digest = hashlib.sha256()
    if n:
        with open(part, "rb") as f:
            while n:
                block = f.read(min(CHUNK, n))
                if not block:
                    raise PullError(f"{part}: shorter than its recorded size; delete it and pull again")
                digest.update(block)
                n -= len(block)
    return digest


def _copy(r, out, digest, done: int, total: int | None, progress, url: str) -> None:
    while True:
        try:
            block = r.read1(CHUNK)   # what has arrived: a slow link still makes progress
        except (OSError, http.client.HTTPException) as e:
            out.flush()
            raise PullError(f"download of {url} interrupted at {done} bytes ({e}); "
                            "run the same command again to resume") from None
        if not block:
            break
        out.write(block)
        digest.update(block)
        done += len(block)
        if progress:
            progress(done, total)
    if total is not None and done < total:
        raise PullError(f"download of {url} interrupted at {done} of {total} bytes; "
                        "run the same command again to resume")


def _http_error(url: str, e: urllib.error.HTTPError) -> PullError:
    hint = " (is the repository or file name right?)" if e.code == 404 else ""
    if e.code in (401, 403):
        hint = " (a gated repository needs HF_TOKEN)"
    return PullError(f"{url}: HTTP {e.code} {e.reason}{hint}")


def _net_error(url: str, e: Exception) -> PullError:
    reason = getattr(e, "reason", e)
    return PullError(f"cannot reach {url}: {reason}")


# ---------------------------------------------------------------------------
# Progress bar (stderr, only on a terminal)
# ---------------------------------------------------------------------------

class Progress:
    """`done/total bytes, rate, bar` redrawn at most 10 times a second."""

    def __init__(self, name: str, stream=sys.stderr):
        self.name, self.stream = name, stream
        self.t0 = self._last = time.monotonic()
        self.first: int | None = None

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = done
        if now - self._last < 0.1 and done != total:
            return
        self._last = now
        rate = (done - self.first) / max(now - self.t0, 1e-6)
        if total:
            width = 30
            filled = int(width * done / total)
            bar = f"[{'#' * filled}{'.' * (width - filled)}] {100 * done / total:5.1f}%"
        else:
            bar = f"{done >> 20} MiB"
        self.stream.write(f"\r{self.name} {bar} {rate / 1e6:6.1f} MB/s")
        self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------------------
# Listing and removing
# ---------------------------------------------------------------------------

@dataclass
class Entry:
    repo: str
    file: str
    path: Path
    size: int
    sha256: str
    verified: str


def _write_sidecar(dest: Path, sha: str, verified: str) -> None:
    side = dest.with_name(dest.name + ".sha256")
    side.write_text(f"{sha}  {dest.name}\n{verified or 'not verified'}\n")


def _read_sidecar(dest: Path) -> tuple[str, str]:
    try:
        lines = dest.with_name(dest.name + ".sha256").read_text().splitlines()
        return lines[0].split()[0], (lines[1] if len(lines) > 1 else "")
    except (OSError, IndexError):
        return "", ""


def entries(root: Path) -> list[Entry]:
    """Every complete model in the cache (part files are not listed)."""
    out = []
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        repo = folder.name.replace("--", "/", 1)
        for f in sorted(folder.glob("*.gguf")):
            sha, verified = _read_sidecar(f)
            out.append(Entry(repo, f.name, f, f.stat().st_size, sha, verified))
    return out


def partials(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.part")) if root.is_dir() else []


def remove(root: Path, name: str) -> list[Path]:
    """Remove a model given as REPO/FILE, REPO FILE's file name alone, or REPO (all its files)."""
    matches = [e for e in entries(root) if name in (f"{e.repo}/{e.file}", e.file, e.repo)]
    parts = [p for p in partials(root)
             if name in (f"{p.parent.name.replace('--', '/', 1)}/{p.name[:-5]}", p.name[:-5])]
    if not matches and not parts:
        raise PullError(f"{name!r} is not in the cache {root} (see `ember models`)")
    gone = []
    for e in matches:
        for p in (e.path, e.path.with_name(e.path.name + ".sha256")):
            if p.exists():
                p.unlink()
                gone.append(p)
    for p in parts:
        p.unlink()
        gone.append(p)
    for folder in {p.parent for p in gone}:
        if folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(folder)
    return gone


# ---------------------------------------------------------------------------
# The default model
# ---------------------------------------------------------------------------

def default_model(root: Path, hub: str, allow_pull: bool = True, say=print) -> Path:
    """The cached default model, pulled first if missing; PullError explains what to do."""
    path = model_path(DEFAULT_REPO, DEFAULT_FILE, root)
    if path.is_file():
        return path
    command = f"ember pull {DEFAULT_REPO} {DEFAULT_FILE}"
    if root != cache_dir({k: v for k, v in os.environ.items() if k != "CACHE_DIRECTORY"}):
        command += f" --cache-dir {root}"     # e.g. systemd's CacheDirectory: say where
    if not allow_pull:
        raise PullError(f"no --model given and the default model is not in the cache ({path}); "
                        f"run `{command}` or pass --model PATH")
    say(f"no --model given: pulling the default model {DEFAULT_REPO}/{DEFAULT_FILE} into {root}")
    try:
        return pull(DEFAULT_REPO, DEFAULT_FILE, root, hub).path
    except OSError as e:
        raise PullError(f"no --model given, the default model is not in the cache ({path}) and it "
                        f"cannot be stored there: {e.strerror}. Pass --model PATH") from None
    except PullError as e:
        raise PullError(f"no --model given, the default model is not in the cache ({path}) and "
                        f"pulling it failed: {e}. When the network is up, run `{command}` "
                        f"(EMBER_HUB selects a mirror), or pass --model PATH") from None
