"""What the daemon-overhead benches share: a real emberd, and one timed request.

Used by bench/daemon_overhead.py (daemon vs in-process) and bench/http_overhead.py
(HTTP door vs ZeroMQ door): the same start-up, the same request and the same
summary line, so the two scripts' numbers compare.
"""
from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "conformance" / "models" / "stories260K.gguf"


def start_emberd(model: str, backend: str, binds: list[str],
                 http: bool = False) -> tuple[subprocess.Popen, list[str]]:
    """A real emberd on `binds` (and --http on a free port); (process, endpoints as printed)."""
    cmd = [sys.executable, "-m", "ember.daemon.emberd", "--model", model, "--backend", backend,
           *[arg for b in binds for arg in ("--bind", b)], *(["--http", "127.0.0.1:0"] if http else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    buf, end = b"", time.monotonic() + 120
    while buf.count(b"\n") < len(binds) + http:     # one "listening on" line per endpoint
        if time.monotonic() > end or proc.poll() is not None:
            raise SystemExit("emberd did not start")
        if select.select([proc.stdout], [], [], 1.0)[0]:
            buf += os.read(proc.stdout.fileno(), 4096)
    return proc, [ln.split()[-1] for ln in buf.decode().splitlines()]


def complete(client, prompt: str, n: int = 1) -> float:
    """Seconds for one non-streamed generation (start + done) over ZeroMQ."""
    t = time.perf_counter()
    client.complete(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
    return time.perf_counter() - t


def stream(client, prompt: str, n: int = 1) -> float:
    """Seconds for one streamed generation (start + n tokens + done) over ZeroMQ."""
    t = time.perf_counter()
    for _ in client.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True):
        pass
    return time.perf_counter() - t


def summary(name: str, xs: list[float], width: int = 16) -> str:
    q = statistics.quantiles(xs, n=10)
    return (f"{name:<{width}} median {statistics.median(xs) * 1e3:7.3f} ms   min {min(xs) * 1e3:7.3f}   "
            f"p10 {q[0] * 1e3:7.3f}   p90 {q[-1] * 1e3:7.3f}")


def parse_args(description: str) -> argparse.Namespace:
    """The options both overhead benches take: model, backend, requests, prompt."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--prompt", default="Once upon a time")
    return ap.parse_args()
