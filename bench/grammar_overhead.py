"""What does constrained output add to a decoded token? At a 32k and a 150k vocabulary.

    python3 bench/grammar_overhead.py [--model PATH] [--threads 2] [--tokens 64] [--rounds 3]

The forward pass is the 1.1B shape (the synthetic TinyLlama-1.1B Q4_0 that
`ember bench --synthetic tinyllama-1.1b --quant Q4_0` writes, cpu backend).
The grammar side uses real vocabularies, because a mask's cost depends on the
token strings: Llama-2's 32,000 SentencePiece tokens (v32k-llama) and Qwen2's
151,936 BPE tokens (v151k-qwen2), read from ../shared/conformance/models.
The constraint is a JSON Schema with strings, integers, an enum and an array.

Per vocabulary, each round runs the same decode loop four ways, alternating
so machine noise hits all alike; reported is the median over all tokens:

  plain       runner.decode(tok) + Sampler.sample(logits)        (no grammar)
  inline      + the mask computed after the forward pass, on this thread
  thread      + every mask started on the mask thread before the forward pass
              and waited for after it (overlap, paying the hand-off each token)
  engine      the engine's way (Generation.step): prefetch() + mask(), which
              overlap only while masks cost more than Constraint.overlap_above_s

The logits row is the model's, widened to the vocabulary with random values
(the 1.1B shape has 32,000 outputs); tokens are sampled under the mask and fed
to the matcher, so the grammar walks real JSON (a finished document starts a
new one). Each way's time per token is split into the forward pass and the
rest ("host": widening, sampling, the grammar's wait, apply and accept); the
overhead is (host - plain's host) / plain's total: what the grammar adds on
the critical path, as a share of a plain token. (Differences of totals would
measure mostly the machine's noise on a shared box: the forward pass varies by
more than the whole grammar costs.) The issue's goal is < 10%.
Also printed: the mask alone (computed on the calling thread, no hand-off) and
the one-time build of the vocabulary table (on a model's first constrained request).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from ember.daemon import engine, grammar
from ember.daemon.grammar import Constraint
from ember.daemon.sampling import Sampler, SamplingParams
from ember.formats.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "conformance" / "models"
VOCABS = {"32k (Llama-2 SPM)": MODELS / "v32k-llama-Q8_0.gguf",
          "150k (Qwen2 BPE)": MODELS / "v151k-qwen2-Q8_0.gguf"}
SCHEMA = {"type": "object", "required": ["name", "age", "mood", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "mood": {"enum": ["happy", "sad", "calm"]},
                         "tags": {"type": "array", "maxItems": 5,
                                  "items": {"type": "string", "maxLength": 16}}}}
PARAMS = SamplingParams.parse(temperature=0.8, seed=1)


# ---------------------------------------------------------------------------
# One decode loop, three ways
# ---------------------------------------------------------------------------

class Loop:
    """The 1.1B runner + a vocabulary's constraint; each `way` returns seconds per token."""

    def __init__(self, model: engine.Model, vocab, n_vocab: int):
        self.model, self.vocab, self.n_vocab = model, vocab, n_vocab
        self.rng = np.random.default_rng(0)
        self.pad = self.rng.standard_normal(max(0, n_vocab - model.n_vocab)).astype(np.float32)
        self.constraint = self._fresh()

    def _fresh(self):
        return grammar.Constraint.compile(self.vocab, "json_schema", json.dumps(SCHEMA))

    def _row(self, logits: np.ndarray) -> np.ndarray:
        """The model's logits (32,000) widened to this vocabulary: (n_vocab,)."""
        row = np.concatenate([logits, self.pad]) if self.pad.size else logits
        return row[: self.n_vocab]

    def _accept(self, tok: int) -> None:
        c = self.constraint
        c.accept(tok)
        if c.finished:                        # a whole document: start the next one
            self.constraint = self._fresh()

    def run(self, way: str, n: int) -> list[tuple[float, float]]:
        """Per token: (seconds, of which outside the forward pass), for one way."""
        m, sampler, out = self.model, Sampler(PARAMS), []
        m.runner.reset()
        tok = int(np.argmax(m.runner.prefill(m.tokenize("Once upon a time"))))
        for _ in range(n):
            t0 = time.perf_counter()
            c = self.constraint
            c.overlap_above_s = {"thread": 0.0, "engine": Constraint.overlap_above_s}.get(way, float("inf"))
            if way in ("thread", "engine"):
                c.prefetch()
            t1 = time.perf_counter()
            logits = m.runner.decode(tok % m.n_vocab)
            t2 = time.perf_counter()
            row = self._row(logits)
            allowed = None if way == "plain" else c.mask()
            tok = sampler.sample(row, allowed).id
            if way != "plain":
                self._accept(tok)
            t3 = time.perf_counter()
            out.append((t3 - t0, (t3 - t0) - (t2 - t1)))
        return out

    def mask_only(self, n: int) -> float:
        """Seconds per mask computed on this thread (llguidance + unpacking the bits), walking
        the grammar with random tokens: the work that the thread way hides."""
        sampler, t = Sampler(PARAMS), 0.0
        for _ in range(n):
            c = self.constraint
            t0 = time.perf_counter()
            allowed = c.mask_now()
            t += time.perf_counter() - t0
            self._accept(sampler.sample(self.rng.standard_normal(self.n_vocab), allowed).id)
        return t / n


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="the 1.1B-shape GGUF (default: the synthetic TinyLlama Q4_0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.model is None:
        from ember.daemon.synthetic import ensure_cached
        args.model = str(ensure_cached("tinyllama-1.1b", "Q4_0"))
    model = engine.load(args.model, backend="cpu", n_ctx=512, threads=args.threads)
    print(f"forward: {Path(args.model).name}, cpu backend, {args.threads} threads; "
          f"{platform.processor() or platform.machine()}; {args.tokens} tokens x {args.rounds} rounds")
    for label, path in VOCABS.items():
        tok = Tokenizer.from_gguf(path)
        t0 = time.perf_counter()
        vocab = grammar.vocabulary(tok, tok.n_vocab)
        build = time.perf_counter() - t0
        loop = Loop(model, vocab, tok.n_vocab)
        loop.run("thread", 4)                              # warm-up: threads, caches
        times = {w: [] for w in ("plain", "inline", "thread", "engine")}
        for _ in range(args.rounds):
            for w in times:
                times[w] += loop.run(w, args.tokens)
        # medians per token: on a shared machine a thread's wake-up is now and then late by
        # a scheduler quantum (10+ ms), which would swamp a mean of sub-millisecond costs
        tot = {w: statistics.median(t for t, _ in v) for w, v in times.items()}
        host = {w: statistics.median(h for _, h in v) for w, v in times.items()}
        mask = loop.mask_only(args.tokens * args.rounds)
        print(f"\nvocabulary {label}: {tok.n_vocab} tokens, table built once in {build * 1e3:.0f} ms")
        print(f"  mask alone (no thread)   {mask * 1e3:8.3f} ms/token   "
              f"({100 * mask / tot['plain']:.2f}% of plain decode)")
        print(f"  {'':<24} {'total':>8}   {'host':>8}   overhead (host - plain host) / plain total")
        for w in times:
            over = "" if w == "plain" else f"   {100 * (host[w] - host['plain']) / tot['plain']:+6.2f}%"
            print(f"  {w:<24} {tot[w] * 1e3:8.2f}   {host[w] * 1e3:8.3f}{over}")
    model.close()


if __name__ == "__main__":
    main()
