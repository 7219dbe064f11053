"""Sampling: from one row of logits to the next token, with llama.cpp's semantics.

Design: parameters arrive from untrusted requests, so `SamplingParams.parse`
checks every one (type, NaN, range, unknown keys) and raises SamplingError
naming the key. A `Sampler` owns the per-request state — its RNG and the
penalty history — so a generation that is suspended and resumed later keeps
drawing the same numbers it would have drawn uninterrupted.

The chain runs in llama.cpp's default order (common/sampling):

    penalties -> top_k -> top_p -> min_p -> temperature -> draw

* penalties (llama_sampler_penalties): for each distinct token among the
  last `penalty_last_n` tokens of the history (prompt included, as
  llama-server does), with c occurrences:
  logit = logit / repeat_penalty if logit > 0 else logit * repeat_penalty,
  then logit -= c * frequency_penalty + presence_penalty.
  penalty_last_n = 0 disables them, -1 means the whole history.
* top_k keeps the k largest logits (0: off). top_p keeps the smallest set of
  most likely tokens whose probability (softmax of the current logits) sums
  to >= top_p (1.0: off). min_p keeps tokens whose probability is at least
  min_p times the largest one (0.0: off). temperature divides the surviving
  logits; temperature 0 is greedy (argmax, first index on ties).
* Log-probabilities reported with a token are those of the model itself:
  log_softmax of the raw logits, before penalties and temperature.

Stop strings are matched on the decoded text by `StopMatcher`, which holds
back any tail that could still become a stop string, so the stop string's
text is never emitted.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from ember.formats.errors import UserError
from ember.formats.protocol import MAX_STOP_TOKENS, SAMPLING_RANGES, STOP_TOKEN_ID, Range


class SamplingError(UserError, ValueError):
    """A sampling parameter is missing, mistyped or out of range."""


# ---------------------------------------------------------------------------
# Parameters: parsed and checked once
# ---------------------------------------------------------------------------

# The numeric ranges are the wire's table (SAMPLING_RANGES); these bound what only
# an embedding app can send (the daemon's own limits are tighter and configurable).
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_TOKENS_LIMIT = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None          # None: a fresh random seed (reported in the result)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()       # stop strings (never emitted)
    stop_tokens: tuple[int, ...] = ()  # extra stop token ids, besides the model's EOG set
    ignore_eos: bool = False
    logprobs: bool = False           # report the chosen token's log-probability
    top_logprobs: int = 0            # and this many most likely alternatives

    @classmethod
    def parse(cls, **kw: Any) -> "SamplingParams":
        """Check every value; raise SamplingError naming the first bad one."""
        unknown = sorted(set(kw) - set(cls.__dataclass_fields__))
        if unknown:
            raise SamplingError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(cls.__dataclass_fields__)}")
        checked = {k: _CHECKS[k](k, v) for k, v in kw.items()}
        return cls(**checked)

    def as_dict(self) -> dict:
        return asdict(self)


def _number(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SamplingError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        raise SamplingError(f"{name} must be finite, got {v}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise SamplingError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return v


def _integer(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise SamplingError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise SamplingError(f"{name} must be in [{lo}, {hi}], got {v}")
    return int(v)


def _stop(name: str, v) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise SamplingError(f"{name} must be a string or a list of strings, got {type(v).__name__}")
    if len(items) > MAX_STOP_STRINGS:
        raise SamplingError(f"{name}: at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
    for s in items:
        if not isinstance(s, str):
            raise SamplingError(f"{name}: every stop must be a string, got {type(s).__name__} {s!r}")
        if not 0 < len(s) <= MAX_STOP_LEN:
            raise SamplingError(f"{name}: stop strings must be 1..{MAX_STOP_LEN} characters, "
                                f"got {len(s)}")
    return tuple(items)


def _in_range(name: str, v, r: Range):
    """Check v against its row of the one range table (ember.formats.protocol.SAMPLING_RANGES)."""
    if r.kind is int:
        return _integer(name, v, r.lo, r.hi)
    return _number(name, v, r.lo, r.hi, lo_open=r.lo_open)


def _stop_tokens(name: str, v) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise SamplingError(f"{name} must be a list of token ids, got {type(v).__name__}")
    if len(v) > MAX_STOP_TOKENS:
        raise SamplingError(f"{name}: at most {MAX_STOP_TOKENS} stop tokens, got {len(v)}")
    return tuple(_in_range(f"{name}[{i}]", t, STOP_TOKEN_ID) for i, t in enumerate(v))


def _flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise SamplingError(f"{name} must be true or false, got {type(v).__name__} {v!r}")
    return v


_CHECKS = {
    **{k: (lambda k, v, r=r: _in_range(k, v, r)) for k, r in SAMPLING_RANGES.items()},
    "seed": lambda k, v: None if v is None else _in_range(k, v, SAMPLING_RANGES["seed"]),
    "max_tokens": lambda k, v: _integer(k, v, 1, MAX_TOKENS_LIMIT),
    "stop": _stop,
    "stop_tokens": _stop_tokens,
    "ignore_eos": _flag,
    "logprobs": _flag,
}


# ---------------------------------------------------------------------------
# The chain: pure functions over a logits row
# ---------------------------------------------------------------------------

def apply_penalties(logits: np.ndarray, history: Iterable[int], p: SamplingParams) -> np.ndarray:
    """Penalized copy of logits (n_vocab,); only tokens in the window move."""
    out = np.array(logits, dtype=np.result_type(logits.dtype, np.float32))  # a copy
    hist = list(history)
    if p.penalty_last_n == 0 or not hist:
        return out
    window = hist if p.penalty_last_n < 0 else hist[-p.penalty_last_n:]
    ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
    ids_ok = (ids >= 0) & (ids < out.size)
    ids, counts = ids[ids_ok], counts[ids_ok]
    sel = out[ids]
    sel = np.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
    out[ids] = sel - counts * p.frequency_penalty - p.presence_penalty
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _top(ids: np.ndarray | None, vals: np.ndarray, k: int):
    """The k largest of vals (unordered), in O(n): argpartition instead of a full sort.
    ids None means vals is the whole vocabulary (ids are positions)."""
    if k >= vals.size:
        return ids, vals
    sel = np.argpartition(vals, vals.size - k)[vals.size - k:]
    return (sel if ids is None else ids[sel]), vals[sel]


def _mass(vals: np.ndarray, vmax: float) -> float:
    return float(np.exp(vals.astype(np.float64) - vmax).sum())


def _sorted(ids: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most likely first, equal logits in id order. (Exact ties straddling the top_k cut
    are resolved by argpartition, i.e. arbitrarily, as by llama.cpp's partial sort.)"""
    order = np.lexsort((ids, -vals))
    return ids[order], vals[order]


def filter_candidates(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """top_k -> top_p -> min_p. -> (ids, logits) of survivors, most likely first
    (in id order when no filter is on: sorting 150k logits per token buys nothing).

    Same result as sorting the whole vocabulary and cutting three prefixes in
    llama.cpp's order, without the O(n log n) sort of 150k logits per token:
    top_p and min_p both keep a *prefix* of the sorted candidates, so the
    survivors are the shorter of the two prefixes, and only candidates that
    can be in it are sorted. top_p's mass is normalized over the top_k set.
    """
    ids, vals = None, logits
    if 0 < p.top_k < logits.size:
        ids, vals = _top(ids, vals, p.top_k)
    vmax = float(vals.max())
    # float64: top_p's cut compares sums over up to 150k terms
    z = float(np.exp(vals.astype(np.float64) - vmax).sum())     # top_p's normalizer
    if p.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
        keep = vals >= vmax + math.log(p.min_p)
        ids = np.flatnonzero(keep) if ids is None else ids[keep]
        vals = vals[keep]
    if p.top_p < 1.0:
        k = 256  # grow a candidate set until it holds top_p of the mass: a superset of the prefix
        while k < vals.size and _mass(_top(ids, vals, k)[1], vmax) < p.top_p * z:
            k *= 8
        ids, vals = _top(ids, vals, k)
    if ids is None and p.top_p >= 1.0:  # no filter is on: draw in id order, unsorted
        return np.arange(vals.size), vals
    ids, vals = _sorted(np.arange(vals.size) if ids is None else ids, vals)
    if p.top_p < 1.0:
        cum = np.cumsum(np.exp(vals.astype(np.float64) - vmax)) / z
        # smallest prefix whose mass reaches top_p (at least one token)
        keep = int(np.searchsorted(cum, p.top_p, side="left")) + 1
        ids, vals = ids[:keep], vals[:keep]
    return ids, vals


@dataclass
class Choice:
    id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Per-request sampling state: RNG and penalty history. Not thread-safe; one per request."""

    def __init__(self, params: SamplingParams, history: Iterable[int] = ()):
        self.params = params
        self.seed = (params.seed if params.seed is not None
                     else int.from_bytes(os.urandom(8), "little"))
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.history: list[int] = list(history)

    def accept(self, token: int) -> None:
        """Record a token (prompt or generated) for the penalty window."""
        self.history.append(int(token))

    def sample(self, logits: np.ndarray) -> Choice:
        """Pick the next token from logits (n_vocab,). Does not accept it."""
        p = self.params
        x = apply_penalties(logits, self.history, p)
        if p.temperature <= 0.0:
            tok = int(np.argmax(x))
        else:
            ids, vals = filter_candidates(x, p)
            probs = _softmax(vals / p.temperature)
            tok = int(ids[self._draw(probs)])
        return self._with_logprobs(logits, tok)

    def _draw(self, probs: np.ndarray) -> int:
        """Inverse-CDF draw: one uniform number per token keeps the RNG stream simple."""
        u = self.rng.random()
        return min(int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right")),
                   probs.size - 1)

    def _with_logprobs(self, logits: np.ndarray, tok: int) -> Choice:
        p = self.params
        if not (p.logprobs or p.top_logprobs):
            return Choice(tok)
        x = logits.astype(np.float64)
        lse = np.max(x) + np.log(np.sum(np.exp(x - np.max(x))))
        top = []
        if p.top_logprobs:
            idx = np.argpartition(-x, p.top_logprobs - 1)[: p.top_logprobs]
            idx = idx[np.argsort(-x[idx], kind="stable")]
            top = [(int(i), float(x[i] - lse)) for i in idx]
        return Choice(tok, float(x[tok] - lse), top)


# ---------------------------------------------------------------------------
# Stop strings on the text stream
# ---------------------------------------------------------------------------

class StopMatcher:
    """Feed decoded text pieces; get back what is safe to emit.

    Text that ends with a proper prefix of some stop string is held back until
    the next piece shows whether the stop string completes. When it does,
    everything before it is emitted and the rest (the stop string and
    anything after it) is dropped.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self.held = ""
        self.stopped: str | None = None     # the stop string that matched

    def feed(self, piece: str) -> str:
        if self.stopped is not None:
            return ""
        text = self.held + piece
        hit = self._first_match(text)
        if hit is not None:
            at, s = hit
            self.stopped, self.held = s, ""
            return text[:at]
        keep = self._longest_partial(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """End of generation: whatever was held back is plain text after all."""
        out, self.held = ("" if self.stopped is not None else self.held), ""
        return out

    def _first_match(self, text: str) -> tuple[int, str] | None:
        hits = [(text.find(s), s) for s in self.stops if s in text]
        return min(hits) if hits else None

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
