"""Quantized kernels vs the numpy reference, for every ISA this CPU runs.

Oracles: formats/quant_blocks.dequantize (numpy, itself bit-exact with gguf-py) for
dequantization, which must match bit for bit; a float64 numpy product for
matvec/matmul, within named tolerances:

  TIGHT  products vs dequant(W) . dequant(quantized x) in float64. Only
         float32 rounding of per-block sums differs; measured worst ~1e-7
         relative to sum|w||x|, so 2e-5 leaves room for 65k-value rows.
  LOOSE  products vs dequant(W) . x (float x, unquantized). Adds the Q8
         activation rounding: at most half a step (amax/254) per value, so
         |error| <= sum|w| * amax/254 -- a bound, not a guess.

Weights are random bytes with their fp16 scale fields set to sane values
(random scales can be inf/NaN, tested separately), over odd block counts.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.formats import quant_blocks as fq
from ember.kernels import _native, dispatch
from ember.kernels import quant_ops as kq

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K",
         "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "F16", "BF16", "F32"]
BLOCK_COUNTS = [1, 7, 31, 33, 255]
TIGHT = 2e-5
ROWS = 5

# byte offsets of the fp16 scale fields inside one block
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "IQ4_NL": [0], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2],
               "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}


def _variants() -> list[str]:
    """Every kernel build this CPU runs: each ISA, plus the ISA without its
    optional extension (VNNI / dotprod) where the CPU has one."""
    out = []
    for isa in dispatch.available_isas():
        out.append(isa)
        dispatch.use(isa)
        if "+" in _native.isa_variant():
            out.append(isa + "-plain")
    dispatch.use(dispatch.ISA)
    return out


@pytest.fixture(params=_variants())
def isa(request):
    """Run the test under each kernel build this CPU can run, then restore."""
    before = dispatch.current_isa()
    name, plain = request.param.removesuffix("-plain"), request.param.endswith("-plain")
    dispatch.use(name)
    _native.set_isa_extensions(not plain)
    yield request.param
    _native.set_isa_extensions(True)
    dispatch.use(before)

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def random_weights(t: str, rows: int, nblocks: int, rng) -> np.ndarray:
    """uint8 (rows, row_bytes): random codes, finite scales in [1e-3, 1e-1]."""
    be, bb = fq.BLOCKS[t]
    if be == 1:   # float types: real values, stored in their own format
        v = rng.standard_normal((rows, nblocks * 32)).astype(np.float32)
        return fq.quantize(t, v).reshape(rows, -1) if t != "F32" else v.view(np.uint8)
    blocks = rng.integers(0, 256, (rows, nblocks, bb), dtype=np.uint8)
    for off in FP16_FIELDS[t]:
        s = (rng.uniform(1e-3, 1e-1, (rows, nblocks)) * rng.choice([-1, 1], (rows, nblocks)))
        blocks[:, :, off:off + 2] = s.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, nblocks * bb)


def n_values(t: str, W: np.ndarray) -> int:
    be, bb = fq.BLOCKS[t]
    return W.shape[1] // bb * be


def ref_dequant(t: str, W: np.ndarray) -> np.ndarray:
    return fq.dequantize(t, np.ascontiguousarray(W), (W.shape[0], n_values(t, W)))

# ---------------------------------------------------------------------------
# Comparison helpers that say where it went wrong
# ---------------------------------------------------------------------------

def assert_bit_exact(got: np.ndarray, want: np.ndarray, block: int, what: str):
    g, w = got.reshape(got.shape[0], -1), want.reshape(want.shape[0], -1)
    same = (g.view(np.uint32) == w.view(np.uint32)) | (np.isnan(g) & np.isnan(w))
    if not same.all():
        r, c = np.argwhere(~same)[0]
        pytest.fail(f"{what}: first mismatch row {r} block {c // block} value {c % block}: "
                    f"got {g[r, c]!r} want {w[r, c]!r} ({(~same).sum()} values differ)")


def assert_close(got, want, scale, rtol: float, what: str):
    """|got - want| <= rtol * scale elementwise; on failure name the worst row."""
    err = np.abs(np.asarray(got, np.float64) - want)
    bound = rtol * scale + 1e-30
    ratio = err / bound
    if not (ratio <= 1).all():
        i = np.unravel_index(np.argmax(ratio), ratio.shape)
        pytest.fail(f"{what}: worst at {i}: got {got[i]!r} want {want[i]!r} "
                    f"err {err[i]:.3g} > {rtol} * {scale[i]:.3g}")

# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES + ["Q8_K"])
def test_c_struct_sizes_match_the_block_table(name):
    tid = fq.GGML_TYPE_IDS[name]
    assert (_native.block_elems(tid), _native.block_bytes(tid)) == fq.BLOCKS[name]


def test_activation_formats():
    assert {t: kq.act_type(t) for t in TYPES} == {
        **{t: "Q8_0" for t in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]},
        **{t: "Q8_K" for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]},
        **{t: "F32" for t in ["F16", "BF16", "F32"]}}

# ---------------------------------------------------------------------------
# Dequantization: bit-exact
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES)
def test_dequantize_bit_exact(isa, t):
    rng = np.random.default_rng(1)
    for nb in BLOCK_COUNTS:
        W = random_weights(t, 3, nb, rng)
        W[1] = 0   # a row of zero blocks
        assert_bit_exact(kq.dequantize(t, W), ref_dequant(t, W), fq.BLOCKS[t][0] or 1, f"{t} {isa} {nb} blocks")


@pytest.mark.parametrize("t", [t for t in TYPES if t in FP16_FIELDS])
def test_dequantize_fully_random_bytes(isa, t):
    """Scales may be inf, NaN or subnormal: still bit-exact (NaN matches NaN)."""
    rng = np.random.default_rng(2)
    W = rng.integers(0, 256, (4, 33 * fq.BLOCKS[t][1]), dtype=np.uint8)
    assert_bit_exact(kq.dequantize(t, W), ref_dequant(t, W), fq.BLOCKS[t][0], f"{t} {isa}")


@pytest.mark.parametrize("t", TYPES)
def test_get_rows_is_dequantized_rows(isa, t):
    rng = np.random.default_rng(3)
    W = random_weights(t, 9, 7, rng)
    ids = np.array([8, 0, 3, 3], np.int32)
    assert_bit_exact(kq.get_rows(t, W, ids), ref_dequant(t, W)[ids], 1, f"{t} get_rows")

# ---------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------

def check_products(t: str, W: np.ndarray, X: np.ndarray, Y: np.ndarray, what: str):
    """Y (b, rows) against both float64 references, with the named tolerances."""
    Wd = ref_dequant(t, W).astype(np.float64)
    Xq = kq.quantize_act(t, X)
    Xd = kq.dequantize(kq.act_type(t), kq.act_blocks(t, Xq)).astype(np.float64)
    absW = np.abs(Wd)
    assert_close(Y, Xd @ Wd.T, np.abs(Xd) @ absW.T, TIGHT, f"{what} vs quantized x")
    # LOOSE: the exact bound of the activation rounding, plus TIGHT's share
    be = fq.BLOCKS[kq.act_type(t)][0]
    half_step = np.repeat(np.abs(X).reshape(X.shape[0], -1, be).max(-1) / 254, be, axis=1)
    if kq.act_type(t) == "F32":
        half_step[:] = 0
    bound = half_step @ absW.T * (1 + 1e-3) + TIGHT * (np.abs(X) @ absW.T)
    assert_close(Y, X.astype(np.float64) @ Wd.T, bound, 1.0, f"{what} vs float x")


@pytest.mark.parametrize("t", TYPES)
def test_matvec_matches_reference(isa, t):
    rng = np.random.default_rng(4)
    for nb in BLOCK_COUNTS:
        W = random_weights(t, ROWS, nb, rng)
        x = rng.standard_normal(n_values(t, W)).astype(np.float32)
        y = kq.matvec(t, W, x)
        check_products(t, W, x[None], y[None], f"{t} {isa} matvec {nb} blocks")


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("batch", [1, 3, 4, 9, 37])   # 37: two 16-row groups (matmul16) + 5
def test_matmul_matches_reference_and_matvec(isa, t, batch):
    rng = np.random.default_rng(5)
    W = random_weights(t, 37, 7, rng)     # 37 rows: crosses a row tile
    X = rng.standard_normal((batch, n_values(t, W))).astype(np.float32)
    Y = kq.matmul(t, W, X)
    check_products(t, W, X, Y, f"{t} {isa} matmul b={batch}")
    # a row's result must not depend on the batch it came in (4-row path or not)
    rows = np.stack([kq.matvec(t, W, x) for x in X])
    assert_bit_exact(Y, rows, 1, f"{t} {isa} matmul rows vs matvec")


@pytest.mark.parametrize("t", TYPES)
def test_matmul_rows_shares_make_up_the_whole_product(isa, t):
    """Row ranges computed apart (one per thread, from activations quantized once) give
    exactly matmul's result: a row's dot product does not depend on who computes it."""
    rng = np.random.default_rng(8)
    W = random_weights(t, 37, 7, rng)
    X = rng.standard_normal((9, n_values(t, W))).astype(np.float32)
    Xq = kq.quantize_act(t, X)
    Y = np.full((9, 37), np.nan, np.float32)
    for r0, r1 in ((0, 5), (5, 5), (5, 20), (20, 37)):
        kq.matmul_rows(t, W, Xq, Y, r0, r1)
    assert_bit_exact(Y, kq.matmul(t, W, X), 1, f"{t} {isa} matmul_rows shares")
    with pytest.raises(kq.KernelArgError):
        kq.matmul_rows(t, W, Xq, np.empty((9, 36), np.float32), 0, 36)


@pytest.mark.parametrize("t", TYPES)
def test_zero_weights_and_zero_activations_give_exact_zero(isa, t):
    rng = np.random.default_rng(6)
    W = random_weights(t, ROWS, 3, rng)
    n = n_values(t, W)
    assert not kq.matvec(t, np.zeros_like(W), rng.standard_normal(n)).any()
    assert not kq.matvec(t, W, np.zeros(n, np.float32)).any()
    assert not kq.matmul(t, W, np.zeros((5, n), np.float32)).any()


@pytest.mark.parametrize("t", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "F16"])
def test_read_only_memmap_and_strided_rows(isa, t, tmp_path):
    """GGUF weights are read-only maps; fused tensors give row slices."""
    rng = np.random.default_rng(7)
    W = random_weights(t, 11, 33, rng)
    path = tmp_path / "w.bin"
    W.tofile(path)
    M = np.memmap(path, np.uint8, "r", shape=W.shape)
    assert not M.flags.writeable
    X = rng.standard_normal((5, n_values(t, W))).astype(np.float32)
    np.testing.assert_array_equal(kq.matmul(t, M, X), kq.matmul(t, W, X))
    np.testing.assert_array_equal(kq.matvec(t, M, X[0]), kq.matvec(t, W, X[0]))
    np.testing.assert_array_equal(kq.get_rows(t, M, [2, 10]), kq.get_rows(t, W, [2, 10]))
    assert_bit_exact(kq.dequantize(t, M), ref_dequant(t, W), 1, f"{t} memmap")
    fused = np.concatenate([W, W], axis=0)[3:8]                  # a row range of a fused tensor
    np.testing.assert_array_equal(kq.matvec(t, fused, X[0]), kq.matvec(t, W[3:8], X[0]))


@pytest.mark.parametrize("t", ["Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_real_quantized_weights(isa, t):
    """Weights made by the project's quantizer from float data, not random codes."""
    rng = np.random.default_rng(8)
    Wf = rng.standard_normal((ROWS, 2048)).astype(np.float32)
    W = fq.quantize(t, Wf)
    X = rng.standard_normal((6, 2048)).astype(np.float32)
    check_products(t, W, X, kq.matmul(t, W, X), f"{t} {isa} quantized weights")

# ---------------------------------------------------------------------------
# Activation quantization
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("t", ["Q4_0", "Q4_K"])
def test_activation_quantization_matches_llama_cpp_reference(isa, t):
    """Q8_0 through the project's numpy quantizer (llama.cpp's _ref)."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(4096) * rng.uniform(0.01, 100)).astype(np.float32)
    got = kq.act_blocks(t, kq.quantize_act(t, x))
    if t == "Q4_0":
        np.testing.assert_array_equal(got, fq.quantize("Q8_0", x))
    else:   # Q8_K: values within one step, bsums exact sums of the codes
        xd = kq.dequantize("Q8_K", got)
        blocks = got.reshape(-1, 292)
        d = blocks[:, :4].copy().view(np.float32)
        assert (np.abs(xd - x).reshape(-1, 256) <= np.abs(d) * 0.5 * (1 + 1e-6)).all()
        codes = blocks[:, 4:260].view(np.int8).astype(np.int32)
        np.testing.assert_array_equal(blocks[:, 260:].copy().view(np.int16),
                                      codes.reshape(-1, 16, 16).sum(-1))

@pytest.mark.parametrize("t,bias", [("Q4_0", 8), ("Q5_0", 16), ("Q8_0", 128), ("Q4_1", 0), ("IQ4_NL", 0)])
def test_q8_0_activation_aux_area(t, bias):
    """After the blocks: each block's scale 8 times, -bias * sums of 4 codes, the codes."""
    rng = np.random.default_rng(10)
    n = 32 * 7
    xq = kq.quantize_act(t, rng.standard_normal(n).astype(np.float32))
    assert xq.size == 7 * (34 + 96)
    blocks = kq.act_blocks(t, xq).reshape(7, 34)
    aux = xq[7 * 34:]
    dx8 = aux[:7 * 32].copy().view(np.float32).reshape(7, 8)
    corr = aux[7 * 32:7 * 64].copy().view(np.int32).reshape(7, 8)
    np.testing.assert_array_equal(aux[7 * 64:].reshape(7, 32), blocks[:, 2:])
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(dx8, np.repeat(d, 8, axis=1))
    codes = blocks[:, 2:].view(np.int8).astype(np.int32).reshape(7, 8, 4)
    np.testing.assert_array_equal(corr, -bias * codes.sum(-1))

# ---------------------------------------------------------------------------
# Bad input: typed errors, never a crash
# ---------------------------------------------------------------------------

def test_bad_arguments_raise_typed_errors():
    W = np.zeros((4, 18 * 2), np.uint8)
    with pytest.raises(kq.KernelArgError, match="no kernels"):
        kq.matvec("IQ2_XXS", W, np.zeros(64, np.float32))
    with pytest.raises(kq.KernelArgError, match="rows of 64"):
        kq.matvec("Q4_0", W, np.zeros(63, np.float32))
    with pytest.raises(kq.KernelArgError, match="whole number"):
        kq.matvec("Q4_0", np.zeros((4, 20), np.uint8), np.zeros(32, np.float32))
    with pytest.raises(kq.KernelArgError, match="2-D uint8"):
        kq.matmul("Q4_0", W.astype(np.int8), np.zeros((2, 64), np.float32))
    with pytest.raises(kq.KernelArgError, match="ids must lie"):
        kq.get_rows("Q4_0", W, [4])
    with pytest.raises(ValueError):   # the binding itself guards C's buffers
        _native.matvec(2, W, np.zeros(2, np.uint8), np.zeros(4, np.float32), 64, 0, 4)
