"""Client for emberd: sync (`Client`) and asyncio (`AsyncClient`), the same methods on both.

    with Client("tcp://127.0.0.1:5555") as c:
        for tok in c.generate("Once upon a time", max_tokens=32, temperature=0):
            print(tok.text, end="", flush=True)      # tok: Token(text, id, index, ...)

    async with AsyncClient() as c:
        async for tok in await c.generate("Once upon a time", max_tokens=32):
            print(tok.text, end="", flush=True)

Design. One DEALER socket per client; several requests may be in flight on
it (a `status` while a stream runs), so every received reply is routed by
its `id` into that request's inbox. A streaming generation is an iterable of
`Token` events whose terminal `done` lands in `stream.done`; an `error`
reply raises EmberError (typed by `code`).

Failing fast. ZeroMQ's connect never fails: with nothing listening, a send
just waits in a queue. So until its first connection is up (with CURVE,
until the handshake passed) a client watches its socket's monitor for
HANDSHAKE_SUCCEEDED; a request waits at most `connect_timeout` for it and
otherwise raises EmberUnavailable, instead of a full reply timeout. After
that the socket behaves as ZeroMQ's always do (a daemon restarted later is
reconnected to; a reply that never comes is EmberTimeout). ZMQ_IMMEDIATE
would say the same per send, but changes how the daemon sees a client that
sends and vanishes at once, so the monitor is used only at the start.

Cancelling. Leaving a stream early — `close()`, the `with` block, a `break`
out of a `for` loop (its generator is closed), an exception, Ctrl-C inside
the loop — sends `cancel` for it, so the server frees the engine within a
token instead of computing for nobody. Replies are decoded with the same
bounded scan the server uses.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator, TypedDict

import numpy as np
import zmq
import zmq.asyncio

from ember.formats import protocol
from ember.formats.errors import UserError

if TYPE_CHECKING:
    from typing_extensions import Unpack

TERMINAL = ("done", "error")
CONNECT_TIMEOUT_S = 1.0
ENDPOINT_ENV = "EMBER_ENDPOINT"


def default_endpoint() -> str:
    """$EMBER_ENDPOINT, else tcp://127.0.0.1:5555 — what the clients and the CLI connect to."""
    return os.environ.get(ENDPOINT_ENV) or protocol.DEFAULT_ENDPOINT


# ---------------------------------------------------------------------------
# Errors and events
# ---------------------------------------------------------------------------

class EmberError(UserError):
    """An `error` reply from the daemon (code as in docs/protocol.md), or a local failure."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class EmberTimeout(EmberError, TimeoutError):
    """No reply within the client's `timeout` (code "timeout")."""


class EmberUnavailable(EmberError, ConnectionError):
    """Nothing answers at the endpoint within `connect_timeout` (code "unavailable")."""


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token: the text that became final with it (may be "" while held back)."""

    text: str
    id: int                     # the token id in the model's vocabulary
    index: int                  # 0 for the first generated token
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None

    @classmethod
    def from_wire(cls, h: dict) -> "Token":
        top = h.get("top_logprobs")
        return cls(h["text"], h["token"], h["i"], h.get("logprob"),
                   None if top is None else tuple((int(i), float(p)) for i, p in top))


class GenerateParams(TypedDict, total=False):
    """The `generate` request's options (ranges and defaults: docs/protocol.md)."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    penalty_last_n: int
    seed: int
    stop: str | list[str]
    stop_tokens: list[int]
    ignore_eos: bool
    logprobs: bool
    top_logprobs: int
    priority: int
    deadline_ms: int
    deadline: float


def _raise_if_error(msg: dict) -> dict:
    if msg.get("op") == "error":
        raise EmberError(str(msg.get("code")), str(msg.get("message")))
    return msg


# ---------------------------------------------------------------------------
# Wire plumbing shared by both clients
# ---------------------------------------------------------------------------

def _request(op: str, rid: Any, fields: dict, tokens=None) -> list[bytes]:
    header = {"v": protocol.VERSION, "op": op, "id": rid,
              **{k: v for k, v in fields.items() if v is not None}}
    frames = []
    if tokens is not None:
        header["frames"] = ["tokens"]
        frames.append(protocol.encode_tokens(tokens))
    return [protocol.pack(header), *frames]


def _generate_fields(prompt, messages, stream: bool, params: dict) -> dict:
    unknown = sorted(set(params) - set(GenerateParams.__annotations__))
    if unknown:
        raise TypeError(f"generate() got unknown option(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(GenerateParams.__annotations__)}")
    return {"prompt": prompt, "messages": messages, "stream": stream, **params}


def _embed_fields(texts, normalize: bool, priority: int | None) -> dict:
    fields = {"input": texts, "normalize": normalize}
    if priority is not None:
        fields["priority"] = priority
    return fields


def _vectors(header: dict, arrays: dict) -> np.ndarray:
    """The `embed` reply -> float32 (n, dim)."""
    return arrays["embeddings"].reshape(header["n"], header["dim"])


def _dealer(ctx: zmq.Context, endpoint: str, curve=None) -> tuple[zmq.Socket, zmq.Socket]:
    """The connected DEALER and its monitor (HANDSHAKE_SUCCEEDED only), made before the
    connect so that the event cannot be missed."""
    from ember.daemon import security
    curve = curve or security.client_curve_from_env()   # EMBER_SERVER_KEY + EMBER_CLIENT_KEY
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.CLIENT_LIMITS.max_frame_bytes)
    if curve:   # (server public, client public, client secret): security.client_curve()
        security.apply_client(sock, curve)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(endpoint)
    return sock, monitor


def _drop_monitor(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    sock.disable_monitor()
    monitor.close(linger=0)


def _unavailable(endpoint: str, curve: bool, waited: float) -> EmberUnavailable:
    why = " (or its CURVE handshake refused this client's key)" if curve else ""
    return EmberUnavailable("unavailable", f"no emberd at {endpoint} within {waited:g} s{why} — "
                                           "start it with `emberd --model demo` (or another model)")


def _timeout(endpoint: str, waited: float) -> EmberTimeout:
    return EmberTimeout("timeout", f"no reply from {endpoint} within {waited:g} s")


# ---------------------------------------------------------------------------
# Sync client
# ---------------------------------------------------------------------------

class Client:
    """A blocking client; `timeout` (s) bounds each wait for a reply, `connect_timeout` the
    wait for a daemon to be there at all."""

    def __init__(self, endpoint: str | None = None, timeout: float = 30.0, *,
                 connect_timeout: float = CONNECT_TIMEOUT_S, ctx: zmq.Context | None = None,
                 curve=None):
        endpoint = endpoint or default_endpoint()
        self.endpoint, self.timeout, self.connect_timeout = endpoint, timeout, connect_timeout
        self._ctx = ctx or zmq.Context.instance()
        self.sock, self._monitor = _dealer(self._ctx, endpoint, curve)
        self._curve = self.sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
        self._ids = itertools.count(1)
        self._inbox: dict[Any, collections.deque] = {}

    def close(self) -> None:
        if self._monitor is not None:
            _drop_monitor(self.sock, self._monitor)
            self._monitor = None
        self.sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    def send(self, op: str, tokens=None, **fields) -> Any:
        """Send one request; returns its id. EmberUnavailable when no daemon was ever reached."""
        if self._monitor is not None:
            if not self._monitor.poll(int(self.connect_timeout * 1000)):
                raise _unavailable(self.endpoint, self._curve, self.connect_timeout)
            _drop_monitor(self.sock, self._monitor)
            self._monitor = None
        rid = next(self._ids)
        self.sock.send_multipart(_request(op, rid, fields, tokens))
        self._inbox[rid] = collections.deque()
        return rid

    def recv(self, rid: Any, timeout: float | None = None) -> tuple[dict, dict]:
        """The next reply for request `rid`: (header, {frame name: int32 array})."""
        wait = self.timeout if timeout is None else timeout
        end = time.monotonic() + wait
        box = self._inbox[rid]
        while not box:
            left = end - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise _timeout(self.endpoint, wait)
            header, arrays = protocol.unpack_reply(self.sock.recv_multipart())
            if header.get("id") in self._inbox:
                self._inbox[header["id"]].append((header, arrays))
        return box.popleft()

    def call(self, op: str, tokens=None, **fields) -> tuple[dict, dict]:
        """One request, one reply (errors raised)."""
        rid = self.send(op, tokens, **fields)
        try:
            header, arrays = self.recv(rid)
        finally:
            self._inbox.pop(rid, None)
        return _raise_if_error(header), arrays

    # -- ops -----------------------------------------------------------------------

    def hello(self) -> dict:
        return self.call("hello", versions=list(protocol.SUPPORTED_VERSIONS))[0]

    def ping(self) -> float:
        """Round-trip seconds."""
        t = time.perf_counter()
        self.call("ping")
        return time.perf_counter() - t

    def status(self) -> dict:
        return self.call("status")[0]

    def models(self) -> list[dict]:
        return self.call("models")[0]["models"]

    def health(self, timeout_ms: int | None = None) -> dict:
        return self.call("health", timeout_ms=timeout_ms)[0]

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.call("tokenize", text=text, add_special=add_special)[1]["tokens"].tolist()

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.call("detokenize", tokens=list(ids))[0]["text"]

    def cancel(self, rid: Any) -> dict:
        return self.call("cancel", target=rid)[0]

    def embed(self, texts: str | list[str], *, normalize: bool = True,
              priority: int | None = None) -> np.ndarray:
        """One vector per text, float32 (n, dim), from an embedding model's daemon."""
        return _vectors(*self.call("embed", **_embed_fields(texts, normalize, priority)))

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 tokens: Iterable[int] | None = None,
                 **params: Unpack[GenerateParams]) -> "Stream":
        """Start a streaming generation; iterate the result for Token events."""
        fields = _generate_fields(prompt, messages, True, params)
        return Stream(self, self.send("generate", tokens, **fields))

    def complete(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 tokens: Iterable[int] | None = None, **params: Unpack[GenerateParams]) -> dict:
        """A non-streaming generation: returns the `done` event (with `text`).
        A timeout or Ctrl-C while waiting cancels it on the daemon."""
        rid = self.send("generate", tokens, **_generate_fields(prompt, messages, False, params))
        header = {}
        try:
            while header.get("op") not in TERMINAL:
                header, arrays = self.recv(rid)
        finally:
            if header.get("op") not in TERMINAL:
                Stream(self, rid).close()       # cancel; wait briefly for the daemon to confirm
            self._inbox.pop(rid, None)
        header["tokens"] = arrays.get("tokens")
        return _raise_if_error(header)

    def _send_cancel(self, rid: Any) -> None:
        try:            # NOBLOCK: with the daemon gone there is nothing to cancel
            self.sock.send_multipart(_request("cancel", next(self._ids), {"target": rid}),
                                     flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


class Stream:
    """One generation's Token events; `done` holds the terminal event (a dict, as on the wire).

    `for tok in stream` iterates a generator: abandoning the loop (break,
    an exception) closes it, which cancels the request on the daemon. So
    does dropping any iterator taken with iter(stream): take single tokens
    with next(stream) instead.
    """

    def __init__(self, client: Client, rid: Any):
        self.client, self.id = client, rid
        self.done: dict | None = None
        self.started: dict | None = None
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def __iter__(self) -> Iterator[Token]:
        try:
            while (tok := self._next()) is not None:
                yield tok
        finally:
            self.close()            # a no-op once `done` arrived

    def __next__(self) -> Token:
        tok = self._next()
        if tok is None:
            raise StopIteration
        return tok

    def _next(self) -> Token | None:
        """The next token, or None after the terminal event."""
        if self.done is not None:
            return None
        try:
            while True:
                header, arrays = self.client.recv(self.id)
                if header["op"] == "token":
                    self.pieces.append(header["text"])
                    return Token.from_wire(header)
                if header["op"] == "start":
                    self.started = header
                    continue
                self._finish(header, arrays)
                return None
        except BaseException:       # a timeout, Ctrl-C: stop the work on the server too
            self.close()            # (a no-op after an error reply: the request is over)
            raise

    def _finish(self, header: dict, arrays: dict) -> None:
        self.done = header
        header["tokens"] = arrays.get("tokens")
        self.client._inbox.pop(self.id, None)
        _raise_if_error(header)

    def close(self, wait: float = 2.0) -> None:
        """Cancel on the server if still running, and wait briefly for the terminal event."""
        if self.done is not None or self.id not in self.client._inbox:
            return
        c = self.client
        try:
            c._send_cancel(self.id)
            end = time.monotonic() + wait
            while self.done is None and time.monotonic() < end:
                header, arrays = c.recv(self.id, timeout=max(0.0, end - time.monotonic()))
                if header["op"] in TERMINAL:
                    self.done = header
        except (EmberError, zmq.ZMQError):  # no terminal event in time, or the client closed
            pass
        finally:
            c._inbox.pop(self.id, None)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# asyncio client
# ---------------------------------------------------------------------------

class AsyncClient:
    """The same operations as Client, as coroutines; a reader task routes replies by id."""

    def __init__(self, endpoint: str | None = None, timeout: float = 30.0, *,
                 connect_timeout: float = CONNECT_TIMEOUT_S,
                 ctx: zmq.asyncio.Context | None = None, curve=None):
        endpoint = endpoint or default_endpoint()
        self.endpoint, self.timeout, self.connect_timeout = endpoint, timeout, connect_timeout
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self.sock, self._monitor = _dealer(self._ctx, endpoint, curve)
        self._curve = self.sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
        self._ids = itertools.count(1)
        self._inbox: dict[Any, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._monitor is not None:
            _drop_monitor(self.sock, self._monitor)
            self._monitor = None
        self.sock.close(linger=0)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            header, arrays = protocol.unpack_reply(await self.sock.recv_multipart())
            box = self._inbox.get(header.get("id"))
            if box is not None:
                box.put_nowait((header, arrays))

    async def send(self, op: str, tokens=None, **fields) -> Any:
        if self._monitor is not None:
            if not await self._monitor.poll(int(self.connect_timeout * 1000)):
                raise _unavailable(self.endpoint, self._curve, self.connect_timeout)
            _drop_monitor(self.sock, self._monitor)
            self._monitor = None
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        rid = next(self._ids)
        self._inbox[rid] = asyncio.Queue()
        await self.sock.send_multipart(_request(op, rid, fields, tokens))
        return rid

    async def recv(self, rid: Any, timeout: float | None = None) -> tuple[dict, dict]:
        wait = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._inbox[rid].get(), wait)
        except asyncio.TimeoutError:
            raise _timeout(self.endpoint, wait) from None

    async def call(self, op: str, tokens=None, **fields) -> tuple[dict, dict]:
        rid = await self.send(op, tokens, **fields)
        try:
            header, arrays = await self.recv(rid)
        finally:
            self._inbox.pop(rid, None)
        return _raise_if_error(header), arrays

    # -- ops -----------------------------------------------------------------------

    async def hello(self) -> dict:
        return (await self.call("hello", versions=list(protocol.SUPPORTED_VERSIONS)))[0]

    async def ping(self) -> float:
        t = time.perf_counter()
        await self.call("ping")
        return time.perf_counter() - t

    async def status(self) -> dict:
        return (await self.call("status"))[0]

    async def models(self) -> list[dict]:
        return (await self.call("models"))[0]["models"]

    async def health(self, timeout_ms: int | None = None) -> dict:
        return (await self.call("health", timeout_ms=timeout_ms))[0]

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return (await self.call("tokenize", text=text, add_special=add_special))[1]["tokens"].tolist()

    async def detokenize(self, ids: Iterable[int]) -> str:
        return (await self.call("detokenize", tokens=list(ids)))[0]["text"]

    async def cancel(self, rid: Any) -> dict:
        return (await self.call("cancel", target=rid))[0]

    async def embed(self, texts: str | list[str], *, normalize: bool = True,
                    priority: int | None = None) -> np.ndarray:
        return _vectors(*await self.call("embed", **_embed_fields(texts, normalize, priority)))

    async def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                       tokens: Iterable[int] | None = None,
                       **params: Unpack[GenerateParams]) -> "AsyncStream":
        fields = _generate_fields(prompt, messages, True, params)
        return AsyncStream(self, await self.send("generate", tokens, **fields))

    async def complete(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                       tokens: Iterable[int] | None = None,
                       **params: Unpack[GenerateParams]) -> dict:
        rid = await self.send("generate", tokens, **_generate_fields(prompt, messages, False, params))
        header = {}
        try:
            while header.get("op") not in TERMINAL:
                header, arrays = await self.recv(rid)
        finally:
            if header.get("op") not in TERMINAL:
                await AsyncStream(self, rid).aclose()
            self._inbox.pop(rid, None)
        header["tokens"] = arrays.get("tokens")
        return _raise_if_error(header)

    async def _send_cancel(self, rid: Any) -> None:
        try:
            await self.sock.send_multipart(_request("cancel", next(self._ids), {"target": rid}),
                                           flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


class AsyncStream:
    """Async iterator over Token events; `aclose()`, `async with` or leaving an `async for`
    (asyncio finalizes the abandoned generator) cancels on the server."""

    def __init__(self, client: AsyncClient, rid: Any):
        self.client, self.id = client, rid
        self.done: dict | None = None
        self.started: dict | None = None
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    async def __aiter__(self) -> AsyncIterator[Token]:
        try:
            while (tok := await self._next()) is not None:
                yield tok
        finally:
            await self.aclose()

    async def __anext__(self) -> Token:
        tok = await self._next()
        if tok is None:
            raise StopAsyncIteration
        return tok

    async def _next(self) -> Token | None:
        if self.done is not None:
            return None
        try:
            while True:
                header, arrays = await self.client.recv(self.id)
                if header["op"] == "token":
                    self.pieces.append(header["text"])
                    return Token.from_wire(header)
                if header["op"] == "start":
                    self.started = header
                    continue
                self.done = header
                header["tokens"] = arrays.get("tokens")
                self.client._inbox.pop(self.id, None)
                _raise_if_error(header)
                return None
        except (asyncio.CancelledError, KeyboardInterrupt, EmberTimeout):
            await self.aclose()
            raise

    async def aclose(self, wait: float = 2.0) -> None:
        c = self.client
        if self.done is not None or self.id not in c._inbox:
            return
        try:
            await c._send_cancel(self.id)
            end = time.monotonic() + wait
            while self.done is None and time.monotonic() < end:
                header, _ = await asyncio.wait_for(c._inbox[self.id].get(), end - time.monotonic())
                if header["op"] in TERMINAL:
                    self.done = header
        except asyncio.TimeoutError:
            pass
        finally:
            c._inbox.pop(self.id, None)

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
