"""`ember backends`: every compute backend, whether it can run here and why.

Rows come from ember.plugins.registry (built-in and third-party plugins
alike), best first; `--json` prints the same rows for scripts. Plugins that
failed to import are listed after the table, so a broken third-party package
is visible without stopping anything. docs/backends.md says what each field
of `--json` means (and what the webgpu row shows: adapter, API, features).
"""
from __future__ import annotations

import json

from ember.plugins import registry


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="also say which backend NAME (or 'auto') resolves to")


def run(args) -> int:
    rows = registry.statuses()
    errors = registry.load_errors()
    chosen = registry.choose(args.backend) if args.backend else None
    if args.json:
        doc = {"backends": [r.to_dict() for r in rows], "load_errors": errors}
        if chosen:
            doc["chosen"] = {"name": chosen[0], "why": chosen[1]}
        print(json.dumps(doc, indent=2))
        return 0
    print(_table(rows))
    for plugin, err in errors.items():
        print(f"plugin {plugin} failed to load: {err}")
    if chosen:
        print(f"--backend {args.backend} -> {chosen[0]}: {chosen[1]}")
    return 0


def _table(rows) -> str:
    head = ("BACKEND", "PRIORITY", "AVAILABLE", "ISA", "DEVICES", "REASON")
    body = [(r.name, str(r.priority), "yes" if r.available else "no", r.isa or "-",
             ",".join(r.devices) or "-", r.reason) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    lines = []
    for cells in [head, *body]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1])
    return "\n".join(lines)
