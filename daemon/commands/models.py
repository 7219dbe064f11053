"""`ember models`: list the GGUF models in the cache (and unfinished downloads)."""
from __future__ import annotations

import argparse

from ember.daemon import modelcache
from ember.daemon.budget import human


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="models folder (default: $CACHE_DIRECTORY/models or "
                                       "~/.cache/ember/models)")


def run(args: argparse.Namespace) -> int:
    root = modelcache.cache_dir(override=args.cache_dir)
    found = modelcache.entries(root)
    demo = modelcache.DEMO_PATH
    print(f"{modelcache.DEMO_NAME}  {human(demo.stat().st_size)}  bundled with ember "
          f"(TinyStories 260K)\n    {demo}")
    if not found:
        print(f"no models in {root}; get one with: ember pull {modelcache.DEFAULT_REPO} "
              f"{modelcache.DEFAULT_FILE}")
    for e in found:
        default = "  (default)" if (e.repo, e.file) == (modelcache.DEFAULT_REPO,
                                                         modelcache.DEFAULT_FILE) else ""
        check = f"sha256 {e.sha256[:12]}… {e.verified or 'not verified'}" if e.sha256 else "no sha256"
        print(f"{e.repo}/{e.file}  {human(e.size)}  {check}{default}\n    {e.path}")
    for p in modelcache.partials(root):
        print(f"partial download: {p} ({human(p.stat().st_size)}); `ember pull` again resumes it")
    return 0
