"""`ember rm NAME`: remove a cached model (REPO/FILE, FILE, or REPO for all its files)."""
from __future__ import annotations

import argparse

from ember.daemon import modelcache


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="REPO/FILE, FILE or REPO as `ember models` shows them")
    p.add_argument("--cache-dir", help="models folder (default: $CACHE_DIRECTORY/models or "
                                       "~/.cache/ember/models)")


def run(args: argparse.Namespace) -> int:
    root = modelcache.cache_dir(override=args.cache_dir)
    for path in modelcache.remove(root, args.name):
        print(f"removed {path}")
    return 0
