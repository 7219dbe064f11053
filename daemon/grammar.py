"""Constrained output: JSON Schema, any JSON object, a regex, or a llama.cpp GBNF grammar.

    vocab = grammar.vocabulary(tokenizer, n_vocab)        # once per model
    c = grammar.Constraint.compile(vocab, "json_schema", '{"type": "object", ...}')
    c.prefetch()                  # start the next token's mask on the mask thread
    logits = runner.decode(tok)   # ... while the forward pass runs
    allowed = c.mask()            # bool (n_vocab,): tokens that keep the output valid
    c.accept(token)               # after sampling

Design
------
The matching itself is llguidance's (the engine llama.cpp links for its own
`%llguidance` grammars): an Earley parser over a lexer, with a token trie, that
computes the set of allowed next tokens for a 150k vocabulary in tens of
microseconds and reads JSON Schema, regexes and Lark. llama.cpp's GBNF is
converted to Lark by llguidance's own converter. xgrammar and outlines-core
were not needed: llguidance covers all four request kinds, ships abi3 wheels
(x86_64, aarch64, macOS) without dependencies, and its limits (LLParserLimits)
let a request that is too large be refused with a message instead of eating
the device.

ember hands llguidance one table: the bytes each token id stands for in the
output (the tokenizer's own `token_to_piece`, so "▁the" is b" the"); control
tokens are marked with a leading 0xff byte, as llguidance expects, so that
text can never spell them. End of generation is any of the vocabulary's EOG
tokens: the mask allows them exactly when the output is complete.

The mask can be computed on one long-lived thread while the backend runs the
forward pass (llguidance drops the GIL, as the CPU kernels do), so its cost
hides behind compute: `prefetch()` before the runner call, `mask()` after it.
That pays only for masks dearer than the hand-off itself, so a constraint
measures its masks and prefetches only while they average above
`overlap_above_s`; the first mask always overlaps (with the prefill).
Preemption needs nothing: the matcher's state belongs to the Generation, not
to the KV cache.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ember.formats.errors import UserError

KINDS = ("json_schema", "json_object", "regex", "grammar")
# JSON whitespace as llama.cpp's json-schema-to-grammar allows it (SPACE_RULE): between
# tokens nothing, one space, or a newline and up to 20 spaces/tabs of indent. llguidance's
# default (any run of whitespace) lets a small model fill max_tokens with newlines
# (stories260K did, every time); no whitespace at all pushes a chat model off the
# pretty-printed JSON it was trained on (SmolLM2 wrote '{"":63,"":2,...'). A schema
# may still ask otherwise through "x-guidance".
JSON_DEFAULTS = {"whitespace_flexible": True, "whitespace_pattern": r"(?: |\n[ \t]{0,20})?"}
# Requests are untrusted: these bound what one grammar may ask of the parser. Lexer
# states cost 1-2 kB each, so 50k caps a request near 100 MB (llguidance's default, 250k,
# allows 500 MB: a server's number, not a Pi's); grammar size 200k symbols (default 500k).
# The fuel and item caps are llguidance's defaults, ~15 ms of work per token at most.
LIMITS = dict(max_grammar_size=200_000, max_lexer_states=50_000, initial_lexer_fuel=1_000_000,
              step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False)


class GrammarError(UserError, ValueError):
    """A constraint that does not parse, is too large, or cannot be met; the message says why."""


# ---------------------------------------------------------------------------
# The vocabulary llguidance matches against (built once per model)
# ---------------------------------------------------------------------------

class _TokenTable:
    """The duck type llguidance.TokenizerWrapper reads: token bytes, EOS, specials, encode."""

    def __init__(self, tok, n_vocab: int):
        control = [i for i in range(tok.n_vocab) if tok.is_control(i)]
        pieces = [tok.token_to_piece(i) for i in range(tok.n_vocab)]
        for i in control:   # 0xff + text: "a special token", never matched by output text
            pieces[i] = b"\xff" + tok.token_to_piece(i, special=True)
        pieces += [b""] * (n_vocab - tok.n_vocab)   # padding rows past the tokenizer's vocab
        self.tokens: list[bytes] = pieces[:n_vocab]  # (n_vocab,)
        self.special_token_ids = [i for i in control if i < n_vocab]
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids, default=0)
        self.bos_token_id = tok.bos_id
        self._tok = tok

    def __call__(self, text) -> list[int]:
        """Ids of text inside the output. No SentencePiece space prefix: llguidance reads
        one as "every token starts with a space" and would mask the output that way."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tok.encode(text, space_prefix=False))


def vocabulary(tok, n_vocab: int):
    """llguidance's LLTokenizer for this tokenizer, padded to the runner's n_vocab."""
    import llguidance
    table = _TokenTable(tok, n_vocab)
    eog = sorted(i for i in tok.eog_ids if i < n_vocab) or [table.eos_token_id]
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(table), n_vocab=n_vocab,
                                  eos_token=eog)


# ---------------------------------------------------------------------------
# Request text -> llguidance grammar
# ---------------------------------------------------------------------------

def to_grammar(kind: str, text: str) -> str:
    """The llguidance grammar for one request field; GrammarError when it does not parse."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_DEFAULTS)
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_DEFAULTS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "grammar":
        try:
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(text))
        except Exception as e:  # noqa: BLE001 - the converter raises its own error types
            raise GrammarError(f"grammar (GBNF) does not parse: {e}") from None
    raise GrammarError(f"unknown constraint kind {kind!r}; known: {', '.join(KINDS)}")


# ---------------------------------------------------------------------------
# One request's constraint
# ---------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _mask_thread() -> ThreadPoolExecutor:
    """The one thread that computes masks beside the forward pass (made on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-mask")
        return _pool


class Constraint:
    """An llguidance matcher plus the next token's mask, computed ahead on the mask thread
    when masks cost more than handing work to a thread does."""

    # A thread hand-off costs ~0.05 ms on a quiet machine and a scheduler quantum (ms) on a
    # loaded one, while most masks of a JSON schema take 0.01-0.2 ms (bench/grammar_overhead.py):
    # those are cheaper inline. Masks above this (large grammars, lexer-heavy steps, the
    # first mask of a big schema, which overlaps the prefill) go to the mask thread.
    overlap_above_s = 0.5e-3

    def __init__(self, matcher, n_vocab: int, kind: str):
        self.matcher, self.n_vocab, self.kind = matcher, n_vocab, kind
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)  # (n_words,) one bit per token
        self._next: Future | None = None
        self._cost = float("inf")        # seconds per mask, a running average; unknown at first

    @classmethod
    def compile(cls, vocab, kind: str, text: str) -> "Constraint":
        import llguidance
        grammar = to_grammar(kind, text)
        limits = llguidance.LLParserLimits(**LIMITS)
        matcher = llguidance.LLMatcher(vocab, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise GrammarError(f"{kind} cannot be used: {_one_line(matcher.get_error())}")
        return cls(matcher, vocab.vocab_size, kind)

    def prefetch(self) -> None:
        """Start the next token's mask on the mask thread (call before the forward pass),
        if masks have been costly enough to be worth it; else mask() computes it."""
        if self._next is None and self._cost > self.overlap_above_s:
            self._next = _mask_thread().submit(self._fill)

    def mask(self) -> np.ndarray:
        """bool (n_vocab,): the tokens allowed next (waits for prefetch(), if it started one)."""
        fut, self._next = self._next, None
        if fut is None:
            self._fill()
        else:
            fut.result()
        return self._allowed()

    def mask_now(self) -> np.ndarray:
        """mask(), computed on the calling thread (benchmarks: the cost without the hand-off)."""
        self._fill()
        return self._allowed()

    def _allowed(self) -> np.ndarray:
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.n_vocab]
        if not allowed.any():
            raise GrammarError(f"{self.kind}: no token can continue the output "
                               f"({_one_line(self.matcher.get_error()) or 'dead end'})")
        return allowed.view(bool)

    def accept(self, token: int) -> None:
        """Advance past a sampled token (one the last mask allowed)."""
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"{self.kind}: token {token} was refused: "
                               f"{_one_line(self.matcher.get_error())}")

    @property
    def finished(self) -> bool:
        """The output is complete: only end of generation may follow."""
        return self.matcher.is_stopped()

    def _fill(self) -> None:
        b, t0 = self._bits, time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(b.ctypes.data, b.nbytes)   # drops the GIL
        dt = time.perf_counter() - t0
        self._cost = dt if self._cost == float("inf") else 0.7 * self._cost + 0.3 * dt


def _one_line(msg: str) -> str:
    """llguidance's multi-line message (with a caret diagram) as one line, bounded."""
    text = " ".join(line.strip() for line in (msg or "").splitlines() if line.strip())
    return text if len(text) <= 400 else text[:400] + " ..."
