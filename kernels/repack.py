"""Repacked weights: the kernel-friendly layout, made once at load, one copy.

Design: a weight matrix whose type has a repacked layout that the current ISA
computes faster (``_native.repacked_type``; kernels/c/repack.c says what the
layout is and why) is rewritten at load into anonymous memory of its own,
16 rows interleaved, and the map's pages of the original are dropped at once
(``GGUFFile.release_pages`` on the tensor's range, MADV_DONTNEED). So at any
moment only one copy of each matrix is resident -- the repacked one, or the
file's while it is being read -- and the memory plan stays "the weights'
bytes": the layout has exactly the file's size.

Why anonymous memory and not a repacked cache file next to the model: the
repack is a 4-byte transpose that runs on every compute thread at once
(row ranges are independent), about the cost of reading the file anyway, so a
cache file would save little at start while adding a second file per model
to key, invalidate and budget on disk. The price: the repacked pages are
private (not shared between two daemons on one model) and swap-backed
rather than file-backed.

What stays in the file's layout: the token embedding (read row by row by
get_rows, which a 16-row interleave cannot serve; with tied embeddings that
is the output matrix too), matrices with rows not a multiple of 16, types
without a repacked layout, and every type on ISAs whose kernels for the
repacked layout are not faster (the generic C twin, NEON for now).
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ember.kernels import _native

ALIGN = 64   # a cache line: the kernels read each group block with 64-byte loads

Progress = Callable[[int, int], None]   # (bytes done, bytes total)


def wanted(mode, tid: int) -> int:
    """The repacked type id for a matrix of GGML type tid under `mode` (True: always
    where a layout exists, False: never, None/"auto": where this ISA computes it
    faster), or -1 to keep the file's layout."""
    if mode is False or mode == "off":
        return -1
    if mode is True or mode == "on":
        return _native.repack_type_of(tid)
    if mode in (None, "auto"):
        return _native.repacked_type(tid)
    raise ValueError(f"repack must be 'auto', 'on' or 'off' (or True/False/None), got {mode!r}")


def aligned_empty(shape: tuple[int, int]) -> np.ndarray:
    """uint8 array of `shape` whose first byte sits on an ALIGN boundary."""
    n = shape[0] * shape[1]
    raw = np.empty(n + ALIGN, np.uint8)
    off = -raw.ctypes.data % ALIGN
    return raw[off:off + n].reshape(shape)


def repack(tid: int, view: np.ndarray, cols: int, rtype: int, pool: ThreadPoolExecutor | None = None,
           parts: int = 1) -> np.ndarray:
    """The (rows, row_bytes) matrix `view` of type tid in layout rtype, in new memory.
    With a pool, `parts` row ranges (whole 16-row groups, independent) are repacked at
    once: the C repacker releases the GIL, and the new pages fault in on every core."""
    out = aligned_empty(view.shape)
    groups = view.shape[0] // _native.REPACK_ROWS
    cuts = [g * _native.REPACK_ROWS for g in np.linspace(0, groups, max(1, min(parts, groups)) + 1).astype(int)]
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    run = lambda ab: _native.repack(tid, view[ab[0]:ab[1]], out[ab[0]:ab[1]], cols)   # noqa: E731
    got = list(pool.map(run, spans)) if pool is not None and len(spans) > 1 else [run(ab) for ab in spans]
    assert set(got) == {rtype}, (got, rtype)
    return out


class Repacker:
    """Repacks the matrices a Decoder binds, dropping each original's pages as it goes,
    and reports progress (a first-run cost worth showing on big models)."""

    def __init__(self, gguf, mode=None, progress: Progress | None = None, total: int = 0, threads: int = 1):
        self.gguf, self.mode, self.progress, self.total = gguf, mode, progress, total
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, "ember-repack") if self.threads > 1 else None
        self.done = 0
        self.count = 0
        self.bytes = 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def matrix(self, t, tid: int, view: np.ndarray, cols: int) -> tuple[int, np.ndarray]:
        """(type id, view) to bind for tensor t: repacked where wanted, else as given."""
        rtype = wanted(self.mode, tid)
        if rtype >= 0 and view.shape[0] % _native.REPACK_ROWS == 0:
            packed = repack(tid, view, cols, rtype, self.pool, self.threads)
            packed.flags.writeable = False   # weights, read-only like the map they replace
            self.gguf.release_pages(t.offset, t.nbytes)
            tid, view = rtype, packed
            self.count += 1
            self.bytes += packed.nbytes
        self.done += t.nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)
        return tid, view


def stderr_bar(label: str = "repacking weights", width: int = 30) -> Progress:
    """A one-line progress bar on stderr when it is a terminal (else silent): the
    first-run cost of a repack, visible without a log line per tensor."""
    if not sys.stderr.isatty():
        return lambda done, total: None
    start = time.monotonic()

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label} [{bar:<{width}}] {done / 2**20:7.0f} / {total / 2**20:.0f} MiB "
                         f"{time.monotonic() - start:5.1f} s{end}")
        sys.stderr.flush()
    return show
