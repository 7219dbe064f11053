"""The engine: load a model, turn prompts into streamed tokens. The stable surface.

    model = engine.load("model.gguf", backend="auto", n_ctx=None, threads=None)
    model.tokenize("Hello", add_special=True)       -> list[int]
    model.logits(tokens)                            -> float32 (len(tokens), n_vocab)
    for ev in model.generate("Once upon", max_tokens=32, temperature=0):
        ...  # TokenEvent(id, text, logprob, top_logprobs), then one Result
    model.embed(["a text", "another"])              -> float32 (2, n_embd)   (embedding models)

Design
------
`load` opens the GGUF (mapped, read-only), reads its ModelConfig, resolves the
backend through ember.plugins.registry.choose, and asks that backend for a
Runner whose KV cache is allocated once for n_ctx (default: min(n_ctx_train,
4096)). The tokenizer and the chat template come from the same file.

Generation is a class, `Generation`, stepped one token at a time by whoever
drives it (the `generate()` iterator for in-process use, the daemon's
scheduler for requests):

* `Model.start(prompt, **sampling)` checks everything up front — sampling
  values (SamplingError), an empty prompt (EmptyPrompt), prompt + max_tokens
  beyond n_ctx (ContextOverflow: ember refuses rather than truncating, so a
  reply is never silently cut or its prompt silently shortened) — and returns
  a Generation that has computed nothing yet.
* `gen.step()` computes and samples exactly one token and returns its
  TokenEvent, or None once finished; `gen.result` then holds the Result
  (stop reason "eos" | "stop" | "length" | "cancelled", usage, timings).
* `gen.cancel()` (any thread) is honoured before the next token.
* Preemption: the runner (and its one KV cache) belongs to whichever
  generation stepped last (`Model.owner`). A generation may be left alone
  (`gen.suspend()` just records it) while another request — or
  `Model.logits` — uses the runner. On its next `step()` it notices that it
  no longer owns the cache and re-prefills prompt + the tokens it generated
  so far in one batch, then continues. Its Sampler (RNG state and penalty
  window) and its text decoder live in the Generation, so the continuation
  equals an uninterrupted run (the re-prefilled logits equal the
  incrementally decoded ones to float rounding, KL <= 1e-6; tested).
  `gen.resume()` is optional: it does that re-prefill eagerly.

Text: token pieces go through the tokenizer's streaming decoder (which holds
back incomplete UTF-8) and then the StopMatcher (which holds back a possible
stop-string prefix). Every sampled token yields one event, including the
final end-of-generation token, whose event carries any held-back text; the
text of a stop string and of an EOS/EOT token is never emitted.

Embeddings: an encoder file (ModelConfig.encoder: bert) is an embedding model.
`Model.embed(texts)` tokenizes each text as llama.cpp does ([CLS] ... [SEP]),
runs the runner's `encode` (hidden states (T, n_embd), whole text at once),
pools them as the file's pooling_type says (mean, CLS = first, last) and
L2-normalises (normalize=False keeps the raw pooled vector). Pooling lives
here, once, so every backend only computes hidden states. Asking an embedding
model to generate, or a text-generation model to embed, raises ModelKindError.

Timings (ms, per generation): queue_ms = creation -> first compute;
ttft_ms = creation -> first token sampled (so it includes queue and
prefill); prefill_tok_s = prompt tokens / first prefill time; decode_tok_s =
one-token decode steps / time spent in them (re-prefills after a preemption
are counted separately as reprefill_ms).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ember.daemon.chat import ChatTemplate
from ember.daemon.sampling import Sampler, SamplingParams, StopMatcher
from ember.formats import gguf as gguf_format
from ember.formats.errors import UserError
from ember.formats.model_config import ModelConfig, config_from_gguf
from ember.plugins import registry
from ember.plugins.types import ContextOverflow, MemoryPlan, ModelKindError

DEFAULT_MAX_CTX = 4096
log = logging.getLogger("emberd.engine")


class EngineError(UserError, ValueError):
    """A request the engine cannot run as given; the message says why."""


class EmptyPrompt(EngineError):
    """The prompt has no tokens to condition on."""


class ModelChanged(RuntimeError):
    """The model file shrank under its map while the model computed (SIGBUS, repaired as
    zero pages by kernels/c/mapguard.c): that computation and every later one on this map
    are void. The daemon answers `model_changed` and stops serving the map."""


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------

@dataclass
class TokenEvent:
    id: int
    text: str                                  # text safe to show now (may be "")
    logprob: float | None = None               # log p(id) under the model, if asked
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Result:
    stop_reason: str                           # "eos" | "stop" | "length" | "cancelled"
    text: str                                  # everything emitted
    tokens: list[int]                          # every sampled token id
    usage: dict                                # prompt_tokens, completion_tokens
    timings: dict                              # queue_ms, ttft_ms, prefill_tok_s, decode_tok_s, ...
    seed: int                                  # the sampler's seed (reproduces the run)


@dataclass
class Embeddings:
    """What Model.encode returns: one vector per input, and the tokens it read."""

    vectors: np.ndarray                        # float32 (n_inputs, n_embd)
    usage: dict                                # prompt_tokens (all inputs), total_tokens
    timings: dict                              # compute_ms


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

# plan_at(n_ctx) -> the chosen backend's MemoryPlan; a Fit picks the n_ctx to load at
Fit = Callable[[Callable[[int], MemoryPlan], int], int]


def load(path: str | os.PathLike, backend: str = "auto", n_ctx: int | None = None,
         threads: int | None = None, options: dict | None = None, fit: Fit | None = None) -> "Model":
    """Open a GGUF model and load it on a backend: the one loading path of ember.

    open (mapped, read-only) -> ModelConfig -> choose the backend (registry) ->
    plan: `fit(plan_at, n_ctx)` may shrink the context or refuse (the daemon's
    memory budget) -> load through the registry, which calls the backend's
    owner plugin alone. Errors are typed and user-facing.
    """
    _check_positive("n_ctx", n_ctx)
    _check_positive("threads", threads)
    options = dict(options or {})
    f = gguf_format.open(path)
    try:
        config = config_from_gguf(f)
        name, why = registry.choose(backend, config)
        ctx = n_ctx or min(config.n_ctx_train, DEFAULT_MAX_CTX)
        if fit is not None:
            ctx = fit(lambda c: registry.plan(name, config, c, options), ctx)
        runner = registry.load(name, f, config, ctx, threads, options)
        return Model(path, f, config, runner, name, why)
    except BaseException:
        f.close()
        raise


def _check_positive(what: str, value) -> None:
    """n_ctx and threads: None (the default) or an int >= 1; checked here and nowhere else."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise EngineError(f"{what} must be a positive integer, got {value!r}")


def _map_guard(f):
    """A SIGBUS guard over the model's map: a truncated file reads as zeros and is counted."""
    from ember.kernels import _native   # imported on first load: kernels load lazily
    return _native.MapGuard(f.mapped())


def _load_tokenizer(f):
    from ember.formats.tokenizer import Tokenizer  # built on first use: a logits-only app never pays for it
    return Tokenizer.from_gguf(f)


def _token_text(tok, token_id: int | None) -> str:
    if token_id is None or token_id < 0:
        return ""
    return tok.token_to_piece(token_id, special=True).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class Model:
    """A loaded model: config, runner (one KV cache), tokenizer, chat template."""

    def __init__(self, path, gguf, config: ModelConfig, runner, backend: str, why: str = ""):
        self.path = os.fspath(path)
        self.gguf = gguf
        self.config = config
        self.runner = runner
        self.backend, self.backend_reason = backend, why
        self.n_ctx, self.n_vocab = runner.n_ctx, runner.n_vocab
        self.owner: Generation | None = None   # whose tokens the KV cache holds
        self.lock = threading.RLock()           # one computation at a time on the runner
        self._tokenizer = None
        self._chat: ChatTemplate | None = None
        self._guard = _map_guard(gguf)
        self._faults = 0                         # kept past close(), for `changed`

    # -- text -----------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.gguf)
        return self._tokenizer

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise EngineError(f"text must be a string, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special=add_special,
                                          parse_special=parse_special))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat is None:
            tok = self.tokenizer
            self._chat = ChatTemplate(self.gguf.metadata.get("tokenizer.chat_template"),
                                      bos_token=_token_text(tok, tok.bos_id),
                                      eos_token=_token_text(tok, tok.eos_id))
            if self._chat.is_fallback:   # built once per model, so this is said once
                log.info("%s has no tokenizer.chat_template: chat messages are rendered "
                         "with the ChatML fallback (<|im_start|>role ... <|im_end|>)",
                         os.path.basename(self.path))
        return self._chat

    def apply_chat(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the file's template and tokenize (special tokens parsed)."""
        text = self.chat_template.render(messages, add_generation_prompt)
        ids = self.tokenize(text, add_special=True, parse_special=True)
        bos = self.tokenizer.bos_id
        if len(ids) >= 2 and ids[0] == ids[1] == bos:  # the template wrote its own BOS
            ids = ids[1:]
        return ids

    def prompt_tokens(self, prompt: Any) -> list[int]:
        """str -> tokenized with BOS; list of {role, content} -> chat; list of ints -> as is."""
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_special=True) if prompt else []
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.apply_chat(list(prompt))
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = self._check_ids(prompt)
        else:
            raise EngineError(f"prompt must be a string, a list of messages or a list of token "
                              f"ids, got {type(prompt).__name__}")
        if not ids:
            raise EmptyPrompt("the prompt is empty: give at least one token of text")
        return ids

    def _check_ids(self, ids) -> list[int]:
        out = []
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise EngineError(f"token {i} is {type(t).__name__}, expected an int")
            if not 0 <= t < self.n_vocab:
                raise EngineError(f"token {i} = {t} is outside the vocabulary [0, {self.n_vocab})")
            out.append(int(t))
        return out

    # -- logits ---------------------------------------------------------------

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits float32 (len(tokens), n_vocab), from an empty cache."""
        if self.runner is None:
            raise EngineError("the model was closed")
        self.require("generation")
        ids = self._check_ids(tokens)
        if not ids:
            raise EmptyPrompt("logits() needs at least one token")
        if len(ids) > self.n_ctx:
            raise ContextOverflow(f"{len(ids)} tokens do not fit n_ctx {self.n_ctx}")
        with self.lock:
            self.owner = None
            self.runner.reset()
            logits = self.checked(self.runner.prefill(ids, all_logits=True))
            return np.asarray(logits, dtype=np.float32)

    # -- generation -----------------------------------------------------------

    def start(self, prompt: Any, created_at: float | None = None, **sampling) -> "Generation":
        """Check a request and return its Generation (nothing computed yet)."""
        self.require("generation")
        params = SamplingParams.parse(**sampling)
        ids = self.prompt_tokens(prompt)
        if len(ids) + params.max_tokens > self.n_ctx:
            raise ContextOverflow(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} exceeds the context of {self.n_ctx} tokens; "
                f"shorten the prompt or lower max_tokens")
        return Generation(self, ids, params, created_at)

    def generate(self, prompt: Any, **sampling) -> Iterator[TokenEvent | Result]:
        """Yield a TokenEvent per token, then the Result."""
        gen = self.start(prompt, **sampling)
        while (ev := gen.step()) is not None:
            yield ev
        yield gen.result

    @property
    def is_embedding(self) -> bool:
        """An encoder: it makes embeddings (embed), not text (generate)."""
        return self.config.encoder

    def require(self, kind: str) -> None:
        """Raise ModelKindError unless this model is of `kind`: "generation" | "embedding"."""
        name, arch = os.path.basename(self.path), self.config.arch
        if kind == "generation" and self.is_embedding:
            raise ModelKindError(
                f"{name} is an embedding model ({arch}): it cannot generate text or logits; "
                "use embed() (the `embed` op, POST /v1/embeddings)")
        if kind == "embedding" and not self.is_embedding:
            raise ModelKindError(
                f"{name} is a text-generation model ({arch}): it makes no embeddings; load an "
                "embedding model (a bert GGUF such as bge) to embed")

    # -- embeddings -------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], normalize: bool = True) -> np.ndarray:
        """One pooled vector per text: float32 (len(texts), n_embd); a str counts as one text."""
        return self.encode(texts, normalize).vectors

    def encode(self, inputs: Any, normalize: bool = True) -> Embeddings:
        """embed() with token counts and timing. Inputs: a str, or a list of strs and/or token
        id lists (taken as they are: no [CLS]/[SEP] added). Every input is checked before any
        is computed."""
        self.require("embedding")
        if self.runner is None:
            raise EngineError("the model was closed")
        seqs = [self._embed_ids(i, x) for i, x in enumerate(self._embed_inputs(inputs))]
        t0 = time.perf_counter()
        with self.lock:
            vectors = np.stack([self._pool(self.checked(self.runner.encode(ids)), normalize)
                                for ids in seqs])
        n = sum(map(len, seqs))
        return Embeddings(vectors, dict(prompt_tokens=n, total_tokens=n),
                          dict(compute_ms=(time.perf_counter() - t0) * 1e3))

    @staticmethod
    def _embed_inputs(inputs: Any) -> list:
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs
                                       and all(isinstance(t, (int, np.integer)) for t in inputs)):
            return [inputs]                     # one text, or one list of token ids
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise EngineError("embed() takes a string or a non-empty list of strings "
                              f"(or of token id lists), got {type(inputs).__name__}"
                              + (" of length 0" if isinstance(inputs, (list, tuple)) else ""))
        return list(inputs)

    def _embed_ids(self, i: int, x: Any) -> list[int]:
        if isinstance(x, str):
            ids = self.tokenize(x, add_special=True)
        elif isinstance(x, (list, tuple, np.ndarray)):
            ids = self._check_ids(x)
        else:
            raise EngineError(f"input {i} is {type(x).__name__}: expected a string or a list of "
                              "token ids")
        if not ids:
            raise EmptyPrompt(f"input {i} has no tokens")
        if len(ids) > self.runner.n_ctx:
            raise ContextOverflow(f"input {i} has {len(ids)} tokens; this embedding model reads "
                                  f"at most {self.runner.n_ctx}: split the text")
        return ids

    def _pool(self, hidden: np.ndarray, normalize: bool) -> np.ndarray:
        """hidden states (T, n_embd) -> (n_embd,) as the file's pooling_type says."""
        pooling = self.config.pooling
        v = (hidden.mean(axis=0, dtype=np.float64) if pooling == "mean"
             else hidden[0] if pooling == "cls" else hidden[-1]).astype(np.float32)
        if normalize:   # llama.cpp's embd_normalize 2: Euclidean; a zero vector stays zero
            norm = float(np.sqrt(np.sum(np.square(v, dtype=np.float64))))
            v = v / np.float32(norm) if norm > 0 else v
        return v

    def info(self) -> dict:
        """Facts the daemon reports in hello/status/models."""
        try:
            isa = registry.probe(self.backend).isa
        except Exception:  # noqa: BLE001 - informational only
            isa = None
        return {"model": os.path.basename(self.path), "path": os.path.abspath(self.path),
                "arch": self.config.arch, "n_ctx": self.n_ctx, "n_vocab": self.n_vocab,
                "backend": self.backend, "isa": isa,
                "kind": "embedding" if self.is_embedding else "generation",
                "n_embd": self.config.n_embd}

    def close(self) -> None:
        """Free the runner and unmap the file; safe to call twice."""
        with self.lock:
            if self.runner is None:
                return
            self.runner.close()
            self.runner, self.owner = None, None
            self._faults = self._guard.faults
            self._guard.close()
            self.gguf.close()

    # -- the mapped file ------------------------------------------------------------

    @property
    def changed(self) -> str | None:
        """Why this model's results can no longer be trusted, or None."""
        faults = self._guard.faults if self.runner is not None else self._faults
        if not faults:
            return None
        return (f"model {self.path} shrank under its map during a computation ({faults} "
                f"pages read past its end); reload it, and replace models by atomic rename")

    def checked(self, logits):
        """Logits of a runner call, unless the file shrank during it (ModelChanged)."""
        if (why := self.changed) is not None:
            raise ModelChanged(why)
        return logits

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# One request's generation, steppable and preemptible
# ---------------------------------------------------------------------------

class Generation:
    """State of one request: prompt, sampler, text decoder, tokens so far, timings."""

    def __init__(self, model: Model, prompt: list[int], params: SamplingParams,
                 created_at: float | None = None):
        self.model, self.prompt, self.params = model, prompt, params
        self.sampler = Sampler(params, history=prompt)
        self.generated: list[int] = []
        tok = model.tokenizer
        self._decoder = tok.stream_decoder()
        self._stops = StopMatcher(params.stop)
        self._stop_ids = set(params.stop_tokens)
        self._eog = (lambda t: False) if params.ignore_eos else tok.is_eog
        self._cached = 0                     # tokens of prompt+generated in the KV cache
        self._pending: np.ndarray | None = None  # logits computed by resume(), not yet sampled
        self._cancel = threading.Event()
        self._text: list[str] = []
        self.result: Result | None = None
        self.state = "pending"               # pending | running | suspended | done
        self.t_created = time.perf_counter() if created_at is None else created_at
        self._t = dict(start=None, first=None, prefill=0.0, decode=0.0, reprefill=0.0, n_decode=0)

    # -- control ----------------------------------------------------------------

    def cancel(self) -> None:
        """Stop before the next token (safe from any thread)."""
        self._cancel.set()

    def suspend(self) -> None:
        """Note that another request may use the runner; the next step re-prefills."""
        if self.state != "done":
            self.state = "suspended"

    def resume(self) -> None:
        """Rebuild the KV cache now (prompt + generated) instead of at the next step."""
        with self.model.lock:
            if self.state != "done" and not self._owns_cache():
                self._pending = self._reprefill()

    @property
    def done(self) -> bool:
        return self.result is not None

    # -- stepping -----------------------------------------------------------------

    def step(self) -> TokenEvent | None:
        """Compute and sample one token; None when the generation is over."""
        if self.result is not None:
            return None
        if self._cancel.is_set():
            self._finish("cancelled")
            return None
        with self.model.lock:
            if self.model.runner is None:
                raise EngineError("the model was closed; this generation cannot continue")
            logits = self._next_logits()
            choice = self.sampler.sample(logits)
        self.sampler.accept(choice.id)
        self.generated.append(choice.id)
        return self._emit(choice)

    def __iter__(self) -> Iterator[TokenEvent]:
        while (ev := self.step()) is not None:
            yield ev

    # -- internals ----------------------------------------------------------------

    def _owns_cache(self) -> bool:
        m = self.model
        return m.owner is self and m.runner.n_past == self._cached

    def _next_logits(self) -> np.ndarray:
        """Logits for the position after prompt + generated, computing what is missing."""
        t0 = time.perf_counter()
        if self._t["start"] is None:
            self._t["start"] = t0
        self.state = "running"
        seq = self.prompt + self.generated
        pending, self._pending = self._pending, None
        if not self._owns_cache():
            logits = self._reprefill()
        elif pending is not None:  # resume() already rebuilt the cache
            logits = pending
        else:  # exactly the last sampled token is not yet in the cache
            logits = self.model.checked(self.model.runner.decode(seq[-1]))
            self._cached += 1
            self._t["decode"] += time.perf_counter() - t0
            self._t["n_decode"] += 1
        return logits

    def _reprefill(self) -> np.ndarray:
        t0 = time.perf_counter()
        m, seq = self.model, self.prompt + self.generated
        m.owner = None
        m.runner.reset()
        logits = m.checked(m.runner.prefill(seq))
        m.owner, self._cached = self, len(seq)
        self._t["prefill" if not self.generated else "reprefill"] += time.perf_counter() - t0
        return logits

    def _emit(self, choice) -> TokenEvent:
        tok, p = choice.id, self.params
        if self._t["first"] is None:
            self._t["first"] = time.perf_counter()
        if tok in self._stop_ids or self._eog(tok):
            text = self._stops.feed(self._decoder.flush())  # the EOS's own text is dropped
            return self._final(choice, text + self._stops.flush(), "eos")
        text = self._stops.feed(self._decoder.feed(tok))
        if self._stops.stopped is not None:
            return self._final(choice, text, "stop")
        if len(self.generated) >= p.max_tokens:
            tail = self._stops.feed(self._decoder.flush())
            return self._final(choice, text + tail + self._stops.flush(), "length")
        self._text.append(text)
        return TokenEvent(tok, text, choice.logprob, choice.top_logprobs)

    def _final(self, choice, text: str, reason: str) -> TokenEvent:
        self._text.append(text)
        self._finish(reason)
        return TokenEvent(choice.id, text, choice.logprob, choice.top_logprobs)

    def _finish(self, reason: str) -> None:
        self.state = "done"
        t, now = self._t, time.perf_counter()
        n_prompt, n_gen = len(self.prompt), len(self.generated)
        start = t["start"] if t["start"] is not None else now
        timings = dict(
            queue_ms=(start - self.t_created) * 1e3,
            ttft_ms=((t["first"] or now) - self.t_created) * 1e3,
            prefill_ms=t["prefill"] * 1e3,
            prefill_tok_s=n_prompt / t["prefill"] if t["prefill"] > 0 else 0.0,
            decode_ms=t["decode"] * 1e3,
            decode_tok_s=t["n_decode"] / t["decode"] if t["decode"] > 0 else 0.0,
            reprefill_ms=t["reprefill"] * 1e3,
            total_ms=(now - self.t_created) * 1e3,
        )
        self.result = Result(reason, "".join(self._text), list(self.generated),
                             dict(prompt_tokens=n_prompt, completion_tokens=n_gen),
                             timings, self.sampler.seed)
