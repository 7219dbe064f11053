"""Test helper: a real GGUF file plus one huge metadata array that costs no disk.

`with_huge_array(src, dst, n)` writes dst = src with an extra first key whose
value is an ARRAY[UINT8] of about n zero bytes, left as a hole in a sparse
file. The array's size is rounded so that the key shifts everything after it
by a multiple of the file's alignment: the rest of src is then copied byte for
byte (metadata, tensor infos, padding, tensor data) and every tensor offset,
which is relative to the aligned data section, stays right.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from ember.formats import gguf

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
HUGE_KEY = "test.huge_array"


def with_huge_array(src: str | os.PathLike, dst: str | os.PathLike, n: int,
                    key: str = HUGE_KEY) -> int:
    """Write dst (read-only, as the daemon wants models); returns the array's length."""
    with gguf.open(src) as f:
        align = f.alignment
    raw = Path(src).read_bytes()
    n_kv = U64.unpack_from(raw, 16)[0]
    head = U64.pack(len(key)) + key.encode() + U32.pack(gguf.ARRAY) + U32.pack(gguf.UINT8)
    n -= (len(head) + 8 + n) % align                     # keep the shift a multiple of align
    with open(dst, "wb") as out:
        out.write(raw[:16] + U64.pack(n_kv + 1) + head + U64.pack(n))
        out.seek(n, os.SEEK_CUR)                         # the elements: a hole, read as zeros
        out.write(raw[24:])
    os.chmod(dst, 0o444)
    return n
