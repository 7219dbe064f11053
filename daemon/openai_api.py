"""OpenAI's HTTP API shapes <-> ember generations: request checks, reply objects, errors.

Design. This module is pure data in, data out: no sockets, no aiohttp, no
threads. The HTTP gateway (daemon/http.py) reads a JSON body, calls
`parse(kind, body, ...)` to get a checked `Call`, submits it to the
scheduler as a job, and renders what the worker produces with a `Reply`
(stream chunks, or one whole object). Keeping the two apart lets the request
rules be tested without a daemon and keeps the gateway a thin loop.

Field values are checked by ember.formats.protocol's checkers — the same
functions the ZeroMQ front door uses — so a limit means the same on both
doors (max_tokens cap, stop strings, prompt bytes, penalty ranges). OpenAI
names map onto ember's sampling keywords in FIELDS; an unknown field, `n`
other than 1, tools, or any other feature ember does not do is a 400 in
OpenAI's error shape, never silently ignored. `null` means "not given", as
many clients send it for optional fields.

Defaults are ember's (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05,
max_tokens 256 capped by the daemon), like llama.cpp's server, not OpenAI's
(temperature 1, top_p 1, no cap): the same request gives the same text on
both of emberd's front doors.
"""
from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ember.formats import protocol
from ember.formats.protocol import Limits, ProtocolError

# ---------------------------------------------------------------------------
# Errors: OpenAI's {"error": {message, type, param, code}} with an HTTP status
# ---------------------------------------------------------------------------

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request answered with an OpenAI-shaped error and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# ember error codes (protocol checks, scheduler, engine) -> (HTTP status, OpenAI code)
STATUS_OF = {
    "bad_request": (400, None),
    "context_overflow": (400, "context_length_exceeded"),
    "too_large": (413, "too_large"),
    "busy": (429, "busy"),
    "cancelled": (503, "draining"),
    "deadline_exceeded": (503, "deadline_exceeded"),
    "not_loaded": (503, "not_loaded"),
    "internal": (500, None),
}


def from_ember(code: str, message: str, param: str | None = None) -> ApiError:
    status, api_code = STATUS_OF.get(code, (500, code))
    return ApiError(status, message, param, api_code)


# ---------------------------------------------------------------------------
# Requests: the checked form of one call
# ---------------------------------------------------------------------------

@dataclass
class Call:
    """One checked /v1/chat/completions or /v1/completions request."""

    kind: str                         # "chat" | "completion"
    model: str
    source: Any                       # prompt str | token ids list | chat messages list
    sampling: dict                    # engine sampling keywords, max_tokens included
    stream: bool = False
    include_usage: bool = False       # stream_options.include_usage
    top_logprobs: int | None = None   # None: no logprobs; k >= 0: logprobs with k alternatives
    user: str | None = None


def _sampling(protocol_name: str) -> Callable:
    """A field that maps straight onto a protocol sampling checker."""
    check = protocol.GENERATE[protocol_name]
    return lambda name, x, limits: {protocol_name: check(name, x, limits)}


def _max_tokens(name, x, limits):
    return {"max_tokens": protocol.max_tokens(name, x, limits)}


def _stream(name, x, limits):
    return {"stream": protocol.boolean(name, x, limits)}


def _bad(name: str, why: str) -> ApiError:
    return ApiError(400, f"field '{name}' {why}", name)


def _stream_options(name, x, limits):
    if not isinstance(x, dict) or set(x) - {"include_usage"}:
        raise _bad(name, "must be an object with at most 'include_usage'")
    return {"include_usage": protocol.boolean(f"{name}.include_usage", x.get("include_usage", False),
                                              limits)}


def _user(name, x, limits):
    return {"user": protocol.text("max_stop_bytes")(name, x, limits)}


def _n(name, x, limits):
    if protocol.integer(1, 1 << 20)(name, x, limits) != 1:
        raise ApiError(400, "n > 1 is not supported: ember makes one completion per request; "
                            "send several requests instead", name, "unsupported_parameter")
    return {}


def _refused(why: str) -> Callable:
    def check(name, x, limits):
        raise ApiError(400, f"'{name}' is not supported: {why}", name, "unsupported_parameter")
    return check


def _only(value, why: str) -> Callable:
    """A field accepted only at its default (e.g. echo=false)."""
    def check(name, x, limits):
        if x != value or type(x) is not type(value):
            raise ApiError(400, f"'{name}' must be {value!r}: {why}", name, "unsupported_parameter")
        return {}
    return check


def _response_format(name, x, limits):
    if not isinstance(x, dict) or x.get("type") != "text" or len(x) != 1:
        raise ApiError(400, f"'{name}' supports only {{\"type\": \"text\"}}: ember has no JSON mode",
                       name, "unsupported_parameter")
    return {}


def _messages(name, x, limits):
    if isinstance(x, list):
        x = [_flat_message(f"{name}[{i}]", m) for i, m in enumerate(x)]
    return {"source": protocol.chat_messages(name, x, limits)}


def _flat_message(name: str, m):
    """OpenAI content parts [{type: text, text}] -> one string; other parts are refused."""
    if not isinstance(m, dict) or not isinstance(m.get("content"), list):
        return m
    texts = []
    for i, part in enumerate(m["content"]):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"'{name}.content[{i}]' must be a text part "
                                "({\"type\": \"text\", \"text\": ...}); ember reads text only",
                           f"{name}.content", "unsupported_content")
        texts.append(part["text"])
    return {**m, "content": "".join(texts)}


def _prompt(name, x, limits):
    if isinstance(x, list) and len(x) == 1 and isinstance(x[0], str):
        x = x[0]                                   # a batch of one prompt
    if isinstance(x, str):
        return {"source": protocol.text("max_prompt_bytes", allow_empty=False)(name, x, limits)}
    if isinstance(x, list) and x and all(type(t) is int for t in x):
        if len(x) > limits.max_prompt_tokens:
            raise ProtocolError("too_large", f"'{name}' has {len(x)} tokens, limit {limits.max_prompt_tokens}")
        if min(x) < 0:
            raise _bad(name, "token ids must be non-negative")
        return {"source": list(x)}
    raise _bad(name, "must be a non-empty string, a list of one string, or a list of "
                              "token ids (batches of prompts are not supported: send one request each)")


def _chat_logprobs(name, x, limits):
    return {"logprobs": protocol.boolean(name, x, limits)}


def _chat_top_logprobs(name, x, limits):
    return {"top_logprobs": protocol.integer(0, 20)(name, x, limits)}


def _completion_logprobs(name, x, limits):
    return {"logprobs": True, "top_logprobs": protocol.integer(0, 5)(name, x, limits)}


TOOLS_WHY = "ember serves plain text generation (no tool or function calling)"

COMMON: dict[str, Callable] = {
    "stream": _stream,
    "stream_options": _stream_options,
    "max_tokens": _max_tokens,
    "temperature": _sampling("temperature"),
    "top_p": _sampling("top_p"),
    "stop": _sampling("stop"),
    "seed": _sampling("seed"),
    "presence_penalty": _sampling("presence_penalty"),
    "frequency_penalty": _sampling("frequency_penalty"),
    "user": _user,
    "n": _n,
    # ember / llama.cpp extensions
    "top_k": _sampling("top_k"),
    "min_p": _sampling("min_p"),
    "repeat_penalty": _sampling("repeat_penalty"),
    "ignore_eos": _sampling("ignore_eos"),
}
FIELDS: dict[str, dict[str, Callable]] = {
    "chat": {**COMMON,
             "messages": _messages,
             "max_completion_tokens": _max_tokens,
             "logprobs": _chat_logprobs,
             "top_logprobs": _chat_top_logprobs,
             "response_format": _response_format,
             "tools": _refused(TOOLS_WHY), "tool_choice": _refused(TOOLS_WHY),
             "functions": _refused(TOOLS_WHY), "function_call": _refused(TOOLS_WHY),
             "parallel_tool_calls": _refused(TOOLS_WHY),
             "logit_bias": _refused("ember does not bias logits")},
    "completion": {**COMMON,
                   "prompt": _prompt,
                   "logprobs": _completion_logprobs,
                   "echo": _only(False, "ember does not echo the prompt"),
                   "best_of": _only(1, "ember makes one completion per request"),
                   "suffix": _refused("ember does not do fill-in-the-middle"),
                   "logit_bias": _refused("ember does not bias logits")},
}
REQUIRED = {"chat": "messages", "completion": "prompt"}


def parse(kind: str, body: Any, models: Callable[[str], bool], limits: Limits) -> Call:
    """Check a decoded JSON body; raise ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    fields = FIELDS[kind]
    for name in body:
        if name not in fields and name != "model":
            name = clip(name)                  # echoed back: never the client's megabyte
            raise ApiError(400, f"unknown field '{name}' for /v1/{_route(kind)}; known: "
                                f"model, {', '.join(fields)}", name, "unknown_parameter")
    model = check_model(body, models)
    required = REQUIRED[kind]
    if body.get(required) is None:
        raise ApiError(400, f"'{required}' is required", required, "missing_required_parameter")
    got: dict = {}
    for name, x in body.items():
        if name == "model" or x is None:
            continue
        try:
            got.update(fields[name](name, x, limits))
        except ProtocolError as e:
            raise from_ember(e.code, e.message, name) from None
    return _call(kind, model, got, limits)


def _route(kind: str) -> str:
    return "chat/completions" if kind == "chat" else "completions"


def check_model(body: dict, models: Callable[[str], bool]) -> str:
    """The request's `model`, which must name the served model (404 otherwise)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a model id from GET /v1/models", "model",
                       "missing_required_parameter")
    if not models(model):
        raise ApiError(404, f"the model '{clip(model)}' does not exist here; GET /v1/models lists "
                            "the model this daemon serves", "model", "model_not_found")
    return model


def clip(text: str, n: int = 100) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _call(kind: str, model: str, got: dict, limits: Limits) -> Call:
    stream = got.pop("stream", False)
    include_usage = got.pop("include_usage", None)
    if include_usage is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with stream: true", "stream_options")
    user = got.pop("user", None)
    top = got.get("top_logprobs")
    if kind == "chat" and top is not None and not got.get("logprobs"):
        raise ApiError(400, "'top_logprobs' needs logprobs: true", "top_logprobs")
    source = got.pop("source")
    got.setdefault("max_tokens", min(256, limits.max_tokens))
    wants = got.get("logprobs", False)
    return Call(kind, model, source, got, stream, bool(include_usage), (top or 0) if wants else None,
                user)


# ---------------------------------------------------------------------------
# Replies: chunks while streaming, or one whole object
# ---------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def finish_reason(stop: str) -> str:
    return FINISH.get(stop, "stop")


def usage(result) -> dict:
    p = int(result.usage.get("prompt_tokens", 0))
    c = int(result.usage.get("completion_tokens", len(result.tokens)))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@dataclass
class Reply:
    """Renders one call's tokens as OpenAI objects. `piece(id) -> bytes` is the token's own text."""

    call: Call
    piece: Callable[[int], bytes]
    fingerprint: str
    model: str                        # the served model's id (what GET /v1/models lists)
    id: str = ""
    created: int = 0
    offset: int = 0                   # completions logprobs: text offset of the next token
    _logprobs: list = field(default_factory=list)   # the whole reply's per-token entries

    def __post_init__(self):
        prefix = "chatcmpl" if self.call.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    # -- streaming ----------------------------------------------------------------

    def role_chunk(self) -> dict | None:
        """Chat streams open with the assistant role (as OpenAI's do); completions don't."""
        if self.call.kind != "chat":
            return None
        return self._chunk({"role": "assistant", "content": ""}, None, None)

    def token_chunk(self, ev) -> dict | None:
        """The chunk for one token event; None when it carries nothing to show."""
        lp = self._logprob(ev)
        if not ev.text and lp is None:
            return None                # held-back text (partial UTF-8, a possible stop string)
        body = {"content": ev.text} if self.call.kind == "chat" else ev.text
        return self._chunk(body, lp, None)

    def final_chunk(self, stop: str) -> dict:
        body = {} if self.call.kind == "chat" else ""
        return self._chunk(body, None, finish_reason(stop))

    def usage_chunk(self, result) -> dict:
        return {**self._head("chunk"), "choices": [], "usage": usage(result)}

    def _chunk(self, body, logprobs, finish: str | None) -> dict:
        choice = {"index": 0, ("delta" if self.call.kind == "chat" else "text"): body,
                  "logprobs": logprobs, "finish_reason": finish}
        out = {**self._head("chunk"), "choices": [choice]}
        if self.call.include_usage:
            out["usage"] = None        # OpenAI: every chunk but the last carries usage: null
        return out

    def _head(self, what: str) -> dict:
        obj = {("chat", "chunk"): "chat.completion.chunk", ("chat", "whole"): "chat.completion",
               ("completion", "chunk"): "text_completion",
               ("completion", "whole"): "text_completion"}[(self.call.kind, what)]
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    # -- whole ----------------------------------------------------------------------

    def whole(self, result, stop: str, events: list) -> dict:
        """The non-streamed object, from the result and every token event."""
        for ev in events:
            self._logprob(ev)
        lp = self._merged() if self.call.top_logprobs is not None else None
        if self.call.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "logprobs": lp, "finish_reason": finish_reason(stop)}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": lp,
                      "finish_reason": finish_reason(stop)}
        return {**self._head("whole"), "choices": [choice], "usage": usage(result)}

    # -- logprobs ---------------------------------------------------------------------

    def _logprob(self, ev) -> dict | None:
        """This token's logprobs entry (chat or completions shape), remembered for `whole`."""
        if self.call.top_logprobs is None or ev.logprob is None:
            return None
        text = self._text(ev.id)
        alts = [(self._text(t), float(lp), t) for t, lp in ev.top_logprobs[:self.call.top_logprobs]]
        if self.call.kind == "chat":
            entry = {"token": text, "logprob": float(ev.logprob), "bytes": list(self.piece(ev.id)),
                     "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(self.piece(t))}
                                      for s, lp, t in alts]}
            self._logprobs.append(entry)
            return {"content": [entry]}
        entry = {"tokens": [text], "token_logprobs": [float(ev.logprob)],
                 "top_logprobs": [{s: lp for s, lp, _ in alts}], "text_offset": [self.offset]}
        self.offset += len(ev.text)
        self._logprobs.append(entry)
        return entry

    def _merged(self) -> dict:
        if self.call.kind == "chat":
            return {"content": list(self._logprobs)}
        return {k: [v for e in self._logprobs for v in e[k]]
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}

    def _text(self, tid: int) -> str:
        return self.piece(int(tid)).decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Embeddings: POST /v1/embeddings
# ---------------------------------------------------------------------------

@dataclass
class EmbedCall:
    """One checked /v1/embeddings request."""

    model: str
    inputs: list                      # texts, or token id lists (taken as they are)
    base64: bool = False              # encoding_format "base64": little-endian float32 bytes
    user: str | None = None


ENCODING_FORMATS = ("float", "base64")


def _embed_input(name: str, x, limits: Limits) -> list:
    """OpenAI's four input shapes: a string, a list of strings, a list of token ids, or a
    list of token id lists; at most max_array_len inputs, max_prompt_bytes of text."""
    if isinstance(x, str) or (isinstance(x, list) and x and all(type(t) is int for t in x)):
        x = [x]
    if not isinstance(x, list) or not 0 < len(x) <= limits.max_array_len:
        raise _bad(name, f"must be a string, a list of 1-{limits.max_array_len} strings, or "
                         "token ids (a list of ints, or a list of such lists)")
    out, total = [], 0
    for i, item in enumerate(x):
        where = f"{name}[{i}]"
        if isinstance(item, str):
            if not item:
                raise _bad(where, "must not be an empty string")
            total += len(protocol.text("max_prompt_bytes")(where, item, limits).encode("utf-8", "surrogatepass"))
        elif isinstance(item, list) and item and all(type(t) is int for t in item):
            if len(item) > limits.max_prompt_tokens or min(item) < 0:
                raise _bad(where, f"must hold 1-{limits.max_prompt_tokens} non-negative token ids")
        else:
            raise _bad(where, "must be a non-empty string or a non-empty list of token ids")
        out.append(item)
    if total > limits.max_prompt_bytes:
        raise ProtocolError("too_large", f"'{name}' has {total} bytes of text, limit {limits.max_prompt_bytes}")
    return out


def parse_embeddings(body: Any, models: Callable[[str], bool], limits: Limits) -> EmbedCall:
    """Check a decoded /v1/embeddings body; raise ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    known = ("model", "input", "encoding_format", "dimensions", "user")
    for name in body:
        if name not in known:
            name = clip(name)
            raise ApiError(400, f"unknown field '{name}' for /v1/embeddings; known: "
                                f"{', '.join(known)}", name, "unknown_parameter")
    model = check_model(body, models)
    if body.get("input") is None:
        raise ApiError(400, "'input' is required", "input", "missing_required_parameter")
    if body.get("dimensions") is not None:
        raise ApiError(400, "'dimensions' is not supported: ember returns the model's own "
                            "embedding width", "dimensions", "unsupported_parameter")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ENCODING_FORMATS:
        raise _bad("encoding_format", f"must be one of {list(ENCODING_FORMATS)}")
    try:
        inputs = _embed_input("input", body["input"], limits)
        user = _user("user", body["user"], limits)["user"] if body.get("user") is not None else None
    except ProtocolError as e:
        raise from_ember(e.code, e.message, "input") from None
    return EmbedCall(model, inputs, fmt == "base64", user)


def embeddings_reply(call: EmbedCall, vectors, usage_: dict, model: str) -> dict:
    """The /v1/embeddings object: one entry per input, in input order."""
    def encoded(v):
        if call.base64:
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v.tolist()
    n = int(usage_.get("prompt_tokens", 0))
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}
