"""emberd's TOML config file (`--config PATH`); command-line flags override it.

Design. The config file and the flags describe the same settings, so the file
is folded into argparse itself: its values become the parser's defaults and
the command line is parsed again on top of them. A flag given on the command
line therefore always wins, and a setting absent from both keeps the flag's
built-in default. `bind` is the one list: endpoints given with --bind replace
the file's list rather than adding to it.

The file is validated before anything starts: an unknown key, a wrong type
or a section that is not a table is a `ConfigError` naming the key and the
file (a user error: one line, exit 2). systemd/emberd.toml is the documented
example and a test checks that it loads.

Keys (top level unless a section is named):

    model, bind, backend, threads (0 = the backend's default), ctx, min_ctx,
    memory_budget ("1.5G" or bytes), log_level, allow_load, load_dir, strict_model_file,
    http ("HOST:PORT": the OpenAI-compatible API, docs/http.md),
    draft ("prompt-lookup" or a draft model: speculative decoding), draft_max,
    cache_slots, prompt_cache_dir (the prompt cache: daemon/promptcache.py)
    [scheduler]  queue_size, max_tokens, drain_timeout
    [security]   server_secret_key, allowed_clients, insecure, api_key_file
    [cache]      dir, hub
"""
from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass

from ember.formats.errors import UserError


class ConfigError(UserError, ValueError):
    """The config file is unreadable or has a bad key/value."""


# ---------------------------------------------------------------------------
# The schema: (section, key) -> argparse dest and accepted types
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    dest: str
    types: tuple
    what: str


SCHEMA: dict[tuple[str, str], Key] = {
    ("", "model"): Key("model", (str,), "a model file path or name (empty: the default model)"),
    ("", "bind"): Key("bind", (list,), "a list of endpoint strings"),
    ("", "backend"): Key("backend", (str,), "a backend name"),
    ("", "threads"): Key("threads", (int,), "an integer >= 0"),
    ("", "ctx"): Key("ctx", (int,), "a positive integer"),
    ("", "min_ctx"): Key("min_ctx", (int,), "a positive integer"),
    ("", "memory_budget"): Key("memory_budget", (str, int), 'a size such as "1.5G" or bytes'),
    ("", "log_level"): Key("log_level", (str,), "debug, info, warning or error"),
    ("", "allow_load"): Key("allow_load", (bool,), "true or false"),
    ("", "strict_model_file"): Key("strict_model_file", (bool,), "true or false"),
    ("", "load_dir"): Key("load_dir", (str,), "a folder"),
    ("", "cache_slots"): Key("cache_slots", (int,), "an integer >= 0"),
    ("", "prompt_cache_dir"): Key("prompt_cache_dir", (str,), "a folder"),
    ("", "http"): Key("http", (str,), 'an HTTP address such as "127.0.0.1:8080"'),
    ("", "draft"): Key("draft", (str,), '"prompt-lookup" or a draft model path or name'),
    ("", "draft_max"): Key("draft_max", (int,), "a positive integer (tokens per draft)"),
    ("scheduler", "queue_size"): Key("max_queue", (int,), "an integer >= 0"),
    ("scheduler", "max_tokens"): Key("max_tokens", (int,), "a positive integer"),
    ("scheduler", "drain_timeout"): Key("drain_timeout", (int, float), "seconds"),
    ("security", "server_secret_key"): Key("server_key", (str,), "a path to a .key_secret file"),
    ("security", "allowed_clients"): Key("allowed_clients", (str,), "a folder of client .key files"),
    ("security", "insecure"): Key("insecure", (bool,), "true or false"),
    ("security", "api_key_file"): Key("api_key_file", (str,), "a path to a file of HTTP API keys"),
    ("cache", "dir"): Key("cache_dir", (str,), "a folder"),
    ("cache", "hub"): Key("hub", (str,), "a base URL"),
}
SECTIONS = {s for s, _ in SCHEMA if s}


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

def load(path: str | os.PathLike) -> dict[str, object]:
    """The file's settings as {argparse dest: value}, validated."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from None
    out: dict[str, object] = {}
    for section, key, value in _items(path, data):
        spec = SCHEMA.get((section, key))
        name = f"[{section}] {key}" if section else key
        if spec is None:
            raise ConfigError(f"config {path}: unknown key {name!r}; known: {_known()}")
        out[spec.dest] = _checked(path, name, spec, value)
    return out


def _items(path, data: dict):
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(f"config {path}: unknown section [{key}]; known: "
                                  f"{', '.join(sorted(SECTIONS))}")
            for k, v in value.items():
                yield key, k, v
        else:
            yield "", key, value


def _checked(path, name: str, spec: Key, value):
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if spec.dest == "bind":
        ok = ok and all(isinstance(v, str) for v in value)
    if spec.types == (int,) and ok:
        ok = value >= 0 if spec.dest in ("threads", "max_queue") else value > 0
    if not ok:
        raise ConfigError(f"config {path}: {name} must be {spec.what}, got {value!r}")
    if spec.dest == "threads" and value == 0:
        return None                      # 0 = the backend's default
    if spec.dest == "model" and value == "":
        return None                      # empty = the documented default model
    return value


def _known() -> str:
    return ", ".join(f"[{s}] {k}" if s else k for s, k in SCHEMA)


# ---------------------------------------------------------------------------
# Folding into argparse
# ---------------------------------------------------------------------------

def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help="TOML config file (see systemd/emberd.toml); flags override it")


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv with the config file's values as defaults (flags win).

    A bad config file ends the process like a bad flag does: one line, exit 2.
    """
    pre, _ = parser.parse_known_args(argv)
    settings: dict[str, object] = {}
    if getattr(pre, "config", None):
        try:
            settings = load(pre.config)
        except ConfigError as e:
            parser.exit(2, f"{parser.prog}: {e}\n")
    binds = settings.pop("bind", None)
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in settings.items() if k in known})
    args = parser.parse_args(argv)
    if args.bind is None and binds:      # --bind replaces the file's list
        args.bind = list(binds)
    args.config_keys = set(settings) | ({"bind"} if binds else set())
    return args
