"""GGUF: read (zero-copy, validated) and write llama.cpp's model files.

Layout (little-endian throughout):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x  (key: string, value_type: u32, value)
    n_tensors x (name: string, n_dims: u32, dims: u64[n_dims], type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset

A string is a u64 length then that many UTF-8 bytes. Dims are stored
innermost first (ggml's ne[0] is the row length); `.shape` reverses them into
numpy order.

Design: the whole file is mapped read-only once. Every count and length read
from it is checked against the bytes that remain *before* anything is
allocated in proportion to it, so a hostile file costs bounded time and
memory. Tensor data is handed out as read-only numpy views into the map.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ember.formats import quants

# ---------------------------------------------------------------------------
# Constants and errors
# ---------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 4          # nested arrays deeper than this are refused
MAX_DIMS = 4                 # ggml tensors have at most 4 dimensions
MAX_ELEMENTS = 1 << 62       # product of dims; keeps byte counts far from int64 overflow
MAX_ALIGNMENT = 1 << 16

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
MIN_VALUE_BYTES = {t: struct.calcsize(f) for t, (f, _) in SCALARS.items()} | {STRING: 8, ARRAY: 12}


class GGUFError(ValueError):
    """A GGUF file is malformed or unsupported. The message names field and byte offset."""


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
        """Checked arithmetic: n more bytes must exist; returns the start offset."""
        if n < 0 or n > self.remaining():
            raise GGUFError(f"{what} at byte {self.pos}: needs {n} bytes, "
                            f"only {self.remaining()} remain in the file")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, vtype: int, what: str):
        fmt = SCALARS[vtype][0]
        start = self.need(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def u32(self, what: str) -> int:
        return self.scalar(UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(UINT64, what)

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u64(f"{what} length")
        start = self.need(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} at byte {at}: invalid UTF-8 ({e.reason})") from None

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count whose items (at least min_item_bytes each) must fit in the file."""
        at = self.pos
        n = self.u64(what)
        if n * min_item_bytes > self.remaining():
            raise GGUFError(f"{what} at byte {at}: {n} items of >= {min_item_bytes} bytes "
                            f"cannot fit in the {self.remaining()} bytes that remain")
        return n


# ---------------------------------------------------------------------------
# Metadata values
# ---------------------------------------------------------------------------

def _read_value(cur: _Cursor, vtype: int, what: str, depth: int = 0):
    if vtype in SCALARS:
        v = cur.scalar(vtype, what)
        return bool(v) if vtype == BOOL else v
    if vtype == STRING:
        return cur.string(what)
    if vtype == ARRAY:
        return _read_array(cur, what, depth + 1)
    raise GGUFError(f"{what} at byte {cur.pos - 4}: unknown value type {vtype}")


def _read_array(cur: _Cursor, what: str, depth: int) -> list:
    if depth > MAX_ARRAY_DEPTH:
        raise GGUFError(f"{what} at byte {cur.pos}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    at = cur.pos
    etype = cur.u32(f"{what} element type")
    if etype not in MIN_VALUE_BYTES:
        raise GGUFError(f"{what} at byte {at}: unknown array element type {etype}")
    n = cur.count(f"{what} array length", MIN_VALUE_BYTES[etype])
    if etype in SCALARS:
        # Fast path: one frombuffer over the whole run instead of n unpacks.
        width = MIN_VALUE_BYTES[etype]
        start = cur.need(n * width, what)
        arr = np.frombuffer(cur.buf, dtype=SCALARS[etype][1], count=n, offset=start)
        return arr.astype(bool).tolist() if etype == BOOL else arr.tolist()
    return [_read_value(cur, etype, f"{what}[{i}]", depth) for i in range(n)]


def _value_type_of(cur: _Cursor, what: str):
    """Returns (value type, element type or None) as declared at the cursor."""
    at = cur.pos
    vtype = cur.u32(f"{what} value type")
    if vtype not in MIN_VALUE_BYTES:
        raise GGUFError(f"{what} at byte {at}: unknown value type {vtype}")
    etype = None
    if vtype == ARRAY and cur.remaining() >= 4:
        etype = struct.unpack_from("<I", cur.buf, cur.pos)[0]
    return vtype, etype


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
    data: np.ndarray = field(repr=False)  # uint8, (nbytes,), read-only

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def numpy(self) -> np.ndarray:
        """Dequantized float32 array of `.shape`."""
        return quants.dequantize(self.type, self.data, self.shape)


@dataclass
class _TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: str
    rel_offset: int
    nbytes: int
    at: int  # byte offset of this tensor's info, for error messages


def _read_tensor_info(cur: _Cursor, index: int) -> _TensorInfo:
    at = cur.pos
    name = cur.string(f"tensor {index} name")
    what = f"tensor {name!r}"
    n_dims = cur.u32(f"{what} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"{what} at byte {at}: n_dims {n_dims} outside 1..{MAX_DIMS}")
    dims = [cur.u64(f"{what} dim {i}") for i in range(n_dims)]
    type_at = cur.pos
    type_id = cur.u32(f"{what} type")
    offset = cur.u64(f"{what} offset")
    n = 1
    for i, d in enumerate(dims):
        if d < 1:
            raise GGUFError(f"{what} at byte {at}: dim {i} is {d}, must be >= 1")
        n *= d
        if n > MAX_ELEMENTS:
            raise GGUFError(f"{what} at byte {at}: element count overflows (dims {dims})")
    tname = quants.GGML_TYPE_NAMES.get(type_id)
    if tname is None or tname not in quants.BLOCKS:
        label = f"unsupported tensor type {tname}" if tname else f"unknown tensor type {type_id}"
        raise GGUFError(f"{what} at byte {type_at}: {label}")
    elems, bsize = quants.BLOCKS[tname]
    if dims[0] % elems:
        raise GGUFError(f"{what} at byte {at}: row length {dims[0]} is not a multiple of "
                        f"{tname}'s block of {elems}")
    return _TensorInfo(name, tuple(reversed(dims)), tname, offset, n // elems * bsize, at)


# ---------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------

class GGUFFile:
    """A mapped, validated GGUF file. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mmap = None
        with builtins_open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{self.path}: {size} bytes is too short for a GGUF header (24)")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(memoryview(self._mmap))
        except BaseException:
            self.close()
            raise

    # -- parsing, in file order ---------------------------------------------

    def _parse(self, buf) -> None:
        cur = _Cursor(buf)
        self._read_header(cur)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[int, int | None]] = {}
        for i in range(self._n_kv):
            self._read_kv(cur, i)
        infos = [_read_tensor_info(cur, i) for i in range(self._n_tensors)]
        self.alignment = self._read_alignment()
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensor] = self._place_tensors(infos, len(buf))

    def _read_header(self, cur: _Cursor) -> None:
        magic = bytes(cur.buf[0:4])
        cur.need(4, "magic")
        if magic != GGUF_MAGIC:
            raise GGUFError(f"magic at byte 0: {magic!r} is not b'GGUF' (not a GGUF file)")
        version = cur.u32("version")
        if version & 0xFFFF == 0 and version >> 16:
            raise GGUFError(f"version at byte 4: file is big-endian (version reads as {version:#x});"
                            " ember reads little-endian GGUF only — convert it on the machine that made it")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"version at byte 4: GGUF version {version} unsupported "
                            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        # each tensor info needs >= 8+4+8+4+8 bytes, each kv >= 8+4+1
        self._n_tensors = cur.count("tensor count", 32)
        self._n_kv = cur.count("metadata count", 13)

    def _read_kv(self, cur: _Cursor, index: int) -> None:
        at = cur.pos
        key = cur.string(f"metadata key {index}")
        if key in self.metadata:
            raise GGUFError(f"metadata key {key!r} at byte {at}: duplicate key")
        vtype, etype = _value_type_of(cur, f"metadata {key!r}")
        self.metadata[key] = _read_value(cur, vtype, f"metadata {key!r}")
        self.metadata_types[key] = (vtype, etype)

    def _read_alignment(self) -> int:
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(align, int) or isinstance(align, bool) or align < 1
                or align > MAX_ALIGNMENT or align & (align - 1)):
            raise GGUFError(f"metadata 'general.alignment': {align!r} is not a power of two "
                            f"in 1..{MAX_ALIGNMENT}")
        return align

    def _place_tensors(self, infos: list[_TensorInfo], size: int) -> dict[str, GGUFTensor]:
        tensors: dict[str, GGUFTensor] = {}
        spans = []
        for info in infos:
            what = f"tensor {info.name!r} at byte {info.at}"
            if info.name in tensors:
                raise GGUFError(f"{what}: duplicate tensor name")
            if info.rel_offset % self.alignment:
                raise GGUFError(f"{what}: offset {info.rel_offset} not aligned to {self.alignment}")
            start = self.data_offset + info.rel_offset
            if start + info.nbytes > size:
                raise GGUFError(f"{what}: data [{start}, {start + info.nbytes}) runs past the "
                                f"end of the file ({size} bytes)")
            data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=start)
            tensors[info.name] = GGUFTensor(info.name, info.type, info.shape, start, info.nbytes, data)
            spans.append((start, start + info.nbytes, info.name))
        _check_overlaps(spans)
        return tensors

    # -- lifetime -------------------------------------------------------------

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


def _check_overlaps(spans: list[tuple[int, int, str]]) -> None:
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise GGUFError(f"tensor {n1!r} at byte {s1}: overlaps tensor {n0!r} [{s0}, {e0})")


builtins_open = open


def open(path: str | os.PathLike) -> GGUFFile:  # noqa: A001 - the stable surface is gguf.open
    """Map and validate a GGUF file. Raises GGUFError (or OSError for I/O)."""
    return GGUFFile(path)
