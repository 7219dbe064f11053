"""`ember chat`: an interactive, streaming, multi-turn chat through a running emberd.

Each line you type is a user turn; the whole conversation is sent every turn
(the daemon keeps no session state) and the reply streams as it is produced.
`/reset` forgets the conversation, `/exit` or end of input (Ctrl-D) quits.
Ctrl-C during a reply cancels it on the daemon and keeps the chat going;
Ctrl-C at the prompt quits. Works with piped input too (no prompt shown).
"""
from __future__ import annotations

import argparse
import sys

from ember.daemon.commands.generate import add_endpoint, add_sampling, sampling, stream_to


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_endpoint(p)
    add_sampling(p)
    p.add_argument("--system", help="a system message at the start of the conversation")


def _read_line(interactive: bool) -> str | None:
    try:
        return input("> " if interactive else "")
    except EOFError:
        return None


def _reply(client, messages: list[dict], params: dict) -> str | None:
    """Stream one assistant turn; None when interrupted (cancelled on the daemon)."""
    with client.generate(messages=messages, **params) as stream:
        try:
            stream_to(sys.stdout, stream)
        except KeyboardInterrupt:
            sys.stdout.write("\n[cancelled]\n")
            return None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.text


def run(args: argparse.Namespace) -> int:
    from ember.daemon.client import Client
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    params = sampling(args)
    with Client(args.endpoint, timeout=args.timeout) as client:
        client.ping()   # fail fast, before the first prompt, when no daemon answers
        while (line := _read_line(interactive)) is not None:
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                messages = list(start)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            text = _reply(client, messages, params)
            if text is None:
                messages.pop()
            else:
                messages.append({"role": "assistant", "content": text})
    return 0
