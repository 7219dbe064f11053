"""formats/quant_blocks.py against gguf-py's dequantize and llama.cpp's own quantizer.

Oracle 1: every tensor of every conformance model dequantizes bit-identical to
`gguf.quants.dequantize` (no type needs an ulp of slack: the multiplications
run in C's order). Oracle 2: re-quantizing the F32 s512 models reproduces the
bytes llama.cpp's quantizer wrote. Oracle 3, where llama.cpp's libggml-base is
installed (../llamaenv, or EMBER_GGML_LIB): its quantize_row_*_ref and
dequantize_row_* called through ctypes on generated data -- ties, tiny and
heavy-tailed values, odd block counts. The rest are properties: zero and
random blocks, read-only memmaps, typed errors.
"""
from __future__ import annotations

import ctypes
import glob
import os
import zlib

import numpy as np
import pytest

gguf_py = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from ember.formats import gguf, quant_blocks  # noqa: E402
from ember.formats.quant_blocks import QuantError, dequantize, quantize  # noqa: E402
from tests.conftest import REQUIRE_ORACLES, ROOT, absent, conformance_models, conformance_path  # noqa: E402

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
QUANTIZABLE = LEGACY + ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"]
# type -> the pure s512-llama file llama.cpp's quantizer wrote in it
K_QUANTIZABLE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S",
                 "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL"}
# types whose file quantizer (ggml_quantize_chunk) is not quantize_row_*_ref: IQ4_NL's
# _ref searches with ntry = -1, the file path with ntry = 7; IQ4_XS has only the latter
CHUNK_QUANTIZABLE = ["IQ4_NL", "IQ4_XS"]
# readable types the gguf package can also dequantize (it lacks Q8_K and the integers)
GGUF_TYPES = [t for t in quant_blocks._TYPES if t not in ("Q8_K", "I8", "I16", "I32", "F64")]
ODD_COUNTS = [1, 7, 31, 33, 255]


def bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns of a float32 array, so NaN payloads and -0.0 compare too."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def sane_blocks(type_name: str, n: int, seed: int = 0) -> np.ndarray:
    """(n, type_size) random bytes whose fp16/f32 scales are finite and moderate."""
    rng = np.random.default_rng(seed)
    elems, size = quant_blocks.BLOCKS[type_name]
    if type_name in ("F16", "BF16", "F32", "F64"):
        x = rng.standard_normal(n).astype(np.float32)
        return quant_blocks.quantize(type_name, x).reshape(n, size) if type_name != "F64" \
            else x.astype(np.float64).view(np.uint8).reshape(n, size)
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in quant_blocks._TYPES[type_name].scale_offsets:
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, (n, 1)).astype(np.float16).view(np.uint8)
    if type_name == "Q8_K":
        raw[:, 0:4] = rng.uniform(-0.05, 0.05, (n, 1)).astype(np.float32).view(np.uint8)
    return raw


def gguf_reference(type_name: str, raw: np.ndarray) -> np.ndarray:
    return gguf_dequantize(raw.reshape(-1), GGMLQuantizationType[type_name]).astype(np.float32).reshape(-1)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def test_blocks_agree_with_gguf_constants():
    shared = [t for t in quant_blocks.BLOCKS if t in GGMLQuantizationType.__members__]
    assert len(shared) == len(quant_blocks.BLOCKS)
    for name in shared:
        qt = GGMLQuantizationType[name]
        assert quant_blocks.GGML_TYPE_IDS[name] == qt.value, name
        if name == "Q8_1":
            # ggml-common.h: block_q8_1 holds fp16 d and s (2*2 + 32 = 36 bytes);
            # gguf-py still lists the old float32 layout (40). Activation-only: never in files.
            assert quant_blocks.BLOCKS[name] == (32, 36) and GGML_QUANT_SIZES[qt] == (32, 40)
            continue
        assert quant_blocks.BLOCKS[name] == GGML_QUANT_SIZES[qt], name


def test_every_table_type_but_q8_1_and_i64_has_a_codec():
    assert set(quant_blocks.BLOCKS) - set(quant_blocks._TYPES) == {"Q8_1", "I64"}
    for name, cls in quant_blocks._TYPES.items():
        assert (cls.block, cls.type_size) == quant_blocks.BLOCKS[name]


# ---------------------------------------------------------------------------
# Oracle 1: gguf-py's dequantize on every conformance tensor
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", conformance_models() or ["(none)"])
def test_conformance_tensors_dequantize_like_gguf_py(model):
    path = conformance_path("models", model)
    with gguf.open(path) as f:
        for name, t in f.tensors.items():
            ours = t.numpy()
            assert ours.shape == t.shape and ours.dtype == np.float32
            ref = gguf_reference(t.type, t.data)
            np.testing.assert_array_equal(bits(ours).reshape(-1), bits(ref), err_msg=f"{name} ({t.type})")


# ---------------------------------------------------------------------------
# Oracle 2: llama.cpp's quantizer output, byte for byte
# ---------------------------------------------------------------------------

def requantize_and_compare(f32_file: str, quant_file: str, type_name: str) -> int:
    """Quantize every `type_name` tensor of quant_file from f32_file; returns how many."""
    checked = 0
    with gguf.open(conformance_path("models", f32_file)) as src, \
            gguf.open(conformance_path("models", quant_file)) as dst:
        for name, t in dst.tensors.items():
            if t.type != type_name:
                continue
            ours = quantize(type_name, src.tensors[name].numpy()).reshape(-1, quant_blocks.BLOCKS[type_name][1])
            theirs = t.data.reshape(ours.shape)
            bad = np.nonzero((ours != theirs).any(axis=1))[0]
            assert bad.size == 0, (f"{quant_file} {name}: {bad.size}/{len(ours)} blocks differ, "
                                   f"first {bad[0]}: ours {ours[bad[0]]} llama.cpp {theirs[bad[0]]}")
            checked += 1
    return checked


@pytest.mark.parametrize("type_name", LEGACY)
def test_legacy_quantize_matches_llama_cpp_bytes(type_name):
    # every matrix (token_embd and output included) is type_name; the 5 norms stay F32
    assert requantize_and_compare("s512-llama-F32.gguf", f"s512-llama-{type_name}.gguf", type_name) == 16


@pytest.mark.parametrize("type_name", sorted(K_QUANTIZABLE))
def test_k_quantize_matches_llama_cpp_bytes(type_name):
    n = requantize_and_compare("s512-llama-F32.gguf", f"s512-llama-{K_QUANTIZABLE[type_name]}.gguf", type_name)
    assert n == 16


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_q4_k_m_mix_matches_llama_cpp_bytes(arch):
    # Q4_K_M mixes Q4_K and Q6_K matrices; both must come out identical
    n = sum(requantize_and_compare(f"s512-{arch}-F32.gguf", f"s512-{arch}-Q4_K_M.gguf", t)
            for t in ("Q4_K", "Q6_K"))
    assert n >= 16


# ---------------------------------------------------------------------------
# Generated blocks: odd counts, chunk boundaries, zeros, garbage
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_odd_block_counts_match_gguf_py(type_name):
    elems = quant_blocks.BLOCKS[type_name][0]
    # the last count crosses several of dequantize's internal chunks
    for n in ODD_COUNTS + [3 * (quant_blocks._CHUNK_ELEMS // elems) + 5]:
        raw = sane_blocks(type_name, n, seed=n)
        ours = dequantize(type_name, raw.reshape(-1), (n * elems,))
        np.testing.assert_array_equal(bits(ours), bits(gguf_reference(type_name, raw)), err_msg=f"n={n}")


def test_types_gguf_py_lacks_follow_their_definition():
    n = 33
    raw = sane_blocks("Q8_K", n)
    d = raw[:, 0:4].copy().view(np.float32)                 # (n, 1)
    expect = raw[:, 4:260].view(np.int8).astype(np.float32) * d
    np.testing.assert_array_equal(dequantize("Q8_K", raw, (n, 256)), expect)
    for name, dt in [("I8", np.int8), ("I16", np.int16), ("I32", np.int32), ("F64", np.float64)]:
        v = np.arange(-50, 51).astype(dt)
        np.testing.assert_array_equal(dequantize(name, v.view(np.uint8), (101,)), v.astype(np.float32))


@pytest.mark.parametrize("type_name", sorted(quant_blocks._TYPES))
def test_zero_blocks_dequantize_to_zero(type_name):
    elems, size = quant_blocks.BLOCKS[type_name]
    out = dequantize(type_name, np.zeros(7 * size, np.uint8), (7 * elems,))
    assert not out.any()


@pytest.mark.parametrize("type_name", sorted(quant_blocks._TYPES))
def test_random_bytes_never_crash_and_match_gguf_py(type_name):
    elems, size = quant_blocks.BLOCKS[type_name]
    raw = np.random.default_rng(7).integers(0, 256, size=255 * size, dtype=np.uint8)
    out = dequantize(type_name, raw, (255, elems))          # NaN/inf scales just propagate
    assert out.shape == (255, elems) and out.dtype == np.float32
    if type_name in GGUF_TYPES:
        with np.errstate(all="ignore"):
            ref = gguf_reference(type_name, raw)
        np.testing.assert_array_equal(bits(out).reshape(-1), bits(ref))


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_read_only_memmap_input(type_name, tmp_path):
    elems, size = quant_blocks.BLOCKS[type_name]
    raw = sane_blocks(type_name, 33).reshape(-1)
    path = tmp_path / "blocks.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    assert not mm.flags.writeable
    out = dequantize(type_name, mm, (3, 11 * elems))
    np.testing.assert_array_equal(bits(out), bits(dequantize(type_name, raw.copy(), (3, 11 * elems))))
    del mm
    assert path.read_bytes() == raw.tobytes()


def test_f16_and_bf16_every_bit_pattern():
    # the F16 bit trick must agree with numpy's cast on subnormals, zeros, inf
    # and NaN payloads; a clean chunk (no inf/NaN) takes the fast path alone
    h = np.arange(1 << 16, dtype=np.uint16)
    ours = dequantize("F16", h.view(np.uint8), (1 << 16,))
    np.testing.assert_array_equal(bits(ours), bits(h.view(np.float16).astype(np.float32)))
    finite = h[(h & 0x7C00) != 0x7C00]
    np.testing.assert_array_equal(bits(dequantize("F16", finite.view(np.uint8), finite.shape)),
                                  bits(finite.view(np.float16).astype(np.float32)))
    np.testing.assert_array_equal(bits(dequantize("BF16", h.view(np.uint8), h.shape)),
                                  (h.astype(np.uint32) << 16))


def test_f32_is_a_zero_copy_view_and_others_are_fresh():
    x = np.arange(64, dtype=np.float32)
    raw = x.view(np.uint8)
    raw.flags.writeable = False
    v = dequantize("F32", raw, (8, 8))
    assert np.shares_memory(v, raw) and not v.flags.writeable
    q = dequantize("Q8_0", quantize("Q8_0", x), (64,))
    assert q.flags.writeable and q.flags.c_contiguous


# ---------------------------------------------------------------------------
# Quantize: properties beyond the llama.cpp files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", LEGACY + sorted(K_QUANTIZABLE) + ["IQ4_XS"])
def test_round_trip_error_is_bounded(type_name):
    elems = quant_blocks.BLOCKS[type_name][0]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((31, 8 * 32)) * rng.uniform(1e-3, 10, (31, 1))).astype(np.float32)
    x = x[:, : (x.shape[1] // elems) * elems]
    q = quantize(type_name, x)
    assert q.shape == (31, quant_blocks.row_bytes(type_name, x.shape[1])) and q.dtype == np.uint8
    y = dequantize(type_name, q, x.shape)
    # worst error relative to each row's largest value, for the format's bit depth:
    # Q4_0/Q5_0 map the largest value to code -8/-16, so its opposite end reaches
    # only 7/8 (15/16) of it; Q8_0 is half a step plus the fp16 rounding of d.
    rel = np.abs(y - x).max(axis=1) / np.abs(x).max(axis=1)
    limit = {"Q4_0": 1 / 8 + 2**-9, "Q4_1": 1 / 14, "Q5_0": 1 / 16 + 2**-9, "Q5_1": 1 / 30,
             "Q8_0": 0.5 / 127 + 2**-10, "Q2_K": 1 / 2, "Q3_K": 1 / 4, "Q4_K": 1 / 8,
             "Q5_K": 1 / 16, "Q6_K": 1 / 40, "IQ4_NL": 1 / 8, "IQ4_XS": 1 / 8}[type_name]
    assert rel.max() <= limit, (type_name, rel.max())


@pytest.mark.parametrize("type_name", LEGACY + sorted(K_QUANTIZABLE) + ["IQ4_XS"])
def test_quantize_zeros_and_odd_block_counts(type_name):
    elems, size = quant_blocks.BLOCKS[type_name]
    for n in ODD_COUNTS:
        x = np.zeros((n, elems), np.float32)
        assert not dequantize(type_name, quantize(type_name, x), x.shape).any()
    # a zero block between live ones must not disturb its neighbours
    x = np.random.default_rng(5).standard_normal((3, elems)).astype(np.float32)
    x[1] = 0
    q = quantize(type_name, x)
    np.testing.assert_array_equal(q[[0, 2]], quantize(type_name, x[[0, 2]]))
    assert not dequantize(type_name, q[1], (elems,)).any()


def test_q8_0_rounds_half_away_from_zero():
    # 127 * 0.5/127 lands on q = 0.5-ish ties; roundf must go away from zero
    x = np.zeros(32, np.float32)
    x[0], x[1], x[2] = 127.0, 0.5, -0.5
    q = quantize("Q8_0", x)[2:].view(np.int8)
    assert (q[0], q[1], q[2]) == (127, 1, -1)


def test_float_conversions_match_numpy():
    x = np.random.default_rng(9).standard_normal(4096).astype(np.float32) * 100
    x[:4] = [np.inf, -np.inf, np.nan, 65520.0]          # 65520 rounds to fp16 inf
    with np.errstate(over="ignore"):
        expect = x.astype(np.float16)
    np.testing.assert_array_equal(quantize("F16", x).view(np.float16).reshape(-1), expect)
    np.testing.assert_array_equal(bits(dequantize("F32", quantize("F32", x), x.shape)), bits(x))


def test_bf16_quantize_matches_gguf_py_rounding():
    u = np.random.default_rng(11).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    x = u.view(np.float32)
    ours = quantize("BF16", x).reshape(-1)
    ref = gguf_py.quants.BF16.quantize_blocks(x.reshape(-1, 1)).reshape(-1)
    np.testing.assert_array_equal(ours, ref)


# ---------------------------------------------------------------------------
# Bad arguments: one typed error
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: dequantize("Q9_9", np.zeros(18, np.uint8), (32,)), "unknown"),
    (lambda: dequantize("Q4_0", np.zeros(17, np.uint8), (32,)), "bytes"),
    (lambda: dequantize("Q4_0", np.zeros(36, np.uint8), (32,)), "bytes"),
    (lambda: dequantize("Q4_0", np.zeros(18, np.uint8), (2, 16)), "multiple"),
    (lambda: dequantize("Q4_0", np.zeros(9, np.uint16), (32,)), "uint8"),
    (lambda: dequantize("Q4_0", np.zeros(18, np.uint8), (-1, 32)), "negative"),
    (lambda: dequantize("Q4_0", [0] * 18, (32,)), "bytes-like"),
    (lambda: quantize("I16", np.zeros(256, np.float32)), "not supported"),
    (lambda: quantize("Q4_0", np.zeros(48, np.float32)), "multiple"),
    (lambda: quantize("IQ2_XXS", np.zeros(256, np.float32)), "unknown"),
    (lambda: quantize("Q8_0", np.float32(1)), "scalar"),
])
def test_bad_arguments_raise_quant_error(call, match):
    with pytest.raises(QuantError, match=match):
        call()
    assert issubclass(QuantError, ValueError)


def test_bytes_like_input_is_accepted():
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    q = quantize("Q8_0", x)
    np.testing.assert_array_equal(dequantize("Q8_0", q.tobytes(), (64,)), dequantize("Q8_0", q, (64,)))


# ---------------------------------------------------------------------------
# Oracle 3: libggml-base's C reference, through ctypes (skipped without it)
# ---------------------------------------------------------------------------

def _libggml():
    path = os.environ.get("EMBER_GGML_LIB") or next(iter(sorted(glob.glob(
        str(ROOT / ".." / "llamaenv" / "lib" / "python3*" / "site-packages" / "llama_cpp"
            / "lib" / "libggml-base.so")))), None)
    if not path or not os.path.exists(path):
        absent("llama.cpp's libggml-base.so not found (set EMBER_GGML_LIB)", REQUIRE_ORACLES)
    return ctypes.CDLL(path)


def _c_name(type_name: str) -> str:
    return type_name.lower().replace("_k", "_K")


def c_quantize(lib, type_name: str, x: np.ndarray) -> np.ndarray:
    elems, size = quant_blocks.BLOCKS[type_name]
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    out = np.zeros(x.size // elems * size, np.uint8)
    fn = getattr(lib, f"quantize_row_{_c_name(type_name)}_ref")
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


def c_dequantize(lib, type_name: str, raw: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    fn = getattr(lib, f"dequantize_row_{_c_name(type_name)}")
    fn(np.ascontiguousarray(raw).ctypes.data_as(ctypes.c_void_p),
       out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(n))
    return out


def generated(kind: str, n: int, rng) -> np.ndarray:
    return {
        "normal": lambda: rng.standard_normal(n),
        "heavy": lambda: rng.standard_cauchy(n),                  # outliers dominate blocks
        "integers": lambda: rng.integers(-8, 8, n),               # exact ties everywhere
        "halves": lambda: rng.integers(-20, 20, n) / 2,           # .5 ties for roundf/rint
        "tiny": lambda: rng.standard_normal(n) * 1e-6,            # fp16 subnormal scales
        "sparse": lambda: rng.standard_normal(n) * (rng.random(n) < 0.05),   # zero sub-blocks
    }[kind]().astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "heavy", "integers", "halves", "tiny", "sparse"])
@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_quantize_matches_libggml_reference(type_name, kind):
    lib = _libggml()
    elems, size = quant_blocks.BLOCKS[type_name]
    rng = np.random.default_rng(zlib.crc32(f"{type_name}/{kind}".encode()))   # stable per case
    for n_blocks in ODD_COUNTS:
        x = generated(kind, n_blocks * elems, rng)
        ours = quantize(type_name, x).reshape(-1, size)
        theirs = c_quantize(lib, type_name, x).reshape(-1, size)
        bad = np.nonzero((ours != theirs).any(axis=1))[0]
        assert bad.size == 0, f"{kind} n={n_blocks}: block {bad[0]} ours {ours[bad[0]]} C {theirs[bad[0]]}"


def c_quantize_chunk(lib, type_name: str, x: np.ndarray) -> np.ndarray:
    """ggml_quantize_chunk without an importance matrix: what llama-quantize writes."""
    elems, size = quant_blocks.BLOCKS[type_name]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros(x.size // elems * size, np.uint8)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk(ctypes.c_int(quant_blocks.GGML_TYPE_IDS[type_name]),
                            x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
                            ctypes.c_int64(0), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]),
                            ctypes.c_void_p(0))
    return out


@pytest.mark.parametrize("kind", ["normal", "heavy", "integers", "halves", "tiny", "sparse"])
@pytest.mark.parametrize("type_name", CHUNK_QUANTIZABLE)
def test_quantize_matches_libggml_file_quantizer(type_name, kind):
    lib = _libggml()
    elems, size = quant_blocks.BLOCKS[type_name]
    rng = np.random.default_rng(zlib.crc32(f"chunk/{type_name}/{kind}".encode()))
    for n_blocks in ODD_COUNTS:
        x = generated(kind, n_blocks * elems, rng).reshape(1, -1)
        if n_blocks > 2:
            x[:, elems:2 * elems] = 0                          # an all-zero block between live ones
        ours = quantize(type_name, x).reshape(-1, size)
        theirs = c_quantize_chunk(lib, type_name, x).reshape(-1, size)
        bad = np.nonzero((ours != theirs).any(axis=1))[0]
        assert bad.size == 0, f"{kind} n={n_blocks}: block {bad[0]} ours {ours[bad[0]]} C {theirs[bad[0]]}"


@pytest.mark.parametrize("type_name", [t for t in quant_blocks._TYPES if quant_blocks.BLOCKS[t][0] > 1])
def test_dequantize_matches_libggml_reference(type_name):
    lib = _libggml()
    elems, size = quant_blocks.BLOCKS[type_name]
    for seed, raw in enumerate([sane_blocks(type_name, 255, seed=1),
                                np.random.default_rng(2).integers(0, 256, (33, size), dtype=np.uint8)]):
        ours = dequantize(type_name, raw.reshape(-1), (len(raw) * elems,))
        with np.errstate(all="ignore"):
            theirs = c_dequantize(lib, type_name, raw, len(raw) * elems)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{'sane' if seed == 0 else 'random'} blocks")
