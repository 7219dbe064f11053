"""What does the HTTP door cost over the ZeroMQ door? Latency of a 1-token generation, and RSS.

    python3 bench/http_overhead.py [--model PATH] [--backend reference] [--n 300]

Latency: one emberd with --http serves both doors from the same scheduler
and model. Request by request, alternating (so machine noise hits both
alike), it times a full round trip of a 1-token generation of the same
prompt at temperature 0:

  zmq complete    Client.complete (stream=false: start + done)
  http complete   POST /v1/completions, stream=false, one keep-alive connection
  zmq stream      Client.generate (start + token + done)
  http stream     POST /v1/completions, stream=true, read to `data: [DONE]`

and reports medians and the median of the paired differences (HTTP minus
ZeroMQ: the added latency). Goal: < 1 ms. Then a 128-token stream on each
door: the added time per token (does SSE keep up with the decode speed?).

Memory: a second emberd without --http on the same model; both get the same
warm-up (20 generations on their own door), then RSS from /proc is compared.
Goal: --http adds < 25 MB.
"""
from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

from emberd_timing import parse_args, complete as zmq_complete, start_emberd, \
    stream as zmq_stream, summary

TCP = ["tcp://127.0.0.1:*"]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------
# One timed request on the HTTP door (the ZeroMQ ones: emberd_timing)
# ---------------------------------------------------------------------------

class Http:
    """One keep-alive connection, as an SDK client keeps it."""

    def __init__(self, url: str, model: str):
        u = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        self.model = model

    def _post(self, prompt: str, stream: bool, n: int = 1) -> bytes:
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                           "ignore_eos": True, "stream": stream})
        self.conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {data[:200]!r}")
        return data

    def complete(self, prompt: str) -> float:
        t = time.perf_counter()
        self._post(prompt, False)
        return time.perf_counter() - t

    def stream(self, prompt: str, n: int = 1) -> float:
        t = time.perf_counter()
        data = self._post(prompt, True, n)
        assert data.endswith(b"data: [DONE]\n\n")
        return time.perf_counter() - t


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def latency(model: str, backend: str, n: int, prompt: str) -> float:
    from ember.daemon.client import Client
    proc, (zmq_ep, http_url) = start_emberd(model, backend, TCP, http=True)
    try:
        zc, hc = Client(zmq_ep, timeout=30), Http(http_url, Path(model).name)
        doors = {"zmq complete": lambda: zmq_complete(zc, prompt),
                 "http complete": lambda: hc.complete(prompt),
                 "zmq stream": lambda: zmq_stream(zc, prompt),
                 "http stream": lambda: hc.stream(prompt)}
        for fn in doors.values():              # warm every path
            for _ in range(20):
                fn()
        series = {k: [] for k in doors}
        for _ in range(n):                     # alternate: the same noise for every door
            for k, fn in doors.items():
                series[k].append(fn())
        print(f"model {Path(model).name}, backend {backend}, {n} alternating rounds, 1-token "
              f"generation of {prompt!r}\n")
        for k, xs in series.items():
            print(summary(k, xs))
        print()
        worst = 0.0
        for mode in ("complete", "stream"):
            diffs = [h - z for h, z in zip(series[f"http {mode}"], series[f"zmq {mode}"])]
            added = statistics.median(diffs)
            worst = max(worst, added)
            print(f"HTTP added latency, {mode:<8}: median of paired differences {added * 1e3:+.3f} ms "
                  f"(ratio of medians {statistics.median(series[f'http {mode}']) / statistics.median(series[f'zmq {mode}']):.2f}x)")
        long_stream(zc, hc, prompt, 128, max(5, n // 20))
        zc.close()
        return worst
    finally:
        proc.terminate()
        proc.wait(10)


def long_stream(zc, hc, prompt: str, n_tokens: int, rounds: int) -> None:
    """A long streamed generation: does the HTTP door keep up with the decode speed?"""
    z, h = [], []
    for _ in range(rounds):
        z.append(zmq_stream(zc, prompt, n_tokens))
        h.append(hc.stream(prompt, n_tokens))
    a, b = statistics.median(z), statistics.median(h)
    print(f"\n{n_tokens}-token stream, {rounds} alternating rounds: zmq {a * 1e3:.2f} ms, http "
          f"{b * 1e3:.2f} ms, http adds {(b - a) * 1e3:+.2f} ms ({(b - a) / n_tokens * 1e6:+.1f} "
          f"us/token, ratio {b / a:.3f}x)")


def memory(model: str, backend: str, prompt: str) -> float:
    from ember.daemon.client import Client
    on, (zmq_on, http_url) = start_emberd(model, backend, TCP, http=True)
    off, (zmq_off,) = start_emberd(model, backend, TCP)
    try:
        hc, zc = Http(http_url, Path(model).name), Client(zmq_off, timeout=30)
        for _ in range(20):
            hc.complete(prompt)
            hc.stream(prompt)
            zmq_complete(zc, prompt)
            zmq_stream(zc, prompt)
        zc.close()
        a, b = rss_mib(on.pid), rss_mib(off.pid)
        print(f"\nRSS after 40 warm-up generations each: --http {a:.1f} MiB, without {b:.1f} MiB, "
              f"--http adds {a - b:+.1f} MiB")
        return a - b
    finally:
        for p in (on, off):
            p.terminate()
            p.wait(10)


def main() -> int:
    args = parse_args(__doc__.split("\n")[0])
    added = latency(args.model, args.backend, args.n, args.prompt)
    grew = memory(args.model, args.backend, args.prompt)
    print(f"\ngoals: added latency < 1 ms: {'met' if added < 1e-3 else 'MISSED'} "
          f"({added * 1e3:.3f} ms); RSS < 25 MB: {'met' if grew * 2**20 < 25e6 else 'MISSED'} "
          f"({grew * 2**20 / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
