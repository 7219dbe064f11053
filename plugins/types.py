"""Values that cross the backend contract (see hookspecs.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from ember.formats.errors import UserError


class BackendError(UserError):
    """A backend cannot be chosen or cannot load a model; the message says why."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    priority: int          # higher wins under --backend auto
    description: str = ""
    # the ember.plugins.features.FEATURES it computes (None: all, or it refuses at load): under
    # --backend auto a model goes to the best backend that computes all of its features
    features: frozenset[str] | None = None


@dataclass
class Probe:
    available: bool
    reason: str = ""                       # why (not) available, one line
    isa: str | None = None                 # e.g. "avx2" for the cpu backend
    devices: list[str] = field(default_factory=list)
    memory_bytes: int | None = None        # usable device/host memory, if known


@dataclass
class MemoryPlan:
    """Bytes a loaded model will use, by part. Device bytes are separate from host."""

    weights: int
    kv_cache: int
    scratch: int
    runtime: int = 0
    device: int = 0        # bytes on an accelerator (not counted in host_total)
    notes: list[str] = field(default_factory=list)

    @property
    def host_total(self) -> int:
        return self.weights + self.kv_cache + self.scratch + self.runtime


class Runner(Protocol):
    """A loaded model on one backend. Owns its KV cache, allocated once for n_ctx."""

    n_ctx: int
    n_vocab: int
    n_past: int            # tokens currently in the KV cache

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to the cache in one batch.

        Returns float32 logits: (len(tokens), n_vocab) if all_logits else (n_vocab,)
        for the last token. Raises ContextOverflow past n_ctx.
        """

    def decode(self, token: int) -> np.ndarray:
        """Append one token; returns its float32 logits (n_vocab,)."""

    def reset(self) -> None:
        """Empty the cache (n_past = 0) without freeing it."""

    def truncate(self, n_past: int) -> None:
        """Forget cache entries at positions >= n_past."""

    def close(self) -> None:
        """Release what the runner holds."""

    # Encoders (ModelConfig.encoder: bert) have no logits; their runners answer this instead
    # of prefill/decode (which raise ModelKindError), and decoders' runners need not have it.
    def encode(self, tokens: Sequence[int]) -> np.ndarray:
        """Hidden states float32 (len(tokens), n_embd) of one whole text, attended both ways.

        Independent of the cache (n_past is untouched); raises ContextOverflow past n_ctx.
        """


class ModelKindError(UserError, ValueError):
    """An embedding model asked to generate (or for logits), or a text-generation model asked
    for embeddings: the message says which kind the model is and what to use instead."""


class ContextOverflow(UserError):
    """Tokens would run past the KV cache's n_ctx."""


class CacheTooShort(BackendError, ValueError):
    """truncate() asked for positions a ring cache has dropped: sliding-window rings and
    convolution states keep only the latest positions. reset() and prefill again instead."""


class TokenOutOfRange(UserError, ValueError):
    """A token id is negative or not below n_vocab."""


class CacheBookkeeping:
    """The KV-cache position bookkeeping every runner shares: token checks, reset, truncate.

    A runner sets n_ctx, n_vocab and n_past; it keeps only the compute. Cache rows
    past n_past are never read, so reset and truncate move the cursor and the
    next prefill simply overwrites them.
    """

    n_ctx: int
    n_vocab: int
    n_past: int

    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n_past: int) -> None:
        if not isinstance(n_past, (int, np.integer)) or not 0 <= n_past <= self.n_past:
            raise ValueError(f"truncate({n_past!r}): must be an int in [0, {self.n_past}]")
        self.n_past = int(n_past)

    def checked_tokens(self, tokens: Sequence[int], dtype) -> np.ndarray:
        """tokens as a contiguous (n,) array of dtype, after every check a request can fail."""
        ids = np.asarray(tokens)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise TokenOutOfRange(f"tokens must be a non-empty 1-D sequence of ints, "
                                  f"got {ids.dtype} array of shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            bad = ids[(ids < 0) | (ids >= self.n_vocab)][0]
            raise TokenOutOfRange(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        if self.n_past + ids.size > self.n_ctx:
            raise ContextOverflow(f"{ids.size} tokens after {self.n_past} cached would need "
                                  f"{self.n_past + ids.size} positions; n_ctx is {self.n_ctx}")
        return np.ascontiguousarray(ids, dtype=dtype)
