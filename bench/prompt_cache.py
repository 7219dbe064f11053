"""The prompt cache: time to first token of a chat's second turn, with and without it.

    python3 bench/prompt_cache.py [--model PATH] [--backend cpu] [--threads 2] [--history 800]

Issue 19's must-show: on the synthetic TinyLlama-1.1B Q4_0 (the file `ember
bench --synthetic tinyllama-1.1b --quant Q4_0` writes), cpu backend, 2
threads, a chat whose first turn is ~800 tokens of history. Turn 1 runs (a
32-token reply), then another request (a different ~300-token prompt), then
turn 2 (history + reply + a new question), greedy, 16 tokens, twice on the
same loaded model:

  cached      turn 1's KV cache comes back from a prompt-cache slot (the
              other request had overwritten the live cache): only the
              new question and the re-rendered reply are prefilled
  uncached    the prompt cache emptied and the live cache overwritten:
              the whole history is prefilled, as before issue 19

and reports each TTFT (engine clock: creation -> first token sampled), the
prompt tokens found cached, the ratio, and whether the outputs are
token-for-token identical (they must be: on the cpu backend chunked and
cached prefills give bit-equal logits). Goal: >= 10x. The CPU time of each
turn is printed too: on a machine shared with other work, wall clocks
stretch, and the CPU-time ratio is the steadier one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

WORDS = ("the old fisherman boat sea harbour morning storm net village children market bread "
         "lantern river bridge stone garden window quiet evening song road letter friend "
         "winter summer mountain forest path light").split()


def history_text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words)) + "."


def chat_messages(model, target: int) -> list[dict]:
    """A user message whose chat rendering is about `target` tokens."""
    words = target // 4
    while True:
        msgs = [{"role": "user", "content": history_text(words, 1)}]
        n = len(model.apply_chat(msgs))
        if n >= target:
            return msgs
        words += max(4, (target - n) // 4)


def timed(model, prompt, max_tokens: int) -> tuple[float, float, object]:
    """(TTFT ms, CPU ms to the first token, Result)"""
    c0 = time.process_time()
    gen = model.start(prompt, temperature=0, max_tokens=max_tokens)
    gen.step()
    cpu_ms = (time.process_time() - c0) * 1e3
    while gen.step() is not None:
        pass
    r = gen.result
    return r.timings["ttft_ms"], cpu_ms, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the synthetic tinyllama-1.1b Q4_0)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--history", type=int, default=800, help="turn-1 prompt tokens")
    args = ap.parse_args()
    from ember.daemon import engine, promptcache
    if args.model is None:
        from ember.daemon import synthetic
        args.model = str(synthetic.ensure_cached("tinyllama-1.1b", "Q4_0"))
    m = engine.load(args.model, backend=args.backend, n_ctx=2048, threads=args.threads)
    print(f"model {os.path.basename(args.model)}, backend {m.backend}, threads {args.threads}, "
          f"cpu {_cpu_model()}")

    turn1 = chat_messages(m, args.history)
    t1_ms, _, r1 = timed(m, turn1, 32)
    turn2 = turn1 + [{"role": "assistant", "content": r1.text},
                     {"role": "user", "content": "And what did the fisherman find in his net?"}]
    print(f"turn 1: {len(m.apply_chat(turn1))} prompt tokens, TTFT {t1_ms:.0f} ms; "
          f"turn 2: {len(m.apply_chat(turn2))} prompt tokens")
    timed(m, history_text(250, 2), 4)                      # someone else's request in between
    cached = timed(m, turn2, 16)
    m.prompt_cache = promptcache.PromptCache(0)
    m.logits([m.tokenizer.bos_id or 1])                    # the live cache: not this chat
    plain = timed(m, turn2, 16)
    m.close()

    print(f"{'turn 2':<10} {'TTFT ms':>10} {'CPU ms':>10} {'cached tok':>11}")
    for name, (ms, cpu, r) in (("cached", cached), ("uncached", plain)):
        print(f"{name:<10} {ms:>10.1f} {cpu:>10.1f} {r.usage['cached_tokens']:>11}")
    same = cached[2].tokens == plain[2].tokens
    print(f"TTFT uncached/cached {plain[0] / cached[0]:.1f}x (CPU time {plain[1] / cached[1]:.1f}x); "
          f"outputs identical: {same}")
    return 0 if same else 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
