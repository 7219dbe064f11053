"""Assembles the WebGPU kernel sources (kernels/wgsl/*.wgsl) into shader modules.

Design: WGSL has no #include, so a module is a concatenation. The matrix
kernels (kernels/wgsl/matvec.wgsl: matvec and embed) are written once
against ``fn dequant(wrow, drow, u)``, the 32 weights of one unit of a row,
and each weight kind brings that function and its weight bindings in a
file of its own (dequant_<kind>.wgsl); the module for a kind is the two
together. ``TB``, the tokens a thread multiplies per dequantized unit, is a
constant (function-scope arrays need one), so decode's module (TB = 1) and
prefill's (TB = 8) are two texts of the same file. The row kernels
(rope_kv, attention, swiglu, add_norm, shortconv) are one file and module
each.

Every module is plain WGSL with no extension enabled: it runs on Vulkan,
Metal and D3D12 alike (naga, which wgpu validates with, translates it to
each). Nothing here needs a GPU, so CI checks the assembly, and
tests/kernels/test_wgsl_source.py compiles every module where an adapter is
found (lavapipe in CI).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ember.formats.errors import UserError

WGSL_DIR = Path(__file__).with_name("wgsl")
KINDS = ("q4_0", "q8_0", "q4_k", "q5_k", "q6_k", "f16", "f32")   # dequant_<kind>.wgsl
ROW_KERNELS = ("rope_kv", "attention", "swiglu", "add_norm", "shortconv")        # <name>.wgsl, entry <name>
TOKEN_TILES = (1, 8)     # TB of the matvec modules: decode, prefill
HD_MAX = 256             # widest head the row kernels hold in workgroup memory
_TB_LINE = "const TB: u32 = 1u;"


class SourceError(UserError, ValueError):
    """An unknown kernel kind or token tile."""


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    return (WGSL_DIR / f"{name}.wgsl").read_text()


def matvec_source(kind: str, tb: int = 1) -> str:
    """The matvec + embed module of one weight kind, TB tokens a thread."""
    if kind not in KINDS:
        raise SourceError(f"no WGSL dequant for kind {kind!r} (kinds: {', '.join(KINDS)})")
    if tb not in TOKEN_TILES:
        raise SourceError(f"token tile {tb} is not one of {TOKEN_TILES}")
    body = _read("matvec")
    if _TB_LINE not in body:
        raise SourceError(f"matvec.wgsl lost its {_TB_LINE!r} line")
    return _read(f"dequant_{kind}") + "\n" + body.replace(_TB_LINE, f"const TB: u32 = {tb}u;")


def row_source(name: str) -> str:
    """The module of one row kernel (its entry point has the same name)."""
    if name not in ROW_KERNELS:
        raise SourceError(f"no row kernel {name!r} (kernels: {', '.join(ROW_KERNELS)})")
    return _read(name)


def all_modules() -> dict[str, str]:
    """Every module the backend can create, by key: 'mv<TB>_<kind>' and the row kernels."""
    mods = {f"mv{tb}_{k}": matvec_source(k, tb) for k in KINDS for tb in TOKEN_TILES}
    mods.update({n: row_source(n) for n in ROW_KERNELS})
    return mods


def wgsl_files() -> list[Path]:
    """Every .wgsl file shipped (each is part of at least one module of all_modules)."""
    return sorted(WGSL_DIR.glob("*.wgsl"))
