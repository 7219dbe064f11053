"""Repacked weight layouts (kernels/c/repack*.c, kernels/repack.py) on every ISA this CPU runs.

Oracles: a numpy transcription of the layout repack.c documents (the repacker
must produce exactly it); the float64 reference products of test_quant_ops (the
repacked kernels are held to the same TIGHT/LOOSE bounds); the portable C twin
(every SIMD build must equal it bit for bit: they share one float order); and
the file layout's AVX-512 VNNI kernels, which keep that order too, so there
the repacked result is bit-identical to the unrepacked one.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.formats import quant_blocks as fq
from ember.formats.quant_blocks import GGML_TYPE_IDS
from ember.kernels import _native, dispatch, repack
from ember.kernels import quant_ops as kq
from tests.kernels.test_quant_ops import assert_bit_exact, check_products, isa, n_values, random_weights  # noqa: F401

TYPES = ["Q4_0", "Q8_0", "Q4_K"]
R = _native.REPACK_ROWS

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def numpy_repack(t: str, W: np.ndarray) -> np.ndarray:
    """repack.c's layout, written from its comment: per 16-row group and block, each
    leading fp16 field (d; Q4_K: d, dmin) as 16 rows' values, then piece p = the
    4-byte groups p of the rest of rows 0..15."""
    bb = fq.BLOCKS[t][1]
    head = 4 if t == "Q4_K" else 2
    rows, nblk = W.shape[0], W.shape[1] // bb
    blocks = W.reshape(rows // R, R, nblk, bb)                     # (group, row, block, bytes)
    fields = blocks[..., :head].reshape(rows // R, R, nblk, head // 2, 2)
    fields = fields.transpose(0, 2, 3, 1, 4).reshape(rows // R, nblk, -1)   # (group, block, field, row, 2)
    codes = blocks[..., head:].reshape(rows // R, R, nblk, (bb - head) // 4, 4)
    pieces = codes.transpose(0, 2, 3, 1, 4).reshape(rows // R, nblk, -1)   # (group, block, piece, row, 4)
    return np.concatenate([fields, pieces], axis=-1).reshape(W.shape)


def packed(t: str, W: np.ndarray) -> tuple[int, np.ndarray]:
    tid = GGML_TYPE_IDS[t]
    rtype = _native.repack_type_of(tid)
    return rtype, repack.repack(tid, W, n_values(t, W), rtype)


def products(tid: int, W: np.ndarray, Xq: np.ndarray, n: int) -> np.ndarray:
    Y = np.empty((Xq.shape[0], W.shape[0]), np.float32)
    _native.matmul(tid, W, Xq, Y, n, 0, W.shape[0])
    return Y

# ---------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", TYPES)
def test_repack_writes_the_documented_layout(t):
    rng = np.random.default_rng(1)
    W = random_weights(t, 3 * R, 7, rng)
    rtype, P = packed(t, W)
    assert P.shape == W.shape and P.ctypes.data % repack.ALIGN == 0
    np.testing.assert_array_equal(P, numpy_repack(t, W))
    assert _native.block_bytes(rtype) == _native.block_bytes(GGML_TYPE_IDS[t])   # same size


def test_repack_refuses_what_it_cannot_lay_out():
    rng = np.random.default_rng(2)
    W = random_weights("Q4_0", R + 1, 3, rng)
    with pytest.raises(ValueError, match="multiple of 16"):
        _native.repack(GGML_TYPE_IDS["Q4_0"], W, np.empty_like(W), n_values("Q4_0", W))
    K = random_weights("Q6_K", R, 1, rng)
    with pytest.raises(ValueError, match="no repacked layout"):
        _native.repack(GGML_TYPE_IDS["Q6_K"], K, np.empty_like(K), 256)
    rtype, P = packed("Q4_0", random_weights("Q4_0", R, 3, rng))
    with pytest.raises(ValueError, match="interleaves 16 rows"):
        _native.get_rows(rtype, P, np.zeros(1, np.int32), np.empty((1, 96), np.float32))
    with pytest.raises(ValueError, match="interleaves 16 rows"):
        _native.dequantize_row(rtype, P[0], np.empty(96, np.float32))


def test_modes():
    tid = GGML_TYPE_IDS["Q4_0"]
    assert repack.wanted("off", tid) == repack.wanted(False, tid) == -1
    assert repack.wanted("on", tid) == _native.repack_type_of(tid) >= 0
    assert repack.wanted("on", GGML_TYPE_IDS["Q6_K"]) == -1
    assert repack.wanted(None, tid) == repack.wanted("auto", tid) == _native.repacked_type(tid)
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        repack.wanted("yes", tid)

# ---------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("batch", [1, 3, 4, 9])   # 9: two 4-row tiles + 1
def test_repacked_products_match_reference_twin_and_matvec(isa, t, batch):
    rng = np.random.default_rng(3)
    W = random_weights(t, 3 * R, 33, rng)
    n = n_values(t, W)
    X = rng.standard_normal((batch, n)).astype(np.float32)
    Xq = kq.quantize_act(t, X)
    rtype, P = packed(t, W)
    Y = products(rtype, P, Xq, n)
    check_products(t, W, X, Y, f"{t} {isa} repacked b={batch}")
    # matvec == the matmul row, also for row ranges that cut a 16-row group
    for r0, r1 in [(0, 3 * R), (3, 45), (16, 32), (17, 18)]:
        y = np.empty(r1 - r0, np.float32)
        _native.matvec(rtype, P, Xq[batch - 1], y, n, r0, r1)
        assert_bit_exact(y[None], Y[batch - 1:, r0:r1], 1, f"{t} {isa} matvec rows [{r0}, {r1})")
    # every build equals the portable twin (one float order)
    before = dispatch.current_isa()
    dispatch.use("generic")
    twin = products(rtype, P, Xq, n)
    dispatch.use(before)
    assert_bit_exact(Y, twin, 1, f"{t} {isa} repacked vs the portable twin")
    if _native.isa_variant() == "avx512+vnni":   # the file layout's kernels keep the same order
        assert_bit_exact(Y, products(GGML_TYPE_IDS[t], W, Xq, n), 1, f"{t} {isa} repacked vs file layout")


@pytest.mark.parametrize("t", TYPES)
def test_repacked_extreme_codes_do_not_overflow(isa, t):
    """Every code at its extreme against activations at +-127 (the int16 paths' bounds)."""
    rng = np.random.default_rng(4)
    W = random_weights(t, R, 8, rng)
    bb = fq.BLOCKS[t][1]
    blocks = W.reshape(R, 8, bb)
    blocks[..., 2:] = 0x00 if t == "Q4_0" else 0x80     # Q4_0 code -8, Q8_0 -128
    n = n_values(t, W)
    X = np.where(np.arange(n) % 2, 1.0, -1.0).astype(np.float32)[None].repeat(2, 0)
    X[1] = 1.0
    rtype, P = packed(t, W)
    check_products(t, W, X, products(rtype, P, kq.quantize_act(t, X), n), f"{t} {isa} extreme codes")


def test_repack_in_parallel_row_ranges_is_the_same_bytes():
    """Row ranges of whole groups are independent: a pool of threads writes what one does."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(5)
    W = random_weights("Q4_0", 7 * R, 9, rng)
    tid, n = GGML_TYPE_IDS["Q4_0"], n_values("Q4_0", W)
    rtype = _native.repack_type_of(tid)
    with ThreadPoolExecutor(3) as pool:
        for parts in (2, 3, 7, 50):
            np.testing.assert_array_equal(repack.repack(tid, W, n, rtype, pool, parts), numpy_repack("Q4_0", W))
