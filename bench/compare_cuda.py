"""ember's cuda backend vs llama.cpp's CUDA build on the same GPU, same synthetic models.

Usage (on the GPU machine; see bench/results/cuda-*.md for a recorded run):

    python bench/compare_cuda.py --llama-bench /path/to/llama-bench \
        [--shape tinyllama-1.1b] [--quants Q4_0,Q8_0,Q4_K_M] [--reps 2] [--out table.md] \
        [--variants "base:flash=0,prefetch=0;new:flash=1,prefetch=1"] [--profile] [--trace]

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

--variants measures several sets of runner options side by side (e.g.
"graph:;persistent:persistent=1": the launch graph, the yardstick, first) (each row of
the table is one variant; the first is the yardstick for a logits check: the
KL of every other variant's prefill and decode logits from it). --profile
times each step of one decoded token (position ~600) and of a 512-token
prefill with CUDA events, summed per kernel, for the first quant; for the
persistent decode, its stages from the kernel's own clock (persistent_trace).
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


def ember_run(path: Path, options: dict | None = None, n_prompt: int = 512, n_gen: int = 128) -> dict:
    """pp512 and tg128 tok/s of one runner, plus its logits (last prompt position, and the
    first decoded token after the prompt) for the cross-variant check."""
    import numpy as np
    from ember.formats import gguf
    from ember.plugins import cuda
    from ember.formats.model_config import config_from_gguf
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        r = cuda.CudaRunner(f, c, n_prompt + n_gen, options or {})
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
        r.reset()
        out["logits"] = [r.prefill(prompt[:300]), r.decode(prompt[300])]
        out.update(flash=r.lay.flash, prefetch=r.lay.prefetch, fuse_rope=r.lay.fuse_rope, pdl=r.pdl is not None,
                   persistent=r.lay.persistent, p_grid=r.lay.p_grid, persistent_error=r.persistent_error,
                   graph=type(r.graph).__name__)
        r.close()
    return out


def ember_run_isolated(path: Path, options: dict) -> dict | None:
    """ember_run in a child process (a kernel fault poisons its CUDA context, not ours);
    None, with the child's error shown, when it fails."""
    import tempfile
    import numpy as np
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.npz"
        try:
            p = subprocess.run([sys.executable, __file__, "--one", str(path), json.dumps(options), str(out)],
                               capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            print(f"ember run {options} timed out", file=sys.stderr)
            return None
        if p.returncode != 0 or not out.exists():
            print(f"ember run {options} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
            return None
        z = np.load(out)
        res = json.loads(str(z["meta"]))
        res["logits"] = [z["prefill"], z["decode"]]
        return res


def _one(path: str, options: str, out: str) -> int:
    """Child side of ember_run_isolated."""
    import numpy as np
    r = ember_run(Path(path), json.loads(options))
    pre, dec = r.pop("logits")
    np.savez(out, prefill=pre, decode=dec, meta=json.dumps(r))
    return 0


def kl(p_logits, q_logits) -> float:
    """KL(softmax(p) || softmax(q)) in float64."""
    import numpy as np

    def ls(x):
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())
    lp, lq = ls(p_logits), ls(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum())


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """"name:key=val,key=val;name2:..." -> [(name, {key: int(val)})]"""
    out = []
    for part in filter(None, text.split(";")):
        name, _, opts = part.partition(":")
        out.append((name, {k: int(v) for k, v in (kv.split("=") for kv in filter(None, opts.split(",")))}))
    return out


def llama_run(binary: str, path: Path) -> dict | None:
    out = subprocess.run([binary, "-m", str(path), "-p", "512", "-n", "128", "-ngl", "99", "-r", "3",
                          "-o", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"llama-bench failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
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
    bw = 10 * 2 * a.nbytes / (time.perf_counter() - t)
    del a, b
    cp.get_default_memory_pool().free_all_blocks()
    return bw


def decode_bytes(path: Path) -> int:
    """Device bytes one decoded token reads: every weight but the embedding table."""
    from ember.formats import gguf
    from ember.plugins import cuda
    from ember.formats.model_config import config_from_gguf
    with gguf.open(path) as f:
        c = config_from_gguf(f)
    skip = "" if c.tied_embeddings else "token_embd.weight"
    return sum(cuda.device_bytes(t) for n, t in c.tensors.items() if n != skip)


def profile(path: Path, options: dict) -> str:
    """Per-kernel time of one decoded token at position ~600 and of a 512-token prefill (CUDA
    events around each step, summed per kernel and grid), plus the whole decode graph."""
    import collections
    import cupy as cp
    import numpy as np
    from ember.formats import gguf
    from ember.plugins import cuda
    from ember.formats.model_config import config_from_gguf
    lines = []
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        r = cuda.CudaRunner(f, c, 640, options)
        toks = np.random.default_rng(0).integers(3, c.n_vocab, 600).tolist()
        r.prefill(toks)
        r.decode(5)
        s = r.stream
        t = time.perf_counter()
        for _ in range(100):
            r.graph.launch(s)
            s.synchronize()
        lines.append(f"decode graph ({len(cuda.decode_steps(r.lay))} steps) launch + sync: "
                     f"{(time.perf_counter() - t) * 1e4:.1f} us per token at position ~600")

        def per_step(steps, label):
            evs = []
            with r.device, s:
                for st in steps:
                    a, b = cp.cuda.Event(), cp.cuda.Event()
                    a.record(s)
                    r._run([st])
                    b.record(s)
                    name = st.kernel if isinstance(st, cuda.Launch) else type(st).__name__
                    if isinstance(st, cuda.Launch) and st.kernel.startswith("matvec"):
                        name += f" grid {st.grid[0]} K {st.args[7 if 'swiglu' in st.kernel else 11]}"
                    if isinstance(st, cuda.Gemm):
                        name += f" {st.m}x{st.k}"
                    evs.append((name, a, b))
                s.synchronize()
            agg = collections.defaultdict(lambda: [0.0, 0])
            for name, a, b in evs:
                agg[name][0] += cp.cuda.get_elapsed_time(a, b)
                agg[name][1] += 1
            lines.append(f"== {label}: {sum(v[0] for v in agg.values()):.3f} ms summed over {len(steps)} steps "
                         f"(each timed alone, gaps excluded)")
            for k, (ms, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:16]:
                lines.append(f"  {k:44s} {ms:8.3f} ms  x{n:3d}  {1000 * ms / n:8.1f} us each")
        r.io_h[0], r.io_h[1] = 600, 7
        per_step(cuda.decode_steps(r.lay), "decode, one token")
        if r.lay.persistent:
            lines += persistent_trace(r)
        r.io_h[0] = 0
        r.io_h[1:513] = toks[:512]
        with r.device, s:
            r._run([cuda.Copy(cuda.Buf("io"), cuda.Buf("io_h"), 4 * 513, "h2d")])
        per_step(cuda.forward_steps(r.lay, 512), "prefill, 512 tokens")
        r.close()
    return "\n".join(lines)


def persistent_trace(r, reps: int = 20) -> list[str]:
    """Where the persistent kernel's time goes: block 0's clock at each stage start (so a
    stage's time includes the barrier wait after it), the median of reps tokens at position
    600, summed per kind of stage, with the weight bytes each reads."""
    import collections
    import numpy as np
    from ember.plugins import cuda
    stages = cuda.persistent_stages(r.lay)
    names = ["embed"] + ["q|k|v", "attention", "o", "gate|up", "down"] * r.lay.c.n_layer + ["output"]
    launch = cuda.persistent_launch(r.lay, trace=True)
    runs = []
    with r.device, r.stream:
        for _ in range(reps):
            r.io_h[0], r.io_h[1] = 600, 7
            r._run([cuda.Copy(cuda.Buf("io"), cuda.Buf("io_h"), 8, "h2d"), launch])
            r.stream.synchronize()
            runs.append(np.diff(r.bufs["trace"].view(np.int64).get()[:len(stages) + 1]))
    ns = np.median(np.stack(runs), axis=0)
    agg = collections.defaultdict(lambda: [0.0, 0, 0])
    for name, st, t in zip(names, stages, ns):
        agg[name][0] += t / 1e3
        agg[name][1] += 1
        agg[name][2] += sum(m.rows * cuda._row_bytes(m.kind, m.cols) + (m.rows * m.cols // 16 if m.d() else 0)
                            for m in st.mats) if st.op != cuda.P_EMBED else 0
    total = ns.sum() / 1e3
    out = [f"== persistent decode ({r.lay.p_grid} blocks, {len(stages)} stages): {total:.1f} us a token "
           f"(kernel only, median of {reps}; a stage includes the barrier after it)"]
    for name, (us, n, nbytes) in sorted(agg.items(), key=lambda kv: -kv[1][0]):
        gbs = f"{nbytes / us / 1e3:8.0f} GB/s" if nbytes else ""
        out.append(f"  {name:10s} {us:8.1f} us  x{n:3d}  {us / n:6.2f} us each {gbs}")
    return out


def trace_variants(path: Path, variants: list[tuple[str, dict]]) -> str:
    """persistent_trace of each persistent variant on one model (position ~600)."""
    import numpy as np
    from ember.formats import gguf
    from ember.plugins import cuda
    from ember.formats.model_config import config_from_gguf
    lines = []
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        toks = np.random.default_rng(0).integers(3, c.n_vocab, 600).tolist()
        for name, opts in variants:
            r = cuda.CudaRunner(f, c, 640, opts)
            r.prefill(toks)
            r.decode(5)
            if r.lay.persistent:
                lines += [f"-- {name} {opts}"] + persistent_trace(r)
            r.close()
    return "\n".join(lines)


def device_name() -> str:
    import cupy as cp
    n = cp.cuda.runtime.getDeviceProperties(0)["name"]
    return n.decode() if isinstance(n, bytes) else str(n)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        return _one(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", help="llama-bench built with -DGGML_CUDA=ON (omit: ember only)")
    ap.add_argument("--shape", default="tinyllama-1.1b")
    ap.add_argument("--quants", default="Q4_0,Q8_0,Q4_K_M")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", help="write the markdown table here too")
    ap.add_argument("--variants", default="default:",
                    help='runner options to compare, "name:key=val,...;name2:..." (first = yardstick)')
    ap.add_argument("--profile", action="store_true", help="per-kernel times of the first quant, last variant")
    ap.add_argument("--trace", action="store_true", help="the persistent kernel's stage trace of every variant, "
                                                         "first quant")
    a = ap.parse_args()
    quants, variants = a.quants.split(","), parse_variants(a.variants)
    paths = write_models(a.shape, quants)
    bw = copy_bandwidth()
    lines = [f"GPU: {device_name()}; device-to-device copy {bw / 1e12:.2f} TB/s (read + write)", "",
             "| weights | ember variant | ember decode tok/s | llama.cpp decode tok/s | ratio | ember GB/s (of copy) "
             "| ember prefill tok/s | llama.cpp prefill tok/s | ratio | KL vs first variant (prefill, decode) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for q in quants:
        em = {name: [] for name, _ in variants}
        ll = []
        for _ in range(a.reps):   # alternate, so drift hits all alike
            for name, opts in variants:
                res = ember_run_isolated(paths[q], opts)
                if res is not None:
                    em[name].append(res)
                    print(q, name, {k: v for k, v in res.items() if k != "logits"}, file=sys.stderr, flush=True)
            if a.llama_bench and (res := llama_run(a.llama_bench, paths[q])) is not None:
                ll.append(res)
                print(q, "llama.cpp", ll[-1], file=sys.stderr, flush=True)
        ld = max((r["decode_tok_s"] for r in ll), default=float("nan"))
        lp = max((r["prefill_tok_s"] for r in ll), default=float("nan"))
        first = next((em[n][0]["logits"] for n, _ in variants if em[n]), None)
        for name, opts in variants:
            runs = em[name]
            label = f"{name} ({', '.join(f'{k}={v}' for k, v in opts.items()) or 'defaults'})"
            if not runs:
                lines.append(f"| {q} | {label} | failed | {ld:,.0f} | | | failed | {lp:,.0f} | | |")
                continue
            ed, ep = max(r["decode_tok_s"] for r in runs), max(r["prefill_tok_s"] for r in runs)
            gbs = decode_bytes(paths[q]) * ed
            d = [kl(x, y) for x, y in zip(first, runs[0]["logits"])]
            lines.append(f"| {q} | {label} | {ed:,.0f} | {ld:,.0f} | {ed / ld:.2f}x | {gbs / 1e9:,.0f} ({gbs / bw:.0%}) "
                         f"| {ep:,.0f} | {lp:,.0f} | {ep / lp:.2f}x | {d[0]:.1e}, {d[1]:.1e} |")
        text = "\n".join(lines)
        print(text, flush=True)
        if a.out:
            Path(a.out).write_text(text + "\n")
    if a.profile:
        print(profile(paths[quants[0]], variants[-1][1]), flush=True)
    if a.trace:
        print(trace_variants(paths[quants[0]], variants), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
