"""`ember bench`: load time, prefill and decode speed, time to first token, peak RSS.

Design: one model, one backend, in this process: load (map + backend load),
prefill `--prompt-tokens` random token ids in one batch (time to first token
= that prefill plus picking the token), then decode `--gen-tokens` greedily
after the prompt. Peak RSS is the process's high-water mark (VmHWM), so
mapped weight pages that were touched count, as they do for llama.cpp.

`--synthetic SHAPE --quant Q` benchmarks a random-weight model of a known
shape (ember.daemon.synthetic), written once into the cache by a child
process so that writing it never counts in this process's peak RSS.
"""
from __future__ import annotations

import json
import time

import numpy as np

from ember.formats.errors import UserError

JSON_KEYS = ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb")


class BenchError(UserError, ValueError):
    """A bad flag combination; one line on stderr, exit 2 (a UserError)."""


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", help="GGUF model file (or use --synthetic)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    p.add_argument("--backend", default="auto", help="backend name or 'auto' (see `ember backends`)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens decoded after the prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--synthetic", metavar="SHAPE",
                   help="benchmark a random-weight model of this shape (tinyllama-1.1b, qwen2-0.5b, gemma3-1b, lfm2-1.2b, ...: ember.daemon.synthetic.SHAPES)")
    p.add_argument("--quant", default="Q4_0", help="quant mix of --synthetic: Q4_0, Q8_0, Q4_K_M")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")


# ---------------------------------------------------------------------------
# The model to measure
# ---------------------------------------------------------------------------

def _check(args) -> str:
    if args.prompt_tokens < 1 or args.gen_tokens < 0:
        raise BenchError("--prompt-tokens must be >= 1 and --gen-tokens >= 0")
    if args.threads is not None and args.threads < 1:
        raise BenchError("--threads must be >= 1")
    if args.synthetic:
        from ember.daemon import synthetic
        return str(synthetic.ensure_cached(args.synthetic, args.quant))
    if not args.model:
        raise BenchError("give a MODEL file or --synthetic SHAPE")
    return args.model


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def measure(path: str, backend: str, n_prompt: int, n_gen: int, threads: int | None,
            seed: int = 0) -> dict:
    from ember.daemon import budget, engine
    t0 = time.perf_counter()
    model = engine.load(path, backend=backend, n_ctx=n_prompt + n_gen, threads=threads)
    load_s = time.perf_counter() - t0
    runner = model.runner     # the backend's runner itself: no sampling or text in the timings
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, runner.n_vocab, size=n_prompt).tolist()  # past <unk> <s> </s>
    t0 = time.perf_counter()
    tok = int(np.argmax(runner.prefill(prompt)))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_gen):
        tok = int(np.argmax(runner.decode(tok)))
    decode_s = time.perf_counter() - t0
    model.close()
    return {
        "load_s": round(load_s, 4),
        "prefill_tok_s": round(n_prompt / prefill_s, 2),
        "decode_tok_s": round(n_gen / decode_s, 2) if n_gen else None,
        "ttft_ms": round(prefill_s * 1000.0, 2),
        "peak_rss_mb": round(budget.peak_rss_bytes() / 2**20, 1),
        "backend": model.backend,
    }


def run(args) -> int:
    path = _check(args)
    r = measure(path, args.backend, args.prompt_tokens, args.gen_tokens, args.threads, args.seed)
    if args.json:
        print(json.dumps({k: r[k] for k in JSON_KEYS}))
        return 0
    print(f"model        {path}")
    print(f"backend      {r['backend']}")
    print(f"load         {r['load_s']:.3f} s")
    print(f"prefill      {r['prefill_tok_s']:.1f} tok/s ({args.prompt_tokens} tokens)")
    if r["decode_tok_s"] is not None:
        print(f"decode       {r['decode_tok_s']:.1f} tok/s ({args.gen_tokens} tokens)")
    print(f"ttft         {r['ttft_ms']:.1f} ms")
    print(f"peak RSS     {r['peak_rss_mb']:.1f} MB")
    return 0
