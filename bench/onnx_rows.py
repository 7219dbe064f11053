"""Benchmark rows for the onnx backend beside llama.cpp (and ember's cpu backend when present).

    python3 bench/onnx_rows.py [--synthetic tinyllama-1.1b --quant Q4_0 | --model PATH]
                               [--prompt 128] [--gen 32] [--threads 2] [--rounds 2]

Design note. Each measurement runs in a fresh subprocess so that peak RSS
(ru_maxrss) belongs to that contender alone; contenders alternate round by
round because the machine is shared and noisy, and the table quotes medians
and ratios against llama.cpp from the same run. llama.cpp runs from the
llama-cpp-python venv (/work/llamaenv, never an ember dependency) on the very
same GGUF; ember's backends run through ember.plugins.registry.

Threads: --threads for every contender; idle workers sleep rather than spin
(OMP_WAIT_POLICY=PASSIVE for llama.cpp, the onnx backend's default), because
spinning on a shared CPU slows everyone, the spinner included.

Timings: prefill = one batch of --prompt tokens from an empty cache; decode =
--gen single-token steps after it (tok/s over those steps). The ONNX graph is
built into the model cache before the first round, so load time is the cached
load; the one-time build is reported on its own line.

The synthetic model has TinyLlama-1.1B's shape (random weights, Llama-2's
32000-token vocabulary from the conformance data so llama.cpp accepts it).
Q4_0/Q8_0 blocks are written directly (random codes, one scale per block);
other types quantize random floats with ember's quantizer.
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
LLAMA_PY = "/work/llamaenv/bin/python"
SHAPES = {  # name -> llama hyper-parameters
    "tinyllama-1.1b": dict(n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632,
                           n_vocab=32000, n_ctx=2048),
}
VOCAB_SOURCE = ROOT / ".." / "shared" / "conformance" / "models" / "v32k-llama-Q8_0.gguf"


# ---------------------------------------------------------------------------
# The synthetic model
# ---------------------------------------------------------------------------

def _random_blocks(rng, qtype: str, shape: tuple[int, int]):
    """Bytes of a random (rows, cols) matrix of `qtype`."""
    import numpy as np
    from ember.formats import quant_blocks
    rows, cols = shape
    if qtype in ("Q4_0", "Q8_0"):
        n, size = rows * cols // 32, quant_blocks.block_size(qtype)[1]
        b = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
        scale = 0.02 / (4 if qtype == "Q4_0" else 64)           # ~N(0, 0.02)-sized weights
        b[:, :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
        return b.reshape(-1)
    return quant_blocks.quantize(qtype, rng.standard_normal(shape, dtype=np.float32) * 0.02)


def synthesize(path: Path, shape_name: str, qtype: str) -> None:
    """Write the synthetic GGUF (skipped when `path` exists)."""
    import numpy as np
    from ember.formats import gguf
    if path.exists():
        return
    s, rng = SHAPES[shape_name], np.random.default_rng(0)
    vocab = gguf.open(VOCAB_SOURCE)
    md = {k: v for k, v in vocab.metadata.items() if k.startswith("tokenizer.")}
    types = {k: vocab.metadata_types[k] for k in md}
    d, hd = s["n_embd"], s["n_embd"] // s["n_head"]
    md.update({"general.architecture": "llama", "general.name": f"synthetic {shape_name}",
               "llama.embedding_length": d, "llama.block_count": s["n_layer"],
               "llama.attention.head_count": s["n_head"],
               "llama.attention.head_count_kv": s["n_head_kv"],
               "llama.feed_forward_length": s["n_ff"], "llama.context_length": s["n_ctx"],
               "llama.rope.dimension_count": hd, "llama.attention.layer_norm_rms_epsilon": np.float32(1e-5)})  # llama.cpp wants f32

    def mat(rows, cols):
        return gguf.TensorData(qtype, (rows, cols), lambda: _random_blocks(rng, qtype, (rows, cols)))
    ones = lambda: np.ones(d, np.float32)  # noqa: E731
    t = {"token_embd.weight": mat(s["n_vocab"], d), "output_norm.weight": ones(),
         "output.weight": mat(s["n_vocab"], d)}
    kv = s["n_head_kv"] * hd
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": ones(), p + "attn_q.weight": mat(d, d),
                  p + "attn_k.weight": mat(kv, d), p + "attn_v.weight": mat(kv, d),
                  p + "attn_output.weight": mat(d, d), p + "ffn_norm.weight": ones(),
                  p + "ffn_gate.weight": mat(s["n_ff"], d), p + "ffn_up.weight": mat(s["n_ff"], d),
                  p + "ffn_down.weight": mat(d, s["n_ff"])})
    path.parent.mkdir(parents=True, exist_ok=True)
    gguf.write(path, md, t, types=types)


# ---------------------------------------------------------------------------
# Workers (one per subprocess)
# ---------------------------------------------------------------------------

def _tokens(n: int, n_vocab: int) -> list[int]:
    import random
    rnd = random.Random(0)
    return [1] + [rnd.randrange(3, n_vocab) for _ in range(n - 1)]


def _peak_rss() -> int:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024


def work_ember(backend: str, model: str, n_prompt: int, n_gen: int, threads: int, opts: dict):
    import numpy as np
    from ember.daemon import engine
    t0 = time.perf_counter()
    m = engine.load(model, backend=backend, n_ctx=n_prompt + n_gen + 8, threads=threads, options=opts)
    r = m.runner
    t1 = time.perf_counter()
    ids = _tokens(n_prompt, m.config.n_vocab)
    tok = int(np.argmax(r.prefill(ids)))
    t2 = time.perf_counter()
    for _ in range(n_gen):
        tok = int(np.argmax(r.decode(tok)))
    t3 = time.perf_counter()
    return dict(load_s=t1 - t0, prefill_tok_s=n_prompt / (t2 - t1), decode_tok_s=n_gen / (t3 - t2),
                peak_rss=_peak_rss(), info=getattr(r, "info", {}))


def work_llama(model: str, n_prompt: int, n_gen: int, threads: int):
    import llama_cpp
    import numpy as np
    # This machine lists AMX, but ggml's AMX repacking dies with SIGILL here (the VM
    # does not grant the tile state): load without extra buffer types.
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama_cpp.llama_model_default_params = params
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    t1 = time.perf_counter()
    n_vocab = llm.n_vocab()

    def last_logits():  # the context's own logits of the last evaluated token
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
    llm.eval(_tokens(n_prompt, n_vocab))
    tok = int(np.argmax(last_logits()))
    t2 = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    t3 = time.perf_counter()
    return dict(load_s=t1 - t0, prefill_tok_s=n_prompt / (t2 - t1), decode_tok_s=n_gen / (t3 - t2),
                peak_rss=_peak_rss(), info={"llama_cpp": llama_cpp.__version__})


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------

def contenders(args) -> list[tuple[str, list[str]]]:
    """(label, argv of a worker subprocess) for every contender that can run here."""
    me = [sys.executable, __file__, "--worker"]
    common = ["--model", str(args.model_path), "--prompt", str(args.prompt), "--gen", str(args.gen),
              "--threads", str(args.threads)]
    out = [("onnx", me + ["onnx", "--options", "{}"] + common),
           ("onnx acc0", me + ["onnx", "--options", '{"accuracy_level": 0}'] + common)]
    from ember.plugins import registry
    if "cpu" in registry.available():
        out.append(("cpu", me + ["cpu", "--options", "{}"] + common))
    if os.path.exists(LLAMA_PY):
        out.append(("llama.cpp", [LLAMA_PY, __file__, "--worker", "llama.cpp"] + common))
    return out


def run_worker(argv: list[str]) -> dict:
    # llama.cpp's OpenMP workers spin by default; on this shared, oversubscribed box
    # that made it ~30x slower (0.25 vs 9 tok/s decode). Passive waiting is its best
    # setting here, as sleeping workers are the onnx backend's default.
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench"), OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def prepare_onnx(args) -> None:
    """Build the ONNX graphs into the cache once, timed, so rounds measure cached loads."""
    from ember.formats import gguf
    from ember.formats.model_config import config_from_gguf
    from ember.plugins import onnx
    f = gguf.open(args.model_path)
    cfg = config_from_gguf(f)
    for acc in (4, 0):
        t0 = time.perf_counter()
        path, built = onnx.graph_path(f, cfg, {"accuracy_level": acc})
        size = sum(p.stat().st_size for p in path.parent.iterdir())
        print(f"onnx graph (accuracy_level {acc}): {'built' if built else 'cached'} in "
              f"{time.perf_counter() - t0:.1f} s, {size / 2**20:.0f} MiB at {path.parent}")


def table(results: dict[str, list[dict]], args) -> str:
    def med(label, key):
        vals = [r[key] for r in results[label] if key in r]
        return statistics.median(vals) if vals else float("nan")
    base = "llama.cpp" if "llama.cpp" in results else None
    lines = [f"model: {args.model_path.name}  prompt {args.prompt}  gen {args.gen}  "
             f"threads {args.threads}  rounds {args.rounds} (medians)", "",
             "| backend | prefill tok/s | decode tok/s | peak RSS MiB | load s | vs llama.cpp (prefill / decode / RSS) |",
             "|---|---|---|---|---|---|"]
    for label, runs in results.items():
        errs = [r["error"] for r in runs if "error" in r]
        if errs and len(errs) == len(runs):
            lines.append(f"| {label} | error: {errs[0]} | | | | |")
            continue
        pf, dc, rss, ld = (med(label, k) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss", "load_s"))
        ratio = ""
        if base and label != base:
            ratio = (f"{pf / med(base, 'prefill_tok_s'):.2f}x / {dc / med(base, 'decode_tok_s'):.2f}x"
                     f" / {rss / med(base, 'peak_rss'):.2f}x")
        lines.append(f"| {label} | {pf:.1f} | {dc:.2f} | {rss / 2**20:.0f} | {ld:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--model", default=None, help="a GGUF file instead of the synthetic model")
    ap.add_argument("--out-dir", default="/tmp/ember-bench", help="where the synthetic model goes")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model = args.model
        res = (work_llama(model, args.prompt, args.gen, args.threads) if args.worker == "llama.cpp"
               else work_ember(args.worker, model, args.prompt, args.gen, args.threads,
                               json.loads(args.options)))
        print(json.dumps(res))
        return 0
    args.model_path = Path(args.model or Path(args.out_dir) / f"{args.synthetic}-{args.quant}.gguf")
    if not args.model:
        t0 = time.perf_counter()
        synthesize(args.model_path, args.synthetic, args.quant)
        print(f"synthetic model {args.model_path} ready ({time.perf_counter() - t0:.1f} s)")
    prepare_onnx(args)
    results: dict[str, list[dict]] = {}
    runs = contenders(args)
    for rnd in range(args.rounds):
        order = runs if rnd % 2 == 0 else runs[::-1]     # alternate: noise hits both sides
        for label, argv in order:
            res = run_worker(argv)
            results.setdefault(label, []).append(res)
            print(f"round {rnd + 1} {label}: {json.dumps(res)}", flush=True)
    print()
    print(table({label: results[label] for label, _ in runs}, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
