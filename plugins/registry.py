"""Finding, listing and choosing backends: one pluggy manager for the process."""
from __future__ import annotations

import importlib
import logging
from functools import lru_cache

import pluggy

from ember.plugins import hookspecs
from ember.plugins.types import BackendError, BackendSpec, Probe

log = logging.getLogger("ember.plugins")

ENTRY_POINT_GROUP = "ember.backends"
# Built-in backends are ordinary plugins, registered by module name. A module
# that fails to import (e.g. a missing optional dependency) is simply absent.
BUILTIN_MODULES = ["ember.plugins.reference", "ember.plugins.cpu", "ember.plugins.onnx",
                   "ember.plugins.cuda"]


@lru_cache(maxsize=1)
def manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("ember")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_MODULES:
        try:
            pm.register(importlib.import_module(name), name=name)
        except ImportError as e:
            if e.name != name:  # the module exists but a dependency is missing
                log.debug("built-in backend %s not importable: %s", name, e)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def backends() -> list[BackendSpec]:
    """Every declared backend, best first."""
    specs = [s for group in manager().hook.ember_backends() for s in group]
    return sorted(specs, key=lambda s: -s.priority)


def probe(name: str) -> Probe:
    """Probe one backend; a probe that raises is reported, never propagated."""
    try:
        result = manager().hook.ember_probe(backend=name)
    except Exception as e:  # noqa: BLE001 - a third-party plugin must not take ember down
        return Probe(False, f"probe raised {type(e).__name__}: {e}")
    return result if result is not None else Probe(False, "no plugin answers for it")


def choose(name: str = "auto") -> tuple[str, str]:
    """Resolve a backend name (or 'auto') to an available one; returns (name, why)."""
    specs = backends()
    names = [s.name for s in specs]
    if name != "auto":
        if name not in names:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(names) or 'none'}")
        p = probe(name)
        if not p.available:
            raise BackendError(f"backend {name!r} is not available here: {p.reason}; "
                               f"available: {', '.join(_available(specs)) or 'none'}")
        return name, "asked for by name"
    for s in specs:
        p = probe(s.name)
        if p.available:
            return s.name, f"highest-priority available backend ({s.priority}): {p.reason}"
    raise BackendError("no backend is available here; see `ember backends`")


def _available(specs: list[BackendSpec]) -> list[str]:
    return [s.name for s in specs if probe(s.name).available]
