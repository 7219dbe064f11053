"""Dequantize speed per type: ember vs the gguf package, side by side.

    python3 bench/dequant_speed.py [--mb 4] [--rounds 7] [--types Q4_0,Q6_K]

For each type the same few MB of blocks (random codes, finite fp16 scales),
shaped as a matrix of 4096-element rows like a real weight, go through
`ember.formats.quant_blocks.dequantize` and `gguf.quants.dequantize`,
alternating call by call for several rounds so that the noise of a shared
machine hits both alike. MB/s counts input bytes and comes from each side's
best round; "ratio" is ember/gguf speed from those best rounds, "paired
median" the median over rounds of the ratio within each back-to-back pair. F32 is a zero-copy view on both sides
(shown for completeness, the ratio means nothing there).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ember.formats import quant_blocks

TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


ROW = 4096   # elements per row: a typical weight matrix row


def make_blocks(type_name: str, mb: float, seed: int = 0) -> np.ndarray:
    """About `mb` MB of blocks with sane scales, as a (rows, row bytes) uint8 matrix.

    2-D on purpose: gguf-py works through a matrix 16 rows at a time, which
    keeps its temporaries cache-sized; a 1-D blob would make it look slower.
    """
    rng = np.random.default_rng(seed)
    elems, size = quant_blocks.BLOCKS[type_name]
    row_bytes = ROW // elems * size
    rows = max(1, int(mb * 2**20) // row_bytes)
    n = rows * (ROW // elems)
    if elems == 1:
        x = rng.standard_normal(n).astype(np.float32)
        return quant_blocks.quantize(type_name, x).reshape(rows, row_bytes)
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in quant_blocks._TYPES[type_name].scale_offsets:
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, (n, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, row_bytes)


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_type(type_name: str, mb: float, rounds: int) -> dict[str, float]:
    """Speeds of both sides over `rounds` alternating pairs of calls.

    Best-of-rounds (timeit's advice: noise only ever adds time) gives MB/s
    and the main ratio; the median of per-pair ratios is shown beside it,
    since the two calls of a pair run back to back under the same load.
    """
    raw = make_blocks(type_name, mb)
    shape = (len(raw), ROW)
    qtype = GGMLQuantizationType[type_name]
    ours = lambda: quant_blocks.dequantize(type_name, raw, shape)   # noqa: E731
    theirs = lambda: gguf_dequantize(raw, qtype)              # noqa: E731
    a = ours()
    b = np.asarray(theirs(), dtype=np.float32).reshape(-1)
    assert np.array_equal(a.reshape(-1).view(np.uint32), b.view(np.uint32)), f"{type_name}: results differ"
    t_ours, t_theirs = [], []
    for r in range(rounds):
        first, second = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        t1, t2 = time_once(first), time_once(second)
        t_ours.append(t1 if first is ours else t2)
        t_theirs.append(t2 if first is ours else t1)
    mbytes = raw.size / 1e6
    return {
        "ember": mbytes / min(t_ours), "gguf": mbytes / min(t_theirs),
        "ratio": min(t_theirs) / min(t_ours),
        "paired": statistics.median(g / e for e, g in zip(t_ours, t_theirs)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="MB of quantized input per type")
    ap.add_argument("--rounds", type=int, default=11, help="alternating timing rounds per type")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated type names")
    args = ap.parse_args()
    print(f"{'type':<8}{'ember MB/s':>12}{'gguf MB/s':>12}{'ratio':>8}{'paired median':>15}")
    worst = None
    for t in args.types.split(","):
        r = bench_type(t, args.mb, args.rounds)
        note = "  (both zero-copy views)" if t == "F32" else ""
        print(f"{t:<8}{r['ember']:12.0f}{r['gguf']:12.0f}{r['ratio']:7.2f}x{r['paired']:14.2f}x{note}",
              flush=True)
        if t != "F32":
            worst = r["ratio"] if worst is None else min(worst, r["ratio"])
    if worst is not None:
        print(f"lowest best-of-rounds ratio (F32 excluded): {worst:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
