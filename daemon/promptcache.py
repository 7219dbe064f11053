"""The prompt cache: KV states of earlier requests, reused by longest common prefix.

Design. A chat's next turn starts with the whole history of the last one, so
its KV cache up to there is already known. The runner holds one live cache
(the last request's tokens, `Model.kv_tokens`); this module holds up to
`slots` more as host copies (`KVState`, made by the runner's `save_state`)
in least-recently-used order. A request about to prefill `seq` asks for the
entry sharing the longest prefix with it; the engine loads that state,
truncates it to the shared prefix and prefills only the rest.

Copies are made lazily: the live cache is copied into a slot only at the
moment another request is about to overwrite it (engine `Model.attach`), so
one chat talking to the daemon alone never copies anything. A preempted
request's finished positions (prefill chunks included) land here the same
way, and it resumes from them.

An entry is a state of one runner of one model: the cache belongs to its
`Model` and dies with it, so a model swap (SIGHUP, `load`) never sees the
old model's entries. On disk (`--prompt-cache-dir`), entries live in a
folder named by `model_key` — the file's identity (path, size, mtime), the
backend and n_ctx — and are read back only by a model with the same key.

Memory: each entry holds at most the runner's whole cache (full layers'
rows [0, n_past), whole rings and conv states), so `slots` x the plan's
kv_cache bounds it; daemon/budget.py counts that as the `prompt_cache` line.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.plugins.types import KVState

log = logging.getLogger("emberd.promptcache")

DEFAULT_SLOTS = 4          # with no budget to size them by
FILE_VERSION = 1           # bump when the .npz layout changes: older files are ignored


@dataclass
class Entry:
    tokens: np.ndarray     # (n_past,) int32: the positions the state holds
    state: KVState


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


# ---------------------------------------------------------------------------
# The LRU of states
# ---------------------------------------------------------------------------

class PromptCache:
    """Up to `slots` KV states, least recently used evicted first."""

    def __init__(self, slots: int):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ValueError(f"cache slots must be an integer >= 0, got {slots!r}")
        self.slots = slots
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._ids = 0
        self.nbytes = 0        # kept as entries come and go: `status` reads it from another thread
        self.hits = self.misses = self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, seq: np.ndarray) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with seq, and that length (0: none)."""
        best, n_best = None, 0
        for e in self._entries.values():
            n = common_prefix(e.tokens, seq)
            if n > n_best:
                best, n_best = e, n
        return best, n_best

    def touch(self, entry: Entry) -> None:
        """Mark an entry used now (last to be evicted)."""
        if (k := self._key(entry)) is not None:
            self._entries.move_to_end(k)

    def discard(self, entry: Entry) -> None:
        if (k := self._key(entry)) is not None:
            self._drop(k)

    def _drop(self, k: int) -> None:
        self.nbytes -= self._entries.pop(k).state.nbytes

    def _key(self, entry: Entry) -> int | None:
        return next((k for k, e in self._entries.items() if e is entry), None)

    def put(self, tokens: np.ndarray, state: KVState) -> None:
        """Keep a state for `tokens`; entries it extends are dropped (it holds them too)."""
        if self.slots == 0 or len(tokens) == 0:
            return
        tokens = np.array(tokens, dtype=np.int32)
        for k in [k for k, e in self._entries.items()
                  if len(e.tokens) <= len(tokens) and common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._drop(k)
        while len(self._entries) >= self.slots:
            self._drop(next(iter(self._entries)))      # the least recently used
        self._ids += 1
        self._entries[self._ids] = Entry(tokens, state)
        self.nbytes += state.nbytes

    def holds(self, tokens: np.ndarray) -> bool:
        """Whether some entry already covers every one of `tokens` (no copy needed)."""
        _, n = self.best(tokens)
        return n == len(tokens) and any(len(e.tokens) == n for e in self._entries.values())

    def stats(self) -> dict:
        return {"slots": self.slots, "entries": len(self), "bytes": self.nbytes,
                "hits": self.hits, "misses": self.misses, "tokens_reused": self.tokens_reused}

    # -- on disk --------------------------------------------------------------

    def save(self, folder: Path) -> int:
        """Write every entry as <folder>/<n>.npz (replacing what was there); -> entries written."""
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.npz"):
            old.unlink()
        for i, e in enumerate(self._entries.values()):
            arrays = {f"a{j}": a for j, a in enumerate(e.state.arrays)}
            extra = {f"x_{k}": np.asarray(v) for k, v in e.state.extra.items()}
            tmp = folder / f".{i}.npz.tmp"
            with open(tmp, "wb") as f:
                np.savez(f, version=FILE_VERSION, tokens=e.tokens, n_past=e.state.n_past,
                         **arrays, **extra)
            os.replace(tmp, folder / f"{i}.npz")   # a crash mid-write leaves no half entry
        return len(self._entries)

    def load(self, folder: Path) -> int:
        """Read the entries save() wrote (oldest first); unreadable files are skipped."""
        n = 0
        for path in sorted(folder.glob("*.npz"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            try:
                tokens, state = _read_entry(path)
            except (OSError, ValueError, KeyError) as e:
                log.warning("prompt cache: skipping %s (%s)", path, e)
                continue
            self.put(tokens, state)
            n += 1
        return n


def _read_entry(path: Path) -> tuple[np.ndarray, KVState]:
    with np.load(path, allow_pickle=False) as z:
        if int(z["version"]) != FILE_VERSION:
            raise ValueError(f"file version {int(z['version'])}, expected {FILE_VERSION}")
        tokens = np.array(z["tokens"], dtype=np.int32)
        n_arrays = sum(1 for k in z.files if k.startswith("a") and k[1:].isdigit())
        arrays = [np.array(z[f"a{j}"]) for j in range(n_arrays)]
        extra = {k[2:]: z[k].tolist() for k in z.files if k.startswith("x_")}
        n_past = int(z["n_past"])
    if n_past != len(tokens):
        raise ValueError(f"{len(tokens)} tokens for a state of {n_past} positions")
    return tokens, KVState(n_past, arrays, extra)


def model_key(path: str, backend: str, n_ctx: int) -> str:
    """A folder name for one model file (as it is now) on one backend at one context."""
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{backend}|{n_ctx}"
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
