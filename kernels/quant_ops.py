"""Quantized products for Python callers: argument checks, then the C kernels.

Design: weights are a 2-D uint8 array, one row of blocks per output element
(``(rows, row_bytes)``; read-only memmaps welcome, rows may be strided, e.g.
a slice of a fused tensor); activations are float32. Activations are
quantized once per call into the format the weight type pairs with (Q8_0,
Q8_K, or f32, see ``act_type``) and reused for every weight row. This layer
validates in the user's terms, allocates the outputs, and calls
kernels/_native, which releases the GIL and never allocates.

All functions take the weight type by name (``"Q4_K"``) as in
formats/quant_blocks.py.
"""
from __future__ import annotations

import numpy as np

from ember.formats.errors import UserError
from ember.formats.quant_blocks import GGML_TYPE_IDS
from ember.kernels import _native
from ember.kernels import dispatch  # noqa: F401  (applies EMBER_ISA once)


class KernelArgError(UserError, ValueError):
    """Arguments that the kernels cannot take: unknown type, wrong shape or dtype."""


# ---------------------------------------------------------------------------
# Type facts
# ---------------------------------------------------------------------------

def type_id(wtype: str) -> int:
    """GGML id of a weight type that has kernels; KernelArgError otherwise."""
    tid = GGML_TYPE_IDS.get(wtype)
    if tid is None or not _native.type_supported(tid):
        supported = sorted(n for n, i in GGML_TYPE_IDS.items() if _native.type_supported(i))
        raise KernelArgError(f"no kernels for weight type {wtype!r} (supported: {', '.join(supported)})")
    return tid


def act_type(wtype: str) -> str:
    """Name of the activation format wtype's products use: 'Q8_0', 'Q8_K' or 'F32'."""
    from ember.formats.quant_blocks import GGML_TYPE_NAMES
    return GGML_TYPE_NAMES[_native.act_type(type_id(wtype))]


def row_length(wtype: str, row_bytes: int) -> int:
    """Values in a weight row of `row_bytes` bytes; KernelArgError if not whole blocks."""
    tid = type_id(wtype)
    bb, be = _native.block_bytes(tid), _native.block_elems(tid)
    if row_bytes <= 0 or row_bytes % bb:
        raise KernelArgError(f"{wtype}: a row of {row_bytes} bytes is not a whole number of {bb}-byte blocks")
    return row_bytes // bb * be


def _weights(wtype: str, W) -> tuple[int, np.ndarray, int]:
    """(type id, W as 2-D uint8 with contiguous rows, row length in values)."""
    tid = type_id(wtype)
    if not isinstance(W, np.ndarray) or W.dtype != np.uint8 or W.ndim != 2:
        raise KernelArgError(f"{wtype}: weights must be a 2-D uint8 array (rows, row_bytes), "
                             f"got {getattr(W, 'dtype', type(W).__name__)} {getattr(W, 'shape', '')}")
    if W.strides[1] != 1:
        W = np.ascontiguousarray(W)
    return tid, W, row_length(wtype, W.shape[1])


def _floats(x, n: int, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1:] != (n,):
        raise KernelArgError(f"{what}: expected rows of {n} values, got shape {x.shape}")
    return x

# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------

def quantize_act(wtype: str, x) -> np.ndarray:
    """float32 (n,) or (b, n) -> uint8 (act bytes,) or (b, act bytes) in wtype's activation format."""
    tid = type_id(wtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise KernelArgError(f"quantize_act: x must be 1-D or 2-D, got shape {x.shape}")
    n = x.shape[-1]
    be = _native.block_elems(tid)
    if n == 0 or n % max(be, _native.block_elems(_native.act_type(tid))):
        raise KernelArgError(f"quantize_act: row length {n} is not a multiple of {wtype}'s block")
    rows = x.reshape(-1, n)
    out = np.empty((rows.shape[0], _native.act_row_bytes(tid, n)), np.uint8)
    for b in range(rows.shape[0]):
        _native.quantize_act(tid, rows[b], out[b])
    return out.reshape(x.shape[:-1] + (out.shape[1],))

def act_blocks(wtype: str, xq: np.ndarray) -> np.ndarray:
    """The standard block part of quantized activation rows (drops Q8_0's aux area)."""
    act = _native.act_type(type_id(wtype))
    if act != GGML_TYPE_IDS["Q8_0"]:
        return xq
    bb = _native.block_bytes(act)
    nb = xq.shape[-1] // (bb + 96)        # per 32 values: a 34-byte block + 96 bytes of aux
    return xq[..., :nb * bb]

# ---------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------

def matvec(wtype: str, W, x, out: np.ndarray | None = None) -> np.ndarray:
    """W (rows, row_bytes) of wtype times float32 x (n,) -> float32 (rows,)."""
    tid, W, n = _weights(wtype, W)
    xq = quantize_act(wtype, _floats(x, n, "matvec x"))
    y = np.empty(W.shape[0], np.float32) if out is None else out
    if y.shape != (W.shape[0],) or y.dtype != np.float32 or not y.flags.c_contiguous:
        raise KernelArgError(f"matvec: out must be contiguous float32 ({W.shape[0]},)")
    _native.matvec(tid, W, xq, y, n, 0, W.shape[0])
    return y


def matmul(wtype: str, W, X, out: np.ndarray | None = None) -> np.ndarray:
    """W (rows, row_bytes) of wtype times float32 X (b, n) -> float32 (b, rows) = X @ W.T."""
    tid, W, n = _weights(wtype, W)
    X = _floats(X, n, "matmul X")
    if X.ndim != 2:
        raise KernelArgError(f"matmul: X must be 2-D (b, {n}), got shape {X.shape}")
    Xq = quantize_act(wtype, X)
    Y = np.empty((X.shape[0], W.shape[0]), np.float32) if out is None else out
    if Y.shape != (X.shape[0], W.shape[0]) or Y.dtype != np.float32 or not Y.flags.c_contiguous:
        raise KernelArgError(f"matmul: out must be contiguous float32 {(X.shape[0], W.shape[0])}")
    _native.matmul(tid, W, Xq, Y, n, 0, W.shape[0])
    return Y

def matmul_rows(wtype: str, W, Xq: np.ndarray, Y: np.ndarray, r0: int, r1: int) -> None:
    """Y[:, r0:r1] = X @ W[r0:r1].T, from X already quantized by quantize_act(wtype, X):
    the share of one product that one thread computes (the kernel releases the GIL)."""
    tid, W, n = _weights(wtype, W)
    if Y.dtype != np.float32 or Y.ndim != 2 or not Y.flags.c_contiguous or Y.shape[1] != W.shape[0]:
        raise KernelArgError(f"matmul_rows: Y must be contiguous float32 (b, {W.shape[0]})")
    _native.matmul(tid, W, Xq, Y, n, r0, r1)

# ---------------------------------------------------------------------------
# Dequantization and embedding lookup
# ---------------------------------------------------------------------------

def dequantize(wtype: str, data) -> np.ndarray:
    """uint8 blocks (rows, row_bytes) or (row_bytes,) -> float32 (rows, n) or (n,).

    Also accepts the activation formats ('Q8_K' included) so tests can read
    back what quantize_act produced.
    """
    tid = GGML_TYPE_IDS.get(wtype, -1)
    be, bb = _native.block_elems(tid), _native.block_bytes(tid)
    data = np.asarray(data)
    if be == 0 or data.dtype != np.uint8 or data.ndim not in (1, 2):
        raise KernelArgError(f"dequantize: need 1-D/2-D uint8 blocks of a known type, got {wtype!r} {data.dtype} {data.shape}")
    if data.shape[-1] % bb:
        raise KernelArgError(f"dequantize: {data.shape[-1]} bytes per row is not whole {bb}-byte {wtype} blocks")
    rows = np.ascontiguousarray(data).reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], data.shape[-1] // bb * be), np.float32)
    for r in range(rows.shape[0]):
        _native.dequantize_row(tid, rows[r], out[r])
    return out.reshape(data.shape[:-1] + (out.shape[1],))


def get_rows(wtype: str, W, ids) -> np.ndarray:
    """Rows `ids` of W, dequantized: float32 (len(ids), n). Embedding lookup."""
    tid, W, n = _weights(wtype, W)
    ids = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= W.shape[0]):
        raise KernelArgError(f"get_rows: ids must lie in [0, {W.shape[0]}), got {ids.min()}..{ids.max()}")
    out = np.empty((ids.size, n), np.float32)
    _native.get_rows(tid, W, ids, out)
    return out
