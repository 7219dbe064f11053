"""`ember status`: what a running emberd is doing (model, queue, current request, counters)."""
from __future__ import annotations

import argparse
import json

from ember.daemon.commands.generate import add_endpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_endpoint(p, timeout=5.0)
    p.add_argument("--json", action="store_true", help="print the raw status reply as JSON")


def _lines(st: dict) -> list[str]:
    cur = st["current"]
    running = (f"{cur['id']!r} ({cur['tokens']} tokens, priority {cur['priority']})"
               if cur else "idle")
    return [
        f"model      {st['model']} on {st['backend']}" + (f" ({st['isa']})" if st.get("isa") else ""),
        f"uptime     {st['uptime_s']:.1f} s, RSS {st['rss_bytes'] / 2**20:.1f} MiB",
        f"running    {running}",
        f"queue      {st['queue_len']} / {st['queue_max']} waiting",
        f"served     {st['requests_served']} requests, {st['tokens_served']} tokens",
        *_speculative(st.get("speculative")),
        *_memory_lines(st),
    ]


def _speculative(sp: dict | None) -> list[str]:
    if not sp:
        return []
    return [f"draft      {sp['draft']}: {sp['accepted']} of {sp['drafted']} draft tokens "
            f"accepted ({sp['acceptance_rate']:.1%}) in {sp['steps']} passes"]


def _memory_lines(st: dict) -> list[str]:
    """The memory plan by part, and what the prompt cache holds of its share."""
    out, mem, pc = [], st.get("memory"), st.get("prompt_cache")
    if mem:
        parts = ", ".join(f"{k} {mem[k] / 2**20:.1f}" for k in
                          ("weights", "kv_cache", "prompt_cache", "scratch", "runtime", "process")
                          if k in mem)
        out.append(f"plan       {mem['total'] / 2**20:.1f} MiB at n_ctx {mem['n_ctx']} ({parts} MiB)")
    if pc:
        out.append(f"prompt     cache {pc['entries']} / {pc['slots']} slots, {pc['bytes'] / 2**20:.1f} MiB; "
                   f"{pc['hits']} hits, {pc['tokens_reused']} tokens reused")
    return out


def run(args: argparse.Namespace) -> int:
    from ember.daemon.client import Client
    with Client(args.endpoint, timeout=args.timeout) as client:
        st = client.status()
    if args.json:
        print(json.dumps({k: v for k, v in st.items() if k not in ("v", "op", "id")}, indent=2))
    else:
        print("\n".join(_lines(st)))
    return 0
