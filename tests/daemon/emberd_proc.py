"""Test helper: run a real `emberd` subprocess on a free loopback port and an ipc path.

`start_emberd()` returns a Daemon once it has printed its bound endpoints (so
`tcp://127.0.0.1:*` needs no port guessing); `Daemon.stop()` always
terminates it (kill after a grace period). Fixtures importing this get one
daemon per test module (`emberd`), started on the reference backend with
stories260K, skipped with a reason when the conformance model is absent.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zmq

from ember.daemon.client import Client
from ember.formats import protocol
from tests.conftest import conformance_path

BACKEND = "reference"


def model_path() -> Path:
    return conformance_path("models", "stories260K.gguf")


class Daemon:
    """A running emberd process and its endpoints."""

    def __init__(self, proc: subprocess.Popen, endpoints: list[str], workdir: str, log: Path):
        self.proc, self.endpoints, self.workdir, self.log = proc, endpoints, workdir, log

    @property
    def tcp(self) -> str:
        return next(e for e in self.endpoints if e.startswith("tcp://"))

    @property
    def http(self) -> str:
        """The HTTP gateway's base URL (start_emberd(http=True))."""
        return next(e for e in self.endpoints if e.startswith("http://"))

    @property
    def ipc(self) -> str:
        return next(e for e in self.endpoints if e.startswith("ipc://"))

    def client(self, endpoint: str | None = None, timeout: float = 20.0) -> Client:
        return Client(endpoint or self.tcp, timeout=timeout)

    def dealer(self, endpoint: str | None = None) -> zmq.Socket:
        """A raw DEALER socket (for hostile input); close it yourself."""
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint or self.tcp)
        return s

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_emberd(*extra: str, ipc: bool = True, timeout: float = 60.0,
                 stderr: str | None = None, http: bool = False, model: Path | None = None) -> Daemon:
    """Start emberd and wait until it reports every bound endpoint (stderr: a path instead of
    the log file, e.g. /dev/full; http: also --http on a free loopback port; model: another
    file than stories260K)."""
    model = model or model_path()
    # ipc paths are limited to ~107 bytes: a short private dir under the system tmp
    workdir = tempfile.mkdtemp(prefix="emberd-")
    log = Path(workdir) / "stderr.log"
    binds = ["--bind", "tcp://127.0.0.1:*"] + (["--bind", f"ipc://{workdir}/e.sock"] if ipc else [])
    cmd = [sys.executable, "-m", "ember.daemon.emberd", "--model", str(model), "--backend", BACKEND,
           *binds, *(["--http", "127.0.0.1:0"] if http else []), *extra]
    with open(stderr or log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    daemon = Daemon(proc, [], workdir, log)
    try:
        daemon.endpoints = _read_endpoints(proc, 1 + ipc + http, timeout)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _read_endpoints(proc: subprocess.Popen, n: int, timeout: float) -> list[str]:
    # raw reads: a buffered readline could swallow the second line where select can't see it
    end, buf, fd = time.monotonic() + timeout, b"", proc.stdout.fileno()
    while buf.count(b"\n") < n:
        left = end - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"emberd did not start (exit {proc.poll()})")
        if select.select([fd], [], [], left)[0]:
            buf += os.read(fd, 4096)
    lines = buf.decode().splitlines()
    return [ln.split()[-1] for ln in lines if ln.startswith("emberd: listening on ")]


@pytest.fixture(scope="module")
def emberd():
    """One emberd for the whole test module; always terminated."""
    d = start_emberd()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def model():
    """The in-process engine on the same file and backend, for comparisons."""
    from ember.daemon import engine
    m = engine.load(model_path(), backend=BACKEND)
    yield m
    m.close()


def greedy_local(model, prompt, max_tokens: int) -> str:
    out = None
    for out in model.generate(prompt, max_tokens=max_tokens, temperature=0.0):
        pass
    return out.text


__all__ = ["Daemon", "start_emberd", "emberd", "model", "greedy_local", "protocol"]
