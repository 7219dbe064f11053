"""Client for emberd: sync (`Client`) and asyncio (`AsyncClient`).

    with Client("tcp://127.0.0.1:5555") as c:
        with c.generate("Once upon a time", max_tokens=32, temperature=0) as stream:
            for tok in stream:            # {"op": "token", "text": ..., "token": ...}
                print(tok["text"], end="", flush=True)
        print(stream.done["stop"], stream.done["timings"])

Design. One DEALER socket per client; several requests may be in flight on
it (a `status` while a stream runs), so every received reply is routed by
its `id` into that request's inbox. A streaming generation is an iterator of
`token` events whose terminal `done` lands in `stream.done`; an `error`
reply raises EmberError (typed by `code`). Leaving a stream early — `close()`,
the `with` block, an exception, Ctrl-C inside the loop — sends `cancel`
for it, so the server frees the engine within a token instead of computing
for nobody. Replies are decoded with the same bounded scan the server uses.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import time
from typing import Any, Iterable

import zmq
import zmq.asyncio

from ember.formats import protocol
from ember.formats.errors import UserError

TERMINAL = ("done", "error")


class EmberError(UserError):
    """An `error` reply from the daemon (or a local timeout: code "timeout")."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _raise_if_error(msg: dict) -> dict:
    if msg.get("op") == "error":
        raise EmberError(str(msg.get("code")), str(msg.get("message")))
    return msg


def _request(op: str, rid: Any, fields: dict, tokens=None) -> list[bytes]:
    header = {"v": protocol.VERSION, "op": op, "id": rid,
              **{k: v for k, v in fields.items() if v is not None}}
    frames = []
    if tokens is not None:
        header["frames"] = ["tokens"]
        frames.append(protocol.encode_tokens(tokens))
    return [protocol.pack(header), *frames]


def _generate_fields(prompt, messages, stream: bool, params: dict) -> dict:
    return {"prompt": prompt, "messages": messages, "stream": stream, **params}


def _dealer(ctx: zmq.Context, endpoint: str, curve=None) -> zmq.Socket:
    from ember.daemon import security
    curve = curve or security.client_curve_from_env()   # EMBER_SERVER_KEY + EMBER_CLIENT_KEY
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.CLIENT_LIMITS.max_frame_bytes)
    if curve:   # (server public, client public, client secret): security.client_curve()
        security.apply_client(sock, curve)
    sock.connect(endpoint)
    return sock


# ---------------------------------------------------------------------------
# Sync client
# ---------------------------------------------------------------------------

class Client:
    """A blocking client; `timeout` (s) bounds each wait for a reply."""

    def __init__(self, endpoint: str = protocol.DEFAULT_ENDPOINT, timeout: float = 30.0,
                 ctx: zmq.Context | None = None, curve=None):
        self.endpoint, self.timeout = endpoint, timeout
        self._ctx = ctx or zmq.Context.instance()
        self.sock = _dealer(self._ctx, endpoint, curve)
        self._ids = itertools.count(1)
        self._inbox: dict[Any, collections.deque] = {}

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    def send(self, op: str, tokens=None, **fields) -> Any:
        """Send one request; returns its id."""
        rid = next(self._ids)
        self._inbox[rid] = collections.deque()
        self.sock.send_multipart(_request(op, rid, fields, tokens))
        return rid

    def recv(self, rid: Any, timeout: float | None = None) -> tuple[dict, dict]:
        """The next reply for request `rid`: (header, {frame name: int32 array})."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        box = self._inbox[rid]
        while not box:
            left = end - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise EmberError("timeout", f"no reply from {self.endpoint} within "
                                            f"{self.timeout if timeout is None else timeout:g} s")
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

    def generate(self, prompt: str | None = None, *, messages: list | None = None,
                 tokens=None, **params) -> "Stream":
        """Start a streaming generation; iterate the result for token events."""
        rid = self.send("generate", tokens, **_generate_fields(prompt, messages, True, params))
        return Stream(self, rid)

    def complete(self, prompt: str | None = None, *, messages: list | None = None,
                 tokens=None, **params) -> dict:
        """A non-streaming generation: returns the `done` event (with `text`)."""
        rid = self.send("generate", tokens, **_generate_fields(prompt, messages, False, params))
        try:
            while True:
                header, arrays = self.recv(rid)
                if header["op"] in TERMINAL:
                    header["tokens"] = arrays.get("tokens")
                    return _raise_if_error(header)
        finally:
            self._inbox.pop(rid, None)


class Stream:
    """Iterator over one generation's `token` events; `done` holds the terminal event."""

    def __init__(self, client: Client, rid: Any):
        self.client, self.id = client, rid
        self.done: dict | None = None
        self.started: dict | None = None
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> dict:
        if self.done is not None:
            raise StopIteration
        try:
            while True:
                header, arrays = self.client.recv(self.id)
                if header["op"] == "token":
                    self.pieces.append(header["text"])
                    return header
                if header["op"] == "start":
                    self.started = header
                    continue
                self._finish(header, arrays)
                raise StopIteration
        except BaseException as e:
            if not isinstance(e, StopIteration):
                self.close()        # Ctrl-C or a timeout: stop the work on the server too
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
            c.sock.send_multipart(_request("cancel", next(c._ids), {"target": self.id}))
            end = time.monotonic() + wait
            while self.done is None and time.monotonic() < end:
                header, arrays = c.recv(self.id, timeout=max(0.0, end - time.monotonic()))
                if header["op"] in TERMINAL:
                    self.done = header
        except (EmberError, zmq.ZMQError):
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
    """The same operations as coroutines; a reader task routes replies by id."""

    def __init__(self, endpoint: str = protocol.DEFAULT_ENDPOINT, timeout: float = 30.0,
                 ctx: zmq.asyncio.Context | None = None, curve=None):
        self.endpoint, self.timeout = endpoint, timeout
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = _dealer(self._ctx, endpoint, curve)
        self._ids = itertools.count(1)
        self._inbox: dict[Any, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(linger=0)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _read(self) -> None:
        while True:
            header, arrays = protocol.unpack_reply(await self.sock.recv_multipart())
            box = self._inbox.get(header.get("id"))
            if box is not None:
                box.put_nowait((header, arrays))

    async def send(self, op: str, tokens=None, **fields) -> Any:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        rid = next(self._ids)
        self._inbox[rid] = asyncio.Queue()
        await self.sock.send_multipart(_request(op, rid, fields, tokens))
        return rid

    async def recv(self, rid: Any) -> tuple[dict, dict]:
        try:
            return await asyncio.wait_for(self._inbox[rid].get(), self.timeout)
        except asyncio.TimeoutError:
            raise EmberError("timeout", f"no reply from {self.endpoint} within {self.timeout:g} s") from None

    async def call(self, op: str, tokens=None, **fields) -> tuple[dict, dict]:
        rid = await self.send(op, tokens, **fields)
        try:
            header, arrays = await self.recv(rid)
        finally:
            self._inbox.pop(rid, None)
        return _raise_if_error(header), arrays

    async def ping(self) -> float:
        t = time.perf_counter()
        await self.call("ping")
        return time.perf_counter() - t

    async def status(self) -> dict:
        return (await self.call("status"))[0]

    async def hello(self) -> dict:
        return (await self.call("hello", versions=list(protocol.SUPPORTED_VERSIONS)))[0]

    async def generate(self, prompt: str | None = None, *, messages: list | None = None,
                       tokens=None, **params) -> "AsyncStream":
        rid = await self.send("generate", tokens, **_generate_fields(prompt, messages, True, params))
        return AsyncStream(self, rid)


class AsyncStream:
    """Async iterator over token events; `aclose()` (or `async with`) cancels on the server."""

    def __init__(self, client: AsyncClient, rid: Any):
        self.client, self.id = client, rid
        self.done: dict | None = None
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> dict:
        if self.done is not None:
            raise StopAsyncIteration
        try:
            while True:
                header, arrays = await self.client.recv(self.id)
                if header["op"] == "token":
                    self.pieces.append(header["text"])
                    return header
                if header["op"] in TERMINAL:
                    self.done = header
                    header["tokens"] = arrays.get("tokens")
                    self.client._inbox.pop(self.id, None)
                    _raise_if_error(header)
                    raise StopAsyncIteration
        except (asyncio.CancelledError, KeyboardInterrupt, EmberError):
            await self.aclose()
            raise

    async def aclose(self, wait: float = 2.0) -> None:
        c = self.client
        if self.done is not None or self.id not in c._inbox:
            return
        try:
            await c.sock.send_multipart(_request("cancel", next(c._ids), {"target": self.id}))
            end = time.monotonic() + wait
            while self.done is None and time.monotonic() < end:
                header, _ = await asyncio.wait_for(c._inbox[self.id].get(), end - time.monotonic())
                if header["op"] in TERMINAL:
                    self.done = header
        except (asyncio.TimeoutError, zmq.ZMQError):
            pass
        finally:
            c._inbox.pop(self.id, None)

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
