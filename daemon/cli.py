"""`ember`: the tools and client command line.

Each subcommand lives in its own module under ember.daemon.commands, exposing
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their command runs, so `ember ping` does not pay for numpy kernels.
A user error (bad file, bad flag, daemon unreachable) is one line on stderr
and a non-zero exit — never a traceback.

Habits from llama.cpp and Ollama work: the short flags of HABITS are
accepted beside ember's own names (one table for `ember` and `emberd`), a
flag ember has no equivalent for gets a hint (FOREIGN), and a mistyped flag
or command prints the subcommand's usage with "did you mean".
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import re
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


# ---------------------------------------------------------------------------
# Flags people bring from llama.cpp / Ollama
# ---------------------------------------------------------------------------

# ember's flag -> the other spellings it also answers to
HABITS: dict[str, tuple[str, ...]] = {
    "--model": ("-m",),
    "--max-tokens": ("-n", "--n-predict"),
    "--ctx": ("-c", "--ctx-size"),
    "--n-ctx": ("-c", "--ctx-size"),
    "--threads": ("-t",),
    "--seed": ("-s",),
    "--temperature": ("--temp",),
}

# flags of llama.cpp that mean nothing here -> what to do instead
_GPU_HINT = ("ember does not split layers between CPU and GPU: `--backend cuda` runs the whole "
             "model on the GPU (see `ember backends`)")
FOREIGN: dict[str, str] = {"-ngl": _GPU_HINT, "--n-gpu-layers": _GPU_HINT, "--gpu-layers": _GPU_HINT}


def add_flag(p: argparse.ArgumentParser, name: str, **kw) -> argparse.Action:
    """p.add_argument(name, ...) plus its HABITS spellings; a short one leads, so usage
    lines show `-m MODEL` (the destination still comes from `name`)."""
    others = HABITS.get(name, ())
    short = [o for o in others if not o.startswith("--")]
    return p.add_argument(*short, name, *[o for o in others if o.startswith("--")], **kw)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version("ember")
    except PackageNotFoundError:       # running from a source tree that was never installed
        return "unknown"


def add_version(p: argparse.ArgumentParser) -> None:
    """--version, looked up only when asked (reading the package metadata takes ~0.2 s)."""
    class Version(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog} {version()}")
            parser.exit()
    p.add_argument("--version", nargs=0, action=Version, help="show the version and exit")


class Parser(argparse.ArgumentParser):
    """argparse with hints: FOREIGN flags explained, unknown flags and commands get
    "did you mean", and errors print this (sub)command's usage."""

    def parse_known_args(self, args=None, namespace=None):
        mine = [] if self._subparsers is not None else sys.argv[1:] if args is None else args
        for a in mine:      # (a parser with subcommands leaves this to the subcommand's)
            if a.split("=", 1)[0] in FOREIGN:   # before argparse reads `-ngl` as `-n gl`
                self.error(f"{a.split('=', 1)[0]}: {FOREIGN[a.split('=', 1)[0]]}")
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{self._did_you_mean(message)}\n")

    def _did_you_mean(self, message: str) -> str:
        if m := re.search(r"unrecognized arguments: (.*)", message):
            words = [w.split("=", 1)[0] for w in m.group(1).split() if w.startswith("-")]
            known = list(self._option_string_actions)
        elif m := re.search(r"invalid choice: '([^']*)'", message):
            words, known = [m.group(1)], [c for a in self._actions if a.choices for c in a.choices]
        else:
            return ""
        hints = [close[0] for w in words
                 if (close := difflib.get_close_matches(w, known, n=1, cutoff=0.6))]
        return f"; did you mean {' or '.join(hints)}?" if hints else ""


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(f"ember.daemon.commands.{module}")


def _available() -> list[str]:
    return [n for n, (m, _) in COMMANDS.items()
            if importlib.util.find_spec(f"ember.daemon.commands.{m}") is not None]


def build_parser(argv: list[str]) -> tuple[Parser, Parser | None]:
    """The `ember` parser and the chosen subcommand's (None when argv names none)."""
    parser = Parser(prog="ember", description="ember: local LLM inference")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    chosen_parser = None
    for name in _available():
        p = sub.add_parser(name, help=COMMANDS[name][1])
        if name == chosen:  # only the chosen command's module is imported
            _load(name).add_arguments(p)
            chosen_parser = p
    return parser, chosen_parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser, chosen = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:               # argparse would blame the top-level parser: blame the subcommand
        (chosen or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
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
