"""Which instruction set the C kernels run with, chosen once at import.

Design: the C library detects the CPU's features itself (dispatch.c) and
starts on the widest ISA it can run. This module reads ``EMBER_ISA``
(``generic|avx2|avx512|neon``; empty or ``auto`` means the widest), applies
it once, and logs the choice once. Forcing an ISA the CPU lacks, or naming
one that does not exist, raises ISAError at import: a clear error instead of
a silently slower (or crashing) process.

``ISA`` is the name chosen at import; ``current_variant()`` adds the
extension in use ("avx512+vnni"); ``available_isas()`` lists what this CPU
runs, widest last; ``use(name)`` switches at run time (tests walk every
variant with it) and must not race with running kernels.
"""
from __future__ import annotations

import logging
import os

from ember.formats.errors import UserError
from ember.kernels import _native

log = logging.getLogger("ember.kernels")

# order = preference: later entries are wider
ISA_NAMES: tuple[str, ...] = ("generic", "neon", "avx2", "avx512")


class ISAError(UserError, RuntimeError):
    """EMBER_ISA names an unknown ISA or one this CPU cannot run."""


def available_isas() -> list[str]:
    """ISAs this CPU can run, narrowest first (always starts with 'generic')."""
    mask = _native.cpu_isas()
    return [name for name in ISA_NAMES if mask & (1 << _native.ISA_IDS[name])]


def parse_isa(value: str | None) -> str | None:
    """EMBER_ISA's value -> an ISA name, or None for 'pick the widest'."""
    v = (value or "").strip().lower()
    if v in ("", "auto"):
        return None
    if v not in ISA_NAMES:
        raise ISAError(f"EMBER_ISA={value!r} is not an ISA; use one of: auto, {', '.join(ISA_NAMES)}")
    return v


def use(name: str) -> str:
    """Switch every kernel to ISA `name`; ISAError if this CPU cannot run it."""
    avail = available_isas()
    if name not in avail:
        raise ISAError(f"ISA {name!r} is not supported by this CPU (it runs: {', '.join(avail)})")
    _native.set_isa(_native.ISA_IDS[name])
    return name


def current_isa() -> str:
    """The ISA the kernels run with right now."""
    return _native.isa_name()


def current_variant() -> str:
    """The ISA plus the optional extension its kernels use, e.g. 'avx512+vnni',
    'neon+dotprod' (for `ember backends` and the daemon's status)."""
    return _native.isa_variant()


def _select() -> str:
    forced = parse_isa(os.environ.get("EMBER_ISA"))
    name = use(forced if forced is not None else available_isas()[-1])
    how = "forced by EMBER_ISA" if forced is not None else "auto"
    log.info("kernels: ISA %s (%s, %s; this CPU runs %s)", name, current_variant(), how,
             ", ".join(available_isas()))
    return name


ISA: str = _select()
