"""The repacked weight layout against the file's, side by side, on one model.

    python bench/repack_ab.py --synthetic tinyllama-1.1b --quant Q4_0 --rounds 5
    python bench/repack_ab.py ... --instructions      # callgrind instruction counts
    python bench/repack_ab.py --kernels                # the kernels alone, 1 thread
    python bench/repack_ab.py --kernels --instructions # their instructions (callgrind, AVX2)

Wall clock: each round loads the model twice (cpu backend, repack 'on' then
'off', order alternating by round) and times a prefill and a decode of each;
medians of the per-round numbers and of their ratio are printed with the load
average. A ratio measured inside one round is what to trust on a shared
machine: both sides see about the same load.

--kernels times the kernels alone on random weights, one thread, by the
thread's CPU time (time.thread_time: the time it was scheduled, so other
processes on the cores stretch it far less than the wall clock; memory
bandwidth they take still counts), best of N, file layout vs repacked, at
the ISA in use: matvec over a 72-136 MiB matrix (streams from DRAM), over a
256-row one (cache-resident: the kernel's own speed), and a 64-row matmul.

--instructions runs each side under callgrind (valgrind on PATH), counting
only inside ember_forward, one thread: instructions per decoded token and per
prompt token, independent of the load. Valgrind has no AVX-512, so these are
the AVX2 kernels (the CPU valgrind emulates has none beyond AVX2).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def measure(model: str, mode: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    """Load, prefill n_prompt tokens, decode n_gen: seconds of each and what was repacked."""
    import numpy as np

    from ember.formats import gguf
    from ember.formats.model_config import config_from_gguf
    from ember.plugins.cpu import CpuRunner

    f = gguf.open(model)
    c = config_from_gguf(f)
    t0 = time.perf_counter()
    r = CpuRunner(f, c, n_prompt + n_gen + 1, threads=threads, options={"repack": mode})
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, c.n_vocab, n_prompt).tolist()
    t0 = time.perf_counter()
    tok = int(np.argmax(r.prefill(prompt)))
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_gen):
        tok = int(np.argmax(r.decode(tok)))
    decode = time.perf_counter() - t0
    out = {"mode": mode, "isa": r.isa, "load_s": load, "prefill_tok_s": n_prompt / prefill,
           "decode_tok_s": n_gen / decode if n_gen else 0.0, "repacked": list(r.dec.repacked)}
    r.close()
    return out


def instructions(model: str, mode: str, n_prompt: int, n_gen: int) -> int:
    """Instructions executed inside ember_forward (callgrind), one thread."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
               "--toggle-collect=ember_forward", sys.executable, __file__, "--child", model, mode,
               str(n_prompt), str(n_gen)]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "EMBER_ISA": "avx2"})
        with open(out) as fh:
            m = re.search(r"^summary:\s+(\d+)", fh.read(), re.M)
        return int(m.group(1))


def kernels(trials: int) -> None:
    """File layout vs repacked, per type: GB/s of matvec (DRAM, cache) and matmul ms."""
    import numpy as np

    from ember.formats import quant_blocks as fq
    from ember.formats.quant_blocks import GGML_TYPE_IDS
    from ember.kernels import _native, repack
    from ember.kernels import quant_ops as kq

    rng = np.random.default_rng(0)
    print(f"ISA {_native.isa_variant()}; 1 thread; thread CPU time, best of {trials}")

    def best(fn, n):
        t = []
        for _ in range(n):
            t0 = time.thread_time()
            fn()
            t.append(time.thread_time() - t0)
        return min(t)

    for t in ("Q4_0", "Q8_0", "Q4_K"):
        tid, (be, bb) = GGML_TYPE_IDS[t], fq.BLOCKS[t]
        rtype = _native.repacked_type(tid)
        if rtype < 0:
            print(f"{t}: this ISA keeps the file layout")
            continue
        n = 2048
        for what, rows, nb in (("matvec DRAM", 65536, 1), ("matvec cache", 256, 1), ("matmul 64", 2048, 64)):
            W = rng.integers(0, 256, (rows, n // be, bb), dtype=np.uint8)
            for off in ((0, 2) if t == "Q4_K" else (0,)):
                W[:, :, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)   # finite scales
            W = W.reshape(rows, -1)
            P = repack.repack(tid, W, n, rtype)
            Xq = kq.quantize_act(t, rng.standard_normal((nb, n)).astype(np.float32))
            Y = np.empty((nb, rows), np.float32)
            reps = trials if rows > 256 else 20 * trials
            got = {name: best(lambda: _native.matmul(ty, M, Xq, Y, n, 0, rows) if nb > 1 else
                              _native.matvec(ty, M, Xq[0], Y[0], n, 0, rows), reps)
                   for name, ty, M in (("file", tid, W), ("repacked", rtype, P))}
            if nb > 1:
                print(f"{t} {what:12s} file {got['file'] * 1e3:7.2f} ms  repacked {got['repacked'] * 1e3:7.2f} ms"
                      f"  ({got['file'] / got['repacked']:.2f}x)")
            else:
                gbs = {k: W.nbytes / v / 1e9 for k, v in got.items()}
                print(f"{t} {what:12s} file {gbs['file']:6.1f} GB/s  repacked {gbs['repacked']:6.1f} GB/s"
                      f"  ({gbs['repacked'] / gbs['file']:.2f}x)  {W.nbytes / 2**20:.1f} MiB")


def kernel_child(t: str, layout: str, reps: int = 4) -> None:
    """Under callgrind: `reps` matvecs of a 1024 x 2048 matrix of t in one layout."""
    import numpy as np

    from ember.formats import quant_blocks as fq
    from ember.formats.quant_blocks import GGML_TYPE_IDS
    from ember.kernels import _native, repack
    from ember.kernels import quant_ops as kq

    tid, (be, bb) = GGML_TYPE_IDS[t], fq.BLOCKS[t]
    rng = np.random.default_rng(0)
    W = rng.integers(0, 256, (1024, 2048 // be, bb), dtype=np.uint8)
    W[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    W = W.reshape(1024, -1)
    ty, M = tid, W
    if layout == "repacked":
        ty = _native.repack_type_of(tid)
        M = repack.repack(tid, W, 2048, ty)
    xq = kq.quantize_act(t, rng.standard_normal(2048).astype(np.float32))
    y = np.empty(1024, np.float32)
    for _ in range(reps):
        _native.matvec(ty, M, xq, y, 2048, 0, 1024)


def kernel_instructions() -> None:
    """Instructions per weight byte of matvec, file layout vs repacked (callgrind, AVX2)."""
    for t in ("Q4_0", "Q8_0"):
        got = {}
        for layout in ("file", "repacked"):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "cg.out")
                subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                "--collect-atstart=no", "--toggle-collect=ember_matvec", sys.executable,
                                __file__, "--kchild", t, layout], check=True, capture_output=True)
                with open(out) as fh:
                    got[layout] = int(re.search(r"^summary:\s+(\d+)", fh.read(), re.M).group(1))
        nbytes = 4 * 1024 * 2048 // 32 * (18 if t == "Q4_0" else 34)
        print(f"{t} matvec (AVX2, 4 x 1024x2048): instructions file {got['file']:,} repacked "
              f"{got['repacked']:,} ({got['file'] / got['repacked']:.2f}x fewer); per weight byte "
              f"{got['file'] / nbytes:.3f} vs {got['repacked'] / nbytes:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--synthetic", default=None, help="a synthetic shape, e.g. tinyllama-1.1b")
    p.add_argument("--quant", default="Q4_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--instructions", action="store_true", help="callgrind counts instead of wall clock")
    p.add_argument("--kernels", action="store_true", help="the kernels alone, no model")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--kchild", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.kchild:
        kernel_child(*a.kchild)
        return 0
    if a.kernels and a.instructions:
        print(f"load average {os.getloadavg()[0]:.1f} (1 min) before")
        kernel_instructions()
        return 0
    if a.kernels:
        print(f"load average {os.getloadavg()[0]:.1f} (1 min) before")
        kernels(12)
        print(f"load average {os.getloadavg()[0]:.1f} (1 min) after")
        return 0
    if a.child:   # under valgrind: one measured run, nothing printed
        model, mode, n_prompt, n_gen = a.child
        measure(model, mode, 1, int(n_prompt), int(n_gen))
        return 0
    if a.synthetic:
        from ember.daemon.synthetic import ensure_cached
        a.model = str(ensure_cached(a.synthetic, a.quant))
    if not a.model:
        p.error("give a MODEL file or --synthetic SHAPE")
    print(f"{os.path.basename(a.model)}; load average {os.getloadavg()[0]:.1f} (1 min) before")
    if a.instructions:
        for what, n_prompt, n_gen in (("prefill", 16, 0), ("prefill+decode", 16, 4)):
            counts = {m: instructions(a.model, m, n_prompt, n_gen) for m in ("on", "off")}
            print(f"{what} ({n_prompt} prompt, {n_gen} decoded): instructions repack on {counts['on']:,} "
                  f"off {counts['off']:,} ({counts['off'] / counts['on']:.2f}x fewer)")
            if n_gen:
                base = {m: instructions(a.model, m, n_prompt, 0) for m in ("on", "off")}
                per = {m: (counts[m] - base[m]) / n_gen for m in counts}
                print(f"per decoded token: on {per['on']:,.0f} off {per['off']:,.0f} "
                      f"({per['off'] / per['on']:.2f}x fewer)")
        return 0
    rows = []
    for i in range(a.rounds):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        got = {m: measure(a.model, m, a.threads, a.prompt_tokens, a.gen_tokens) for m in order}
        rows.append(got)
        print(json.dumps({"round": i + 1, "load": os.getloadavg()[0], **got}))
    med = lambda k, m: statistics.median(r[m][k] for r in rows)   # noqa: E731
    ratio = lambda k: statistics.median(r["on"][k] / r["off"][k] for r in rows)   # noqa: E731
    print(f"threads={a.threads} prompt={a.prompt_tokens} gen={a.gen_tokens} rounds={a.rounds} "
          f"isa={rows[0]['on']['isa']}; load average {os.getloadavg()[0]:.1f} after")
    for k in ("decode_tok_s", "prefill_tok_s", "load_s"):
        print(f"{k:14s} repack on {med(k, 'on'):8.2f}  off {med(k, 'off'):8.2f}  on/off {ratio(k):.2f}x (median of rounds)")
    print(f"repacked: {rows[0]['on']['repacked'][0]} matrices, {rows[0]['on']['repacked'][1] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
