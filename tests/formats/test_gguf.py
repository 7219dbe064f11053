"""formats/gguf.py: the reader against real llama.cpp files and gguf-py, the writer by round trip.

Hostile files live in test_gguf_hostile.py; this file is about valid ones.
"""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ember.formats import gguf, quant_blocks
from ember.formats.gguf import (ARRAY, BOOL, FLOAT32, FLOAT64, INT8, INT16, INT32, INT64, STRING,
                                UINT8, UINT16, UINT32, UINT64, GGUFError, TensorData)
from tests.conftest import conformance_models, conformance_path

SMALL_MODELS = [m for m in conformance_models() if not m.startswith("v")]  # gguf-py is slow on big vocabs

# ---------------------------------------------------------------------------
# Real files made by llama.cpp
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", conformance_models() or ["(none)"])
def test_conformance_model_reencodes_byte_identical(name):
    """Reading then writing a llama.cpp file gives back the very same bytes: types kept exactly."""
    path = conformance_path("models", name)
    with gguf.open(path) as f:
        assert f.version in (2, 3)
        assert f.metadata["general.architecture"] in ("llama", "qwen2", "qwen3", "phi3")
        out = gguf.encode(f.metadata, f.tensors, types=f.metadata_types, version=f.version)
    assert out == path.read_bytes()


@pytest.mark.parametrize("name", SMALL_MODELS or ["(none)"])
def test_reader_agrees_with_gguf_py(name):
    gguf_py = pytest.importorskip("gguf")
    path = conformance_path("models", name)
    ref = gguf_py.GGUFReader(path)
    with gguf.open(path) as f:
        assert [t.name for t in ref.tensors] == list(f.tensors)
        for rt in ref.tensors:
            t = f.tensors[rt.name]
            assert t.type == rt.tensor_type.name
            assert t.shape == tuple(int(d) for d in reversed(rt.shape.tolist()))
            assert t.offset == rt.data_offset and t.nbytes == rt.n_bytes
            assert bytes(t.data) == bytes(np.asarray(rt.data).reshape(-1).view(np.uint8))
        for key, rf in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            assert f.metadata_types[key][0] == int(rf.types[0])
            if len(rf.types) > 1:
                assert f.metadata_types[key][1] == int(rf.types[1])
            assert f.metadata[key] == rf.contents()


def test_tensors_are_read_only_views_into_one_map():
    path = conformance_path("models", "stories260K.gguf")
    with gguf.open(path) as f:
        size = os.path.getsize(path)
        for t in f.tensors.values():
            assert t.data.dtype == np.uint8 and t.data.shape == (t.nbytes,)
            assert not t.data.flags.writeable and not t.data.flags.owndata
            with pytest.raises(ValueError):
                t.data[0] = 1
            assert 0 < t.offset and t.offset + t.nbytes <= size and t.offset % f.alignment == 0
        maps = {id(t.data.base.obj) for t in f.tensors.values()}  # frombuffer -> memoryview -> mmap
        assert len(maps) == 1 and isinstance(next(iter(f.tensors.values())).data.base.obj, mmap.mmap)
        emb = f.tensors["token_embd.weight"]
        assert emb.shape == (512, 64) and emb.type == "F32"
        # the view's bytes are the file's bytes at that offset
        with open(path, "rb") as raw:
            raw.seek(emb.offset)
            assert raw.read(64) == bytes(emb.data[:64])


def test_tensor_views_outlive_close():
    path = conformance_path("models", "stories260K.gguf")
    with gguf.open(path) as f:
        t = f.tensors["token_embd.weight"]
        view, offset = t.data, t.offset
    assert f.tensors == {}
    with open(path, "rb") as raw:  # the map stays alive under the view, with the file's bytes
        raw.seek(offset)
        assert bytes(view[:256]) == raw.read(256)


def test_release_pages_keeps_the_views_readable(tmp_path):
    """release_pages drops the resident pages only: the views read the file's bytes again."""
    w = np.arange(4096, dtype=np.float32).reshape(64, 64)
    gguf.write(tmp_path / "r.gguf", {"general.architecture": "llama"},
               [("w", gguf.TensorData("F32", (64, 64), w.tobytes()))])
    with gguf.open(tmp_path / "r.gguf") as f:
        before = bytes(f.tensors["w"].data)
        f.release_pages()
        assert bytes(f.tensors["w"].data) == before == w.tobytes()


# ---------------------------------------------------------------------------
# Writer: explicit cases
# ---------------------------------------------------------------------------


def roundtrip(tmp_path, metadata, tensors=(), **kw):
    path = tmp_path / "x.gguf"
    gguf.write(path, metadata, tensors, **kw)
    return gguf.open(path)


def test_every_value_type_round_trips_exactly(tmp_path):
    md = {"u8": 255, "i8": -128, "u16": 65535, "i16": -32768, "u32": 2**32 - 1, "i32": -2**31,
          "f32": 0.5, "b": True, "s": "héllo ✓", "u64": 2**64 - 1, "i64": -2**63, "f64": 0.1,
          "arr_s": ["a", "", "ü"], "arr_f": [1.0, -2.5], "nested": [[1, 2], [], [3]],
          "deep": [[[["x"]]]], "mixed_nest": [[1], ["a", "b"]]}
    types = {"u8": UINT8, "i8": INT8, "u16": UINT16, "i16": INT16, "u32": UINT32, "i32": "INT32",
             "f32": FLOAT32, "b": BOOL, "s": STRING, "u64": UINT64, "i64": INT64, "f64": FLOAT64,
             "arr_f": (ARRAY, FLOAT64), "nested": (ARRAY, ((ARRAY, UINT8), (ARRAY, INT16),
                                                           (ARRAY, UINT64)))}
    with roundtrip(tmp_path, md, types=types) as f:
        assert f.metadata == md
        mt = f.metadata_types
        assert {k: mt[k] for k in types if k not in ("i32", "nested")} == \
            {k: (v, None) if isinstance(v, int) else v for k, v in types.items()
             if k not in ("i32", "nested")}
        assert mt["i32"] == (INT32, None)
        assert mt["nested"] == types["nested"]
        assert mt["arr_s"] == (ARRAY, STRING)
        assert mt["deep"] == (ARRAY, ((ARRAY, ((ARRAY, ((ARRAY, STRING),)),)),))
        assert mt["mixed_nest"] == (ARRAY, ((ARRAY, UINT32), (ARRAY, STRING)))
        again = gguf.encode(f.metadata, types=f.metadata_types)
    assert again == (tmp_path / "x.gguf").read_bytes()


def test_inferred_types(tmp_path):
    md = {"a": 7, "b": -7, "c": 2**40, "d": 2**63, "e": 1.5, "f": 0.1, "g": True,
          "h": [1, 2], "i": [1, -1], "j": [0.25, 3], "k": np.float32(0.1), "l": np.arange(3, dtype=np.int16),
          "m": np.uint8(3), "n": [True, False], "o": []}
    with roundtrip(tmp_path, md) as f:
        t = {k: v[0] if v[0] != ARRAY else (ARRAY, v[1]) for k, v in f.metadata_types.items()}
        assert f.metadata["k"] == float(np.float32(0.1))
        assert f.metadata["l"] == [0, 1, 2] and f.metadata["o"] == []
    assert t == {"a": UINT32, "b": INT32, "c": INT64, "d": UINT64, "e": FLOAT32, "f": FLOAT64,
                 "g": BOOL, "h": (ARRAY, UINT32), "i": (ARRAY, INT32), "j": (ARRAY, FLOAT32),
                 "k": FLOAT32, "l": (ARRAY, INT16), "m": UINT8, "n": (ARRAY, BOOL),
                 "o": (ARRAY, INT32)}


def test_tensors_of_every_type_and_alignment_honored(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for tname, (elems, bsize) in quant_blocks.BLOCKS.items():
        shape = (3, 2 * elems)
        raw = rng.integers(0, 256, 3 * 2 * bsize, dtype=np.uint8).tobytes()
        tensors[f"t.{tname}"] = TensorData(tname, shape, raw)
    f32 = rng.standard_normal((5, 7)).astype(np.float32)
    tensors["plain.f32"] = f32
    tensors["plain.f16"] = f32.astype(np.float16)
    tensors["lazy"] = TensorData("Q8_0", (1, 32), lambda: bytes(range(34)))
    md = {"general.alignment": 64}
    with roundtrip(tmp_path, md, tensors) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert list(f.tensors) == list(tensors)
        for name, t in tensors.items():
            got = f.tensors[name]
            assert got.offset % 64 == 0
            if isinstance(t, np.ndarray):
                assert got.shape == t.shape
                assert bytes(got.data) == t.tobytes()
            else:
                assert (got.type, got.shape) == (t.type, t.shape)
                assert bytes(got.data) == (t.data() if callable(t.data) else t.data)
        assert np.array_equal(f.tensors["plain.f32"].data.view(np.float32).reshape(5, 7), f32)
    assert os.path.getsize(tmp_path / "x.gguf") % 64 == 0  # padded after the last tensor, as llama.cpp


def test_version_2_reads_and_writes(tmp_path):
    with roundtrip(tmp_path, {"k": "v"}, {"w": np.ones((2, 4), np.float32)}, version=2) as f:
        assert f.version == 2 and f.metadata == {"k": "v"}
        assert f.tensors["w"].data.view(np.float32).tolist() == [1.0] * 8


@pytest.mark.parametrize("metadata, tensors, types, match", [
    ({"x": 300}, {}, {"x": UINT8}, "outside UINT8"),
    ({"x": 1.5}, {}, {"x": INT32}, "not a valid INT32"),
    ({"x": True}, {}, {"x": UINT32}, "not a valid UINT32"),
    ({"x": 1e39}, {}, {"x": FLOAT32}, "outside FLOAT32"),
    ({"x": 3}, {}, {"x": STRING}, "not a string"),
    ({"x": "\ud800"}, {}, {}, "UTF-8|surrogate"),
    ({"x": [1, "a"]}, {}, {}, "mixed array"),
    ({"x": [[[[[1]]]]]}, {}, {}, "nested deeper"),
    ({"x": object()}, {}, {}, "cannot infer"),
    ({"x": 1}, {}, {"x": 99}, "unknown value type"),
    ({"general.alignment": 13}, {}, {}, "power of two"),
    ({"general.alignment": 32}, {}, {"general.alignment": UINT64}, "must be UINT32"),
    ({}, {"t": TensorData("Q4_0", (2, 31), b"")}, {}, "multiple of"),
    ({}, {"t": TensorData("Q8_0", (1, 32), b"short")}, {}, "need 34"),
    ({}, {"t": TensorData("IQ2_XXS", (1, 256), b"")}, {}, "unsupported tensor type"),
    ({}, {"t": TensorData("F32", (0, 4), b"")}, {}, "each >= 1"),
    ({}, {"t": TensorData("F32", (1, 1, 1, 1, 1), b"\0" * 4)}, {}, "1..4 dims"),
    ({}, {"n" * 64: np.zeros(1, np.float32)}, {}, "at most 63"),
    ({}, {"t": np.zeros(1, np.complex64)}, {}, "no GGML type"),
    ({}, {"t": "not a tensor"}, {}, "neither"),
])
def test_writer_refuses_what_the_reader_would(tmp_path, metadata, tensors, types, match):
    with pytest.raises((GGUFError, UnicodeEncodeError), match=match):
        gguf.write(tmp_path / "bad.gguf", metadata, tensors, types=types)
    assert os.listdir(tmp_path) == []  # no half-written file left behind


def test_writer_refuses_duplicate_tensor_names(tmp_path):
    z = np.zeros(4, np.float32)
    with pytest.raises(GGUFError, match="duplicate tensor"):
        gguf.write(tmp_path / "d.gguf", {}, [("a", z), ("a", z)])


# ---------------------------------------------------------------------------
# Writer: property-based round trip
# ---------------------------------------------------------------------------

INT_TYPES = [UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64]


def scalar_of(vtype):
    if vtype in INT_TYPES:
        lo, hi = gguf.INT_RANGES[vtype]
        return st.integers(lo, hi)
    if vtype == FLOAT32:
        return st.floats(width=32, allow_nan=False)
    if vtype == FLOAT64:
        return st.floats(allow_nan=False)
    if vtype == BOOL:
        return st.booleans()
    return st.text(max_size=8)


LEAF_TYPES = INT_TYPES + [FLOAT32, FLOAT64, BOOL, STRING]


@st.composite
def flat_array(draw):
    et = draw(st.sampled_from(LEAF_TYPES))
    return (ARRAY, et), draw(st.lists(scalar_of(et), max_size=6))


def nested_array(children):
    @st.composite
    def build(draw):
        items = draw(st.lists(children, max_size=3))
        return (ARRAY, tuple(s for s, _ in items)), [v for _, v in items]
    return build()


# arrays nested up to 4 deep: flat, then three levels of nesting
ARRAYS = st.one_of(flat_array(), nested_array(flat_array()),
                   nested_array(nested_array(flat_array())),
                   nested_array(nested_array(nested_array(flat_array()))))
SCALAR_VALUES = st.sampled_from(LEAF_TYPES).flatmap(lambda t: scalar_of(t).map(lambda v: ((t, None), v)))


@st.composite
def tensor_dicts(draw):
    out = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=4)):
        if len(name.encode()) > gguf.MAX_TENSOR_NAME:
            continue
        tname = draw(st.sampled_from(sorted(quant_blocks.BLOCKS)))
        elems, bsize = quant_blocks.BLOCKS[tname]
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
        shape = shape + (elems * draw(st.integers(1, 2)),)
        n_bytes = int(np.prod(shape)) // elems * bsize
        out[name] = TensorData(tname, shape, draw(st.binary(min_size=n_bytes, max_size=n_bytes)))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(kvs=st.dictionaries(st.text(max_size=10), st.one_of(SCALAR_VALUES, ARRAYS), max_size=6),
       tensors=tensor_dicts(), version=st.sampled_from([2, 3]),
       align=st.sampled_from([None, 1, 8, 32, 256]))
def test_read_of_write_is_identity(tmp_path, kvs, tensors, version, align):
    kvs.pop("general.alignment", None)
    md = {k: v for k, (_, v) in kvs.items()}
    types = {k: s for k, (s, _) in kvs.items()}
    if align is not None:
        md["general.alignment"], types["general.alignment"] = align, (UINT32, None)
    path = tmp_path / "p.gguf"
    gguf.write(path, md, tensors, types=types, version=version)
    with gguf.open(path) as f:
        assert f.version == version
        assert f.metadata == md
        assert f.metadata_types == types
        assert f.alignment == (align or 32)
        assert list(f.tensors) == list(tensors)
        for name, t in tensors.items():
            got = f.tensors[name]
            assert (got.type, got.shape, bytes(got.data)) == (t.type, t.shape, t.data)
            assert got.offset % f.alignment == 0


def test_numpy_dequantizes_to_shape():
    with gguf.open(conformance_path("models", "stories260K-Q8_0.gguf")) as f:
        for name in ("token_embd.weight", "blk.0.ffn_down.weight", "output_norm.weight"):
            t = f.tensors[name]
            x = t.numpy()
            assert x.dtype == np.float32 and x.shape == t.shape and np.isfinite(x).all()
    with gguf.open(conformance_path("models", "stories260K.gguf")) as f:
        t = f.tensors["token_embd.weight"]
        assert np.array_equal(t.numpy(), t.data.view(np.float32).reshape(t.shape))


def test_errors_carry_path_field_and_offset(tmp_path):
    p = tmp_path / "bad.gguf"
    data = bytearray(gguf.encode({"a": 1}, {"w": np.zeros(8, np.float32)}))
    data[4:8] = (7).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError) as e:
        gguf.open(p)
    assert (e.value.field, e.value.offset) == ("version", 4)
    assert str(e.value).startswith(f"{p}: version at byte 4: GGUF version 7")


# ---------------------------------------------------------------------------
# Metadata arrays: lazy views of the map
# ---------------------------------------------------------------------------

def test_a_huge_metadata_array_costs_no_memory_at_open(tmp_path):
    """A 100M-element array used to become a 100M-item list at open (~900 MB)."""
    from ember.daemon.budget import rss_bytes
    from tests.formats.sparse_gguf import HUGE_KEY, with_huge_array
    src = conformance_path("models", "stories260K.gguf")
    n = with_huge_array(src, tmp_path / "huge.gguf", 100_000_000)
    before = rss_bytes()
    with gguf.open(tmp_path / "huge.gguf") as f:
        grew = rss_bytes() - before
        view = f.metadata[HUGE_KEY]
        assert isinstance(view, gguf.ArrayView) and len(view) == n
        assert f.metadata_types[HUGE_KEY] == (ARRAY, UINT8)
        arr = view.numpy()
        assert arr.shape == (n,) and not arr.flags.owndata and not arr.flags.writeable
        assert view[n - 1] == 0 and view[:3] == [0, 0, 0]
        with gguf.open(src) as g:   # the tensors after the array are the source's
            assert all(np.array_equal(t.data, f.tensors[k].data) for k, t in g.tensors.items())
    assert grew < 16 << 20, f"opening grew RSS by {grew >> 20} MiB"


def test_array_views_decode_on_use_and_equal_their_lists(tmp_path):
    md = {"u8": [1, 2, 3], "f": [0.5, -1.0], "b": [True, False], "s": ["a", "", "ü"], "e": []}
    types = {"u8": (ARRAY, UINT8), "f": (ARRAY, FLOAT32), "b": (ARRAY, BOOL)}
    with roundtrip(tmp_path, md, types=types) as f:
        u8, fl, b, s = (f.metadata[k] for k in ("u8", "f", "b", "s"))
        assert u8 == [1, 2, 3] and [1, 2, 3] == u8 and u8 == (1, 2, 3) and u8 != [1, 2]
        assert u8 == np.array([1, 2, 3]) and list(u8) == [1, 2, 3] and u8[-1] == 3
        assert type(u8[0]) is int and type(fl[0]) is float and b.tolist() == [True, False]
        assert np.asarray(fl).dtype == np.float32 and b.numpy().dtype == np.bool_
        assert s.tolist() is s.tolist() and s[2] == "ü" and "" in s   # decoded once, kept
        assert f.metadata["e"] == [] and len(f.metadata["e"]) == 0
        assert repr(u8) == "ArrayView(UINT8 x 3)"
        with pytest.raises(IndexError):
            u8[3]
        again = gguf.encode(f.metadata, types=f.metadata_types)
    assert again == (tmp_path / "x.gguf").read_bytes()
