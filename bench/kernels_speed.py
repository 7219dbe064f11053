"""Single-thread matvec speed per weight type and ISA, against read bandwidth.

Decode reads every weight once per token, so a matvec kernel is good when it
moves weights as fast as the memory system delivers them. This script prints,
per type and ISA, the GB/s of weight bytes consumed by one thread:

  warm    one TinyLlama-sized matrix (5632 x 2048), repeated: cache-resident,
          so it shows the kernel's compute ceiling;
  stream  a stack of such matrices larger than the last-level cache, walked
          once per repeat: what decode actually sees;

prefill, the same matrix times a batch of activation rows (matmul), as
weight rows x batch rows per second against batch x matvec, which shows how
much the 4-row weight reuse buys;

and the machine's single-thread read bandwidth (a plain C sum over a 1 GiB
array, compiled on the fly; numpy's sum if no C compiler), so that
stream / bandwidth is the fraction of the bound reached. With --threads N
(N > 1) the stream is also walked by N threads at once, each over its own
contiguous rows as decode splits a matrix, against the read bandwidth of N
threads summing their own parts: decode runs that way, and one thread alone
does not saturate memory here.

ISAs alternate inside each repeat, so load on a shared machine hits all of
them alike; compare ratios, not absolute numbers across runs.

    python3 bench/kernels_speed.py [--types Q4_0,Q8_0,Q4_K,Q6_K] [--stream-mb 1024] [--threads 2]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import threading
import time

import numpy as np

from ember.formats.quant_blocks import BLOCKS, GGML_TYPE_IDS
from ember.kernels import _native, dispatch

HOT = "Q4_0,Q8_0,Q4_K,Q6_K"
ALL = "Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,IQ4_NL,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_XS,F16,BF16,F32"
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "IQ4_NL": [0], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2],
               "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}

# ---------------------------------------------------------------------------
# Read bandwidth
# ---------------------------------------------------------------------------

SUM_C = r"""
#include <stdint.h>
#include <stddef.h>
uint64_t sum_u64(const uint64_t *p, size_t n) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i + 4 <= n; i += 4) { a += p[i]; b += p[i + 1]; c += p[i + 2]; d += p[i + 3]; }
    return a + b + c + d;
}
"""


def _c_sum():
    """ctypes sum_u64 built with -O3 -march=native, or None without a compiler."""
    d = tempfile.mkdtemp(prefix="ember_bw_")
    src, lib = os.path.join(d, "sum.c"), os.path.join(d, "sum.so")
    with open(src, "w") as f:
        f.write(SUM_C)
    try:
        subprocess.run(["cc", "-O3", "-march=native", "-shared", "-fPIC", src, "-o", lib],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    fn = ctypes.CDLL(lib).sum_u64
    fn.restype, fn.argtypes = ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_size_t]
    return fn


def read_bandwidth(gib: float = 1.0, repeats: int = 5, threads: int = 1) -> tuple[float, str]:
    """Best GB/s of `threads` threads each summing its part of a `gib` GiB array, and how."""
    a = np.ones(int(gib * (1 << 30)) // 8, np.uint64)   # (n,) touched once: pages exist
    fn = _c_sum()
    parts = np.array_split(a, threads)
    if fn:   # ctypes drops the GIL for the call, so the parts run in parallel
        tasks = [lambda p=p: fn(p.ctypes.data, p.size) for p in parts]
    else:
        tasks = [lambda p=p: p.sum() for p in parts]
    best = min(_timed(lambda: _parallel(tasks)) for _ in range(repeats))
    return a.nbytes / best / 1e9, "C sum -O3 -march=native" if fn else "numpy uint64 sum"


def _parallel(tasks) -> None:
    """Run callables at once, one thread each (the first on this thread)."""
    ts = [threading.Thread(target=t) for t in tasks[1:]]
    for t in ts:
        t.start()
    tasks[0]()
    for t in ts:
        t.join()

# ---------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------

def random_weights(t: str, rows: int, n: int, rng) -> np.ndarray:
    """uint8 (rows, row_bytes) of type t: random codes, scales in [1e-3, 1e-1]."""
    be, bb = BLOCKS[t]
    if be == 1:
        v = rng.standard_normal((rows, n), dtype=np.float32)
        if t == "F32":
            return v.view(np.uint8)
        from ember.formats.quant_blocks import quantize
        return quantize(t, v).reshape(rows, -1)
    W = rng.integers(0, 256, (rows, n // be, bb), dtype=np.uint8)
    for off in FP16_FIELDS[t]:
        W[:, :, off:off + 2] = rng.uniform(1e-3, 1e-1, (rows, n // be)).astype(np.float16)[..., None].view(np.uint8)
    return W.reshape(rows, -1)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

# ---------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------

def bench_type(t: str, isas: list[str], rows: int, n: int, stream_bytes: int, repeats: int, rng,
               threads: int = 1) -> dict:
    tid = GGML_TYPE_IDS[t]
    W = random_weights(t, rows, n, rng)
    copies = max(2, -(-stream_bytes // W.nbytes))
    S = np.concatenate([W] * copies)                   # (copies*rows, row_bytes): beyond the LLC
    x = rng.standard_normal(n).astype(np.float32)
    xq = np.empty(_native.act_row_bytes(tid, n), np.uint8)
    y = np.empty(S.shape[0], np.float32)
    warm = {i: float("inf") for i in isas}
    stream, par = dict(warm), dict(warm)
    bounds = np.linspace(0, S.shape[0], threads + 1).astype(int)   # contiguous rows per thread
    tasks = [lambda a=a, b=b: _native.matvec(tid, S, xq, y[a:b], n, a, b) for a, b in zip(bounds, bounds[1:])]
    for _ in range(repeats):
        for isa in isas:                               # alternate: load hits every ISA alike
            dispatch.use(isa)
            _native.quantize_act(tid, x, xq)
            for _ in range(3):
                warm[isa] = min(warm[isa], _timed(lambda: _native.matvec(tid, W, xq, y, n, 0, rows)))
            stream[isa] = min(stream[isa], _timed(lambda: _native.matvec(tid, S, xq, y, n, 0, S.shape[0])))
            if threads > 1:
                par[isa] = min(par[isa], _timed(lambda: _parallel(tasks)))
    return {isa: (W.nbytes / warm[isa] / 1e9, S.nbytes / stream[isa] / 1e9, S.nbytes / par[isa] / 1e9)
            for isa in isas}


def bench_matmul(t: str, isas: list[str], rows: int, n: int, batch: int, repeats: int, rng) -> dict:
    """Per ISA: (matmul row-dots per second in G, speedup over batch separate matvecs)."""
    tid = GGML_TYPE_IDS[t]
    W = random_weights(t, rows, n, rng)
    X = rng.standard_normal((batch, n)).astype(np.float32)
    Xq = np.empty((batch, _native.act_row_bytes(tid, n)), np.uint8)
    Y = np.empty((batch, rows), np.float32)
    mm = {i: float("inf") for i in isas}
    mv = dict(mm)
    for _ in range(repeats):
        for isa in isas:
            dispatch.use(isa)
            for b in range(batch):
                _native.quantize_act(tid, X[b], Xq[b])
            mm[isa] = min(mm[isa], _timed(lambda: _native.matmul(tid, W, Xq, Y, n, 0, rows)))
            mv[isa] = min(mv[isa], _timed(lambda: [_native.matvec(tid, W, Xq[b], Y[b], n, 0, rows) for b in range(batch)]))
    return {isa: (rows * batch / mm[isa] / 1e9, mv[isa] / mm[isa]) for isa in isas}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=HOT, help=f"comma list, or 'all' ({ALL})")
    ap.add_argument("--isas", default=",".join(dispatch.available_isas()))
    ap.add_argument("--rows", type=int, default=5632)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--stream-mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="activation rows for the matmul (prefill) part; 0 skips it")
    ap.add_argument("--threads", type=int, default=1, help="also stream with this many threads (decode's split)")
    args = ap.parse_args()
    types = (ALL if args.types == "all" else args.types).split(",")
    isas = args.isas.split(",")
    nt = max(1, args.threads)
    bw, how = read_bandwidth()
    print(f"single-thread read bandwidth: {bw:.1f} GB/s ({how}, 1 GiB)")
    bwn = read_bandwidth(threads=nt)[0] if nt > 1 else bw
    if nt > 1:
        print(f"{nt}-thread read bandwidth: {bwn:.1f} GB/s")
    print(f"matvec {args.rows}x{args.cols}; GB/s of weights (warm = cache-resident, 1 thread; "
          f"stream = {args.stream_mb} MB, 1 thread{f' and {nt} threads' if nt > 1 else ''}; "
          f"fraction = stream / read bandwidth of as many threads)")
    head = f"{'type':7} {'isa':8} {'warm GB/s':>10} {'stream GB/s':>12} {'fraction':>9}"
    print(head + (f" {f'stream {nt}T':>11} {'fraction':>9}" if nt > 1 else ""))
    rng = np.random.default_rng(0)
    for t in types:
        res = bench_type(t, isas, args.rows, args.cols, args.stream_mb << 20, args.repeats, rng, nt)
        for isa, (warm, stream, par) in res.items():
            line = f"{t:7} {isa:8} {warm:10.2f} {stream:12.2f} {stream / bw:9.2f}"
            print(line + (f" {par:11.2f} {par / bwn:9.2f}" if nt > 1 else ""))
    if args.batch:
        print(f"\nmatmul {args.rows}x{args.cols} x {args.batch} rows, 1 thread "
              f"(G row-dots/s; speedup over {args.batch} matvecs)")
        print(f"{'type':7} {'isa':8} {'G dots/s':>9} {'vs matvec':>10}")
        for t in types:
            for isa, (rate, gain) in bench_matmul(t, isas, args.rows, args.cols, args.batch, args.repeats, rng).items():
                print(f"{t:7} {isa:8} {rate:9.3f} {gain:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
