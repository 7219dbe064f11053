"""What does going through emberd cost? A 1-token generation, daemon vs in-process.

    python3 bench/daemon_overhead.py [--model PATH] [--backend reference] [--n 300]

Starts a real emberd (loopback TCP and ipc), loads the same model in this
process on the same backend, then alternates the two measurements request by
request so machine noise hits both alike:

  in-process   model.generate(prompt, max_tokens=1, temperature=0), drained
  daemon       Client.complete(...) (stream=false: start + done) and
               Client.generate(...) (stream=true: start + token + done),
               each a full round trip from send to the terminal event

and reports medians, p10/p90 and the median of the paired differences (the
daemon's overhead). Also the bare ping round trip. The goal: overhead < 1 ms.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from emberd_timing import parse_args, complete as daemon_complete, start_emberd, \
    stream as daemon_stream, summary


def in_process(model, prompt: str, n: int = 1) -> float:
    t = time.perf_counter()
    for _ in model.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True):
        pass
    return time.perf_counter() - t


def long_generation(model, client, prompt: str, n_tokens: int, rounds: int) -> None:
    """Streaming a long generation: does the daemon keep up with the engine's decode speed?"""
    local, remote = [], []
    for _ in range(rounds):
        local.append(in_process(model, prompt, n_tokens))
        remote.append(daemon_stream(client, prompt, n_tokens))
    a, b = statistics.median(local), statistics.median(remote)
    print(f"\n{n_tokens}-token generation, {rounds} alternating rounds: in-process {a * 1e3:.2f} ms, "
          f"daemon tcp stream {b * 1e3:.2f} ms, overhead {(b - a) * 1e3:+.2f} ms "
          f"({(b - a) / n_tokens * 1e6:+.1f} us/token, ratio {b / a:.3f}x)")


def main() -> int:
    args = parse_args(__doc__.split("\n")[0])

    from ember.daemon import engine
    from ember.daemon.client import Client
    model = engine.load(args.model, backend=args.backend)
    workdir = tempfile.mkdtemp(prefix="ember-bench-")
    proc, endpoints = start_emberd(args.model, args.backend,
                                   ["tcp://127.0.0.1:*", f"ipc://{workdir}/bench.sock"])
    try:
        clients = {ep.split(":")[0]: Client(ep, timeout=30) for ep in endpoints}
        for c in clients.values():      # warm both paths
            for _ in range(20):
                daemon_complete(c, args.prompt)
        for _ in range(20):
            in_process(model, args.prompt)
        series = {"in-process": []}
        for kind in clients:
            series[f"daemon {kind} complete"] = []
            series[f"daemon {kind} stream"] = []
        pings = []
        for _ in range(args.n):         # alternate: the same noise for everyone
            series["in-process"].append(in_process(model, args.prompt))
            for kind, c in clients.items():
                series[f"daemon {kind} complete"].append(daemon_complete(c, args.prompt))
                series[f"daemon {kind} stream"].append(daemon_stream(c, args.prompt))
            pings.append(clients["tcp"].ping())
        print(f"model {Path(args.model).name}, backend {args.backend}, {args.n} alternating rounds, "
              f"1-token generation of {args.prompt!r}\n")
        for name, xs in series.items():
            print(summary(name, xs, 28))
        print(summary("ping tcp (no engine)", pings, 28))
        print()
        base = series["in-process"]
        for name, xs in series.items():
            if name == "in-process":
                continue
            diffs = [d - b for d, b in zip(xs, base)]
            print(f"overhead {name:<22} median of paired differences {statistics.median(diffs) * 1e3:+.3f} ms, "
                  f"difference of minimums {(min(xs) - min(base)) * 1e3:+.3f} ms "
                  f"(ratio of medians {statistics.median(xs) / statistics.median(base):.2f}x)")
        long_generation(model, clients["tcp"], args.prompt, 128, max(5, args.n // 20))
        for c in clients.values():
            c.close()
    finally:
        proc.terminate()
        proc.wait(10)
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
