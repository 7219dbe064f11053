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
  beyond n_ctx (ContextOverflow, with the numbers: ember refuses rather than
  truncating, so a reply is never silently cut or its prompt silently
  shortened) — and returns a Generation that has computed nothing yet.
  Without max_tokens (or None) it runs to the end of the context (stop
  "length"); a prompt that fills the context is a ContextOverflow.
* `gen.advance()` does one piece of work: one prefill chunk (returns None,
  `gen.done` still False) or one token (returns its TokenEvent). Chunks are
  sized to take about PREFILL_CHUNK_S from the model's measured prefill
  rate, so whoever steps the generation (the scheduler) can cancel or
  preempt a long prefill within ~0.2 s. Chunk boundaries do not change the
  numbers (the cpu backend's rows are computed independently: bit-equal to
  one batch; tested). `gen.step()` advances until a token and returns its
  TokenEvent, or None once finished; `gen.result` then holds the Result
  (stop reason "eos" | "stop" | "length" | "cancelled", usage, timings).
* `gen.cancel()` (any thread) is honoured before the next token or chunk.
* The KV cache and the prompt cache: `Model.kv_tokens` records which tokens
  the runner's cache holds. A generation that does not own the cache
  (`Model.owner`) attaches first (`Model.attach`): it reuses the longest
  prefix of prompt + generated found in the live cache or in the prompt
  cache (daemon/promptcache.py: LRU host copies of earlier requests' caches,
  made only when another request is about to overwrite them), then
  prefills only the rest. `usage.cached_tokens` counts the prompt tokens so
  found. The prompt cache belongs to the Model: a new model (a reload)
  starts with its own.
* Preemption: the runner (and its one KV cache) belongs to whichever
  generation stepped last (`Model.owner`). A generation may be left alone
  (`gen.suspend()` just records it) while another request — or
  `Model.logits` — uses the runner. On its next step it notices that it no
  longer owns the cache, attaches (finding its own tokens in the prompt
  cache: a prefill preempted mid-way keeps its finished chunks) and
  prefills what is missing, then continues. Its Sampler (RNG state and
  penalty window) and its text decoder live in the Generation, so the
  continuation equals an uninterrupted run (the re-prefilled logits equal the
  incrementally decoded ones to float rounding, KL <= 1e-6; tested).
  `gen.resume()` is optional: it does that re-prefill eagerly.

Speculative decoding (`Model.set_draft`, daemon/speculative.py): once the
first token is out, a step may draft k tokens, verify them in one batched
prefill and queue every token that pass chose (accepted drafts + one); the
following steps hand those out without computing, one event each, so the
scheduler still acts between tokens. Rejected positions are truncated from
the KV cache, keeping the invariant that the last chosen token is not cached.

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

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ember.daemon import promptcache, speculative
from ember.daemon.chat import ChatTemplate
from ember.daemon.sampling import Sampler, SamplingParams, StopMatcher
from ember.formats import gguf as gguf_format
from ember.formats.errors import UserError
from ember.formats.model_config import ModelConfig, config_from_gguf
from ember.plugins import registry
from ember.plugins.types import CacheTooShort, ContextOverflow, MemoryPlan, ModelKindError

DEFAULT_MAX_CTX = 4096
PREFILL_CHUNK_S = 0.2      # a prefill chunk's target time: cancel and preemption act between chunks
FIRST_CHUNK = 16           # tokens in the first chunk, before the model's prefill rate is known
MIN_CHUNK = 8              # below this a chunk re-reads the weights for too few tokens (contended CPU)
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
         threads: int | None = None, options: dict | None = None, fit: Fit | None = None,
         cache_slots: int = promptcache.DEFAULT_SLOTS, cache_dir: str | None = None) -> "Model":
    """Open a GGUF model and load it on a backend: the one loading path of ember.

    open (mapped, read-only) -> ModelConfig -> choose the backend (registry) ->
    plan: `fit(plan_at, n_ctx)` may shrink the context or refuse (the daemon's
    memory budget) -> load through the registry, which calls the backend's
    owner plugin alone. Errors are typed and user-facing. cache_slots: KV
    states of earlier requests kept for prefix reuse (0: only the live cache);
    cache_dir: where they are saved at close and read back at load
    (Model.use_prompt_cache).
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
        model = Model(path, f, config, runner, name, why)
        model.use_prompt_cache(cache_slots, cache_dir)
        return model
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
        self.owner: Generation | None = None   # whose generation the KV cache is stepping
        self.kv_tokens: list[int] = []           # the tokens at the cache's positions [0, n_past)
        self.prompt_cache = promptcache.PromptCache(0)
        self.cache_dir: Path | None = None       # where prompt_cache is kept across restarts
        self.prefill_rate: float | None = None   # tokens/s of the last prefill chunk
        self.chunk_tokens: int | None = None     # fixed prefill chunks (None: by time)
        self.drafter = None                     # speculative decoding (set_draft), or None
        self.lock = threading.RLock()           # one computation at a time on the runner
        self._tokenizer = None
        self._chat: ChatTemplate | None = None
        self._grammar_vocab = None               # llguidance's token table, on first use
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
            self._vacate(ids)
            self.runner.reset()
            self.kv_tokens = []
            logits = self.checked(self.runner.prefill(ids, all_logits=True))
            self.kv_tokens = ids
            return np.asarray(logits, dtype=np.float32)

    # -- the KV cache: live, and the prompt cache -------------------------------

    def use_prompt_cache(self, slots: int, folder: str | os.PathLike | None = None) -> None:
        """Keep `slots` states of earlier requests (0: only the live cache), saved in `folder`."""
        if self.is_embedding:    # an encoder keeps no cache between texts
            slots = 0
        if slots and not hasattr(self.runner, "save_state"):
            log.info("prompt cache off: the %s backend cannot copy its KV cache; only the "
                     "live cache is reused (requests that extend the previous one)", self.backend)
            slots = 0
        self.prompt_cache = promptcache.PromptCache(slots)
        if folder is not None and slots:
            self.cache_dir = Path(folder) / promptcache.model_key(self.path, self.backend, self.n_ctx)
            if self.cache_dir.is_dir():
                n = self.prompt_cache.load(self.cache_dir)
                log.info("prompt cache: %d entries read from %s", n, self.cache_dir)

    def attach(self, seq: list[int]) -> int:
        """Make the cache hold the longest prefix of seq it can (at most len(seq) - 1
        tokens: the last one must be computed for its logits); -> that length.

        Caller holds the lock. Sources: the live cache (truncated in place) or a
        prompt-cache entry (loaded, then truncated). The live cache goes into the
        prompt cache first when this would overwrite tokens it holds."""
        want = np.asarray(seq[:-1], dtype=np.int32)
        live = promptcache.common_prefix(np.asarray(self.kv_tokens, dtype=np.int32), want)
        entry, n_entry = self.prompt_cache.best(want)
        if live < len(self.kv_tokens) or n_entry > live:
            self._vacate(seq)
        self.owner = None
        n = self._reuse(entry, n_entry) if n_entry > live else self._truncate(live)
        pc = self.prompt_cache
        pc.hits, pc.misses, pc.tokens_reused = pc.hits + (n > 0), pc.misses + (n == 0), pc.tokens_reused + n
        return n

    def _vacate(self, seq: list[int]) -> None:
        """Copy the live cache into the prompt cache unless seq extends it or a slot holds it."""
        kv = np.asarray(self.kv_tokens, dtype=np.int32)
        if (not self.prompt_cache.slots or len(kv) == 0
                or promptcache.common_prefix(kv, np.asarray(seq, dtype=np.int32)) == len(kv)
                or self.prompt_cache.holds(kv)):
            return
        try:
            state = self.runner.save_state()
        except MemoryError:      # the budget's cap on private memory (budget.cap_private)
            log.warning("prompt cache: no memory for a copy of %d positions; not kept", len(kv))
            return
        self.prompt_cache.put(kv, state)

    def _reuse(self, entry, n: int) -> int:
        try:
            self.runner.load_state(entry.state)
        except (ValueError, CacheTooShort) as e:   # a state of another layout (a stale file)
            log.warning("prompt cache: dropping an entry that does not load (%s)", e)
            self.prompt_cache.discard(entry)
            self.kv_tokens = []
            return self._truncate(0)
        self.prompt_cache.touch(entry)
        self.kv_tokens = entry.tokens.tolist()
        return self._truncate(n)

    def _truncate(self, n: int) -> int:
        """Keep the live cache's first n positions, or as many as a ring/conv cache allows."""
        try:
            self.runner.truncate(n)
        except CacheTooShort:
            self.runner.reset()
            n = 0
        self.kv_tokens = self.kv_tokens[:n]
        return n

    # -- generation -----------------------------------------------------------

    def start(self, prompt: Any, created_at: float | None = None, **sampling) -> "Generation":
        """Check a request and return its Generation (nothing computed yet)."""
        self.require("generation")
        until_full = sampling.get("max_tokens") is None
        if until_full:
            sampling.pop("max_tokens", None)
        params = SamplingParams.parse(**sampling)
        ids = self.prompt_tokens(prompt)
        if until_full:   # no max_tokens: run to the end of the context (stop "length")
            if len(ids) >= self.n_ctx:
                raise ContextOverflow(
                    f"the prompt ({len(ids)} tokens) fills the context of {self.n_ctx} tokens, "
                    f"leaving no room to generate; shorten the prompt")
            params = dataclasses.replace(params, max_tokens=self.n_ctx - len(ids))
        elif len(ids) + params.max_tokens > self.n_ctx:
            raise ContextOverflow(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} exceeds the context of {self.n_ctx} tokens; "
                f"shorten the prompt or lower max_tokens")
        return Generation(self, ids, params, created_at, self.constraint(params))

    def constraint(self, params: SamplingParams):
        """The compiled output constraint of a request (GrammarError if it is bad), or None."""
        if params.constraint is None:
            return None
        from ember.daemon import grammar   # llguidance loads on the first constrained request
        with self.lock:
            if self._grammar_vocab is None:
                self._grammar_vocab = grammar.vocabulary(self.tokenizer, self.n_vocab)
        return grammar.Constraint.compile(self._grammar_vocab, *params.constraint)

    def generate(self, prompt: Any, **sampling) -> Iterator[TokenEvent | Result]:
        """Yield a TokenEvent per token, then the Result."""
        gen = self.start(prompt, **sampling)
        while (ev := gen.step()) is not None:
            yield ev
        yield gen.result

    # -- speculative decoding ---------------------------------------------------

    def set_draft(self, spec: str | None, n_draft: int | None = None,
                  threads: int | None = None) -> None:
        """Speculate from now on: spec "prompt-lookup", a draft model's path (same
        vocabulary, loaded on this backend at this context), or None to stop."""
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        if not spec:
            return
        if (why := speculative.unsupported(self)) is not None:
            raise speculative.SpeculationError(f"speculative decoding is not available for "
                                               f"{os.path.basename(self.path)}: {why}")
        if n_draft is not None and (isinstance(n_draft, bool) or not isinstance(n_draft, int)
                                    or not 1 <= n_draft <= 64):
            raise speculative.SpeculationError(f"draft length must be an integer in [1, 64], "
                                               f"got {n_draft!r}")
        if spec == speculative.PROMPT_LOOKUP:
            self.drafter = speculative.PromptLookup(n_draft or speculative.DEFAULT_DRAFT_LOOKUP)
            return
        draft = load(spec, backend=self.backend, n_ctx=self.n_ctx, threads=threads)
        try:
            self.drafter = speculative.DraftModel(self, draft,
                                                  n_draft or speculative.DEFAULT_DRAFT_MODEL)
        except BaseException:
            draft.close()
            raise

    def speculation(self) -> dict | None:
        """Acceptance so far (status, /metrics), or None when not speculating."""
        d = self.drafter
        if d is None:
            return None
        return {"draft": d.name, "n_draft": d.n_draft, "steps": d.stats.steps,
                "drafted": d.stats.drafted, "accepted": d.stats.accepted,
                "acceptance_rate": round(d.stats.acceptance_rate, 4)}

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
            self._save_prompt_cache()
            if self.drafter is not None:
                self.drafter.close()
                self.drafter = None
            self.runner.close()
            self.runner, self.owner = None, None
            self._faults = self._guard.faults
            self._guard.close()
            self.gguf.close()

    def _save_prompt_cache(self) -> None:
        if self.cache_dir is None or self.changed is not None:
            return
        self._vacate([])
        try:
            n = self.prompt_cache.save(self.cache_dir)
            log.info("prompt cache: %d entries saved to %s", n, self.cache_dir)
        except OSError as e:
            log.warning("prompt cache: cannot save to %s: %s", self.cache_dir, e)

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
                 created_at: float | None = None, constraint=None):
        self.model, self.prompt, self.params = model, prompt, params
        self.sampler = Sampler(params, history=prompt)
        self.constraint = constraint             # grammar.Constraint | None
        self.generated: list[int] = []
        tok = model.tokenizer
        self._decoder = tok.stream_decoder()
        self._stops = StopMatcher(params.stop)
        self._stop_ids = set(params.stop_tokens)
        # a grammar allows end of generation only once the output is complete
        self._eog = (lambda t: False) if params.ignore_eos and not constraint else tok.is_eog
        self._cached = 0                     # tokens of prompt+generated in the KV cache
        self._prefilling = True              # attached, and tokens before the last not all cached
        self.cached_tokens: int | None = None  # prompt tokens found in the cache at the start
        self._pending: np.ndarray | None = None  # logits computed by resume(), not yet sampled
        self._queue: list = []               # Choices verified by one speculative pass, not yet emitted
        self._pacing = speculative.Pacing()   # when to draft (backs off after failed drafts)
        self._cancel = threading.Event()
        self._text: list[str] = []
        self.result: Result | None = None
        self.state = "pending"               # pending | running | suspended | done
        self.t_created = time.perf_counter() if created_at is None else created_at
        self._t = dict(start=None, first=None, prefill=0.0, decode=0.0, reprefill=0.0, n_decode=0,
                       drafted=0, accepted=0)

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
            # tokens still queued are already chosen: the rebuild waits until they are out
            if self.state != "done" and not self._queue and not self._owns_cache():
                while (logits := self._compute()) is None:
                    pass
                self._pending = logits

    @property
    def done(self) -> bool:
        return self.result is not None

    # -- stepping -----------------------------------------------------------------

    def step(self) -> TokenEvent | None:
        """Compute and sample one token (all of a prefill first); None when it is over."""
        while (ev := self.advance()) is None and not self.done:
            pass
        return ev

    def advance(self) -> TokenEvent | None:
        """One piece of work: one prefill chunk (-> None, `done` still False) or one token
        (-> its event). None with `done` set: the generation is over. The scheduler calls
        this, so cancel, deadlines and preemption act between prefill chunks too."""
        if self.result is not None:
            return None
        if self._cancel.is_set():
            self._finish("cancelled")
            return None
        if not self._queue:
            with self.model.lock:
                if self.model.runner is None:
                    raise EngineError("the model was closed; this generation cannot continue")
                self._queue = self._speculate() or self._one()
            if not self._queue:
                return None                 # a prefill chunk: more of the prompt to go
        choice = self._queue.pop(0)
        self.generated.append(choice.id)
        return self._emit(choice)

    def __iter__(self) -> Iterator[TokenEvent]:
        while (ev := self.step()) is not None:
            yield ev

    # -- internals ----------------------------------------------------------------

    def _one(self) -> list:
        """Plain decoding: one token from the next logits (within the grammar, if any)."""
        c = self.constraint
        if c is not None:
            c.prefetch()                  # the mask computes while the forward pass runs
        logits = self._compute()
        if logits is None:
            return []
        choice = self.sampler.sample(logits, None if c is None else c.mask())
        self.sampler.accept(choice.id)
        if c is not None:
            c.accept(choice.id)
        return [choice]

    def _speculate(self) -> list:
        """Draft, verify in one batch, roll back the rejected positions (see
        daemon/speculative.py); [] when a plain step is due instead."""
        m, d = self.model, self.model.drafter
        # a grammar masks each token from the ones before it: constrained output decodes plainly
        if (d is None or self.constraint is not None or not self.generated or self._prefilling
                or self._pending is not None or not self._owns_cache()):
            return []
        if not self._pacing.due():
            return []
        seq = self.prompt + self.generated
        # room: the k+1 tokens stay within max_tokens; the k written positions within n_ctx
        k = min(d.n_draft, self.params.max_tokens - len(self.generated) - 1, m.n_ctx - len(seq))
        t0 = time.perf_counter()                  # drafting is part of the decode cost
        draft = d.draft(seq, k) if k > 0 else []
        if not draft:
            self._t["decode"] += time.perf_counter() - t0
            return []
        rows = self._run(lambda ids: m.runner.prefill(ids, all_logits=True),
                         [seq[-1], *draft])                                 # (k+1, n_vocab)
        choices = speculative.verify(self.sampler, rows, draft)
        self._rollback(len(seq) + len(choices) - 1)
        self._pacing.record(len(choices) - 1)
        d.stats.steps += 1
        d.stats.drafted += len(draft)
        d.stats.accepted += len(choices) - 1
        t = self._t
        t["decode"] += time.perf_counter() - t0
        t["n_decode"] += len(choices)
        t["drafted"] += len(draft)
        t["accepted"] += len(choices) - 1
        return choices

    def _rollback(self, n_keep: int) -> None:
        """Keep the cache's first n_keep positions (the rejected drafts go)."""
        m = self.model
        try:
            m.runner.truncate(n_keep)
            self._cached = n_keep
            del m.kv_tokens[n_keep:]
        except CacheTooShort:        # a ring that cannot go back: the next step prefills again
            m.runner.reset()
            m.owner, m.kv_tokens = None, []

    def _owns_cache(self) -> bool:
        m = self.model
        return m.owner is self and m.runner.n_past == self._cached

    def _compute(self) -> np.ndarray | None:
        """Logits for the position after prompt + generated, or None after a prefill
        chunk that leaves more to prefill."""
        if self._t["start"] is None:
            self._t["start"] = time.perf_counter()
        self.state = "running"
        seq = self.prompt + self.generated
        pending, self._pending = self._pending, None
        if not self._owns_cache():
            self._attach(seq)
        elif pending is not None:  # resume() already rebuilt the cache
            return pending
        if self._prefilling:
            return self._prefill_chunk(seq)
        return self._decode(seq[-1])

    def _attach(self, seq: list[int]) -> None:
        """Take the runner: reuse the longest cached prefix of seq, prefill the rest."""
        m = self.model
        n = m.attach(seq)
        if self.cached_tokens is None:     # what the request's own prompt found cached
            self.cached_tokens = min(n, len(self.prompt))
        m.owner, self._cached, self._prefilling = self, n, True

    def _prefill_chunk(self, seq: list[int]) -> np.ndarray | None:
        m, t0 = self.model, time.perf_counter()
        ids = seq[self._cached:self._cached + self._chunk(len(seq) - self._cached)]
        logits = self._run(m.runner.prefill, ids)
        self._cached += len(ids)
        dt = time.perf_counter() - t0
        if len(ids) >= FIRST_CHUNK // 2:   # a short tail chunk says little about the rate
            m.prefill_rate = len(ids) / max(dt, 1e-6)
        self._t["prefill" if not self.generated else "reprefill"] += dt
        if self._cached < len(seq):
            return None
        self._prefilling = False
        return logits

    def _chunk(self, rest: int) -> int:
        """Tokens in the next chunk: Model.chunk_tokens if set, else as many as the last
        chunks' rate runs in PREFILL_CHUNK_S."""
        m = self.model
        if m.chunk_tokens is not None:
            return min(rest, m.chunk_tokens)
        if m.prefill_rate is None:
            return min(rest, FIRST_CHUNK)
        return min(rest, max(MIN_CHUNK, int(m.prefill_rate * PREFILL_CHUNK_S)))

    def _decode(self, token: int) -> np.ndarray:
        """Exactly the last sampled token is not yet in the cache."""
        t0 = time.perf_counter()
        logits = self._run(lambda ids: self.model.runner.decode(ids[0]), [token])
        self._cached += 1
        self._t["decode"] += time.perf_counter() - t0
        self._t["n_decode"] += 1
        return logits

    def _run(self, call, ids: list[int]) -> np.ndarray:
        """A runner call that appends ids; the model's record of the cache follows it."""
        m = self.model
        try:
            logits = m.checked(call(ids))
        except BaseException:
            m.owner, m.kv_tokens = None, []     # the cache's contents are unknown now
            m.runner.reset()
            raise
        m.kv_tokens.extend(ids)
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
            draft_tokens=t["drafted"],
            draft_accepted=t["accepted"],
            total_ms=(now - self.t_created) * 1e3,
        )
        self.result = Result(reason, "".join(self._text), list(self.generated),
                             dict(prompt_tokens=n_prompt, completion_tokens=n_gen,
                                  cached_tokens=self.cached_tokens or 0),
                             timings, self.sampler.seed)
