"""`ember keys`: write a CURVE key pair (NAME.key public, NAME.key_secret private).

Server: `ember keys --name server`, then emberd --server-key server.key_secret
--allowed-clients DIR. Each client: `ember keys --name laptop`, copy laptop.key
into the server's DIR, and connect with EMBER_SERVER_KEY=server.key
EMBER_CLIENT_KEY=laptop.key_secret (or Client(curve=...)).
"""
from __future__ import annotations

import argparse

from ember.daemon import security


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=".", help="folder to write the pair into (default: .)")
    p.add_argument("--name", default="ember", help="file name stem (default: ember)")


def run(args: argparse.Namespace) -> int:
    public, secret = security.write_pair(args.dir, args.name)
    print(f"public key  {public}  (give this to the other side)")
    print(f"secret key  {secret}  (mode 0600; keep it here)")
    return 0
