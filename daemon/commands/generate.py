"""`ember generate "prompt"`: generate through a running emberd, streaming the completion.

Only the completion goes to stdout (as tokens arrive), so `ember generate
... > out.txt` keeps exactly the text; `--verbose` puts the stop reason and
timings on stderr. Ctrl-C cancels the request on the daemon (the client's
stream sends `cancel` when it is interrupted) and exits 130. Sampling flags
not given keep the daemon's defaults; the daemon checks every value and a bad
one comes back as a one-line error, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from ember.daemon.client import ENDPOINT_ENV, default_endpoint
from ember.formats import protocol

# flag -> (request field, type, help)
SAMPLING_FLAGS = {
    "--max-tokens": ("max_tokens", int, "tokens to generate at most (default: to the end of the context)"),
    "--temperature": ("temperature", float, "0 = greedy (default 0.8)"),
    "--top-k": ("top_k", int, "keep the k most likely tokens, 0 = off"),
    "--top-p": ("top_p", float, "nucleus mass, 1.0 = off"),
    "--min-p": ("min_p", float, "drop tokens below min_p * p_max, 0 = off"),
    "--repeat-penalty": ("repeat_penalty", float, "1.0 = off"),
    "--seed": ("seed", int, "RNG seed: the same seed gives the same text"),
    "--priority": ("priority", int, "scheduling priority; higher runs first (default 0)"),
    "--deadline-ms": ("deadline_ms", int, "give up after this many milliseconds"),
}


def add_endpoint(p: argparse.ArgumentParser, timeout: float = 60.0) -> None:
    p.add_argument("--endpoint", default=default_endpoint(),
                   help=f"emberd endpoint (default ${ENDPOINT_ENV} or {protocol.DEFAULT_ENDPOINT})")
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"seconds to wait for each reply (default {timeout:g})")


def add_sampling(p: argparse.ArgumentParser) -> None:
    from ember.daemon.cli import add_flag
    for flag, (_, kind, help_) in SAMPLING_FLAGS.items():
        add_flag(p, flag, type=kind, default=None, help=help_)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")


def sampling(args: argparse.Namespace) -> dict:
    kw = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in SAMPLING_FLAGS.items()}
    kw = {k: v for k, v in kw.items() if v is not None}
    if args.stop:
        kw["stop"] = args.stop
    return kw


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help='prompt text ("-" reads it from stdin)')
    add_endpoint(p)
    add_sampling(p)
    p.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    p.add_argument("--verbose", "-v", action="store_true", help="stop reason and timings on stderr")


def stream_to(out, stream) -> dict:
    """Write each token's text as it arrives; return the `done` event."""
    for tok in stream:
        out.write(tok.text)
        out.flush()
    return stream.done


def run(args: argparse.Namespace) -> int:
    from ember.daemon.client import Client
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request = {"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt}
    with Client(args.endpoint, timeout=args.timeout) as client:
        stream = client.generate(**request, **sampling(args))
        try:
            done = stream_to(sys.stdout, stream)
        finally:        # Ctrl-C included: the shell prompt starts on a line of its own
            if sys.stdout.isatty() and not stream.text.endswith("\n"):
                sys.stdout.write("\n")
                sys.stdout.flush()
    if args.verbose:
        print(json.dumps({"stop": done["stop"], "usage": done["usage"], "timings": done["timings"]}),
              file=sys.stderr)
    return 0
