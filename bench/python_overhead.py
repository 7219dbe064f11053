"""What does Python add to a decoded token? Three layers on one tiny model.

    python3 bench/python_overhead.py [--model PATH] [--threads 1] [--tokens 200] [--rounds 5]

On a model small enough that compute is negligible (stories260K: 260K
parameters), each round decodes the same greedy run three ways, alternating
so machine noise hits all alike, and reports the median time per token:

  C forward     the compiled decoder's `forward` called straight from a loop
                with preallocated arrays (the floor: compute + one call)
  Runner        CpuRunner.decode(token): the backend's checks, the logits array
  engine        Model.generate(prompt, temperature=0, ignore_eos=True): the
                whole per-token path, sampling, stop checks, streaming decode

The differences are Python's cost per token; the target is < 1 ms.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from ember.daemon import engine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "conformance" / "models" / "stories260K.gguf"
PROMPT = "Once upon a time"


def c_forward(model: engine.Model, ids: list[int], n: int) -> float:
    """Seconds per token: the bare compiled forward, greedy, after the prompt."""
    fw, V = model.runner.dec.fw, model.config.n_vocab
    logits = np.empty(V, np.float32)
    prompt = np.asarray(ids, np.int32)
    fw.forward(prompt, 0, logits, False)          # the prompt's last row: the first token
    tok = np.zeros(1, np.int32)
    tok[0] = int(np.argmax(logits))
    t0 = time.perf_counter()
    for pos in range(len(ids), len(ids) + n):
        fw.forward(tok, pos, logits, False)
        tok[0] = int(np.argmax(logits))
    return (time.perf_counter() - t0) / n


def runner_decode(model: engine.Model, ids: list[int], n: int) -> float:
    """Seconds per token through the Runner protocol."""
    r = model.runner
    r.reset()
    tok = int(np.argmax(r.prefill(ids)))
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(r.decode(tok)))
    return (time.perf_counter() - t0) / n


def engine_generate(model: engine.Model, n: int) -> float:
    """Seconds per token of a whole greedy generation, first token excluded."""
    stamps = []
    for ev in model.generate(PROMPT, max_tokens=n + 1, temperature=0, ignore_eos=True):
        stamps.append(time.perf_counter())
    return (stamps[n] - stamps[1]) / (n - 1)   # stamps: n + 1 tokens, then the result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    model = engine.load(a.model, backend="cpu", n_ctx=a.tokens + 64, threads=a.threads)
    ids = model.tokenize(PROMPT)
    runs: dict[str, list[float]] = {"C forward": [], "Runner": [], "engine": []}
    for _ in range(a.rounds):
        runs["C forward"].append(c_forward(model, ids, a.tokens))
        runs["Runner"].append(runner_decode(model, ids, a.tokens))
        runs["engine"].append(engine_generate(model, a.tokens))
    floor = statistics.median(runs["C forward"])
    print(f"{Path(a.model).name}, cpu backend, {a.threads} thread(s), {a.tokens} tokens x {a.rounds} rounds")
    print(f"{'path':<10} {'us/token':>9} {'over C':>9}")
    for name, xs in runs.items():
        med = statistics.median(xs)
        print(f"{name:<10} {med * 1e6:9.1f} {(med - floor) * 1e6:+9.1f}")


if __name__ == "__main__":
    main()
