"""Embedding throughput: ember (cpu, reference) vs llama.cpp on the same bert GGUF, same run.

Usage:
    python3 bench/embed_speed.py [--quant F32|Q8_0] [--texts 32] [--words 100] [--threads 2]
                                 [--rounds 3] [--llama-python PATH]

The model is a synthetic encoder of bge-small-en-v1.5's shape (bert, d 384,
12 layers, 12 heads, ffn 1536, 512 positions, CLS pooling) with random
weights and the real bert-bge WordPiece vocabulary (from
../shared/conformance/tokenizer/ggml-vocab-bert-bge.gguf), written once to
$EMBER_CACHE_DIR/bench (Q8_0 through `ember quantize`). Each engine embeds
the same --texts texts of --words random words (~1.3 tokens a word), one
text per call as a search index would; the table reports the median texts/s
and tokens/s of --rounds rounds, engines alternating, and each engine's
embeddings' cosine against llama.cpp's (the speed of a wrong answer is not
a result). llama.cpp runs in its own interpreter (a bench-only venv, never
an ember dependency) executing this file with --llama-worker; ember in a
fresh process too, so each process's peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / ".." / "shared" / "conformance" / "tokenizer" / "ggml-vocab-bert-bge.gguf"
SHAPE = {"embedding_length": 384, "block_count": 12, "attention.head_count": 12,
         "feed_forward_length": 1536, "context_length": 512}
# compare_llamacpp imports no ember, so both interpreters (ember's and llama.cpp's) read
# from it the interpreter list and its VmHWM peak-RSS reader
from compare_llamacpp import LLAMA_PYTHONS, peak_rss_mb  # noqa: E402


# ---------------------------------------------------------------------------
# The model and the texts
# ---------------------------------------------------------------------------

def write_model(path: Path, quant: str) -> Path:
    """The bge-small-shaped bert (F32), then `ember quantize` for another quant."""
    import numpy as np
    from ember.formats import gguf
    f32 = path.with_name("bge-small-shape-F32.gguf")
    if not f32.exists():
        voc = gguf.open(VOCAB)
        md = {k: v for k, v in voc.metadata.items() if k.startswith(("tokenizer.", "general."))}
        types = {k: t for k, t in voc.metadata_types.items() if k in md}
        u32, f32t = voc.metadata_types["tokenizer.ggml.unknown_token_id"], (6, None)
        for k, v in SHAPE.items():
            md["bert." + k], types["bert." + k] = v, u32
        md.update({"general.architecture": "bert", "bert.pooling_type": 2,
                   "bert.attention.layer_norm_epsilon": 1e-12, "bert.attention.causal": False})
        types.update({"bert.pooling_type": u32, "bert.attention.layer_norm_epsilon": f32t})
        n_vocab = len(voc.metadata["tokenizer.ggml.tokens"])
        md["tokenizer.ggml.token_type_count"], types["tokenizer.ggml.token_type_count"] = 2, u32
        d, ff, rng = SHAPE["embedding_length"], SHAPE["feed_forward_length"], np.random.default_rng(0)
        w = lambda *s, sd=0.05: rng.normal(0, sd, s).astype(np.float32)  # noqa: E731
        t = {"token_embd.weight": w(n_vocab, d), "token_types.weight": w(2, d),
             "position_embd.weight": w(SHAPE["context_length"], d),
             "token_embd_norm.weight": 1 + w(d), "token_embd_norm.bias": w(d)}
        for i in range(SHAPE["block_count"]):
            p = f"blk.{i}."
            for name, rows, cols in (("attn_q", d, d), ("attn_k", d, d), ("attn_v", d, d),
                                     ("attn_output", d, d), ("ffn_up", ff, d), ("ffn_down", d, ff)):
                t[p + name + ".weight"], t[p + name + ".bias"] = w(rows, cols), w(rows)
            for name in ("attn_output_norm", "layer_output_norm"):
                t[p + name + ".weight"], t[p + name + ".bias"] = 1 + w(d), w(d)
        gguf.write(f32, md, t, types=types)
        voc.close()
    if quant == "F32" or path.exists():
        return f32 if quant == "F32" else path
    subprocess.run([sys.executable, "-m", "ember.daemon.cli", "quantize", "--quiet", str(f32),
                    str(path), quant], check=True)
    return path


def texts(n: int, words: int) -> list[str]:
    import random
    rng = random.Random(1)
    pool = ("the a river dog house girl walked quickly under bright morning light near old "
            "stone bridge where children played with small boats and laughed loudly").split()
    return [" ".join(rng.choice(pool) for _ in range(words)) for _ in range(n)]


# ---------------------------------------------------------------------------
# Workers (one fresh process per measurement)
# ---------------------------------------------------------------------------

def ember_worker(model: str, backend: str, threads: int, batch: list[str]) -> dict:
    from ember.daemon import engine
    with engine.load(model, backend=backend, threads=threads) as m:
        n_tokens = sum(len(m.tokenize(t)) for t in batch)
        m.embed(batch[0])                                   # warm-up: first-call costs
        t0 = time.perf_counter()
        vectors = [m.embed(t)[0].tolist() for t in batch]
        dt = time.perf_counter() - t0
    return {"s": dt, "tokens": n_tokens, "vectors": vectors, "peak_rss_mb": peak_rss_mb()}


def llama_worker(model: str, backend: str, threads: int, batch: list[str]) -> dict:
    from llama_cpp import Llama
    m = Llama(model_path=model, embedding=True, n_ctx=512, n_batch=512, n_threads=threads,
              verbose=False)
    n_tokens = sum(len(m.tokenize(t.encode())) for t in batch)
    m.embed(batch[0])
    t0 = time.perf_counter()
    vectors = [m.embed(t, normalize=True) for t in batch]
    dt = time.perf_counter() - t0
    return {"s": dt, "tokens": n_tokens, "vectors": vectors, "peak_rss_mb": peak_rss_mb()}


def run_worker(python: str, engine_name: str, model: str, backend: str, a, batch) -> dict:
    cmd = [python, __file__, "--worker", engine_name, "--model", model, "--backend", backend,
           "--threads", str(a.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, input=json.dumps(batch), capture_output=True, text=True, env=env,
                       timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{engine_name} worker failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def cosine_min(a, b) -> float:
    import numpy as np
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.sum(x * y, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quant", default="Q8_0", choices=["F32", "Q8_0"])
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--words", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["cpu"])
    p.add_argument("--llama-python", default=next((x for x in LLAMA_PYTHONS if os.path.exists(x)), None))
    p.add_argument("--worker", choices=["ember", "llama"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        work = ember_worker if a.worker == "ember" else llama_worker
        print(json.dumps(work(a.model, a.backend, a.threads, json.loads(sys.stdin.read()))))
        return 0
    if a.llama_python is None:
        raise SystemExit("no llama-cpp-python interpreter: give --llama-python or EMBER_LLAMA_PYTHON")
    from ember.daemon import synthetic
    out = synthetic.cache_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    model = str(write_model(out / f"bge-small-shape-{a.quant}.gguf", a.quant))
    batch = texts(a.texts, a.words)
    engines = [("llama.cpp", a.llama_python, "llama", "-")] + \
              [(f"ember {b}", sys.executable, "ember", b) for b in a.backends]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in engines}
    for _ in range(a.rounds):
        for name, python, kind, backend in engines:
            runs[name].append(run_worker(python, kind, model, backend, a, batch))
    ref = runs["llama.cpp"][0]["vectors"]
    base = statistics.median(r["tokens"] / r["s"] for r in runs["llama.cpp"])
    cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True,
                         text=True).stdout.strip()
    print(f"{Path(model).name}: {a.texts} texts x ~{runs['llama.cpp'][0]['tokens'] // a.texts} "
          f"tokens, {a.threads} threads, {a.rounds} rounds; CPU {cpu}; load {os.getloadavg()[0]:.2f}")
    print("| engine | texts/s | tokens/s | vs llama.cpp | peak RSS MB | min cosine vs llama.cpp |")
    print("|---|---|---|---|---|---|")
    for name, *_ in engines:
        rs = runs[name]
        tok_s = statistics.median(r["tokens"] / r["s"] for r in rs)
        text_s = statistics.median(a.texts / r["s"] for r in rs)
        print(f"| {name} | {text_s:.1f} | {tok_s:.0f} | {tok_s / base:.2f}x | "
              f"{statistics.median(r['peak_rss_mb'] for r in rs):.0f} | {cosine_min(rs[0]['vectors'], ref):.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
