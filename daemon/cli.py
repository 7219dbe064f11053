"""`ember`: the tools and client command line.

Each subcommand lives in its own module under ember.daemon.commands, exposing
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their command runs, so `ember ping` does not pay for numpy kernels.
A user error (bad file, bad flag, daemon unreachable) is one line on stderr
and a non-zero exit — never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ember.formats.errors import UserError

# name -> (module under ember.daemon.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "show a GGUF model's architecture, tokenizer and tensors"),
    "quantize": ("quantize", "convert a GGUF model to another quant type"),
    "run": ("run", "generate in-process from a model file (no daemon)"),
    "bench": ("bench", "measure load, prefill, decode and memory"),
    "backends": ("backends", "list compute backends and whether they can run here"),
    "generate": ("generate", "generate through a running emberd"),
    "chat": ("chat", "interactive multi-turn chat through a running emberd"),
    "status": ("status", "show a running emberd's status"),
    "ping": ("ping", "check that an emberd answers"),
    "pull": ("pull", "download a GGUF model into the model cache"),
    "models": ("models", "list models in the cache"),
    "rm": ("rm", "remove a model from the cache"),
    "keys": ("keys", "generate a CURVE key pair"),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(f"ember.daemon.commands.{module}")


def _available() -> list[str]:
    return [n for n, (m, _) in COMMANDS.items()
            if importlib.util.find_spec(f"ember.daemon.commands.{m}") is not None]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="ember: local LLM inference")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name in _available():
        p = sub.add_parser(name, help=COMMANDS[name][1])
        if name == chosen:  # only the chosen command's module is imported
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(_load(args.command).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing boundary
        if _is_user_error(e):
            print(f"ember {args.command}: {e}", file=sys.stderr)
            return 2
        raise


def _is_user_error(e: Exception) -> bool:
    """Typed errors a user can cause; everything else is a bug and keeps its traceback."""
    return isinstance(e, (UserError, FileNotFoundError, PermissionError, IsADirectoryError))


if __name__ == "__main__":
    sys.exit(main())
