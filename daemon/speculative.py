"""Speculative decoding: guess several tokens cheaply, check them in one forward pass.

Design
------
Decoding one token reads every weight once; a forward pass over k+1 tokens
reads them once too and costs little more on bandwidth-bound hardware. So a
*drafter* proposes k tokens that likely follow the text so far, the target
model computes logits for [last token] + draft in one batched prefill, and
the sampler walks the k+1 rows left to right:

    row i predicts the token after draft[:i]
    accept draft[i] while the sampler agrees;  at the first disagreement the
    sampler's own pick is the correction;      if all k agree, row k adds one more

so every pass yields between 1 and k+1 tokens, and the KV cache is rolled
back (Runner.truncate) to drop the rejected positions. The last token chosen
is never in the cache, as after a plain decode step (engine.Generation's
invariant), so plain and speculative steps mix freely.

Why the output does not change:
* greedy (temperature 0): a draft token is accepted only if it *is* the
  argmax the plain loop would have taken at that position (penalties apply
  with the same history, token by token), so the text is identical as long
  as the batched logits equal the one-token ones (they do to float rounding,
  KL <= 1e-6, tested per backend).
* sampled: both drafters here are deterministic (a proposal q that is one
  token with certainty), and the standard acceptance rule (Leviathan et al.
  2023; Chen et al. 2023) with such a q is: accept d with probability p(d);
  on rejection draw from p with d removed and renormalised. The token's
  distribution is p(d) * [d] + (1 - p(d)) * (p - p(d)[d]) / (1 - p(d)) = p,
  exactly the plain sampler's (p: the whole chain — penalties, top-k/p,
  min-p, temperature). The random stream differs from a plain run's, so the
  same seed gives a different (equally distributed) text.

Drafters (`draft(seq, k) -> up to k token ids`):
* `PromptLookup` — no second model: find the latest earlier occurrence of the
  text's last n tokens (n = max_ngram .. min_ngram) in prompt + output and
  propose what followed it. Copy-heavy tasks (rewrite, extract, edit code)
  repeat long spans of the prompt.
* `DraftModel` — a small model with the same vocabulary decodes k tokens
  greedily. It keeps its own KV cache and re-syncs it to the target's text by
  the longest common prefix, so only the tokens it has not seen are fed.

Backends: anything with a batched `prefill(all_logits=True)` and `truncate`
works. A runner whose cache cannot go back (lfm2's convolution state) is
refused at set-up (`unsupported`); a sliding-window ring that cannot go back
far enough makes that one step fall back to a reset, and the next step
prefills again (correct, just slower).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ember.daemon.sampling import Choice, Sampler
from ember.formats.errors import UserError

# tokens per prompt-lookup draft: copied spans run long, and 15 + the last token make 16
# rows, the cpu backend's batched tile (VNNI matmul16): 16 rows cost ~3 one-token steps there
DEFAULT_DRAFT_LOOKUP = 15
DEFAULT_DRAFT_MODEL = 5       # tokens per draft-model draft: each costs a draft decode step
PROMPT_LOOKUP = "prompt-lookup"


class SpeculationError(UserError, ValueError):
    """Speculative decoding cannot be set up as asked; the message says why."""


class DraftMismatch(SpeculationError):
    """The draft model's vocabulary is not the target's: its token ids would mean other text."""


# ---------------------------------------------------------------------------
# Drafters
# ---------------------------------------------------------------------------

@dataclass
class Stats:
    """Cumulative over the drafter's life (reported in `status` and /metrics)."""
    steps: int = 0          # verification passes
    drafted: int = 0        # draft tokens proposed
    accepted: int = 0       # draft tokens the target agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class PromptLookup:
    """Draft by copying what followed the latest earlier match of the text's last n-gram."""

    name = PROMPT_LOOKUP

    # a 1-token match proposes whatever followed any earlier "the": mostly rejected drafts
    # whose verification still costs (SmolLM2-135M, bench/speculative.py: x2.2 -> x2.9)
    def __init__(self, n_draft: int = DEFAULT_DRAFT_LOOKUP, max_ngram: int = 4, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise SpeculationError(f"prompt lookup n-gram sizes must satisfy 1 <= min <= max, got "
                                   f"{min_ngram}..{max_ngram}")
        self.n_draft, self.max_ngram, self.min_ngram = n_draft, max_ngram, min_ngram
        self.stats = Stats()

    def draft(self, seq: Sequence[int], k: int) -> list[int]:
        s = np.asarray(seq, dtype=np.int64)                    # (n,)
        for n in range(min(self.max_ngram, s.size - 1), self.min_ngram - 1, -1):
            start = _latest_match(s, n)
            if start is not None:
                return s[start + n:start + n + k].tolist()
        return []

    def close(self) -> None:
        pass


def _latest_match(s: np.ndarray, n: int) -> int | None:
    """Start of the latest occurrence of s[-n:] in s that ends before s's last token."""
    tail = s[-n:]
    windows = np.lib.stride_tricks.sliding_window_view(s[:-1], n)   # (len - n, n)
    hits = np.flatnonzero((windows == tail).all(axis=1))
    return int(hits[-1]) if hits.size else None


class DraftModel:
    """Draft with a small model of the same vocabulary (greedy, its own KV cache)."""

    def __init__(self, target, draft, n_draft: int = DEFAULT_DRAFT_MODEL):
        check_same_vocab(target, draft)
        self.model = draft
        self.name = draft.path
        self.n_draft = n_draft
        self.stats = Stats()
        self._cached: list[int] = []      # the tokens in the draft runner's cache
        self._lock = threading.Lock()

    def draft(self, seq: Sequence[int], k: int) -> list[int]:
        k = min(k, self.model.n_ctx - len(seq))
        if k <= 0:
            return []
        with self._lock, self.model.lock:
            runner = self.model.runner
            logits = self._sync(runner, list(seq))
            out = [int(np.argmax(logits))]
            while len(out) < k:
                logits = runner.decode(out[-1])
                self._cached.append(out[-1])
                out.append(int(np.argmax(logits)))
            return out

    def _sync(self, runner, seq: list[int]) -> np.ndarray:
        """Bring the draft cache to seq; -> the logits after seq's last token."""
        keep = min(_common_prefix(self._cached, seq), len(seq) - 1)   # the last token is fed again
        try:
            runner.truncate(keep)
        except UserError:            # a ring or conv state that cannot go back: start over
            runner.reset()
            keep = 0
        self._cached = seq[:keep]
        logits = runner.prefill(seq[keep:])
        self._cached = list(seq)
        return logits

    def close(self) -> None:
        self.model.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def check_same_vocab(target, draft) -> None:
    """DraftMismatch unless both models map every token id to the same text."""
    def vocab(m):
        md = m.gguf.metadata
        return md.get("tokenizer.ggml.model"), list(md.get("tokenizer.ggml.tokens") or [])
    (t_kind, t_tokens), (d_kind, d_tokens) = vocab(target), vocab(draft)
    why = None
    if t_kind != d_kind:
        why = f"tokenizer {d_kind!r} vs the target's {t_kind!r}"
    elif len(t_tokens) != len(d_tokens):
        why = f"{len(d_tokens)} tokens vs the target's {len(t_tokens)}"
    elif t_tokens != d_tokens:
        i = next(i for i, (a, b) in enumerate(zip(t_tokens, d_tokens)) if a != b)
        why = f"token {i} is {d_tokens[i]!r}, the target's is {t_tokens[i]!r}"
    elif draft.n_vocab != target.n_vocab:
        why = f"{draft.n_vocab} logits per token vs the target's {target.n_vocab}"
    if why:
        raise DraftMismatch(f"draft model {draft.path} does not share the vocabulary of "
                            f"{target.path}: {why}; use a draft model from the same family "
                            f"(same tokenizer), or --draft prompt-lookup")


def unsupported(model) -> str | None:
    """Why speculation cannot run on this model, or None."""
    if model.config.encoder:
        return "it is an embedding model: it generates no text to speculate on"
    if "conv" in model.config.layer_kinds:
        return (f"{model.config.arch}'s convolution layers keep only their latest state, so "
                f"rejected draft tokens cannot be rolled back")
    return None


# ---------------------------------------------------------------------------
# Pacing: draft less often while drafts keep failing
# ---------------------------------------------------------------------------

MAX_BACKOFF = 16
PAYS = 2        # accepted drafts a pass needs to beat plain steps (16 rows ~ 3 steps on cpu)


class Pacing:
    """Per generation: after a pass that accepted fewer than PAYS drafts, skip drafting
    for 1, 2, 4 .. MAX_BACKOFF plain steps; a pass that pays resets it.

    A rejected draft still costs its verification (16 rows ~ 3 one-token steps on the cpu
    backend) and the draft model's steps. Free text (a story) matches a bigram of its
    prompt now and then and drafts what followed it there, almost always wrongly:
    SmolLM2-135M wrote 4 of 67 drafted tokens and decoded 0.9x plain. Backing off bounds
    that loss while copy-heavy text, which keeps being accepted, never waits.
    """

    def __init__(self):
        self.backoff = 0          # plain steps to skip after the next failure / 2
        self.skip = 0             # plain steps still to take before drafting again

    def due(self) -> bool:
        if self.skip:
            self.skip -= 1
            return False
        return True

    def record(self, accepted: int) -> None:
        if accepted >= PAYS:
            self.backoff = 0
        else:
            self.backoff = min(MAX_BACKOFF, max(1, 2 * self.backoff))
            self.skip = self.backoff


# ---------------------------------------------------------------------------
# Verification: the target's rows against the draft
# ---------------------------------------------------------------------------

def verify(sampler: Sampler, rows: np.ndarray, draft: Sequence[int]) -> list[Choice]:
    """Walk the target's logits rows (k+1, n_vocab) over draft (k,): the accepted draft
    tokens, then the correction or bonus token. Every returned token is accepted into the
    sampler's history (penalties see them in order, as in plain decoding)."""
    out: list[Choice] = []
    for i, row in enumerate(rows):
        d = draft[i] if i < len(draft) else None
        tok = _pick(sampler, row, d)
        sampler.accept(tok)
        out.append(sampler.choice(row, tok))
        if tok != d:
            break
    return out


def _pick(sampler: Sampler, row: np.ndarray, d: int | None) -> int:
    """The token at this position: d if the acceptance rule keeps it, else a fresh one."""
    if sampler.params.temperature <= 0.0 or d is None:   # greedy, or the bonus row
        return sampler.sample(row).id
    ids, probs = sampler.distribution(row)
    at = np.flatnonzero(ids == d)
    p_d = float(probs[at[0]]) if at.size else 0.0
    if sampler.rng.random() < p_d:
        return int(d)
    residual = probs.copy()              # p with d removed: what a rejection draws from
    if at.size:
        residual[at[0]] = 0.0
    return int(ids[sampler.draw(residual)])
