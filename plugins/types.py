"""Values that cross the backend contract (see hookspecs.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


class BackendError(Exception):
    """A backend cannot be chosen or cannot load a model; the message says why."""

    user_error = True


@dataclass(frozen=True)
class BackendSpec:
    name: str
    priority: int          # higher wins under --backend auto
    description: str = ""


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


class ContextOverflow(Exception):
    """Tokens would run past the KV cache's n_ctx."""

    user_error = True
