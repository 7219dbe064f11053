"""`emberd`: the daemon entry point (the server lands with the daemon issue)."""
import sys


def main(argv=None) -> int:
    print("emberd: not yet — the daemon lands with issue 6; use `ember run` meanwhile",
          file=sys.stderr)
    return 1
