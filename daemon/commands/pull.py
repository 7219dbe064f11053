"""`ember pull REPO FILE`: download a GGUF model into the cache (resumable, sha256-checked).

    ember pull TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf

EMBER_HUB=URL pulls from a mirror laid out like Hugging Face
(``URL/REPO/resolve/main/FILE``). See ember.daemon.modelcache.
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


def run(args: argparse.Namespace) -> int:
    root = modelcache.cache_dir(override=args.cache_dir)
    bar = modelcache.Progress(args.file) if sys.stderr.isatty() else None
    try:
        got = modelcache.pull(args.repo, args.file, root, modelcache.hub_url(override=args.hub),
                              sha256=args.sha256, progress=bar)
    finally:
        if bar is not None:
            bar.end()
    resumed = f", resumed at {got.resumed_from} bytes" if got.resumed_from else ""
    check = (f"sha256 verified ({got.verified})" if got.verified else
             "sha256 NOT verified (no --sha256 and the server gave no sha256 ETag)")
    print(f"{got.path} ({got.size} bytes{resumed}); {check}: {got.sha256}")
    return 0
