"""ember (cpu backend) vs llama.cpp on the same GGUF files, in the same run.

Usage:
    python3 bench/compare_llamacpp.py --synthetic tinyllama-1.1b --quants Q4_0 Q8_0 Q4_K_M \
        --threads 2 --rounds 3 [--prompt-tokens 512 --gen-tokens 128] [--llama-python PATH]
    python3 bench/compare_llamacpp.py MODEL.gguf [MODEL.gguf ...]

Each measurement is a fresh process (so peak RSS is that engine's alone):
ember through `ember bench --json`, llama.cpp through llama-cpp-python run by
another interpreter (a bench-only venv, never an ember dependency) executing
this same file with --llama-worker. Both get the same random prompt of
--prompt-tokens ids, prefill it in one batch (llama.cpp: n_batch=512), then
decode --gen-tokens greedily. Engines alternate within each round, rounds
repeat, and the table reports the median of each number and the ratios
ember / llama.cpp — the machine is shared and noisy, so only side-by-side
numbers mean anything. The machine's read bandwidth (all threads, a 1 GiB
buffer) is measured in every round too, to show what fraction of it decode
reaches (weights bytes per token x tok/s) — for both engines.

A baseline you can trust: before measuring, the script asks the llama.cpp
build for its ggml system-info string and refuses to run (--allow-generic
overrides, and the table says so) when the build lacks a SIMD extension this
CPU has (a generic wheel compiled without -DGGML_NATIVE=ON). And when
llama.cpp's own decode reaches less than 60% of the read bound in this run,
its decode and prefill ratios are not printed: such a baseline is broken
(wrong build, throttled or busy machine), and a ratio against it flatters
ember. Every table starts with the CPU model, its SIMD flags and the load
average, because numbers from one CPU say nothing about another.

AMX: this VM advertises AMX and the kernel grants the tile permission, but
tile instructions fault (SIGILL) — llama.cpp's AMX path crashes on the first
matmul. The worker therefore denies arch_prctl(ARCH_REQ_XCOMP_PERM) with a
seccomp filter before loading llama.cpp; ggml then reports "AMX is not
ready" and uses its AVX-512 kernels (and its repacked Q4_0/Q4_K copies), as
on any CPU without AMX. --allow-amx turns this off for machines where AMX works.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# the llama.cpp interpreter: $EMBER_LLAMA_PYTHON (the oracle .ci/run builds), else these venvs
LLAMA_PYTHONS = [p for p in (os.environ.get("EMBER_LLAMA_PYTHON"),
                             os.path.expanduser("~/.cache/ember-ci/llama-cpp-python-0.3.36/bin/python"),
                             "/work/llvenv/bin/python") if p]
MIN_BASELINE = 0.60     # llama.cpp decode GB/s / read bound below this: no ratio
# /proc/cpuinfo flag -> the name ggml's system-info gives it (the extensions its CPU kernels use)
GGML_FEATURES = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx_vnni": "AVX_VNNI",
                 "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
                 "avx512_bf16": "AVX512_BF16", "amx_int8": "AMX_INT8",
                 "asimddp": "DOTPROD", "i8mm": "MATMUL_INT8", "sve": "SVE"}
KEYS = ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb")


# ---------------------------------------------------------------------------
# The llama.cpp side (runs under the llama-cpp-python interpreter)
# ---------------------------------------------------------------------------

def deny_amx() -> None:
    """seccomp filter: arch_prctl(ARCH_REQ_XCOMP_PERM, ...) fails with EPERM (x86-64 only)."""
    import ctypes
    import struct
    # BPF: load syscall nr; if arch_prctl (158): load args[0]; if 0x1023: return ERRNO(EPERM)
    prog = b"".join(struct.pack("<HBBI", *i) for i in [
        (0x20, 0, 0, 0), (0x15, 0, 3, 158), (0x20, 0, 0, 16), (0x15, 0, 1, 0x1023),
        (0x06, 0, 0, 0x00050001), (0x06, 0, 0, 0x7FFF0000)])
    buf = ctypes.create_string_buffer(prog)

    class FProg(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fp = FProg(len(prog) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fp), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter that disables AMX")


def peak_rss_mb() -> float:
    """VmHWM: this address space's peak (ru_maxrss would include the forking parent's)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def llama_system_info() -> str:
    import llama_cpp
    return llama_cpp.llama_print_system_info().decode()


def llama_worker(model: str, threads: int, n_prompt: int, n_gen: int, seed: int, amx: bool) -> dict:
    import numpy as np
    if not amx:
        deny_amx()
    from llama_cpp import Llama
    t0 = time.perf_counter()
    llm = Llama(model, n_ctx=n_prompt + n_gen, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    prompt = np.random.default_rng(seed).integers(3, n_vocab, size=n_prompt).tolist()

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(last_logits()))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tok_s": n_prompt / prefill_s, "decode_tok_s": n_gen / decode_s,
            "ttft_ms": prefill_s * 1000, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------
# The machine and the llama.cpp build
# ---------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        line = next((ln for ln in f if ln.startswith(("flags", "Features"))), ":")
    return set(line.split(":", 1)[1].split())


def cpu_line() -> str:
    """lscpu's model name and the SIMD flags that matter for these kernels."""
    r = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    field = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in r.stdout.splitlines())}
    name = field.get("Model name", "unknown CPU")
    if "CPU family" in field:   # a VM's model name can be as vague as "AMD EPYC": family/model say which
        name += f" (family {field['CPU family']}, model {field.get('Model', '?')})"
    simd = sorted(f for f in cpu_flags() if f in GGML_FEATURES or f.startswith(("avx512", "amx")))
    return f"CPU: {name}, {os.cpu_count()} cores; SIMD: {' '.join(simd)}"


def missing_in_llama(info: str) -> list[str]:
    """ggml features this CPU has but the llama.cpp build was compiled without."""
    have = {kv.split("=")[0].split()[-1] for kv in info.split("|") if kv.strip().endswith("= 1")}
    want = [GGML_FEATURES[f] for f in sorted(cpu_flags()) if f in GGML_FEATURES]
    return [w for w in want if w not in have]


# ---------------------------------------------------------------------------
# Running one measurement
# ---------------------------------------------------------------------------

def run_json(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_ember(model: str, a) -> dict:
    return run_json([sys.executable, "-m", "ember.daemon.cli", "bench", model, "--backend", "cpu",
                     "--threads", str(a.threads), "--prompt-tokens", str(a.prompt_tokens),
                     "--gen-tokens", str(a.gen_tokens), "--seed", str(a.seed), "--json"])


def run_llama(model: str, a) -> dict:
    return run_json([a.llama_python, os.path.abspath(__file__), "--llama-worker", model,
                     "--threads", str(a.threads), "--prompt-tokens", str(a.prompt_tokens),
                     "--gen-tokens", str(a.gen_tokens), "--seed", str(a.seed)]
                    + (["--allow-amx"] if a.allow_amx else []))


def read_bandwidth(threads: int) -> float:
    """Bytes/s the machine reads with `threads` threads (best of 5 passes over 1 GiB)."""
    import numpy as np
    from ember.kernels import _native
    buf = np.ones(1 << 30, np.uint8)
    bw = _native.read_bandwidth(threads, buf)
    del buf
    return bw


def weights_bytes(model: str) -> int:
    from ember.formats import gguf
    with gguf.open(model) as f:
        return sum(t.nbytes for t in f.tensors.values())


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def kv_mb(model: str, n_ctx: int) -> float:
    from ember.formats import gguf
    from ember.formats.model_config import config_from_gguf
    with gguf.open(model) as f:
        return config_from_gguf(f).kv_cache_bytes(n_ctx) / 2**20


def ratio(x: float, y: float, trusted: bool) -> str:
    return f"{x / y:.2f}x" if trusted else "no ratio"


def table(results: dict, a, bw: list[float], header: list[str]) -> str:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    bw_gb = med(bw) / 1e9
    notes = []
    lines = header + [
        f"threads={a.threads} prompt={a.prompt_tokens} gen={a.gen_tokens} rounds={a.rounds}; "
        f"read bandwidth {bw_gb:.1f} GB/s (median of rounds; {a.threads} threads, 1 GiB)",
        "| model | file MB | decode tok/s ember / llama.cpp (x) | prefill tok/s ember / llama.cpp (x) "
        "| peak RSS MB ember / llama.cpp (x) | RSS budget file+KV+100 "
        "| decode GB/s ember / llama.cpp (of read bw) |",
        "|---|---|---|---|---|---|---|"]
    for model, r in results.items():
        e = {k: med([x[k] for x in r["ember"]]) for k in KEYS}
        l_ = {k: med([x[k] for x in r["llama"]]) for k in KEYS}
        size = os.path.getsize(model) / 2**20
        budget = size + kv_mb(model, a.prompt_tokens + a.gen_tokens) + 100
        gbs, lgbs = (r["wbytes"] * x["decode_tok_s"] / 1e9 for x in (e, l_))
        trusted = lgbs >= MIN_BASELINE * bw_gb
        if not trusted:
            notes.append(f"no ratio for {os.path.basename(model)}: llama.cpp decodes at {lgbs:.1f} GB/s, "
                         f"{lgbs / bw_gb:.0%} of the {bw_gb:.1f} GB/s read bound (< {MIN_BASELINE:.0%}): "
                         "a broken baseline (non-native build, throttled or busy machine)")
        lines.append(
            f"| {os.path.basename(model)} | {size:.0f} "
            f"| {e['decode_tok_s']:.1f} / {l_['decode_tok_s']:.1f} "
            f"({ratio(e['decode_tok_s'], l_['decode_tok_s'], trusted)}) "
            f"| {e['prefill_tok_s']:.1f} / {l_['prefill_tok_s']:.1f} "
            f"({ratio(e['prefill_tok_s'], l_['prefill_tok_s'], trusted)}) "
            f"| {e['peak_rss_mb']:.0f} / {l_['peak_rss_mb']:.0f} ({e['peak_rss_mb'] / l_['peak_rss_mb']:.2f}x) "
            f"| {budget:.0f} {'ok' if e['peak_rss_mb'] <= budget else 'OVER'} "
            f"| {gbs:.1f} / {lgbs:.1f} ({gbs / bw_gb:.0%} / {lgbs / bw_gb:.0%}) |")
    return "\n".join(lines + notes)


def models_of(a) -> list[str]:
    if a.models:
        return a.models
    from ember.daemon import synthetic
    return [str(synthetic.ensure_cached(a.synthetic, q)) for q in a.quants]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*")
    p.add_argument("--synthetic", default="tinyllama-1.1b")
    p.add_argument("--quants", nargs="+", default=["Q4_0", "Q8_0", "Q4_K_M"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-python", default=next((x for x in LLAMA_PYTHONS if os.path.exists(x)), None))
    p.add_argument("--allow-amx", action="store_true", help="let llama.cpp use AMX (it faults in this VM)")
    p.add_argument("--allow-generic", action="store_true",
                   help="measure even a llama.cpp build that lacks SIMD extensions this CPU has")
    p.add_argument("--llama-worker", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--llama-info", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.llama_info:
        print(json.dumps(llama_system_info()))
        return 0
    if a.llama_worker:
        print(json.dumps(llama_worker(a.llama_worker, a.threads, a.prompt_tokens, a.gen_tokens, a.seed,
                                      a.allow_amx)))
        return 0
    if not a.llama_python:
        print("no llama-cpp-python interpreter found; pass --llama-python", file=sys.stderr)
        return 2
    header = [cpu_line(), f"load average {os.getloadavg()[0]:.1f} (1 min) before the run"]
    info = run_json([a.llama_python, os.path.abspath(__file__), "--llama-info"])
    missing = missing_in_llama(info)
    if missing:
        msg = (f"llama.cpp at {a.llama_python} was built without {' '.join(missing)}, which this CPU has: "
               "not a native build, so not a baseline (rebuild llama-cpp-python with "
               'CMAKE_ARGS="-DGGML_NATIVE=ON", or pass --allow-generic)')
        if not a.allow_generic:
            print(msg, file=sys.stderr)
            return 2
        header.append(f"WARNING: {msg}")
    header.append(f"llama.cpp {info.strip()}")
    models = models_of(a)
    results = {m: {"ember": [], "llama": [], "wbytes": weights_bytes(m)} for m in models}
    bw = []
    for rnd in range(a.rounds):
        bw.append(read_bandwidth(a.threads))
        for m in models:
            order = [("ember", run_ember), ("llama", run_llama)]
            for name, fn in (order if rnd % 2 == 0 else order[::-1]):   # alternate who goes first
                r = fn(m, a)
                results[m][name].append(r)
                print(f"round {rnd + 1} {os.path.basename(m)} {name}: " +
                      " ".join(f"{k}={r[k]:.1f}" for k in KEYS), file=sys.stderr, flush=True)
    print(table(results, a, bw, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
