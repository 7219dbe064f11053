"""GGML quantization block layouts: one table, numpy reference codecs.

Every quant type stores a tensor row as a run of fixed-size blocks. BLOCKS is
the single source of truth for (elements per block, bytes per block); the C
structs in kernels/c assert the same sizes and a test checks the two agree.

Design
------
One class per type, named exactly like it (``Q4_0``, ``Q6_K``), in the manner
of gguf-py: ``dequantize_blocks(blocks, out)`` turns an ``(n, type_size)``
uint8 view into ``(n, block)`` float32, ``quantize_blocks(x)`` does the
reverse. Each quant class declares its block once, as a numpy struct
(``layout``) in ggml-common.h's field order, size-checked at import.
``dequantize``/``quantize`` check arguments, allocate the output once, and
walk it in chunks of ``_CHUNK_ELEMS`` elements so temporaries stay in cache.

numpy's cost is per loop call as much as per byte, and the blocks are
16-210 byte rows, so the dequantizers avoid per-row loops:
  * a field is pulled out of the chunk through the struct view, one strided
    copy for all rows, then worked on as a contiguous array;
  * bit fields are split with whole-array uint64 shifts and masks (8 codes a
    lane) and interleaved into element order as whole w-byte rows;
  * signed codes come from wrapping uint8 arithmetic (uint8 ``q - 8`` is the
    int8 ``q - 8``; ``q | 0xFC`` is ``q - 4``), never a wider type;
  * the float32 output is written by one int -> float cast, then scaled in
    place by ``np.repeat``-ed sub-block scales (contiguous multiplies beat
    broadcasting over 16-32 wide rows about 2x).
Dequantization multiplies in the same order as ggml's C code (``(d*sc)*q``,
then ``- m``), so results are bit-identical to it and to gguf-py.

Quantization of every type llama-quantize writes without an importance matrix
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS; Q8_K for activations)
follows ggml_quantize_chunk (ggml-quants.c: ``quantize_row_*_ref`` for all but
the IQ4 types, ``quantize_iq4_*`` for those) operation by operation in float32:
same rounding (truncation, ``roundf``, or round-half-even through the
``nearest_int`` magic number), same ``d ? 1/d : 0`` guard, same summation
order (sequential, never numpy's pairwise sums), fp16 stores rounded to
nearest even like ``_cvtss_sh``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

# GGML type id -> name, for every type a GGUF file may name. Only the types in
# BLOCKS can be read; the rest are known so that errors can name them.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}
GGML_TYPE_IDS: dict[str, int] = {name: i for i, name in GGML_TYPE_NAMES.items()}

QK_K = 256  # super-block size of the K-quants

# name -> (elements per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "F64": (1, 8),
    "I8": (1, 1),
    "I16": (1, 2),
    "I32": (1, 4),
    "I64": (1, 8),
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q8_1": (32, 4 + 32),
    "Q2_K": (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    "Q3_K": (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    "Q4_K": (QK_K, 2 + 2 + 12 + QK_K // 2),
    "Q5_K": (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    "Q8_K": (QK_K, 4 + QK_K + QK_K // 16 * 2),
    "IQ4_NL": (32, 2 + 16),
    "IQ4_XS": (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
}


def block_size(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a readable type; KeyError otherwise."""
    return BLOCKS[type_name]


def row_bytes(type_name: str, n_elements: int) -> int:
    """Bytes that n_elements of type_name occupy (n_elements a multiple of the block)."""
    elems, nbytes = BLOCKS[type_name]
    return n_elements // elems * nbytes


class QuantError(ValueError):
    """Bad arguments to dequantize/quantize: unknown type, wrong byte count or shape."""


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

_CHUNK_ELEMS = 1 << 17   # output elements per chunk: 512 KiB of float32, L2-sized

# fp16 bit pattern -> float32: the exact fallback for F16 chunks holding inf/NaN
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _denormals_flushed() -> bool:
    """True if this thread's FPU flushes subnormals (FTZ/DAZ, set by some native
    libraries); the F16 bit trick multiplies subnormal float32s and needs them."""
    return np.float32(2.0 ** -140) * np.float32(2.0 ** 112) == 0


def _struct(*fields: tuple[str, str]) -> np.dtype:
    """A block layout as a packed numpy struct, fields in ggml-common.h's order.

    Viewing a chunk of blocks through it turns every field into an (n,) array
    that numpy copies in ONE strided loop; slicing bytes out of (n, type_size)
    instead costs a loop call per block row, which dominates at 16-32 bytes.
    """
    return np.dtype(list(fields))


def _fields(blocks: np.ndarray, layout: np.dtype) -> np.ndarray:
    """(n, type_size) uint8 -> (n,) structured view (no copy; read-only stays so)."""
    return blocks.view(layout).reshape(len(blocks))


def _raw(S: np.ndarray, name: str) -> np.ndarray:
    """A byte field as a contiguous (n, width) uint8 copy."""
    f = S[name]
    return np.ascontiguousarray(f).view(np.uint8).reshape(len(S), f.dtype.itemsize)


def _f32(S: np.ndarray, name: str) -> np.ndarray:
    """An fp16/fp32 scale field as (n,) float32."""
    return S[name].astype(np.float32)


def _planes(src: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Bit fields (m, w) uint8 -> (m, count, w): out[:, k] = (src >> k*nbits) & mask.

    All planes come from two whole-array uint64 ops (8 codes a lane; shifts
    broadcast over a plane axis), then each lands in its slot as one w-byte
    void item per row -- one strided copy, not a loop call per 16-32 byte row.
    """
    m, w = src.shape
    words = src.reshape(1, -1).view(np.uint64)                       # (1, m*w/8)
    shifts = np.arange(0, count * nbits, nbits, dtype=np.uint64)[:, None]
    planes = np.right_shift(words, shifts)                           # (count, m*w/8)
    np.bitwise_and(planes, ((1 << nbits) - 1) * 0x0101010101010101, out=planes)
    out = np.empty((m, count, w), np.uint8)
    rows = out.view(f"V{w}").reshape(m, count)
    for k in range(count):
        rows[:, k] = planes[k].view(f"V{w}")
    return out


def _store(q: np.ndarray, out: np.ndarray) -> np.ndarray:
    """One int -> float32 cast into the caller's output; returns it flat (n*block,)."""
    flat = out.reshape(-1)
    np.copyto(flat, q.reshape(-1), casting="unsafe")
    return flat


def _times(flat: np.ndarray, s: np.ndarray, k: int) -> None:
    """flat *= each of s (n, m) repeated k times: contiguous beats broadcasting 16-32 wide."""
    np.multiply(flat, np.repeat(s.reshape(-1), k), out=flat)


def _minus(flat: np.ndarray, s: np.ndarray, k: int) -> None:
    np.subtract(flat, np.repeat(s.reshape(-1), k), out=flat)


def _plus(flat: np.ndarray, s: np.ndarray, k: int) -> None:
    np.add(flat, np.repeat(s.reshape(-1), k), out=flat)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> (n, 2) uint8 of fp16, rounded to nearest even like F16C."""
    with np.errstate(over="ignore"):                    # beyond 65504 is inf, as in F16C
        h = np.ascontiguousarray(x, dtype=np.float32).astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: adding 1.5*2^23 rounds half to even, exactly np.rint."""
    return np.rint(v).astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) in float32; v + 0.5 would double-round."""
    a = np.abs(v)
    f = np.floor(a)
    f += (a - f) >= np.float32(0.5)   # a - f is exact for float32
    return np.copysign(f, v)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the FIRST axis in order, in float32, as a plain C loop does.

    numpy's own sum is pairwise and would round differently; the K-quant
    searches keep element-major (k, m) arrays so each step here is contiguous.
    """
    acc = a[0].copy()
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def _recip(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def _amax_signed(x: np.ndarray) -> np.ndarray:
    """(..., k) -> (...,) the element of largest |x|, the first one on ties.

    C keeps `max = 0` until some |v| beats `amax = 0`, so an all-zero group
    yields +0.0 even when it holds -0.0 (which decides the sign of d = max/-8).
    """
    i = np.argmax(np.abs(x), axis=-1)
    v = np.take_along_axis(x, i[..., None], axis=-1)[..., 0]
    return np.where(v == 0, np.float32(0), v).astype(x.dtype)


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) -> first minimum and first maximum per row, as C's `if (v < min)` loop
    finds them (numpy's min/max may return either of -0.0 and 0.0)."""
    lo = np.take_along_axis(x, np.argmin(x, axis=1)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(x, np.argmax(x, axis=1)[:, None], axis=1)[:, 0]
    return lo, hi


# ---------------------------------------------------------------------------
# Codec base
# ---------------------------------------------------------------------------

_TYPES: dict[str, type["_Quant"]] = {}


class _Quant:
    """A block codec; subclasses are registered under their class name."""

    block: int = 1
    type_size: int = 1
    layout: np.dtype | None = None        # the block struct, for the quant types
    scale_offsets: tuple[int, ...] = ()   # byte offsets of its fp16 fields

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.block, cls.type_size = BLOCKS[cls.__name__]
        if cls.layout is not None and cls.layout.itemsize != cls.type_size:
            # ggml-common.h's static_assert on every block struct, at import
            raise TypeError(f"{cls.__name__}: layout is {cls.layout.itemsize} bytes, "
                            f"BLOCKS says {cls.type_size}")
        if cls.layout is not None:
            cls.scale_offsets = tuple(off for dt, off in cls.layout.fields.values()
                                      if dt == np.float16)
        _TYPES[cls.__name__] = cls

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray, out: np.ndarray) -> np.ndarray:
        """blocks (n, type_size) uint8 -> out (n, block) float32, filled and returned."""
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, x: np.ndarray) -> np.ndarray:
        """x (n, block) float32 -> (n, type_size) uint8."""
        raise QuantError(f"quantizing to {cls.__name__} is not supported")


# ---------------------------------------------------------------------------
# Plain types: floats and integers, one element per "block"
# ---------------------------------------------------------------------------

class F32(_Quant):
    @classmethod
    def dequantize_blocks(cls, blocks, out):
        np.copyto(out, blocks.view(np.float32))
        return out

    @classmethod
    def quantize_blocks(cls, x):
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


class F16(_Quant):
    @classmethod
    def dequantize_blocks(cls, blocks, out):
        # numpy's f16->f32 cast is scalar code; bit arithmetic is ~2x faster.
        # int16 -> int32 sign-extends, so after << 13 the f16 exponent and
        # mantissa sit where float32's do (rebias pending) and bits 28..31 all
        # hold the sign; clear 28..30, then scale by 2^112 to rebias the
        # exponent -- exact for normals, subnormals and zeros alike.
        h = blocks.view(np.int16)[:, 0]                          # (n,)
        if _denormals_flushed():                                 # subnormals would read 0
            np.take(_F16_TO_F32, h.view(np.uint16), out=out[:, 0], mode="clip")
            return out
        o = out.view(np.int32)[:, 0]
        np.copyto(o, h)                                          # sign-extending cast
        np.left_shift(o, 13, out=o)
        np.bitwise_and(o, np.int32(-0x70000001), out=o)          # 0x8FFFFFFF
        np.multiply(out, np.float32(2.0 ** 112), out=out)
        # exponent 31 (inf/NaN) would come out finite: redo such chunks by table
        if h.max() >= 0x7C00 or h.view(np.uint16).max() >= 0xFC00:
            np.take(_F16_TO_F32, h.view(np.uint16), out=out[:, 0], mode="clip")
        return out

    @classmethod
    def quantize_blocks(cls, x):
        return _fp16_bytes(x.reshape(-1))


class BF16(_Quant):
    @classmethod
    def dequantize_blocks(cls, blocks, out):
        # bf16 is the top half of a float32: widen, shift the bits up, no arithmetic
        # (a plain cast then an in-place shift beats one mixed-type shift)
        o = out.view(np.uint32)
        np.copyto(o, blocks.view(np.uint16))
        np.left_shift(o, 16, out=o)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        # ggml_compute_fp32_to_bf16: NaN -> quiet NaN, else round to nearest even
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).reshape(-1)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = (u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = np.where(nan, (u >> 16) | 64, r).astype(np.uint16)
        return r.view(np.uint8).reshape(-1, 2)


class F64(_Quant):
    @classmethod
    def dequantize_blocks(cls, blocks, out):
        np.copyto(out, blocks.view(np.float64), casting="unsafe")
        return out


class I8(_Quant):
    @classmethod
    def dequantize_blocks(cls, blocks, out):
        return _store(blocks.view(np.int8), out)


class I16(_Quant):
    @classmethod
    def dequantize_blocks(cls, blocks, out):
        return _store(blocks.view(np.int16), out)


class I32(_Quant):
    @classmethod
    def dequantize_blocks(cls, blocks, out):
        np.copyto(out, blocks.view(np.int32), casting="unsafe")
        return out


# ---------------------------------------------------------------------------
# 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL
# ---------------------------------------------------------------------------

def _nibble_codes(S: np.ndarray) -> np.ndarray:
    """Field qs (n, 16) -> (n, 32) uint8 codes: qs[j] & 15 at j, qs[j] >> 4 at j+16."""
    return _planes(_raw(S, "qs"), 4, 2).reshape(-1, 32)


def _high_bits(S: np.ndarray, value: int, invert: bool = False) -> np.ndarray:
    """Field qh (n, 4), a little-endian bit per element -> (n, 32) uint8 of value or 0."""
    qh = _raw(S, "qh")
    bits = np.unpackbits(np.bitwise_not(qh) if invert else qh, bitorder="little")
    return np.multiply(bits, value, out=bits).reshape(-1, 32)


class Q4_0(_Quant):
    layout = _struct(("d", "<f2"), ("qs", "V16"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        q = _nibble_codes(S)
        np.subtract(q, 8, out=q)                        # wraps: uint8 q-8 is int8 q-8
        _times(_store(q.view(np.int8), out), _f32(S, "d"), 32)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        mx = _amax_signed(x)                            # (n,)
        d = mx / np.float32(-8)
        v = x * _recip(d)[:, None]
        v += np.float32(8.5)                            # C: (int8_t)(x*id + 8.5f), truncation
        q = np.minimum(v.astype(np.int8), 15).astype(np.uint8)
        return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)


class Q4_1(_Quant):
    layout = _struct(("d", "<f2"), ("m", "<f2"), ("qs", "V16"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        flat = _store(_nibble_codes(S), out)
        _times(flat, _f32(S, "d"), 32)                  # x*d + m, in C's order
        _plus(flat, _f32(S, "m"), 32)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        lo, hi = _first_min_max(x)
        d = (hi - lo) / np.float32(15)
        v = (x - lo[:, None]) * _recip(d)[:, None]
        v += np.float32(0.5)
        q = np.minimum(v.astype(np.int8), 15).astype(np.uint8)
        return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], axis=1)


class Q5_0(_Quant):
    layout = _struct(("d", "<f2"), ("qh", "V4"), ("qs", "V16"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        q = _nibble_codes(S)
        # code - 16 as int8: a clear 5th bit means "negative", i.e. nibble | 0xF0
        np.bitwise_or(q, _high_bits(S, 0xF0, invert=True), out=q)
        _times(_store(q.view(np.int8), out), _f32(S, "d"), 32)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        mx = _amax_signed(x)
        d = mx / np.float32(-16)
        v = x * _recip(d)[:, None]
        v += np.float32(16.5)
        q = np.minimum(v.astype(np.int8), 31).astype(np.uint8)
        return np.concatenate([_fp16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], axis=1)


class Q5_1(_Quant):
    layout = _struct(("d", "<f2"), ("m", "<f2"), ("qh", "V4"), ("qs", "V16"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        q = _nibble_codes(S)
        np.bitwise_or(q, _high_bits(S, 0x10), out=q)
        flat = _store(q, out)
        _times(flat, _f32(S, "d"), 32)
        _plus(flat, _f32(S, "m"), 32)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        lo, hi = _first_min_max(x)
        d = (hi - lo) / np.float32(31)
        v = (x - lo[:, None]) * _recip(d)[:, None]
        v += np.float32(0.5)
        # C: (uint8_t)(x + 0.5f) with no MIN; only bits 0..4 are stored
        q = (v.astype(np.int32) & 0x1F).astype(np.uint8)
        parts = [_fp16_bytes(d), _fp16_bytes(lo), _pack_high_bits(q), _pack_nibbles(q)]
        return np.concatenate(parts, axis=1)


class Q8_0(_Quant):
    layout = _struct(("d", "<f2"), ("qs", "V32"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        _times(_store(_raw(S, "qs").view(np.int8), out), _f32(S, "d"), 32)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        d = np.abs(x).max(axis=1) / np.float32(127)
        q = _roundf(x * _recip(d)[:, None]).astype(np.int8)
        return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)


_IQ4NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


class IQ4_NL(_Quant):
    layout = _struct(("d", "<f2"), ("qs", "V16"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        np.take(_IQ4NL_VALUES, _nibble_codes(S), out=out, mode="clip")   # the codebook
        _times(out.reshape(-1), _f32(S, "d"), 32)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        # quantize_iq4_nl (the llama-quantize path: ntry = 7, no importance weights);
        # quantize_row_iq4_nl_ref differs (ntry = -1) and is not what files hold
        xt = np.ascontiguousarray(x.T)                           # (32, n)
        with np.errstate(all="ignore"):
            scale = _iq4_block_scales(xt)                        # (n,)
            dh = _fp16_bytes(scale)
            L = _iq4_best_index(xt * _recip(scale)).T            # (n, 32)
        return np.concatenate([dh, _pack_nibbles(L)], axis=1)


def _iq4_best_index(v: np.ndarray) -> np.ndarray:
    """ggml best_index_int8 over the IQ4_NL code book, elementwise: the nearest
    entry, the upper one on exact ties; NaN -> 15 as the C binary search gives."""
    mu = np.clip(np.searchsorted(_IQ4NL_VALUES, v, side="right"), 1, 15)
    lower = (v - _IQ4NL_VALUES[mu - 1]) < (_IQ4NL_VALUES[mu] - v)
    return (mu - lower).astype(np.uint8)


def _iq4_block_scales(xt: np.ndarray, ntry: int = 7) -> np.ndarray:
    """quantize_row_iq4_nl_impl's per-32 scale search without importance weights:
    xt (32, m) -> best scale (m,) over the code book, 0 for all-zero groups."""
    f = np.float32
    w = xt * xt
    mx = _amax_signed(xt.T)
    zero = np.abs(mx) < f(1e-15)                            # GROUP_MAX_EPS

    def fit(inv):
        q = _IQ4NL_VALUES[_iq4_best_index(xt * inv)]
        wq = w * q
        return _seqsum(wq * xt), _seqsum(wq * q)           # (w*q)*x, (w*q)*q as in C

    d = -mx / f(-127)                                      # ntry > 0: -max/values[0]
    sumqx, sumq2 = fit(f(1) / d)
    d = np.where(sumq2 > 0, sumqx / sumq2, f(0))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = fit(f(itry - 127) / mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    return np.where(zero, f(0), d).astype(f)


class IQ4_XS(_Quant):
    """IQ4_NL codes in 256-blocks: eight 32-groups with 6-bit scales (low 4 bits in
    scales_l, high 2 in scales_h) under one fp16 super-scale."""
    layout = _struct(("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "V4"), ("qs", "V128"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        codes = _planes(_raw(S, "qs").reshape(-1, 16), 4, 2).reshape(-1, 32)   # (8n, 32)
        np.take(_IQ4NL_VALUES, codes, out=out.reshape(-1, 32), mode="clip")
        ls = _iq4xs_scale_codes(S).astype(np.float32) - np.float32(32)        # (n, 8)
        _times(out.reshape(-1), _f32(S, "d")[:, None] * ls, 32)               # (d*ls)*v, C's order
        return out

    @classmethod
    def quantize_blocks(cls, x):
        # quantize_iq4_xs without an imatrix (ntry = 7): per-32 scales, then one
        # fp16 super-scale d = -max/32 and 6-bit codes; the values re-picked per code
        n = len(x)
        f = np.float32
        xt = np.ascontiguousarray(x.reshape(n * 8, 32).T)        # (32, m): m = 8n groups
        with np.errstate(all="ignore"):
            scales = _iq4_block_scales(xt).reshape(n, 8)
            d = -_amax_signed(scales) / f(32)                    # -0.0 for an all-zero block
            l = np.clip(_nearest_int(_recip(d)[:, None] * scales), -32, 31)   # (n, 8)
            dl = (d[:, None] * l.astype(f)).reshape(1, -1)       # (1, m)
            L = _iq4_best_index(xt * _recip(dl)).T.reshape(n, 8, 32)
        codes = (l + 32).astype(np.uint8)
        scales_l = (codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4)   # (n, 4)
        scales_h = np.zeros(n, np.uint16)
        for ib in range(8):
            scales_h |= (codes[:, ib] >> 4).astype(np.uint16) << (2 * ib)
        qs = (L[:, :, :16] | (L[:, :, 16:] << 4)).reshape(n, 128)
        return np.concatenate([_fp16_bytes(d), scales_h.view(np.uint8).reshape(n, 2),
                               scales_l, qs], axis=1)


def _iq4xs_scale_codes(S: np.ndarray) -> np.ndarray:
    """(n,) IQ4_XS blocks -> (n, 8) uint8 6-bit scale codes (bias 32 not removed)."""
    lo = _raw(S, "scales_l")                                  # (n, 4): two nibbles each
    codes = np.empty((len(S), 8), np.uint8)
    codes[:, 0::2] = lo & 0x0F
    codes[:, 1::2] = lo >> 4
    h = S["scales_h"].astype(np.uint16)
    for ib in range(8):
        codes[:, ib] |= (((h >> (2 * ib)) & 3) << 4).astype(np.uint8)
    return codes


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes 0..15 (or more; low 4 bits kept) -> (n, 16) bytes, j | (j+16) << 4."""
    lo = q[:, :16] & 0x0F
    return lo | ((q[:, 16:] & 0x0F) * 16)           # (uint8 << is slow in numpy; * isn't)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 4) bytes of bit 4 of code j at bit j (little-endian u32)."""
    return np.packbits((q & 0x10) != 0, axis=1, bitorder="little")


# ---------------------------------------------------------------------------
# K-quants: 256-element super-blocks with 6-bit or 8-bit sub-block scales
# ---------------------------------------------------------------------------

def _scale_min_k4(packed: np.ndarray) -> np.ndarray:
    """(n, 12) packed 6-bit scales/mins (get_scale_min_k4) -> (n, 2, 8) uint8 [scales, mins].

    Four bytes at a time, as ggml's SIMD code does: a = bytes 0-3, b = 4-7, c = 8-11.
    """
    a, b, c = (packed.view(np.uint32)[:, i] for i in range(3))
    out = np.empty((len(packed), 4), np.uint32)
    out[:, 0] = a & 0x3F3F3F3F
    out[:, 1] = (c & 0x0F0F0F0F) | (((a >> 6) & 0x03030303) << 4)
    out[:, 2] = b & 0x3F3F3F3F
    out[:, 3] = ((c >> 4) & 0x0F0F0F0F) | (((b >> 6) & 0x03030303) << 4)
    return out.view(np.uint8).reshape(-1, 2, 8)


def _k_scale_min(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: (n, 8) float32 sub-block scales d*sc and mins dmin*m."""
    dm = np.stack([_f32(S, "d"), _f32(S, "dmin")], axis=1)       # (n, 2)
    prod = _scale_min_k4(_raw(S, "scales")) * dm[:, :, None]    # (n, 2, 8)
    return prod[:, 0], prod[:, 1]


# -- K-quant quantizers (llama.cpp's quantize_row_q4_K_ref / q6_K_ref) ------
#
# The searches run on element-major arrays x (k, m): k elements of m
# independent sub-blocks, so every ggml loop over a sub-block becomes k
# vectorized steps in the same order, and every `if` a np.where.

class _Search:
    """Scratch (k, m) buffers for the K-quant searches: every pass below runs
    in place, since a fresh multi-MB temporary per op costs page faults."""

    def __init__(self, x: np.ndarray, w: np.ndarray):
        self.x, self.w = x, w                                  # (k, m) float32
        self.t = np.empty_like(x)

    def levels(self, iscale, shift, lo_hi, out):
        """out = clip(nearest_int(iscale * (x - shift)), lo, hi), all in float32."""
        np.subtract(self.x, shift, out=out)
        np.multiply(out, iscale, out=out)
        np.rint(out, out=out)                                  # nearest_int: half to even
        return np.clip(out, *lo_hi, out=out)

    def wsum(self, *factors):
        """sequential sum over k of w*f1*f2..., multiplied left to right as in C."""
        np.multiply(self.w, factors[0], out=self.t)
        for f in factors[1:]:
            np.multiply(self.t, f, out=self.t)
        return _seqsum(self.t)

    def wsum_of(self, a, b):
        """sequential sum over k of a*b."""
        return _seqsum(np.multiply(a, b, out=self.t))

    def error(self, scale, mn, L, use_mad=False):
        """sum of w * (scale*L + min - x)^2 (or |...| with use_mad), make_qkx2_quants' error."""
        t = self.t
        np.multiply(L, scale, out=t)
        np.add(t, mn, out=t)
        np.subtract(t, self.x, out=t)
        if use_mad:
            np.abs(t, out=t)
        else:
            np.multiply(t, t, out=t)
        np.multiply(self.w, t, out=t)
        return _seqsum(t)


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad=False):
    """ggml make_qkx2_quants on x, w (k, m) -> scale (m,), min (m,), L (k, m)."""
    f = np.float32
    S = _Search(x, w)
    lo = np.minimum(x.min(axis=0), f(0))                 # C clamps min > 0 to 0
    hi = x.max(axis=0)
    sum_w, sum_x = _seqsum(w), S.wsum(x)
    flat = hi == lo
    iscale = f(nmax) / (hi - lo)
    scale = f(1) / iscale
    L = S.levels(iscale, lo, (0, nmax), np.empty_like(x))
    best = S.error(scale, lo, L, use_mad)
    La, wl = np.empty_like(x), np.empty_like(x)          # (reused: L never aliases them)
    for step in range(nstep + 1):
        # (rmin + rdelta*is + nmax) / (max - min), with min the best so far
        iscale = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / (hi - lo)
        S.levels(iscale, lo, (0, nmax), La)
        wl = np.multiply(w, La, out=wl)                  # C: w*l*l is (w*l)*l, w*l*x is (w*l)*x
        sum_l, sum_l2, sum_xl = _seqsum(wl), S.wsum_of(wl, La), S.wsum_of(wl, x)
        D = sum_w * sum_l2 - sum_l * sum_l
        t_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        t_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = t_min > 0
        t_min = np.where(pos, f(0), t_min)
        t_scale = np.where(pos, sum_xl / sum_l2, t_scale)
        err = S.error(t_scale, t_min, La, use_mad)
        better = (D > 0) & (err < best)
        L = np.where(better, La, L)                      # (faster than a broadcast copyto where=)
        best = np.where(better, err, best)
        scale = np.where(better, t_scale, scale)
        lo = np.where(better, t_min, lo)
    return np.where(flat, f(0), scale), -lo, np.where(flat, f(0), L)


def _make_qx_quants_rmse1(x, nmax):
    """ggml make_qx_quants(rmse_type=1, qw=NULL) on x (k, m) -> scale (m,), L (k, m) in 0..2*nmax-1."""
    f = np.float32
    S = _Search(x, x * x)                                # weights w = x*x
    mx = _amax_signed(x.T)
    zero = np.abs(mx) < f(1e-15)                        # GROUP_MAX_EPS: all-zero group
    l = np.empty_like(x)

    def fit(iscale):
        S.levels(iscale, f(0), (-nmax, nmax - 1), l)    # x - 0 is x: same float
        return S.wsum(x, l), S.wsum(l, l)               # (w*x)*l, (w*l)*l

    sumlx, suml2 = fit(f(-nmax) / mx)
    L = l + f(nmax)
    scale = np.where(suml2 != 0, sumlx / suml2, f(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(f(nmax) + f(0.1) * f(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, l + f(nmax), L)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, f(0), scale), np.where(zero, f(0), L)


def _make_q3_quants(x):
    """ggml make_q3_quants(nmax=4, do_rmse=true) on x (k, m) -> scale (m,), L (k, m) in 0..7.

    The rmse pass moves one element at a time and keeps a move only if it
    improves sumlx^2/suml2, so it runs element by element in C's order; a group
    whose pass changed nothing stays unchanged in later passes, so running all
    five passes equals C's early break.
    """
    f = np.float32
    k = x.shape[0]
    mx = _amax_signed(x.T)
    zero = np.abs(mx) < f(1e-15)                         # GROUP_MAX_EPS: all-zero group
    iscale = f(-4) / mx
    l = np.clip(np.rint(iscale * x), -4, 3)              # (k, m) float32 levels
    w = x * x
    wx = w * x
    sumlx, suml2 = _seqsum(wx * l), _seqsum((w * l) * l)
    for _ in range(5):
        for i in range(k):
            xi, wi, wxi, li = x[i], w[i], wx[i], l[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new = np.clip(np.rint((xi * sl2) / slx), -4, 3)
            slx2 = slx + wxi * new
            sl22 = sl2 + (wi * new) * new
            take = ((slx > 0) & (new != li) & (sl22 > 0)
                    & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
            l[i] = np.where(take, new, li)
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, f(0))
    return np.where(zero, f(0), scale), np.where(zero, f(0), l + f(4))


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Two (n, 8) 6-bit arrays -> (n, 12) bytes, the inverse of get_scale_min_k4."""
    out = np.empty((len(ls), 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _scale_codes(v: np.ndarray, vmax: np.ndarray) -> np.ndarray:
    """ggml: MIN(63, (uint8_t)nearest_int(63/vmax * v)), 0 where vmax <= 0; (n, 8)."""
    with np.errstate(divide="ignore"):
        inv = np.where(vmax > 0, np.float32(63) / vmax, np.float32(0))
    # uint8, not int32: float32 * int32 would promote the later math to float64
    return np.minimum(_nearest_int(inv[:, None] * v) & 0xFF, 63).astype(np.uint8)


class Q2_K(_Quant):
    layout = _struct(("scales", "V16"), ("qs", "V64"), ("d", "<f2"), ("dmin", "<f2"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        q = _planes(_raw(S, "qs").reshape(-1, 32), 2, 4)     # (2n, 4, 32): element order
        w = _raw(S, "scales").view(np.uint64)                # (n, 2): scale | min << 4
        sc = (w & 0x0F0F0F0F0F0F0F0F).view(np.uint8)         # (n, 16)
        mn = ((w >> 4) & 0x0F0F0F0F0F0F0F0F).view(np.uint8)
        flat = _store(q, out)
        _times(flat, _f32(S, "d")[:, None] * sc, 16)         # dl*q - ml, C's order
        _minus(flat, _f32(S, "dmin")[:, None] * mn, 16)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        # quantize_row_q2_K_ref: 16 groups of 16, scale and min as 4-bit codes
        n = len(x)
        f = np.float32
        xt = np.ascontiguousarray(x.reshape(n * 16, 16).T)       # (16, m): m = 16n groups
        with np.errstate(all="ignore"):
            scales, mins, L = _make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, use_mad=True)
            scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
            max_scale = np.maximum(scales.max(axis=1), f(0))
            max_min = np.maximum(mins.max(axis=1), f(0))
            # C: (uint8_t)nearest_int(15/max * v), no clamp; 0 when max <= 0
            sc = np.where(max_scale[:, None] > 0,
                          _nearest_int((f(15) / max_scale)[:, None] * scales) & 0xFF, 0)
            mn = np.where(max_min[:, None] > 0,
                          _nearest_int((f(15) / max_min)[:, None] * mins) & 0xFF, 0)
            codes = (sc | (mn << 4)).astype(np.uint8)            # (n, 16), as stored
            dh = _fp16_bytes(np.where(max_scale > 0, max_scale / f(15), f(0)))
            mh = _fp16_bytes(np.where(max_min > 0, max_min / f(15), f(0)))
            d = (dh.view(np.float16).astype(f) * (codes & 0x0F)).reshape(1, -1)   # (1, m)
            dm = (mh.view(np.float16).astype(f) * (codes >> 4)).reshape(1, -1)
            Lr = np.clip(np.rint((xt + dm) / d), 0, 3)
        L = np.where(d != 0, Lr, L).astype(np.uint8).T.reshape(n, 2, 4, 32)
        qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
        return np.concatenate([codes, qs.reshape(n, 64), dh, mh], axis=1)


def _q3_scales(packed: np.ndarray) -> np.ndarray:
    """(n, 12) packed 6-bit scales -> (n, 16) int8 scales - 32, four bytes at a time.

    Scale j: low 4 bits from byte j%8 (low nibble for j < 8, high after), high 2
    bits from byte 8 + j%4 at bit 2*(j//4) -- dequantize_row_q3_K's kmask dance.
    """
    a, b, c = (packed.view(np.uint32)[:, i] for i in range(3))
    out = np.empty((len(packed), 4), np.uint32)
    for k, (lo, shift) in enumerate([(a, 0), (b, 0), (a, 4), (b, 4)]):
        out[:, k] = ((lo >> shift) & 0x0F0F0F0F) | (((c >> (2 * k)) & 0x03030303) << 4)
    q = out.view(np.uint8).reshape(-1, 16)
    return np.subtract(q, 32, out=q).view(np.int8)


class Q3_K(_Quant):
    layout = _struct(("hmask", "V32"), ("qs", "V64"), ("scales", "V12"), ("d", "<f2"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        q = _planes(_raw(S, "qs").reshape(-1, 32), 2, 4).reshape(-1, 8, 32)
        hm = _planes(np.bitwise_not(_raw(S, "hmask")), 1, 8)     # (n, 8, 32): 1 = bit clear
        # code - 4 when the high bit is clear: q | 0xFC is q - 4 as int8
        np.multiply(hm, 0xFC, out=hm)
        np.bitwise_or(q, hm, out=q)
        flat = _store(q.view(np.int8), out)
        _times(flat, _f32(S, "d")[:, None] * _q3_scales(_raw(S, "scales")), 16)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        # quantize_row_q3_K_ref: 16 groups of 16, signed 6-bit scales
        n = len(x)
        f = np.float32
        xt = np.ascontiguousarray(x.reshape(n * 16, 16).T)       # (16, m): m = 16n groups
        with np.errstate(all="ignore"):
            scales, L = _make_q3_quants(xt)
            scales = scales.reshape(n, 16)
            max_scale = _amax_signed(scales)                     # first of largest |scale|
            iscale = f(-32) / max_scale
            l = np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31) + 32
            l = np.where(max_scale[:, None] != 0, l, 0).astype(np.uint8)     # (n, 16) codes
            dh = _fp16_bytes(np.where(max_scale != 0, f(1) / iscale, f(0)))
            sc = np.where(max_scale[:, None] != 0, l.astype(np.int8) - np.int8(32), -32)
            d = (dh.view(np.float16).astype(f) * sc.astype(f)).reshape(1, -1)   # (1, m)
            Lr = np.clip(np.rint(xt / d), -4, 3) + 4
        L = np.where(d != 0, Lr, L).astype(np.uint8).T.reshape(n, 256)
        packed = np.zeros((n, 12), np.uint8)
        packed[:, :8] = (l[:, :8] & 0x0F) | ((l[:, 8:] & 0x0F) << 4)
        for j in range(16):
            packed[:, 8 + j % 4] |= (l[:, j] >> 4) << (2 * (j // 4))
        hmask = np.packbits((L > 3).reshape(n, 8, 32), axis=1, bitorder="little")[:, 0]  # (n, 32)
        L = (L & 3).reshape(n, 2, 4, 32)
        qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
        return np.concatenate([hmask, qs.reshape(n, 64), packed, dh], axis=1)


class Q4_K(_Quant):
    layout = _struct(("d", "<f2"), ("dmin", "<f2"), ("scales", "V12"), ("qs", "V128"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        q = _planes(_raw(S, "qs").reshape(-1, 32), 4, 2)     # (4n, 2, 32): element order
        dl, ml = _k_scale_min(S)
        flat = _store(q, out)
        _times(flat, dl, 32)
        _minus(flat, ml, 32)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        n = len(x)
        dh, mh, scales, L = _quantize_k4(x, 15, -1.0, 20)     # L (n, 256) codes 0..15
        L = L.reshape(n, 4, 2, 32)
        qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
        return np.concatenate([dh, mh, scales, qs], axis=1)


def _quantize_k4(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """quantize_row_q4_K_ref / q5_K_ref up to the bit packing (they differ only in
    nmax, rmin and nstep): x (n, 256) -> d, dmin (n, 2) fp16 bytes, scales (n, 12)
    packed 6-bit codes, L (n, 256) uint8 codes 0..nmax."""
    n = len(x)
    f = np.float32
    xt = np.ascontiguousarray(x.reshape(n * 8, 32).T)        # (32, m): m = 8n sub-blocks
    with np.errstate(all="ignore"):
        av_x = np.sqrt(_seqsum(xt * xt) / f(32))
        w = av_x + np.abs(xt)
        scales, mins, L = _make_qkx2_quants(xt, w, nmax, rmin, 0.1, nstep)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        max_scale = np.maximum(scales.max(axis=1), f(0))
        max_min = np.maximum(mins.max(axis=1), f(0))
        ls, lm = _scale_codes(scales, max_scale), _scale_codes(mins, max_min)
        dh, mh = _fp16_bytes(max_scale / f(63)), _fp16_bytes(max_min / f(63))
        # requantize against the stored (fp16, 6-bit) scales, like the C code
        d = (dh.view(np.float16).astype(f) * ls).reshape(1, -1)  # (1, m)
        dm = (mh.view(np.float16).astype(f) * lm).reshape(1, -1)
        Lr = np.clip(np.rint((xt + dm) / d), 0, nmax)
    L = np.where(d != 0, Lr, L).astype(np.uint8).T.reshape(n, 256)
    return dh, mh, _pack_scale_min_k4(ls, lm), L


class Q5_K(_Quant):
    layout = _struct(("d", "<f2"), ("dmin", "<f2"), ("scales", "V12"), ("qh", "V32"),
                     ("qs", "V128"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        q = _planes(_raw(S, "qs").reshape(-1, 32), 4, 2).reshape(-1, 8, 32)
        hb = _planes(_raw(S, "qh"), 1, 8)                    # (n, 8, 32): bit 4 of each code
        np.multiply(hb, 16, out=hb)                          # uint8 << is slow in numpy; * isn't
        np.bitwise_or(q, hb, out=q)
        dl, ml = _k_scale_min(S)
        flat = _store(q, out)
        _times(flat, dl, 32)
        _minus(flat, ml, 32)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        n = len(x)
        dh, mh, scales, L = _quantize_k4(x, 31, -0.5, 15)     # L (n, 256) codes 0..31
        L = L.reshape(n, 4, 2, 32)                            # 64-runs: low half, high half
        qs = ((L[:, :, 0] & 0x0F) | ((L[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
        hi = (L >> 4).reshape(n, 8, 32)                       # bit 4 of run-half k -> qh bit k
        qh = np.zeros((n, 32), np.uint8)
        for k in range(8):
            qh |= hi[:, k] << k
        return np.concatenate([dh, mh, scales, qh, qs], axis=1)


class Q6_K(_Quant):
    layout = _struct(("ql", "V128"), ("qh", "V64"), ("scales", "V16"), ("d", "<f2"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        # per 128-element half, 64 ql bytes: low nibbles give codes 0..63, high 64..127
        q = _planes(_raw(S, "ql").reshape(-1, 64), 4, 2)     # (2n, 2, 64): element order
        qh = _planes(_raw(S, "qh").reshape(-1, 32), 2, 4)    # (2n, 4, 32): bits 4,5
        np.multiply(qh, 16, out=qh)                          # uint8 << is slow in numpy; * isn't
        np.bitwise_or(q, qh.reshape(q.shape), out=q)
        np.subtract(q, 32, out=q)                        # wraps: uint8 q-32 is int8 q-32
        dl = _f32(S, "d")[:, None] * _raw(S, "scales").view(np.int8)   # (n, 16)
        _times(_store(q.view(np.int8), out), dl, 16)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        n = len(x)
        f = np.float32
        xt = np.ascontiguousarray(x.reshape(n * 16, 16).T)       # (16, m): m = 16n sub-blocks
        with np.errstate(all="ignore"):
            scales, L = _make_qx_quants_rmse1(xt, 32)
            scales = scales.reshape(n, 16)
            max_scale = _amax_signed(scales)                     # first of largest |scale|
            zero = np.abs(max_scale) < f(1e-15)
            iscale = f(-128) / max_scale
            dh = _fp16_bytes(f(1) / iscale)
            sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
            d = (dh.view(np.float16).astype(f) * sc).reshape(1, -1)   # (1, m)
            Lr = np.clip(np.rint(xt / d), -32, 31) + 32
        L = np.where(d != 0, Lr, L).astype(np.uint8).T.reshape(n, 2, 4, 32)
        ql = (L[:, :, 0:2] & 0x0F) | ((L[:, :, 2:4] & 0x0F) << 4)  # (n, 2, 2, 32)
        qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
        out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), dh], axis=1)
        out[zero] = 0                                            # C memsets all-zero blocks
        return out


class Q8_K(_Quant):
    layout = _struct(("d", "<f4"), ("qs", "V256"), ("bsums", "V32"))

    @classmethod
    def dequantize_blocks(cls, blocks, out):
        S = _fields(blocks, cls.layout)
        _times(_store(_raw(S, "qs").view(np.int8), out), _f32(S, "d"), 256)
        return out

    @classmethod
    def quantize_blocks(cls, x):
        # quantize_row_q8_K_ref: the activation format of the K-quant dot products
        f = np.float32
        mx = _amax_signed(x)                                     # (n,) first largest |x|
        zero = mx == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = f(-127) / mx
            q = np.minimum(_nearest_int(iscale[:, None] * x), 127).astype(np.int8)
            d = np.where(zero, f(0), f(1) / iscale).astype(f)
        q[zero] = 0
        bsums = q.reshape(-1, 16, 16).sum(axis=2, dtype=np.int16)   # (n, 16)
        return np.concatenate([d.view(np.uint8).reshape(-1, 4), q.view(np.uint8),
                               bsums.view(np.uint8)], axis=1)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------

def _codec(type_name: str) -> type[_Quant]:
    cls = _TYPES.get(type_name)
    if cls is None:
        known = ", ".join(sorted(_TYPES))
        raise QuantError(f"unknown or unsupported quant type {type_name!r} (supported: {known})")
    return cls


def can_compute(type_name: str) -> bool:
    """Whether ember has a codec (and so a way to compute) for tensors of this type."""
    return type_name in _TYPES


def _check_shape(cls: type[_Quant], shape: Sequence[int]) -> int:
    """Number of blocks of `shape`; QuantError unless the row length fits the block."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise QuantError(f"negative dimension in shape {shape}")
    row = shape[-1] if shape else 1
    if row % cls.block:
        raise QuantError(f"{cls.__name__}: row length {row} is not a multiple of the block size {cls.block}")
    return int(np.prod(shape, dtype=np.int64)) // cls.block


def dequantize(type_name: str, data, shape: Sequence[int]) -> np.ndarray:
    """Raw bytes of a tensor -> float32 array of `shape` (numpy order).

    `data` is any uint8 array or bytes-like object, read-only memmaps
    included; it is never written. F32 comes back as a zero-copy view of
    `data` (read-only when `data` is); every other type is a new array. Raises QuantError for an unknown
    type, a row length that is not a multiple of the block, or a byte count
    that does not match the shape.
    """
    cls = _codec(type_name)
    n = _check_shape(cls, shape)
    try:
        raw = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    except TypeError as e:
        raise QuantError(f"{type_name}: data must be a uint8 array or bytes-like, "
                         f"got {type(data).__name__}") from e
    if raw.dtype != np.uint8:
        raise QuantError(f"{type_name}: data must be uint8 bytes, got {raw.dtype}")
    if raw.size != n * cls.type_size:
        raise QuantError(f"{type_name}: {raw.size} bytes given, shape {tuple(shape)} "
                         f"needs {n * cls.type_size}")
    blocks = np.ascontiguousarray(raw).reshape(n, cls.type_size)
    if cls is F32:
        # zero-copy, like the file's other views (read-only if `data` is)
        return blocks.view(np.float32).reshape(tuple(shape))
    out = np.empty((n, cls.block), np.float32)
    step = max(1, _CHUNK_ELEMS // cls.block)
    with np.errstate(over="ignore", invalid="ignore"):   # NaN/inf scales just propagate
        for i in range(0, n, step):
            cls.dequantize_blocks(blocks[i:i + step], out[i:i + step])
    return out.reshape(tuple(shape))


def quantize(type_name: str, x) -> np.ndarray:
    """float32 array (..., row) -> uint8 array (..., row bytes) of `type_name` blocks.

    Byte-identical to llama.cpp's quantize_row_*_ref for the types that have a
    quantize_blocks here. Raises QuantError for an unknown type, a type that
    cannot be quantized, or a row length that is not a multiple of the block.
    """
    cls = _codec(type_name)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise QuantError(f"{type_name}: cannot quantize a scalar")
    n = _check_shape(cls, x.shape)
    flat = np.ascontiguousarray(x).reshape(n, cls.block)
    step = max(1, (_CHUNK_ELEMS * 4) // cls.block)
    parts = [cls.quantize_blocks(flat[i:i + step]) for i in range(0, n, step)]
    q = np.concatenate(parts, axis=0) if parts else np.empty((0, cls.type_size), np.uint8)
    return q.reshape(*x.shape[:-1], x.shape[-1] // cls.block * cls.type_size)
