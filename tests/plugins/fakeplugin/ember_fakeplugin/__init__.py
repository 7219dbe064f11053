"""A tiny third-party backend package, installed by the tests through an entry point.

It declares two backends the way any outside package would:

- ``fake``: runs anywhere; its runner predicts token (t + 1) mod n_vocab after
  token t (a counting "model"), with a real KV cache of the tokens it has seen,
  so the engine-facing contract (prefill, decode, reset, truncate) is exercised.
- ``broken``: its probe raises, as a plugin for missing hardware might; ember
  must report it unavailable with the error and keep starting.
- ``plain``: the counting model again, at the top priority, declaring that it
  computes none of arch.FEATURES: `--backend auto` takes it for a plain llama
  file and passes it over for a model that needs a feature (a bert encoder).
"""
from __future__ import annotations

import numpy as np

from ember.plugins.hookspecs import hookimpl
from ember.plugins.types import BackendSpec, ContextOverflow, MemoryPlan, Probe


@hookimpl
def ember_backends():
    return [BackendSpec("fake", 1, "third-party test backend (counting model)"),
            BackendSpec("broken", 2, "third-party test backend whose probe raises"),
            BackendSpec("plain", 1000, "third-party test backend without arch features",
                        features=frozenset())]


@hookimpl
def ember_probe(backend):
    if backend == "fake":
        return Probe(True, "fake device always present", isa="fake-isa", devices=["fake0"])
    if backend == "plain":
        return Probe(True, "plain device always present")
    if backend == "broken":
        raise RuntimeError("driver libfake.so.1 not found")
    return None


@hookimpl
def ember_plan(backend, config, n_ctx, options):
    if backend not in ("fake", "plain"):
        return None
    return MemoryPlan(weights=0, kv_cache=8 * n_ctx, scratch=4 * config.n_vocab)


@hookimpl
def ember_load(backend, gguf, config, n_ctx, threads, options):
    return CountingRunner(config.n_vocab, n_ctx) if backend in ("fake", "plain") else None


class CountingRunner:
    def __init__(self, n_vocab: int, n_ctx: int):
        self.n_vocab, self.n_ctx, self.n_past = n_vocab, n_ctx, 0
        self.cache = np.zeros(n_ctx, np.int64)  # (n_ctx,) the tokens seen, allocated once

    def _logits(self, token: int) -> np.ndarray:
        out = np.zeros(self.n_vocab, np.float32)
        out[(token + 1) % self.n_vocab] = 10.0
        return out

    def prefill(self, tokens, all_logits=False):
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextOverflow(f"{self.n_past} + {len(tokens)} tokens > n_ctx {self.n_ctx}")
        self.cache[self.n_past:self.n_past + len(tokens)] = tokens
        self.n_past += len(tokens)
        rows = np.stack([self._logits(int(t)) for t in tokens])
        return rows if all_logits else rows[-1]

    def decode(self, token):
        return self.prefill([token])

    def reset(self):
        self.n_past = 0

    def truncate(self, n_past):
        self.n_past = min(self.n_past, n_past)

    def close(self):
        pass
