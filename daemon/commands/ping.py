"""`ember ping`: check that an emberd answers, and how fast (exit 0 yes, 2 no)."""
from __future__ import annotations

import argparse

from ember.daemon.commands.generate import add_endpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_endpoint(p, timeout=5.0)
    p.add_argument("--count", "-c", type=int, default=1, help="pings to send (default 1)")
    p.add_argument("--health", action="store_true",
                   help="also ask the daemon to prove it can still produce a token")


def run(args: argparse.Namespace) -> int:
    from ember.daemon.client import Client
    with Client(args.endpoint, timeout=args.timeout) as client:
        hello = client.hello()
        rtts = [client.ping() * 1e3 for _ in range(max(1, args.count))]
        print(f"pong from {args.endpoint}: {hello['server']} {hello['server_version']}, "
              f"model {hello['model']} on {hello['backend']}, "
              f"round trip {min(rtts):.3f} ms" + (f" (max {max(rtts):.3f})" if len(rtts) > 1 else ""))
        if args.health:
            h = client.health()
            print(f"health: {'ok' if h['ok'] else 'UNHEALTHY'} — {h['worker']} "
                  f"({h['latency_ms']:.1f} ms)")
            return 0 if h["ok"] else 1
    return 0
