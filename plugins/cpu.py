"""The `cpu` backend: the C decoder (kernels/c/forward.c) on SIMD kernels.

Design: weights stay in the read-only GGUF map — the runner holds views of
it, never a second copy — so host memory is the mapped file plus an f16 KV
cache for n_ctx, scratch sized for one prefill chunk, and the interpreter.
Everything is allocated at load; decoding a token is one call into C with the
GIL released, and allocates only the logits array it returns.

Encoders (bert) run plugins/encoder.py's recipe with this backend's
products: every matrix stays a view of the map and goes through the C
kernels (kernels/quant_ops.py: matmul_rows, get_rows), activations quantized
once per product as llama.cpp quantizes them for that weight type, the
weight rows split across `threads` threads (the kernel releases the GIL);
LayerNorm, attention and gelu are numpy (O(T^2 d) beside the O(T d^2)
products).

Options (``options`` dict): ``max_batch`` (tokens per prefill chunk,
default 256), ``isa`` (force a kernel ISA, as EMBER_ISA does).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ember.formats.model_config import ModelConfig

from ember.plugins.features import FEATURES, require_features
from ember.plugins.hookspecs import hookimpl
from ember.plugins.types import BackendError, BackendSpec, CacheBookkeeping, ContextOverflow, MemoryPlan, Probe
from ember.plugins.types import TokenOutOfRange  # noqa: F401 - re-exported
from ember.plugins.types import CacheTooShort

NAME = "cpu"
# ModelConfig features (features.FEATURES) the C decoder computes; the rest are refused at load.
IMPLEMENTED: frozenset[str] = frozenset(FEATURES)
# interpreter + numpy + the kernels extension, measured as the RSS of
# `python -c "import ember.plugins.cpu"` (~35 MB) with headroom
RUNTIME_BYTES = 48 << 20


def _kernels():
    """The compiled pieces, imported on first use so `ember backends` can report why not."""
    from ember.kernels import dispatch, forward
    return dispatch, forward


# ---------------------------------------------------------------------------
# Plugin hooks
# ---------------------------------------------------------------------------

@hookimpl
def ember_backends():
    return [BackendSpec(NAME, priority=50,
                        description="native C SIMD kernels straight from the mapped file",
                        features=IMPLEMENTED)]


@hookimpl
def ember_probe(backend):
    if backend != NAME:
        return None
    try:
        dispatch, forward = _kernels()
    except Exception as e:  # noqa: BLE001 - a missing/broken extension is "not available"
        return Probe(False, f"the C kernels do not load: {type(e).__name__}: {e}")
    isa = dispatch.current_isa()
    return Probe(True, f"C kernels, ISA {isa} (this CPU runs {', '.join(dispatch.available_isas())}); "
                       f"{forward.physical_cores()} physical cores", isa=isa)


@hookimpl
def ember_plan(backend, config, n_ctx, options):
    if backend != NAME:
        return None
    return plan(config, n_ctx, options or {})


@hookimpl
def ember_load(backend, gguf, config, n_ctx, threads, options):
    if backend != NAME:
        return None
    if config.encoder:
        return encoder_runner(gguf, config, n_ctx, threads)
    return CpuRunner(gguf, config, n_ctx, threads, options or {})


# ---------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------

def plan(config: ModelConfig, n_ctx: int, options: dict, threads: int | None = None) -> MemoryPlan:
    """Mapped weights + f16 KV cache (rings on sliding-window layers, the f32 state on
    conv layers) + scratch for one chunk + the interpreter."""
    _, forward = _kernels()
    if config.encoder:
        return _encoder_plan(config, n_ctx)
    threads = threads or forward.physical_cores()
    batch = int(options.get("max_batch", forward.DEFAULT_MAX_BATCH))
    small = sum(4 * int(np.prod(t.shape)) for t in config.tensors.values()
                if len(t.shape) == 1 and t.type != "F32")
    return MemoryPlan(
        weights=config.weights_bytes,
        kv_cache=forward.cache_bytes(config, n_ctx, batch),
        scratch=forward.scratch_bytes(config, n_ctx, threads, batch) + small,
        runtime=RUNTIME_BYTES,
        notes=["weights are the mapped file's tensor bytes (read-only, shared page cache); "
               "no second copy",
               f"scratch is sized for prefill chunks of {batch} tokens and {threads} threads",
               *_ring_note(config, n_ctx, batch),
               "all_logits=True adds len(tokens) * n_vocab * 4 bytes for the result"],
    )


def _ring_note(config: ModelConfig, n_ctx: int, batch: int) -> list[str]:
    """What the sliding-window rings save against a full cache on every layer."""
    if not any(config.is_swa(il) for il in range(config.n_layer)):
        return []
    _, forward = _kernels()
    rows = [forward.cache_rows(config, il, n_ctx, batch) for il in range(config.n_layer)
            if config.is_swa(il) and config.layer_kind(il) == "attn"]
    saved = 2 * (len(rows) * n_ctx - sum(rows)) * config.n_head_kv * config.head_dim * 2
    return [f"{len(rows)} sliding-window layers keep a ring of {max(rows)} rows "
            f"(window {config.sliding_window} + chunk {batch} - 1) instead of {n_ctx}: "
            f"{saved / 2**20:.1f} MiB of KV cache saved"]


def _encoder_plan(config: ModelConfig, n_ctx: int) -> MemoryPlan:
    from ember.plugins import encoder, reference
    n_ctx = min(n_ctx, config.n_ctx_train)
    small = sum(4 * int(np.prod(t.shape)) for t in config.tensors.values() if len(t.shape) == 1)
    return MemoryPlan(
        weights=config.weights_bytes, kv_cache=0,
        scratch=encoder.scratch_bytes(config, n_ctx, reference.ATTN_CHUNK) + small, runtime=RUNTIME_BYTES,
        notes=["weights are the mapped file's tensor bytes (read-only); no second copy",
               f"an encoder keeps no cache: scratch holds one text of up to {n_ctx} tokens"])


# ---------------------------------------------------------------------------
# The encoder: plugins/encoder.py on views of the map and the C products
# ---------------------------------------------------------------------------

class _Products:
    """dense/rows factories over the map for plugins/encoder.py, and the threads they use."""

    def __init__(self, threads: int):
        from concurrent.futures import ThreadPoolExecutor
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads - 1, "ember-encoder") if threads > 1 else None

    def dense(self, t):
        from ember.kernels import quant_ops as quants
        _, forward = _kernels()
        _, w = forward.matrix_view(t)                               # (out, row_bytes) uint8
        cuts = np.linspace(0, w.shape[0], self.threads + 1).astype(int)   # row shares

        def product(x: np.ndarray) -> np.ndarray:                   # (T, in) -> (T, out)
            xq = quants.quantize_act(t.type, x)                     # once, for every share
            y = np.empty((x.shape[0], w.shape[0]), np.float32)
            shares = [(t.type, w, xq, y, int(a), int(b)) for a, b in zip(cuts, cuts[1:]) if b > a]
            rest = [self.pool.submit(quants.matmul_rows, *s) for s in shares[1:]]
            quants.matmul_rows(*shares[0])
            for f in rest:
                f.result()
            return y
        return product

    def rows(self, t):
        from ember.kernels import quant_ops as quants
        _, forward = _kernels()
        _, w = forward.matrix_view(t)
        return lambda ids: quants.get_rows(t.type, w, ids)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def encoder_runner(gguf, config: ModelConfig, n_ctx: int, threads: int | None = None):
    from ember.plugins import reference
    from ember.plugins.encoder import EncoderRunner
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise BackendError(f"threads must be a positive int, got {threads!r}")
    _, forward = _kernels()
    products = _Products(threads or forward.physical_cores())
    runner = EncoderRunner(gguf, config, n_ctx, NAME, IMPLEMENTED, products.dense, products.rows,
                           ops=reference, on_close=products.close)
    runner.threads = products.threads
    return runner


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------

class CpuRunner(CacheBookkeeping):
    """ember.plugins.types.Runner over the C decoder."""

    def __init__(self, gguf, config: ModelConfig, n_ctx: int, threads: int | None = None,
                 options: dict | None = None):
        options = options or {}
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        if threads is not None and (not isinstance(threads, int) or threads <= 0):
            raise BackendError(f"threads must be a positive int, got {threads!r}")
        require_features(config, NAME, IMPLEMENTED)
        dispatch, forward = _kernels()
        self.n_ctx, self.n_vocab, self.n_past = n_ctx, config.n_vocab, 0
        self.dec = forward.Decoder(gguf, config, n_ctx, threads,
                                   int(options.get("max_batch", forward.DEFAULT_MAX_BATCH)),
                                   options.get("isa"))
        self.isa, self.threads = self.dec.isa, self.dec.threads
        self._one = np.zeros(1, dtype=np.int32)   # decode's token, reused
        # Sliding-window rings hold only their last rows: after writing position p, the
        # position p - rows is gone. _kept[i] is the lowest position ring i still holds,
        # so truncate() knows how far back a cache can go. Conv states hold only what
        # follows the last position: they cannot go back at all.
        self._rings = self.dec.ring_layers()
        self._kept = [0] * len(self._rings)
        self._conv = "conv" in config.layer_kinds

    # -- the Runner protocol --------------------------------------------------

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self._check(tokens)
        out = self.dec.run(ids, self.n_past, bool(all_logits))
        self._advance(ids.shape[0])
        return out

    def decode(self, token: int) -> np.ndarray:
        if self.dec is None:
            raise ValueError("runner is closed")
        if not 0 <= token < self.n_vocab:
            raise TokenOutOfRange(f"token id {token} is outside the vocabulary [0, {self.n_vocab})")
        if self.n_past + 1 > self.n_ctx:
            raise ContextOverflow(f"1 token after {self.n_past} cached would need "
                                  f"{self.n_past + 1} positions; n_ctx is {self.n_ctx}")
        self._one[0] = token
        out = self.dec.run(self._one, self.n_past, False)
        self._advance(1)
        return out

    def reset(self) -> None:
        super().reset()
        self._kept = [0] * len(self._rings)

    def truncate(self, n_past: int) -> None:
        """Keep the first n_past positions. A ring layer must still hold the positions
        the next token reads (its last window - 1), else the cache cannot go back; a
        conv state cannot go back (truncate(0) is a reset and always works)."""
        if isinstance(n_past, (int, np.integer)) and 0 < n_past < self.n_past:
            if self._conv:
                raise CacheTooShort(
                    f"truncate({n_past}): the convolution layers keep only their state after "
                    f"position {self.n_past - 1}; reset() and prefill the prompt again")
            for (rows, window), kept in zip(self._rings, self._kept):
                if max(0, int(n_past) - window + 1) < kept:
                    raise CacheTooShort(
                        f"truncate({n_past}): a ring layer keeps only the last {rows} positions "
                        f"and position {max(0, int(n_past) - window + 1)} is gone; reset() and "
                        f"prefill the prompt again")
        super().truncate(n_past)
        if self.n_past == 0:
            self._kept = [0] * len(self._rings)

    def close(self) -> None:
        if self.dec is not None:
            self.dec.close()
            self.dec = None

    # -- internals ------------------------------------------------------------

    def _advance(self, n: int) -> None:
        self.n_past += n
        self._kept = [max(k, self.n_past - rows) for (rows, _), k in zip(self._rings, self._kept)]

    def _check(self, tokens: Sequence[int]) -> np.ndarray:
        if self.dec is None:
            raise ValueError("runner is closed")
        return self.checked_tokens(tokens, np.int32)
