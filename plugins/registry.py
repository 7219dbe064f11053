"""Finding, listing and choosing backends: one pluggy manager for the process.

Design note. Built-in backends (reference, cpu, onnx, cuda) and third-party
ones are the same thing: pluggy plugins answering the hooks of
ember.plugins.hookspecs. Built-ins are registered by module name; third-party
ones come from the entry-point group ``ember.backends``, one entry point at a
time, so that a package that fails to import is recorded (and shown by
``ember backends``) instead of taking the process down.

Every backend name has one owner plugin (the first that declared it). Hooks
for a backend are called on its owner alone, through a pluggy subset caller:
a third-party plugin that raises for every name then breaks only itself.
Probes are cached per process (they may import heavy libraries); ``refresh``
forgets them.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from ember.plugins import hookspecs
from ember.plugins.features import FEATURES, features
from ember.plugins.types import BackendError, BackendSpec, MemoryPlan, Probe

log = logging.getLogger("ember.plugins")

ENTRY_POINT_GROUP = "ember.backends"
# Built-in backends are ordinary plugins, registered by module name. A module
# that is not installed is simply absent; a module that exists but fails to
# import (a missing dependency) is recorded as a load error.
BUILTIN_MODULES = ["ember.plugins.reference", "ember.plugins.cpu", "ember.plugins.onnx",
                   "ember.plugins.cuda"]


# ---------------------------------------------------------------------------
# The plugin manager
# ---------------------------------------------------------------------------

@dataclass
class _State:
    pm: pluggy.PluginManager
    owners: dict[str, object] = field(default_factory=dict)      # backend name -> plugin
    specs: dict[str, BackendSpec] = field(default_factory=dict)  # backend name -> spec
    origins: dict[str, str] = field(default_factory=dict)        # backend name -> plugin name
    load_errors: dict[str, str] = field(default_factory=dict)    # plugin name -> error
    probes: dict[str, Probe] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _state() -> _State:
    pm = pluggy.PluginManager("ember")
    pm.add_hookspecs(hookspecs)
    st = _State(pm)
    for name in BUILTIN_MODULES:
        _register_builtin(st, name)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _register_entry_point(st, ep)
    for plugin in pm.get_plugins():
        _collect_specs(st, plugin)
    return st


def _register_builtin(st: _State, module: str) -> None:
    try:
        st.pm.register(importlib.import_module(module), name=module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the module exists but a dependency is missing
            st.load_errors[module] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a broken backend must not stop ember
        st.load_errors[module] = f"{type(e).__name__}: {e}"


def _register_entry_point(st: _State, ep: importlib.metadata.EntryPoint) -> None:
    label = f"{ep.name} ({ep.value})"
    if st.pm.get_plugin(ep.name) is not None or st.pm.is_blocked(ep.name):
        return
    try:
        st.pm.register(ep.load(), name=ep.name)
    except Exception as e:  # noqa: BLE001 - third-party code: report, keep starting
        st.load_errors[label] = f"{type(e).__name__}: {e}"
        log.info("backend plugin %s failed to load: %s", label, e)


def _collect_specs(st: _State, plugin) -> None:
    pname = st.pm.get_name(plugin) or repr(plugin)
    if not hasattr(plugin, "ember_backends"):
        return
    try:
        specs = list(plugin.ember_backends() or [])
    except Exception as e:  # noqa: BLE001
        st.load_errors[pname] = f"ember_backends raised {type(e).__name__}: {e}"
        return
    for spec in specs:
        if not isinstance(spec, BackendSpec):
            st.load_errors[pname] = f"ember_backends returned {type(spec).__name__}, not BackendSpec"
        elif spec.name in st.owners:
            log.warning("backend %r from %s ignored: already declared by %s",
                        spec.name, pname, st.origins[spec.name])
        else:
            st.owners[spec.name], st.specs[spec.name], st.origins[spec.name] = plugin, spec, pname


def manager() -> pluggy.PluginManager:
    """The process's plugin manager (built once)."""
    return _state().pm


def refresh() -> None:
    """Forget the manager and every cached probe (tests; after installing a plugin)."""
    _state.cache_clear()


def _owner_call(hook: str, backend: str, **kwargs):
    """Call `hook` on the plugin that owns `backend` only."""
    st = _state()
    owner = st.owners[backend]
    others = [p for p in st.pm.get_plugins() if p is not owner]
    return st.pm.subset_hook_caller(hook, remove_plugins=others)(backend=backend, **kwargs)


# ---------------------------------------------------------------------------
# Listing and probing
# ---------------------------------------------------------------------------

def backends() -> list[BackendSpec]:
    """Every declared backend, best (highest priority) first."""
    return sorted(_state().specs.values(), key=lambda s: (-s.priority, s.name))


def load_errors() -> dict[str, str]:
    """Plugins that could not be imported or declared: plugin -> error."""
    return dict(_state().load_errors)


def probe(name: str) -> Probe:
    """Probe one backend (cached); a probe that raises is reported, never propagated."""
    st = _state()
    if name not in st.probes:
        st.probes[name] = _probe_uncached(name)
    return st.probes[name]


def _probe_uncached(name: str) -> Probe:
    if name not in _state().owners:
        return Probe(False, "no plugin declares it")
    try:
        result = _owner_call("ember_probe", name)
    except Exception as e:  # noqa: BLE001 - a third-party plugin must not take ember down
        return Probe(False, f"probe raised {type(e).__name__}: {e}")
    if not isinstance(result, Probe):
        return Probe(False, f"probe returned {type(result).__name__}, not Probe")
    return result


@dataclass
class BackendStatus:
    """One row of `ember backends`."""

    name: str
    priority: int
    available: bool
    reason: str
    isa: str | None
    devices: list[str]
    memory_bytes: int | None
    description: str
    plugin: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def statuses() -> list[BackendStatus]:
    """Every declared backend with its probe, best first."""
    st = _state()
    rows = []
    for spec in backends():
        p = probe(spec.name)
        rows.append(BackendStatus(spec.name, spec.priority, p.available, p.reason, p.isa,
                                  list(p.devices), p.memory_bytes, spec.description,
                                  st.origins[spec.name]))
    return rows


def available() -> list[str]:
    """Names of the backends that can run here, best first."""
    return [s.name for s in backends() if probe(s.name).available]


# ---------------------------------------------------------------------------
# Choosing, planning, loading
# ---------------------------------------------------------------------------

def choose(name: str = "auto", config=None) -> tuple[str, str]:
    """Resolve a backend name (or 'auto') to an available one; returns (name, why).

    With a model's `config` (ember.formats.model_config.ModelConfig), 'auto' passes over
    backends whose BackendSpec.features lack one of the model's features (a bert
    encoder goes to the best backend that computes encoders).
    Raises BackendError naming the available backends when `name` is unknown
    or cannot run here, or when nothing can run.
    """
    if name in (None, "", "auto"):
        return _choose_auto(config)
    specs = backends()
    if name not in {s.name for s in specs}:
        raise BackendError(f"unknown backend {name!r}; available: {_avail_text()} "
                           f"(known: {', '.join(s.name for s in specs) or 'none'})")
    p = probe(name)
    if not p.available:
        raise BackendError(f"backend {name!r} is not available here: {p.reason}; "
                           f"available: {_avail_text()}")
    return name, "asked for by name"


def _choose_auto(config=None) -> tuple[str, str]:
    needs = set(features(config)) if config is not None else set()
    skipped = []
    for s in backends():
        p = probe(s.name)
        have = needs if s.features is None else s.features
        lacks = [f for f in FEATURES if f in needs - have]
        if p.available and lacks:
            skipped.append(f"{s.name} (no {config.arch} {FEATURES[lacks[0]]})")
            continue
        if p.available:
            why = f"auto: {s.name} is the highest-priority available backend (priority {s.priority})"
            if skipped:
                why += "; skipped " + "; ".join(skipped)
            return s.name, why
        skipped.append(f"{s.name} ({p.reason})")
    raise BackendError("no backend is available here: " + ("; ".join(skipped) or "none declared")
                       + "; see `ember backends`")


def _avail_text() -> str:
    return ", ".join(available()) or "none"


def plan(name: str, config, n_ctx: int, options: dict | None = None) -> MemoryPlan:
    """The backend's memory plan for `config` at `n_ctx`."""
    result = _owner_call("ember_plan", name, config=config, n_ctx=n_ctx, options=options or {})
    if result is None:
        raise BackendError(f"backend {name!r} gave no memory plan")
    return result


def load(name: str, gguf, config, n_ctx: int, threads: int | None = None,
         options: dict | None = None):
    """Load `gguf` on backend `name` (already chosen); returns its Runner."""
    if name not in _state().owners:
        raise BackendError(f"unknown backend {name!r}; available: {_avail_text()}")
    runner = _owner_call("ember_load", name, gguf=gguf, config=config, n_ctx=n_ctx,
                         threads=threads, options=options or {})
    if runner is None:
        raise BackendError(f"backend {name!r} did not load the model")
    return runner
