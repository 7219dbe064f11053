"""ember's webgpu backend vs ember cuda vs llama.cpp CUDA on one GPU, same synthetic models.

Usage (on the GPU machine, with wgpu and a Vulkan driver; see bench/results/webgpu-h200.md):

    python bench/compare_webgpu.py [--llama-bench /path/to/llama-bench] [--shape tinyllama-1.1b] \
        [--quants Q4_0,Q8_0,Q4_K_M] [--reps 1] [--out table.md] [--variants "a:;b:submit_every=64"] \
        [--profile]

Each quant's synthetic model is written once (bench/compare_cuda.write_models); per
repetition, every webgpu variant, ember's cuda runner and `llama-bench -p 512 -n 128 -ngl
99 -r 3` run one after another, each measured the way compare_cuda.py measures: after a
warm-up, pp512 is one 512-token prefill into an empty cache, tg128 is 128 greedy decode()
calls (each returning its logits to the host). Best of the repetitions; the ratios are
webgpu / ember cuda and webgpu / llama.cpp. The KL column compares webgpu's logits (last
prompt position, first decoded token) with cuda's: a check that the fast path computes the
same model on this shape. --profile splits one webgpu decode token into host encoding
(every dispatch recorded into a command buffer, not submitted) and the rest (submit, GPU,
read-back), at position ~600.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_cuda  # noqa: E402 - the model writer, llama-bench runner, cuda runner and KL


def webgpu_run(path: Path, options: dict, n_prompt: int = 512, n_gen: int = 128) -> dict:
    """pp512 and tg128 tok/s of the webgpu runner, plus its logits for the cross-check."""
    import numpy as np
    from ember.formats import gguf
    from ember.plugins import webgpu
    from ember.formats.model_config import config_from_gguf
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        t = time.perf_counter()
        r = webgpu.WebGPURunner(f, c, n_prompt + n_gen, options)
        load_s = time.perf_counter() - t
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
        prefill(), decode()                               # warm-up: pipelines and bind groups
        out = {"prefill_tok_s": prefill(), "decode_tok_s": decode(), "load_s": load_s,
               "adapter": f"{r.adapter.api}: {r.adapter.name}", "dispatches": len(r._forward(1, False))}
        r.reset()
        out["logits"] = [r.prefill(prompt[:300]), r.decode(prompt[300])]
        r.close()
    return out


def webgpu_run_isolated(path: Path, options: dict) -> dict | None:
    """webgpu_run in a child process (a lost device takes the child, not the comparison)."""
    import numpy as np
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.npz"
        try:
            p = subprocess.run([sys.executable, __file__, "--one", str(path), json.dumps(options), str(out)],
                               capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            print(f"webgpu run {options} timed out", file=sys.stderr)
            return None
        if p.returncode != 0 or not out.exists():
            print(f"webgpu run {options} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            return None
        z = np.load(out)
        res = json.loads(str(z["meta"]))
        res["logits"] = [z["prefill"], z["decode"]]
        return res


def _one(path: str, options: str, out: str) -> int:
    import numpy as np
    r = webgpu_run(Path(path), json.loads(options))
    pre, dec = r.pop("logits")
    np.savez(out, prefill=pre, decode=dec, meta=json.dumps(r))
    return 0


def profile(path: Path, options: dict, reps: int = 50) -> str:
    """One decode token at position ~600: host encoding alone vs the whole step."""
    import numpy as np
    from ember.formats import gguf
    from ember.plugins import webgpu
    from ember.formats.model_config import config_from_gguf
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        r = webgpu.WebGPURunner(f, c, 640, options)
        r.prefill(np.random.default_rng(0).integers(3, c.n_vocab, 600).tolist())
        plan = r._forward(1, False)
        r.decode(5)
        t = time.perf_counter()
        for _ in range(reps):
            r.truncate(600)
            r.decode(5)
        whole = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            enc = r.device.create_command_encoder()
            cp = enc.begin_compute_pass()
            for pipe, group, grid in plan:
                cp.set_pipeline(pipe)
                cp.set_bind_group(0, group)
                cp.dispatch_workgroups(*grid)
            cp.end()
            enc.finish()
        encode = (time.perf_counter() - t) / reps
        r.close()
    return (f"webgpu decode at position ~600, {len(plan)} dispatches: {whole * 1e3:.2f} ms a token; host "
            f"encoding alone {encode * 1e3:.2f} ms ({encode / len(plan) * 1e6:.1f} us a dispatch); the rest "
            f"(submit, GPU, read-back) {(whole - encode) * 1e3:.2f} ms")


def _shown(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "logits"}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        return _one(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", help="llama-bench built with -DGGML_CUDA=ON (omit: ember only)")
    ap.add_argument("--shape", default="tinyllama-1.1b")
    ap.add_argument("--quants", default="Q4_0,Q8_0,Q4_K_M")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", help="write the markdown table here too")
    ap.add_argument("--variants", default="default:", help='webgpu options, "name:key=val,...;name2:..."')
    ap.add_argument("--no-cuda", action="store_true", help="skip ember's cuda runner")
    ap.add_argument("--profile", action="store_true", help="split a webgpu decode token, first quant")
    a = ap.parse_args()
    quants, variants = a.quants.split(","), compare_cuda.parse_variants(a.variants)
    paths = compare_cuda.write_models(a.shape, quants)
    lines = ["| weights | webgpu variant | webgpu decode tok/s | ember cuda | llama.cpp CUDA | vs cuda "
             "| vs llama.cpp | webgpu prefill tok/s | ember cuda | llama.cpp CUDA | vs cuda | vs llama.cpp "
             "| KL vs cuda (prefill, decode) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    adapter = ""
    for q in quants:
        wg = {name: [] for name, _ in variants}
        cu, ll = [], []
        for _ in range(a.reps):
            for name, opts in variants:
                if (res := webgpu_run_isolated(paths[q], opts)) is not None:
                    wg[name].append(res)
                    adapter = res["adapter"]
                    print(q, "webgpu", name, _shown(res), file=sys.stderr, flush=True)
            if not a.no_cuda and (res := compare_cuda.ember_run_isolated(paths[q], {})) is not None:
                cu.append(res)
                print(q, "cuda", _shown(res), file=sys.stderr, flush=True)
            if a.llama_bench and (res := compare_cuda.llama_run(a.llama_bench, paths[q])) is not None:
                ll.append(res)
                print(q, "llama.cpp", res, file=sys.stderr, flush=True)
        best = lambda runs, key: max((r[key] for r in runs), default=float("nan"))  # noqa: E731
        cd, cp_, ld, lp = (best(cu, "decode_tok_s"), best(cu, "prefill_tok_s"),
                           best(ll, "decode_tok_s"), best(ll, "prefill_tok_s"))
        for name, opts in variants:
            runs = wg[name]
            label = f"{name} ({', '.join(f'{k}={v}' for k, v in opts.items()) or 'defaults'})"
            if not runs:
                lines.append(f"| {q} | {label} | failed | {cd:,.0f} | {ld:,.0f} | | | failed | {cp_:,.0f} "
                             f"| {lp:,.0f} | | | |")
                continue
            wd, wp = best(runs, "decode_tok_s"), best(runs, "prefill_tok_s")
            d = ([compare_cuda.kl(x, y) for x, y in zip(cu[0]["logits"], runs[0]["logits"])] if cu
                 else [float("nan")] * 2)
            lines.append(f"| {q} | {label} | {wd:,.0f} | {cd:,.0f} | {ld:,.0f} | {wd / cd:.2f}x | {wd / ld:.2f}x "
                         f"| {wp:,.0f} | {cp_:,.0f} | {lp:,.0f} | {wp / cp_:.2f}x | {wp / lp:.2f}x "
                         f"| {d[0]:.1e}, {d[1]:.1e} |")
        text = f"webgpu adapter: {adapter}\n\n" + "\n".join(lines)
        print(text, flush=True)
        if a.out:
            Path(a.out).write_text(text + "\n")
    if a.profile:
        print(profile(paths[quants[0]], variants[-1][1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
