"""ember's cuda backend vs llama.cpp's CUDA build on the same GPU, same synthetic models.

Usage (on the GPU machine; see bench/results/cuda-*.md for a recorded run):

    python bench/compare_cuda.py --llama-bench /path/to/llama-bench \
        [--shape tinyllama-1.1b] [--quants Q4_0,Q8_0,Q4_K_M] [--reps 2] [--out table.md]

For each quant mix it writes the synthetic model once (ember.daemon.synthetic,
the writers run in parallel), then alternates, per repetition, ember's cuda
runner and `llama-bench -p 512 -n 128 -ngl 99 -r 3` (all layers on the GPU),
and reports the best of each with the ratios. ember is measured the way
llama-bench measures: after a warm-up pass, pp512 is one 512-token prefill
into an empty cache, tg128 is 128 greedy decode() calls from an empty cache
(each returning its logits to the host, plus the argmax). The decode row also
gives the memory bandwidth reached: weight bytes read per token (every
matrix but the embedding table, of which one row is read) times tokens per
second, against a device-to-device copy measured in the same run (bytes
read + written).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ember.daemon import synthetic


def write_models(shape: str, quants: list[str]) -> dict[str, Path]:
    paths = {q: synthetic.cached_model(shape, q) for q in quants}
    todo = {q: p for q, p in paths.items() if not p.exists()}
    procs = []
    for q, p in todo.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "ember.daemon.synthetic", shape, q, str(p)]))
    for pr in procs:
        if pr.wait() != 0:
            raise SystemExit("writing a synthetic model failed")
    return paths


def ember_run(path: Path, n_prompt: int = 512, n_gen: int = 128) -> dict:
    import numpy as np
    from ember.formats import gguf
    from ember.plugins import cuda
    from ember.plugins.arch import config_from_gguf
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        r = cuda.CudaRunner(f, c, n_prompt + n_gen)
        prompt = np.random.default_rng(0).integers(3, c.n_vocab, n_prompt).tolist()

        def prefill() -> float:
            r.reset()
            t = time.perf_counter()
            r.prefill(prompt)
            return n_prompt / (time.perf_counter() - t)

        def decode() -> float:
            r.reset()
            tok, t = 1, time.perf_counter()
            for _ in range(n_gen):
                tok = int(np.argmax(r.decode(tok)))
            return n_gen / (time.perf_counter() - t)
        prefill(), decode()                               # warm-up (and the graph capture)
        out = {"prefill_tok_s": prefill(), "decode_tok_s": decode()}
        r.close()
    return out


def llama_run(binary: str, path: Path) -> dict:
    out = subprocess.run([binary, "-m", str(path), "-p", "512", "-n", "128", "-ngl", "99", "-r", "3",
                          "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    get = lambda key: next(r["avg_ts"] for r in rows if r[key] > 0)  # noqa: E731
    return {"prefill_tok_s": get("n_prompt"), "decode_tok_s": get("n_gen")}


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second."""
    import cupy as cp
    a = cp.ones(1 << 29, cp.float32)
    b = cp.empty_like(a)
    cp.copyto(b, a)
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(10):
        cp.copyto(b, a)
    cp.cuda.Device().synchronize()
    return 10 * 2 * a.nbytes / (time.perf_counter() - t)


def decode_bytes(path: Path) -> int:
    """Device bytes one decoded token reads: every weight but the embedding table."""
    from ember.formats import gguf
    from ember.plugins import cuda
    from ember.plugins.arch import config_from_gguf
    with gguf.open(path) as f:
        c = config_from_gguf(f)
    skip = "" if c.tied_embeddings else "token_embd.weight"
    return sum(cuda.device_bytes(t) for n, t in c.tensors.items() if n != skip)


def device_name() -> str:
    import cupy as cp
    n = cp.cuda.runtime.getDeviceProperties(0)["name"]
    return n.decode() if isinstance(n, bytes) else str(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", help="llama-bench built with -DGGML_CUDA=ON (omit: ember only)")
    ap.add_argument("--shape", default="tinyllama-1.1b")
    ap.add_argument("--quants", default="Q4_0,Q8_0,Q4_K_M")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", help="write the markdown table here too")
    a = ap.parse_args()
    quants = a.quants.split(",")
    paths = write_models(a.shape, quants)
    bw = copy_bandwidth()
    lines = [f"GPU: {device_name()}; device-to-device copy {bw / 1e12:.2f} TB/s (read + write)", "",
             "| weights | ember decode tok/s | llama.cpp decode tok/s | ratio | ember GB/s (of copy) "
             "| ember prefill tok/s | llama.cpp prefill tok/s | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for q in quants:
        em, ll = [], []
        for _ in range(a.reps):   # alternate, so drift hits both alike
            em.append(ember_run(paths[q]))
            if a.llama_bench:
                ll.append(llama_run(a.llama_bench, paths[q]))
            print(q, em[-1], ll[-1] if ll else "", file=sys.stderr, flush=True)
        ed, ep = max(r["decode_tok_s"] for r in em), max(r["prefill_tok_s"] for r in em)
        ld = max((r["decode_tok_s"] for r in ll), default=float("nan"))
        lp = max((r["prefill_tok_s"] for r in ll), default=float("nan"))
        gbs = decode_bytes(paths[q]) * ed
        lines.append(f"| {q} | {ed:,.0f} | {ld:,.0f} | {ed / ld:.2f}x | {gbs / 1e9:,.0f} ({gbs / bw:.0%}) "
                     f"| {ep:,.0f} | {lp:,.0f} | {ep / lp:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
