"""GGUF: read (zero-copy, validated) and write llama.cpp's model files.

Layout (little-endian throughout):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x  (key: string, value_type: u32, value)
    n_tensors x (name: string, n_dims: u32, dims: u64[n_dims], type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset, offsets aligned

A string is a u64 length then that many UTF-8 bytes. An array value is an
element type u32, a u64 count, then the elements. Dims are stored innermost
first (ggml's ne[0] is the row length); `.shape` reverses them into numpy
order. Versions 2 and 3 share this layout (v3 only allowed big-endian files,
which ember refuses with a message saying so).

Design: the whole file is mapped read-only once. Every count and length read
from it goes through one bounded cursor that checks it against the bytes that
remain *before* anything is allocated in proportion to it, so a hostile file
costs time and memory bounded by its size, and every failure is a GGUFError
naming the field and byte offset at fault. Tensor data is handed out as
read-only numpy views into the map, never copied.

Metadata arrays stay in the map too: `.metadata[key]` is an `ArrayView` that
was validated at open (counts, string lengths, UTF-8, bool bytes) but decodes
its elements only when asked (`.tolist()`, iteration, indexing, `.numpy()` for
a zero-copy view of a numeric array). A 100M-element array thus costs no
memory until a consumer (the tokenizer, once the memory plan has admitted the
model) materializes it. Arrays of arrays are the exception: their outer level
is a list (of views), since each inner array carries its own type; so they
are limited to MAX_NESTED_ITEMS.

Value types are kept exactly: `.metadata_types[key]` is a spec
`(value_type, element)` — element is None for scalars and strings, the element
type for flat arrays, and a tuple of per-element specs for arrays of arrays.
`write()` accepts those specs, so `open(write(x))` gives back x, types and all.
"""
from __future__ import annotations

import builtins
import io
import mmap
import os
import struct
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ember.formats import quant_blocks
from ember.formats.errors import UserError

# ---------------------------------------------------------------------------
# Constants and errors
# ---------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 4          # arrays nested deeper than this are refused
MAX_NESTED_ITEMS = 1 << 16   # arrays of arrays hold at most this many: each inner array is an
                             # object at open (flat arrays stay lazy views: no such limit)
MAX_DIMS = 4                 # ggml tensors have at most 4 dimensions (GGML_MAX_DIMS)
MAX_TENSOR_NAME = 63         # bytes; ggml's GGML_MAX_NAME is 64 including the NUL
MAX_ELEMENTS = 1 << 62       # product of dims; keeps byte counts far from int64 overflow
MAX_ALIGNMENT = 1 << 16      # llama.cpp only checks "power of two"; 2^31 would waste the file

# GGUF metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)

# value type -> (struct format, numpy dtype) for fixed-size scalars
SCALARS: dict[int, tuple[str, str]] = {
    UINT8: ("<B", "<u1"), INT8: ("<b", "<i1"), UINT16: ("<H", "<u2"), INT16: ("<h", "<i2"),
    UINT32: ("<I", "<u4"), INT32: ("<i", "<i4"), FLOAT32: ("<f", "<f4"), BOOL: ("<?", "u1"),
    UINT64: ("<Q", "<u8"), INT64: ("<q", "<i8"), FLOAT64: ("<d", "<f8"),
}
VALUE_TYPE_NAMES = {
    UINT8: "UINT8", INT8: "INT8", UINT16: "UINT16", INT16: "INT16", UINT32: "UINT32",
    INT32: "INT32", FLOAT32: "FLOAT32", BOOL: "BOOL", STRING: "STRING", ARRAY: "ARRAY",
    UINT64: "UINT64", INT64: "INT64", FLOAT64: "FLOAT64",
}
VALUE_TYPE_IDS = {name: t for t, name in VALUE_TYPE_NAMES.items()}
# smallest encoding of one value of each type: what a declared count is checked against
MIN_VALUE_BYTES = {t: struct.calcsize(f) for t, (f, _) in SCALARS.items()} | {STRING: 8, ARRAY: 12}
INT_RANGES = {UINT8: (0, 2**8 - 1), INT8: (-2**7, 2**7 - 1), UINT16: (0, 2**16 - 1),
              INT16: (-2**15, 2**15 - 1), UINT32: (0, 2**32 - 1), INT32: (-2**31, 2**31 - 1),
              UINT64: (0, 2**64 - 1), INT64: (-2**63, 2**63 - 1)}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# each tensor info takes >= name length 8 + n_dims 4 + one dim 8 + type 4 + offset 8
MIN_TENSOR_INFO_BYTES = 32
# each key/value takes >= key length 8 + value type 4 + a one-byte value
MIN_KV_BYTES = 13


class GGUFError(UserError, ValueError):
    """A GGUF file is malformed or unsupported. The message names field and byte offset.

    `.field` and `.offset` carry the same facts for callers (None where the
    fault is not at one place in a file, e.g. a bad argument to write()).
    """

    def __init__(self, message: str, field: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.field = field
        self.offset = offset


def _fault(what: str, at: int, problem: str) -> GGUFError:
    return GGUFError(f"{what} at byte {at}: {problem}", what, at)


# ---------------------------------------------------------------------------
# Bounded cursor: the one place that checks lengths against the file
# ---------------------------------------------------------------------------

class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf, pos: int = 0):
        self.buf = buf
        self.size = len(buf)
        self.pos = pos

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> int:
        """Checked arithmetic: n more bytes must exist; returns their start offset."""
        if n < 0 or n > self.size - self.pos:
            raise _fault(what, self.pos, f"needs {n} bytes, only {self.remaining()} "
                                         "remain in the file")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, vtype: int, what: str):
        fmt = SCALARS[vtype][0]
        start = self.need(MIN_VALUE_BYTES[vtype], what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def string(self, what: str, max_len: int | None = None) -> str:
        at = self.pos
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            raise _fault(what, at, f"length {n} exceeds the limit of {max_len} bytes")
        start = self.need(n, what)
        return _decode(self.buf[start:start + n], what, at)

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count whose items (at least min_item_bytes each) must fit in the file."""
        at = self.pos
        n = self.u64(what)
        if n * min_item_bytes > self.remaining():  # Python ints: no overflow possible
            raise _fault(what, at, f"{n} items of >= {min_item_bytes} bytes cannot fit in "
                                   f"the {self.remaining()} bytes that remain")
        return n


def _decode(raw: bytes, what: str, at: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fault(what, at, f"invalid UTF-8 ({e.reason} at string byte {e.start})") from None


# ---------------------------------------------------------------------------
# Metadata values
# ---------------------------------------------------------------------------

def _read_value(cur: _Cursor, vtype: int, what: str, depth: int = 0):
    """One value of a known type -> (python value, spec)."""
    if vtype == BOOL:
        at = cur.pos
        return _check_bool(cur.scalar(UINT8, what), what, at), (BOOL, None)
    if vtype in SCALARS:
        return cur.scalar(vtype, what), (vtype, None)
    if vtype == STRING:
        return cur.string(what), (STRING, None)
    return _read_array(cur, what, depth + 1)


def _check_bool(byte: int, what: str, at: int) -> bool:
    # The spec allows 0 and 1 only; llama.cpp would read any other byte as true.
    if byte > 1:
        raise _fault(what, at, f"bool byte {byte} is neither 0 nor 1")
    return bool(byte)


def _read_array(cur: _Cursor, what: str, depth: int):
    at = cur.pos
    if depth > MAX_ARRAY_DEPTH:
        raise _fault(what, at, f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
    etype = cur.u32(f"{what} element type")
    if etype not in MIN_VALUE_BYTES:
        raise _fault(f"{what} element type", at, f"unknown value type {etype}")
    n = cur.count(f"{what} array length", MIN_VALUE_BYTES[etype])
    if etype in SCALARS:
        return _read_scalar_run(cur, etype, n, what), (ARRAY, etype)
    if etype == STRING:
        start, cur.pos = cur.pos, _string_run(cur.buf, cur.pos, cur.size, n, what)
        return ArrayView(cur.buf, STRING, start, n, what), (ARRAY, STRING)
    if n > MAX_NESTED_ITEMS:
        raise _fault(f"{what} array length", at + 4, f"{n} arrays in an array exceed the limit of "
                                                     f"{MAX_NESTED_ITEMS}")
    values, specs = [], []
    for i in range(n):
        v, spec = _read_array(cur, f"{what}[{i}]", depth + 1)
        values.append(v)
        specs.append(spec)
    return values, (ARRAY, tuple(specs))


def _read_scalar_run(cur: _Cursor, etype: int, n: int, what: str) -> "ArrayView":
    start = cur.need(n * MIN_VALUE_BYTES[etype], what)
    if etype == BOOL:   # the one scan at open: bool arrays are short in any real file
        raw = np.frombuffer(cur.buf, dtype=np.uint8, count=n, offset=start)
        bad = np.flatnonzero(raw > 1)
        if bad.size:
            i = int(bad[0])
            _check_bool(int(raw[i]), f"{what}[{i}]", start + i)
    return ArrayView(cur.buf, etype, start, n, what)


def _string_run(buf, pos: int, size: int, n: int, what: str, out: list | None = None) -> int:
    """Check n strings from pos (lengths, UTF-8), appending them to `out` when given;
    returns the offset after the last. The hot loop of a 150k-token vocabulary: kept flat."""
    unpack, keep = _U64.unpack_from, out is not None
    for i in range(n):
        if size - pos < 8:
            raise _fault(f"{what}[{i}] length", pos, f"needs 8 bytes, only {size - pos} remain")
        ln = unpack(buf, pos)[0]
        if ln > size - pos - 8:
            raise _fault(f"{what}[{i}]", pos, f"string of {ln} bytes runs past the end "
                                              f"of the file ({size - pos - 8} remain)")
        text = _decode(buf[pos + 8:pos + 8 + ln], f"{what}[{i}]", pos)
        if keep:
            out.append(text)
        pos += 8 + ln
    return pos


class ArrayView(Sequence):
    """A validated metadata array still in the mapped file; elements decode on use.

    Numeric arrays: `.numpy()` is a read-only view of the map (bool arrays as
    np.bool_), indexing and iteration give Python numbers. String arrays
    decode all their strings on first use and keep the list (a tokenizer
    asks for it more than once). `==` compares element-wise with any
    sequence, so a view equals the list it was written from.
    """

    __slots__ = ("_buf", "etype", "_start", "_n", "_what", "_list")
    __hash__ = None

    def __init__(self, buf, etype: int, start: int, n: int, what: str):
        self._buf, self.etype, self._start, self._n, self._what = buf, etype, start, n, what
        self._list: list | None = None

    def numpy(self) -> np.ndarray:
        """(n,) read-only view of a numeric array's bytes; strings: an object array."""
        if self.etype == STRING:
            return np.array(self.tolist(), dtype=object)
        arr = np.frombuffer(self._buf, dtype=SCALARS[self.etype][1], count=self._n,
                            offset=self._start)
        return arr.view(np.bool_) if self.etype == BOOL else arr

    def tolist(self) -> list:
        """Every element as a Python value (a new list; strings: the kept one)."""
        if self.etype != STRING:
            return self.numpy().tolist()
        if self._list is None:
            out: list[str] = []
            _string_run(self._buf, self._start, len(self._buf), self._n, self._what, out)
            self._list = out
        return self._list

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if self.etype == STRING:
            return self.tolist()[i]
        item = self.numpy()[i]
        return item.tolist()      # numpy scalar -> Python number; a slice -> a list

    def __iter__(self):
        return iter(self.tolist())

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def __eq__(self, other) -> bool:
        if isinstance(other, np.ndarray):
            return other.ndim == 1 and len(other) == self._n and bool(np.all(self.numpy() == other))
        if not isinstance(other, (list, tuple, ArrayView)):
            return NotImplemented
        return len(other) == self._n and self.tolist() == list(other)

    def __repr__(self) -> str:
        return f"ArrayView({VALUE_TYPE_NAMES[self.etype]} x {self._n})"


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------

@dataclass
class GGUFTensor:
    """One tensor: a read-only view of its bytes plus what they mean."""

    name: str
    type: str                 # GGML type name, e.g. "Q4_K"
    shape: tuple[int, ...]    # numpy order, outermost first; shape[-1] is the row length
    offset: int               # absolute byte offset in the file
    nbytes: int
    data: np.ndarray = field(repr=False)  # uint8, (nbytes,), read-only view into the map

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def numpy(self) -> np.ndarray:
        """Dequantized float32 array of `.shape`."""
        return quant_blocks.dequantize(self.type, self.data, self.shape)


@dataclass
class _TensorInfo:
    name: str
    shape: tuple[int, ...]    # numpy order
    type: str
    rel_offset: int           # from the start of the data section
    nbytes: int
    at: int                   # byte offset of this tensor's info, for error messages


def _read_tensor_info(cur: _Cursor, index: int) -> _TensorInfo:
    at = cur.pos
    name = cur.string(f"tensor {index} name", MAX_TENSOR_NAME)
    what = f"tensor {name!r}"
    dims_at = cur.pos
    n_dims = cur.u32(f"{what} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _fault(f"{what} n_dims", dims_at, f"{n_dims} is outside 1..{MAX_DIMS}")
    dims = _read_dims(cur, n_dims, what)
    type_at = cur.pos
    tname = _tensor_type(cur.u32(f"{what} type"), f"{what} type", type_at)
    offset = cur.u64(f"{what} offset")
    elems, bsize = quant_blocks.BLOCKS[tname]
    if dims[0] % elems:
        raise _fault(f"{what} dim 0", dims_at + 4, f"row length {dims[0]} is not a multiple "
                                                   f"of {tname}'s block of {elems}")
    n = int(np.prod(dims, dtype=object))
    return _TensorInfo(name, tuple(reversed(dims)), tname, offset, n // elems * bsize, at)


def _read_dims(cur: _Cursor, n_dims: int, what: str) -> list[int]:
    dims, n = [], 1
    for i in range(n_dims):
        at = cur.pos
        d = cur.u64(f"{what} dim {i}")
        if d < 1:
            raise _fault(f"{what} dim {i}", at, f"{d} must be >= 1")
        if d > MAX_ELEMENTS:  # a negative int64 dim reads as a huge u64
            raise _fault(f"{what} dim {i}", at, f"{d} is out of range (negative as int64?)")
        n *= d
        if n > MAX_ELEMENTS:
            raise _fault(f"{what} dim {i}", at, f"element count overflows (dims {dims + [d]})")
        dims.append(d)
    return dims


def _tensor_type(type_id: int, what: str, at: int) -> str:
    tname = quant_blocks.GGML_TYPE_NAMES.get(type_id)
    if tname is None:
        raise _fault(what, at, f"unknown tensor type {type_id}")
    if tname not in quant_blocks.BLOCKS:
        raise _fault(what, at, f"tensor type {tname} is not supported by ember")
    return tname


# ---------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------

class GGUFFile:
    """A mapped, validated GGUF file. Use as a context manager or call close()."""

    version: int
    metadata: dict[str, Any]
    metadata_types: dict[str, tuple]          # key -> spec (see the module note)
    tensors: dict[str, GGUFTensor]            # in file order
    alignment: int
    data_offset: int                          # absolute start of the tensor data section
    size: int                                 # file size in bytes

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mmap = None
        with builtins.open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size < 24:
                raise GGUFError(f"{self.path}: header at byte 0: {self.size} bytes is too short "
                                "for a GGUF header (24)", "header", 0)
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(_Cursor(self._mmap))
        except GGUFError as e:
            self.close()
            raise GGUFError(f"{self.path}: {e}", e.field, e.offset) from None
        except BaseException:
            self.close()
            raise

    # -- parsing, in file order ---------------------------------------------

    def _parse(self, cur: _Cursor) -> None:
        self._read_header(cur)
        self.metadata, self.metadata_types = {}, {}
        self._kv_at: dict[str, int] = {}       # key -> byte offset of its value type
        for i in range(self._n_kv):
            self._read_kv(cur, i)
        infos = [_read_tensor_info(cur, i) for i in range(self._n_tensors)]
        self.alignment = self._read_alignment()
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors = self._place_tensors(infos)

    def _read_header(self, cur: _Cursor) -> None:
        magic = bytes(cur.buf[0:4])
        cur.need(4, "magic")
        if magic != GGUF_MAGIC:
            raise _fault("magic", 0, f"{magic!r} is not b'GGUF' (not a GGUF file)")
        version = cur.u32("version")
        if version & 0xFFFF == 0 and version >> 16:
            raise _fault("version", 4, f"reads as {version:#x}: the file is big-endian; ember "
                                       "reads little-endian GGUF only — convert it on the "
                                       "machine that made it")
        if version not in SUPPORTED_VERSIONS:
            raise _fault("version", 4, f"GGUF version {version} is not supported "
                                       f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        self._n_tensors = cur.count("tensor count", MIN_TENSOR_INFO_BYTES)
        self._n_kv = cur.count("metadata count", MIN_KV_BYTES)

    def _read_kv(self, cur: _Cursor, index: int) -> None:
        at = cur.pos
        key = cur.string(f"metadata key {index}")
        if key in self.metadata:
            raise _fault(f"metadata key {key!r}", at, "duplicate key")
        what = f"metadata {key!r}"
        type_at = self._kv_at[key] = cur.pos
        vtype = cur.u32(f"{what} value type")
        if vtype not in MIN_VALUE_BYTES:
            raise _fault(f"{what} value type", type_at, f"unknown value type {vtype}")
        self.metadata[key], self.metadata_types[key] = _read_value(cur, vtype, what)

    def _read_alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        align, spec = self.metadata["general.alignment"], self.metadata_types["general.alignment"]
        at = self._kv_at["general.alignment"]
        if spec != (UINT32, None):
            raise _fault("metadata 'general.alignment'", at, f"must be UINT32, is {_spec_name(spec)}")
        _check_alignment(align, at)
        return align

    def _place_tensors(self, infos: list[_TensorInfo]) -> dict[str, GGUFTensor]:
        tensors: dict[str, GGUFTensor] = {}
        for info in infos:
            what = f"tensor {info.name!r}"
            if info.name in tensors:
                raise _fault(what, info.at, "duplicate tensor name")
            if info.rel_offset % self.alignment:
                raise _fault(f"{what} offset", info.at, f"{info.rel_offset} is not aligned to "
                                                        f"{self.alignment}")
            start = self.data_offset + info.rel_offset
            if start + info.nbytes > self.size:
                raise _fault(f"{what} data", info.at, f"[{start}, {start + info.nbytes}) runs "
                                                      f"past the end of the file ({self.size} bytes)")
            data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=start)
            tensors[info.name] = GGUFTensor(info.name, info.type, info.shape, start,
                                            info.nbytes, data)
        _check_overlaps(tensors, {i.name: i.at for i in infos})
        return tensors

    def mapped(self) -> np.ndarray:
        """The whole file as a read-only uint8 view of the map (what a SIGBUS guard covers)."""
        if self._mmap is None:
            raise GGUFError(f"{self.path}: the file is closed")
        return np.frombuffer(self._mmap, dtype=np.uint8)

    # -- lifetime -------------------------------------------------------------

    def release_pages(self) -> None:
        """Tell the kernel the mapped file's pages are not needed now (MADV_DONTNEED): a
        backend that copied every tensor into memory of its own (an integrated GPU's, which is
        the same RAM) does not keep a second, page-cache copy resident. The map stays valid: a
        later read faults the bytes back in from the file."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Drop the map. Views handed out keep it alive until they are gone."""
        self.tensors = {}
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # numpy views still reference it; it closes when they die
            self._mmap = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.tensors)} tensors)"


def _check_alignment(align, at: int | None = None) -> None:
    if (not isinstance(align, int) or isinstance(align, bool) or align < 1
            or align > MAX_ALIGNMENT or align & (align - 1)):
        where = "" if at is None else f" at byte {at}"
        raise GGUFError(f"metadata 'general.alignment'{where}: {align!r} is not a power of two "
                        f"in 1..{MAX_ALIGNMENT}", "general.alignment", at)


def _check_overlaps(tensors: dict[str, GGUFTensor], info_at: dict[str, int]) -> None:
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise _fault(f"tensor {n1!r} data", info_at[n1],
                         f"[{s1}, {e1}) overlaps tensor {n0!r} [{s0}, {e0})")


def open(path: str | os.PathLike) -> GGUFFile:  # noqa: A001 - the stable surface is gguf.open
    """Map and validate a GGUF file. Raises GGUFError (or OSError for I/O)."""
    return GGUFFile(path)


# ---------------------------------------------------------------------------
# Writing: value types
# ---------------------------------------------------------------------------
# A spec is (value_type, element): see the module note. Callers may also pass
# a bare type (id or name) for scalars/strings, or (ARRAY, element type) with
# the element types of nested arrays inferred from the values.

_NUMPY_VALUE_TYPES = {np.dtype(dt).newbyteorder("<"): t for t, (_, dt) in SCALARS.items()
                      if t != BOOL} | {np.dtype(bool): BOOL}


def _spec_name(spec) -> str:
    vtype, sub = spec
    if vtype != ARRAY:
        return VALUE_TYPE_NAMES.get(vtype, str(vtype))
    inner = VALUE_TYPE_NAMES.get(sub, str(sub)) if isinstance(sub, int) else "..."
    return f"ARRAY[{inner}]"


def _type_id(t, what: str) -> int:
    if isinstance(t, str) and t.upper() in VALUE_TYPE_IDS:
        return VALUE_TYPE_IDS[t.upper()]
    if isinstance(t, (int, np.integer)) and int(t) in VALUE_TYPE_NAMES:
        return int(t)
    raise GGUFError(f"{what}: unknown value type {t!r}", what)


def _norm_spec(spec, what: str):
    """Bare type, name or (type, element) -> (type id, element) with ids resolved."""
    if not isinstance(spec, tuple):
        spec = (spec, None)
    if len(spec) != 2:
        raise GGUFError(f"{what}: type spec {spec!r} is not (value_type, element)", what)
    vtype, sub = _type_id(spec[0], what), spec[1]
    if vtype != ARRAY:
        if sub is not None:
            raise GGUFError(f"{what}: {VALUE_TYPE_NAMES[vtype]} takes no element type", what)
        return vtype, None
    if sub is None or isinstance(sub, tuple):
        return vtype, sub
    return vtype, _type_id(sub, what)


def _infer_spec(value, what: str):
    """The spec a plain Python/numpy value gets when the caller gives none."""
    if isinstance(value, (bool, np.bool_)):
        return BOOL, None
    if isinstance(value, (np.integer, np.floating)):
        return _numpy_value_type(value.dtype, what), None
    if isinstance(value, int):
        return _int_type(value, value, what), None
    if isinstance(value, float):
        return _float_type([value]), None
    if isinstance(value, str):
        return STRING, None
    if isinstance(value, ArrayView):
        return ARRAY, value.etype
    if isinstance(value, (list, tuple, np.ndarray)):
        return ARRAY, None   # element type inferred by _array_element_specs
    raise GGUFError(f"{what}: cannot infer a GGUF type for {type(value).__name__}; "
                    "give one in `types`", what)


def _numpy_value_type(dtype: np.dtype, what: str) -> int:
    t = _NUMPY_VALUE_TYPES.get(dtype.newbyteorder("<"))
    if t is None:
        raise GGUFError(f"{what}: numpy dtype {dtype} has no GGUF value type", what)
    return t


def _int_type(lo: int, hi: int, what: str) -> int:
    # Unsigned 32-bit first: it is what llama.cpp expects for counts and token ids.
    for t in (UINT32, INT32, INT64, UINT64):
        if INT_RANGES[t][0] <= lo and hi <= INT_RANGES[t][1]:
            return t
    raise GGUFError(f"{what}: integer outside the 64-bit range", what)


def _float_type(values) -> int:
    # FLOAT32 only when it loses nothing, so that read(write(x)) == x.
    arr = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        exact = np.array_equal(arr.astype(np.float32).astype(np.float64), arr, equal_nan=True)
    return FLOAT32 if exact else FLOAT64


def _infer_element_type(values, what: str) -> int:
    if isinstance(values, np.ndarray):
        return _numpy_value_type(values.dtype, what)
    if not values:
        return INT32  # an empty array reads back as [] whatever its element type
    if all(isinstance(v, str) for v in values):
        return STRING
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return BOOL
    if all(isinstance(v, (list, tuple, np.ndarray, ArrayView)) for v in values):
        return ARRAY
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return _int_type(min(values), max(values), what)
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
           for v in values):
        return _float_type(values)
    raise GGUFError(f"{what}: cannot infer one element type for a mixed array; "
                    "give one in `types`", what)


# ---------------------------------------------------------------------------
# Writing: metadata values
# ---------------------------------------------------------------------------

def _encode_value(out: bytearray, value, spec, what: str, depth: int = 0) -> None:
    vtype, sub = spec
    if vtype in SCALARS:
        out += struct.pack(SCALARS[vtype][0], _checked_scalar(value, vtype, what))
    elif vtype == STRING:
        _encode_string(out, value, what)
    else:
        _encode_array(out, value, sub, what, depth + 1)


def _checked_scalar(v, vtype: int, what: str):
    name = VALUE_TYPE_NAMES[vtype]
    if vtype == BOOL:
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, int) and v in (0, 1)):
            return bool(v)
    elif vtype in INT_RANGES:
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            lo, hi = INT_RANGES[vtype]
            if lo <= v <= hi:
                return int(v)
            raise GGUFError(f"{what}: {v} is outside {name}'s range [{lo}, {hi}]", what)
    elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        v = float(v)
        with np.errstate(over="ignore"):
            # struct refuses a finite double that rounds past float32's range
            if vtype == FLOAT32 and np.isinf(np.float32(v)) and not np.isinf(v):
                raise GGUFError(f"{what}: {v} is outside FLOAT32's range", what)
        return v
    raise GGUFError(f"{what}: {v!r} is not a valid {name}", what)


def _encode_string(out: bytearray, s, what: str) -> None:
    if not isinstance(s, str):
        raise GGUFError(f"{what}: {s!r} is not a string", what)
    raw = s.encode("utf-8")  # lone surrogates raise here: GGUF strings are valid UTF-8
    out += _U64.pack(len(raw))
    out += raw


def _encode_array(out: bytearray, values, sub, what: str, depth: int) -> None:
    if depth > MAX_ARRAY_DEPTH:
        raise GGUFError(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}", what)
    if isinstance(values, ArrayView):   # an array read from another file: copy it over
        values = values.tolist() if values.etype == STRING else values.numpy()
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise GGUFError(f"{what}: a {values.ndim}-D numpy array is not a GGUF array", what)
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise GGUFError(f"{what}: {type(values).__name__} is not an array", what)
    etype, elem_specs = _array_element_specs(values, sub, what)
    out += _U32.pack(etype)
    out += _U64.pack(len(values))
    if etype in SCALARS:
        out += _pack_scalar_run(values, etype, what)
    else:
        for i, (v, s) in enumerate(zip(values, elem_specs)):
            _encode_value(out, v, s, f"{what}[{i}]", depth)


def _array_element_specs(values, sub, what: str):
    """(element type, per-element specs or None for scalar runs) of an array."""
    if sub is None:
        sub = _infer_element_type(values, what)
    if isinstance(sub, int):
        if sub == ARRAY:
            specs = [_infer_spec(v, f"{what}[{i}]") for i, v in enumerate(values)]
            if any(s[0] != ARRAY for s in specs):
                raise GGUFError(f"{what}: an array of arrays holds a non-array", what)
            return ARRAY, specs
        return sub, (None if sub in SCALARS else [(sub, None)] * len(values))
    if sub and not isinstance(sub[0], tuple):      # one spec shared by every element
        spec = _norm_spec(sub, what)
        return spec[0], [spec] * len(values)
    if len(sub) != len(values):                    # one spec per element
        raise GGUFError(f"{what}: {len(sub)} element specs for {len(values)} elements", what)
    specs = [_norm_spec(s, f"{what}[{i}]") for i, s in enumerate(sub)]
    if any(s[0] != ARRAY for s in specs):
        raise GGUFError(f"{what}: per-element specs are only for arrays of arrays", what)
    return ARRAY, specs


def _pack_scalar_run(values, etype: int, what: str) -> bytes:
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        checked = values if len(values) == 0 else values.tolist()
    else:
        checked = values
    checked = [_checked_scalar(v, etype, f"{what}[{i}]") for i, v in enumerate(checked)]
    return np.asarray(checked, dtype=SCALARS[etype][1]).tobytes()


def _encode_metadata(metadata: Mapping[str, Any], types: Mapping[str, Any]) -> tuple[bytearray, int]:
    out = bytearray()
    for key, value in metadata.items():
        what = f"metadata {key!r}"
        if not isinstance(key, str):
            raise GGUFError(f"metadata key {key!r} is not a string", "metadata key")
        spec = _norm_spec(types[key], what) if key in types else _infer_spec(value, what)
        if key == "general.alignment" and spec != (UINT32, None):
            raise GGUFError(f"{what}: must be UINT32 (llama.cpp reads it as u32)", key)
        _encode_string(out, key, f"metadata key {key!r}")
        out += _U32.pack(spec[0])
        _encode_value(out, value, spec, what)
    return out, len(metadata)


# ---------------------------------------------------------------------------
# Writing: tensors
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorData:
    """A tensor to write: raw bytes of any GGML type.

    data: a bytes-like object (or numpy array, taken as its raw bytes) of the
    exact size, or a zero-argument callable returning one. A callable runs
    when the tensor is written, so a converter holds one tensor at a time.
    """

    type: str                  # GGML type name
    shape: tuple[int, ...]     # numpy order, outermost first
    data: Any


_NUMPY_TENSOR_TYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
                       np.dtype("i1"): "I8", np.dtype("<i2"): "I16", np.dtype("<i4"): "I32",
                       np.dtype("<i8"): "I64"}


@dataclass
class _Planned:
    name: str
    type: str
    shape: tuple[int, ...]     # numpy order
    nbytes: int
    source: Any                # bytes-like, numpy array or callable
    rel_offset: int = 0


def _plan_tensor(name, t) -> _Planned:
    what = f"tensor {name!r}"
    if not isinstance(name, str) or len(name.encode("utf-8")) > MAX_TENSOR_NAME:
        raise GGUFError(f"{what}: name must be a str of at most {MAX_TENSOR_NAME} UTF-8 bytes",
                        what)
    if not isinstance(t, np.ndarray) and not all(hasattr(t, a) for a in ("type", "shape", "data")):
        raise GGUFError(f"{what}: {type(t).__name__} is neither a numpy array nor a TensorData",
                        what)
    if isinstance(t, np.ndarray):
        dt = t.dtype.newbyteorder("<")
        if dt not in _NUMPY_TENSOR_TYPES:
            raise GGUFError(f"{what}: numpy dtype {t.dtype} has no GGML type; pass TensorData",
                            what)
        t = TensorData(_NUMPY_TENSOR_TYPES[dt], t.shape, np.ascontiguousarray(t, dtype=dt))
    tname, shape = t.type, tuple(int(d) for d in t.shape)
    if tname not in quant_blocks.BLOCKS:
        raise GGUFError(f"{what}: unknown or unsupported tensor type {tname!r}", what)
    if not 1 <= len(shape) <= MAX_DIMS or min(shape) < 1:
        raise GGUFError(f"{what}: shape {shape} needs 1..{MAX_DIMS} dims, each >= 1", what)
    elems, bsize = quant_blocks.BLOCKS[tname]
    if shape[-1] % elems:
        raise GGUFError(f"{what}: row length {shape[-1]} is not a multiple of {tname}'s "
                        f"block of {elems}", what)
    n = int(np.prod(shape, dtype=object))
    return _Planned(name, tname, shape, n // elems * bsize, t.data)


def _tensor_bytes(p: _Planned) -> memoryview:
    data = p.source() if callable(p.source) else p.source
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    mv = memoryview(data).cast("B")
    if mv.nbytes != p.nbytes:
        raise GGUFError(f"tensor {p.name!r}: data is {mv.nbytes} bytes, its type {p.type} and "
                        f"shape {p.shape} need {p.nbytes}", f"tensor {p.name!r}")
    return mv


def _encode_tensor_infos(planned: list[_Planned], alignment: int) -> bytearray:
    out, rel = bytearray(), 0
    for p in planned:
        p.rel_offset = rel
        rel += -(-p.nbytes // alignment) * alignment
        _encode_string(out, p.name, f"tensor {p.name!r} name")
        out += _U32.pack(len(p.shape))
        for d in reversed(p.shape):       # ggml order: innermost (row length) first
            out += _U64.pack(d)
        out += _U32.pack(quant_blocks.GGML_TYPE_IDS[p.type])
        out += _U64.pack(p.rel_offset)
    return out


# ---------------------------------------------------------------------------
# Writing: the file
# ---------------------------------------------------------------------------

def write(path: str | os.PathLike, metadata: Mapping[str, Any],
          tensors: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), *,
          types: Mapping[str, Any] | None = None, version: int = 3) -> None:
    """Write a GGUF file; `open(path)` gives back the same metadata, types and tensors.

    metadata: key -> value. types: key -> spec (e.g. a GGUFFile's
    `.metadata_types`); keys without one get a type inferred from the value
    (int -> UINT32/INT32/INT64/UINT64, float -> FLOAT32 when exact else
    FLOAT64, numpy scalars and arrays keep their dtype).
    tensors: name -> a float32/float16/int numpy array, a TensorData, or any
    object with `.type`, `.shape`, `.data` (e.g. a GGUFTensor).
    The file appears atomically: it is written beside `path` and renamed.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with builtins.open(tmp, "wb") as f:
            _write_to(f, metadata, tensors, types or {}, version)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def encode(metadata: Mapping[str, Any], tensors: Mapping[str, Any] | Iterable = (), *,
           types: Mapping[str, Any] | None = None, version: int = 3) -> bytes:
    """The bytes `write()` would put in a file."""
    buf = io.BytesIO()
    _write_to(buf, metadata, tensors, types or {}, version)
    return buf.getvalue()


def _write_to(f, metadata, tensors, types, version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"version: cannot write GGUF version {version}", "version")
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    planned = [_plan_tensor(name, t) for name, t in items]
    if len({p.name for p in planned}) != len(planned):
        raise GGUFError("tensors: duplicate tensor name", "tensors")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    _check_alignment(alignment)
    kv, n_kv = _encode_metadata(metadata, types)
    infos = _encode_tensor_infos(planned, alignment)
    head = GGUF_MAGIC + _U32.pack(version) + _U64.pack(len(planned)) + _U64.pack(n_kv)
    pos = f.write(head) + f.write(kv) + f.write(infos)
    for p in planned:
        pos += f.write(b"\0" * (-pos % alignment))
        pos += f.write(_tensor_bytes(p))
    # llama.cpp pads after the last tensor too (its reader sizes the data blob padded).
    f.write(b"\0" * (-pos % alignment))
