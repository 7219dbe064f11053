"""`ember pull REPO FILE`: download a GGUF model into the cache (resumable, sha256-checked).

    ember pull TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf

EMBER_HUB=URL pulls from a mirror laid out like Hugging Face
(``URL/REPO/resolve/main/FILE``). See ember.daemon.modelcache.

On a terminal a tqdm bar shows size, rate and ETA on stderr; tqdm rather
than rich because it is one small pure-Python package with no dependencies
that does exactly this (byte units, rate, ETA, off when not a TTY), where
rich would bring a rendering engine (pygments, markdown-it) for one bar.
"""
from __future__ import annotations

import argparse
import sys

from ember.daemon import modelcache


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", help="repository, OWNER/NAME")
    p.add_argument("file", help="file in the repository, e.g. model.Q4_K_M.gguf")
    p.add_argument("--sha256", help="expected sha256 (default: the server's ETag when it is one)")
    p.add_argument("--cache-dir", help="models folder (default: $CACHE_DIRECTORY/models or "
                                       "~/.cache/ember/models)")
    p.add_argument("--hub", help=f"base URL (default: $EMBER_HUB or {modelcache.DEFAULT_HUB})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def byte_bar(name: str, quiet: bool):
    """A tqdm bar in bytes on stderr: off with --quiet, and when stderr is not a terminal."""
    from tqdm import tqdm
    return tqdm(desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=True if quiet else None, dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    root = modelcache.cache_dir(override=args.cache_dir)
    with byte_bar(args.file, args.quiet) as bar:
        def progress(done: int, total: int | None) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.update(done - bar.n)
        got = modelcache.pull(args.repo, args.file, root, modelcache.hub_url(override=args.hub),
                              sha256=args.sha256, progress=progress)
    if got.cached:
        print(f"{got.path} ({got.size} bytes) is already in the cache, sha256 verified "
              f"({got.verified}): {got.sha256}; nothing downloaded")
        return 0
    resumed = f", resumed at {got.resumed_from} bytes" if got.resumed_from else ""
    check = (f"sha256 verified ({got.verified})" if got.verified else
             "sha256 NOT verified (no --sha256 and the server gave no sha256 ETag)")
    print(f"{got.path} ({got.size} bytes{resumed}); {check}: {got.sha256}")
    return 0
