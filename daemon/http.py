"""emberd's OpenAI-compatible HTTP front door: aiohttp on its own thread, onto the one scheduler.

Design. `emberd --http HOST:PORT` starts a Gateway beside the ZeroMQ Server
in the same process. It is a second front door, not a second server: HTTP
requests become scheduler Jobs (`HttpJob`) in the same bounded priority
queue, computed by the same worker on the same model. Nothing is copied and
nothing else queues.

Threads. The ZeroMQ loop stays on the main thread; the gateway runs an
asyncio loop on its own thread (`ember-http`). The worker reports every
job's events through `scheduler.post`; the gateway puts itself in front of
that callback (`_post`): events of HTTP jobs go into the gateway's deque and
wake its loop (`call_soon_threadsafe`), all others go on to the Server as
before. So an HTTP token takes one thread hop, like a ZeroMQ one.

Pacing and cancel. The scheduler computes token n+1 only once token n-1 was
handed to the client's socket (scheduler._pace). For a stream the gateway
reports a token delivered after `resp.write` returned; a failed write, or
aiohttp cancelling the handler when the connection drops (handler
cancellation on), cancels the job — so the worker computes at most one token
after the gateway learns the client is gone (ember_http_disconnect_extra_tokens
in /metrics measures it). A queued job whose client leaves is dropped.

Limits. Request bodies over MAX_BODY_BYTES get 413 (from Content-Length,
before reading); a body that does not arrive within BODY_TIMEOUT_S gets
408; request lines and headers are bounded by aiohttp's C parser
(MAX_LINE_BYTES, MAX_HEADERS: 400/431); a connection that has not sent a
whole request head IDLE_S after connecting or after its last reply is
closed (aiohttp's keep-alive timer runs from the connection's start, which
ends slowloris heads too); past MAX_CONNECTIONS open connections a new one
gets a canned 503 and is closed. A full queue is 429 with Retry-After; a
draining daemon 503 (its queued HTTP jobs too, as ZeroMQ's get `cancelled`).

Security. Loopback only unless an API key file is given (`--api-key-file`:
one key per line); with keys, every route needs `Authorization: Bearer KEY`,
compared with hmac.compare_digest against every key (no early exit).

The OpenAI request/reply shapes live in daemon/openai_api.py, the metrics
in daemon/metrics.py; this module is the wiring: flags, thread, routes.
aiohttp was chosen over starlette + uvicorn by measurement (docs/http.md,
bench/http_frameworks.py): its streamed SSE events cost a sixth as much,
it has a C header parser with limits, and it runs on a plain thread's loop.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from ember.daemon import openai_api, security
from ember.daemon.openai_api import ApiError
from ember.daemon.scheduler import Busy, Job, probe_job
from ember.formats.errors import UserError

log = logging.getLogger("emberd")

MAX_BODY_BYTES = 1 << 20        # the prompt limit (256 KiB of text) plus JSON escaping, with room
MAX_LINE_BYTES = 8190           # request line and each header
MAX_HEADERS = 64
MAX_CONNECTIONS = 2048
IDLE_S = 5.0                    # keep-alive and whole-request-head timeout
LINGER_S = 1.0                  # after refusing a body, read (and drop) its rest this long, then close
BODY_TIMEOUT_S = 5.0            # 1 MiB at 200 KB/s; a slower body is a slowloris body
HEALTH_TIMEOUT_S = 5.0
RETRY_AFTER_S = 1
SHUTDOWN_GRACE_S = 2.0
MIN_KEY_CHARS = 16
INSTALL = "pip install 'ember[http]'"


class HttpSetupError(UserError, ValueError):
    """A bad --http / --api-key-file setting, or the http extra is missing."""


# ---------------------------------------------------------------------------
# Flags and start-up checks (before the model loads: cheap refusals first)
# ---------------------------------------------------------------------------

def add_arguments(p) -> None:
    g = p.add_argument_group("http (OpenAI-compatible API, docs/http.md)")
    g.add_argument("--http", metavar="HOST:PORT", default=None,
                   help="also serve the OpenAI-compatible HTTP API here, e.g. 127.0.0.1:8080 "
                        "(port 0 picks a free one; off by default)")
    g.add_argument("--api-key-file", metavar="PATH", default=None,
                   help="bearer tokens for the HTTP API, one per line; required to serve HTTP "
                        "beyond loopback")


def from_args(args) -> "Gateway | None":
    """The configured (not yet started) gateway, or None when --http is not given."""
    if not getattr(args, "http", None):
        if getattr(args, "api_key_file", None):
            raise HttpSetupError("--api-key-file needs --http HOST:PORT")
        return None
    _need_libraries()
    host, port = parse_address(args.http)
    keys = load_keys(args.api_key_file) if args.api_key_file else None
    if keys is None and not security.is_local(f"tcp://{host}:{port}"):
        raise HttpSetupError(f"refusing to serve HTTP on {args.http} beyond loopback without "
                             "--api-key-file (anyone who can reach it could use the model); "
                             "bind 127.0.0.1 or give a key file")
    return Gateway(host, port, keys)


def _need_libraries() -> None:
    try:
        import aiohttp  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise HttpSetupError(f"--http needs the http extra ({e.name} is missing): {INSTALL}") from None


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[::1]:PORT' or 'PORT' (loopback) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HttpSetupError(f"--http {text!r}: expected HOST:PORT such as 127.0.0.1:8080")
    return host, int(port)


def load_keys(path: str) -> list[bytes]:
    """API keys, one per line; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HttpSetupError(f"--api-key-file {path}: {getattr(e, 'strerror', None) or e}") from None
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not keys:
        raise HttpSetupError(f"--api-key-file {path}: no key in the file (one key per line)")
    short = [i for i, k in enumerate(keys) if len(k) < MIN_KEY_CHARS or any(c.isspace() for c in k)]
    if short:
        raise HttpSetupError(f"--api-key-file {path}: key {short[0] + 1} is shorter than "
                             f"{MIN_KEY_CHARS} characters or has spaces; use e.g. "
                             "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return [k.encode() for k in keys]


# ---------------------------------------------------------------------------
# Jobs from the HTTP door
# ---------------------------------------------------------------------------

@dataclass(eq=False)
class HttpJob(Job):
    """A scheduler Job whose events go to an HTTP handler's inbox (loop thread only)."""

    inbox: asyncio.Queue | None = None
    answered: bool = False            # the handler took its terminal event
    gone_at: int | None = None        # n_tokens when the client was seen gone


# ---------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------

class Gateway:
    """aiohttp app + the bridge from the scheduler's worker to it."""

    def __init__(self, host: str, port: int, keys: list[bytes] | None):
        self.host, self.port, self.keys = host, port, keys
        self.url: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._events: collections.deque = collections.deque()
        self._wake_pending = False
        self._health: list[asyncio.Future] = []
        self._jobs: set[HttpJob] = set()
        self._ids = itertools.count(1)
        self._draining_seen = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, server) -> None:
        """Hook into the server's scheduler, bind, and serve on the `ember-http` thread."""
        from ember.daemon.metrics import Metrics
        self.server, self.scheduler = server, server.scheduler
        self.metrics = Metrics(server)
        self._thread = threading.Thread(target=self._run, name="ember-http", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise HttpSetupError(f"cannot serve HTTP on {self.host}:{self.port}: {self._start_error}")
        self._forward = self.scheduler.post      # the loop is up: events may come to it now
        self.scheduler.post = self._post
        server.on_tick.append(self._tick)
        print(f"emberd: listening on {self.url}", flush=True)

    def stop(self) -> None:
        """Finish in-flight replies (up to SHUTDOWN_GRACE_S), close every connection, join."""
        if self.loop is None or not self._thread.is_alive():
            return
        if self._start_error is not None:   # it never served: its thread closes the loop and ends
            self._thread.join(SHUTDOWN_GRACE_S)
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(SHUTDOWN_GRACE_S + 5)

    def _run(self) -> None:
        self.loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as e:  # noqa: BLE001 - reported by start() on the main thread
            self._start_error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._close())
            loop.close()

    async def _open(self) -> None:
        from aiohttp import web

        @web.middleware
        async def front(request, handler):
            return await self._front(request, handler)
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[front])
        self._routes(app, web)
        self._runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True, access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_S, keepalive_timeout=IDLE_S, lingering_time=LINGER_S,
            max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES, max_headers=MAX_HEADERS)
        await self._runner.setup()
        self._listener = await asyncio.get_running_loop().create_server(
            self._accept, self.host, self.port, reuse_address=True, backlog=1024)
        host, port = self._listener.sockets[0].getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def _close(self) -> None:
        self._listener.close()
        for job in list(self._jobs):           # handlers still waiting answer 503 now
            self.scheduler.cancel(job)
            job.inbox.put_nowait(("error", ("cancelled", "the daemon is stopping", None)))
        await self._runner.cleanup()

    def _accept(self) -> asyncio.Protocol:
        """aiohttp's protocol for a new connection, or a canned 503 past MAX_CONNECTIONS."""
        web_server = self._runner.server
        if len(web_server.connections) >= MAX_CONNECTIONS:
            return _Refuse()
        return web_server()

    def _routes(self, app, web) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)

    # -- worker (and aux) threads -> the HTTP loop --------------------------------------

    def _post(self, kind: str, job: Job | None, payload: Any, wake: bool = True) -> None:
        """The scheduler's event callback: HTTP jobs here, the rest to the Server."""
        progress = kind in ("token", "done")
        if kind == "done" and not job.probe:
            (self.metrics.embedding if job.op == "embed" else self.metrics.generation)(job, *payload)
        elif kind == "error" and not job.probe:
            self.metrics.failed(payload[0])
        if progress and self._health:
            self._call(self._health_progress)
        if not isinstance(job, HttpJob):
            return self._forward(kind, job, payload, wake)
        if progress and self.server._health:
            self._forward("progress", None, None, wake)   # ZeroMQ health waiters: a token was made
        self._events.append((kind, job, payload))
        if wake and not self._wake_pending:
            self._wake_pending = True
            self._call(self._drain)

    def _call(self, fn) -> None:
        """Run fn on the HTTP loop (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass     # the loop has closed (emberd is stopping): no handler waits any more

    def _drain(self) -> None:
        self._wake_pending = False          # before popping: a later append schedules again
        while self._events:
            kind, job, payload = self._events.popleft()
            if job.probe:
                continue
            if job.gone_at is not None:
                if kind in ("done", "error"):
                    self.metrics.disconnect(job.n_tokens - job.gone_at)
                continue
            if kind == "token" and not job.stream:
                self.scheduler.delivered(job, payload[0] + 1)
            job.inbox.put_nowait((kind, payload))

    def _tick(self) -> None:
        """On the ZeroMQ loop each turn: a drain that just began also empties our queue."""
        if self.server.draining and not self._draining_seen:
            self._draining_seen = True
            self._call(self._cancel_queued)

    def _cancel_queued(self) -> None:
        for job in list(self._jobs):
            if job.state in ("queued", "suspended") and self.scheduler.cancel(job):
                job.inbox.put_nowait(("error", ("cancelled", "the daemon is shutting down", None)))

    # -- the door: auth, errors, metrics -------------------------------------------------

    async def _front(self, request, handler):
        """Every request passes here: key check, OpenAI-shaped errors, the request counter."""
        from aiohttp import web
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "other"    # never a raw path
        try:
            self._authorize(request)
            resp = await handler(request)
        except ApiError as e:
            resp = self._error(e)
        except web.HTTPException as e:
            resp = self._error(_from_http(e, request))
        self.metrics.request(endpoint, resp.status)
        return resp

    def _authorize(self, request) -> None:
        if self.keys is None:
            return
        sent = request.headers.getall("Authorization", [])
        scheme, _, given = (sent[0] if len(sent) == 1 else "").partition(" ")   # two: refused
        ok = False
        for key in self.keys:                 # every key compared: timing says nothing
            ok |= hmac.compare_digest(key, given.strip().encode("utf-8", "replace"))
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with a "
                                "key from the daemon's --api-key-file", code="invalid_api_key")

    def _error(self, e: ApiError):
        from aiohttp import web
        headers = {}
        if e.status == 429:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        if e.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="ember"'
        resp = web.json_response(e.body(), status=e.status, headers=headers)
        if e.status in (408, 413):
            resp.force_close()                # the rest of the body is never read
        return resp

    # -- generation routes ---------------------------------------------------------------

    async def chat_completions(self, request):
        return await self._generate(request, "chat")

    async def completions(self, request):
        return await self._generate(request, "completion")

    async def _generate(self, request, kind: str):
        self._open_for_work()
        body = await self._json(request)
        call = openai_api.parse(kind, body, self._serves, self.server.limits)
        self._require("generation", "model_not_generative")
        job = self._submit(HttpJob(rid=f"http-{next(self._ids)}", owner=None, source=call.source,
                                   sampling=call.sampling, stream=call.stream, inbox=asyncio.Queue()))
        try:
            first = await self._first(job)
            if call.stream:
                return await self._stream(request, call, job, first)
            return await self._whole(call, job, first)
        finally:
            self._leave(job)

    def _open_for_work(self) -> None:
        if self.server.draining:
            raise ApiError(503, "the daemon is shutting down; retry on another instance",
                           code="draining")

    async def _json(self, request) -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {request.content_length} bytes exceeds the "
                                f"limit of {MAX_BODY_BYTES}", code="too_large")
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                raw = await request.read()
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                           code="timeout") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}",
                           code="invalid_json") from None

    def _require(self, kind: str, code: str) -> None:
        """The served model is of `kind` ("generation" | "embedding"), else 400 at once."""
        try:
            self.server.model.require(kind)
        except UserError as e:
            raise ApiError(400, str(e), "model", code) from None

    def _submit(self, job: HttpJob) -> HttpJob:
        try:
            self.scheduler.submit(job)
        except Busy as e:
            raise ApiError(429, f"the daemon is busy: {e}; retry in {RETRY_AFTER_S} s",
                           code="busy") from None
        self._jobs.add(job)
        return job

    async def _first(self, job: HttpJob) -> tuple:
        """The job's first event past `start`; an engine refusal becomes an HTTP error."""
        while True:
            kind, payload = await job.inbox.get()
            if kind == "error":
                job.answered = True
                raise openai_api.from_ember(payload[0], payload[1])
            if kind not in ("start", "suspended"):
                return kind, payload

    async def _whole(self, call, job: HttpJob, event: tuple):
        from aiohttp import web
        reply, events = self._reply(call, job), []
        while True:
            kind, payload = event
            if kind == "token" and call.top_logprobs is not None:
                events.append(payload[1])
            elif kind in ("done", "error"):
                job.answered = True
                result, stop = self._terminal(kind, payload)
                return web.json_response(reply.whole(result, stop, events))
            event = await job.inbox.get()

    async def _stream(self, request, call, job: HttpJob, event: tuple):
        from aiohttp import web
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        reply = self._reply(call, job)
        try:
            await resp.prepare(request)
            if (chunk := reply.role_chunk()) is not None:
                await _send(resp, chunk)
            while not await self._stream_event(resp, reply, call, job, event):
                event = await job.inbox.get()
            await resp.write_eof()
        except ConnectionError:
            log.info("HTTP client of %s is gone after %d tokens; cancelling", job.rid, job.delivered)
        return resp

    async def _stream_event(self, resp, reply, call, job: HttpJob, event: tuple) -> bool:
        """Write one event; True once the stream is finished."""
        kind, payload = event
        if kind == "token":
            i, ev = payload
            if (chunk := reply.token_chunk(ev)) is not None:
                await _send(resp, chunk)
            self.scheduler.delivered(job, i + 1)    # written: the worker may run one further
            return False
        if kind not in ("done", "error"):
            return False
        job.answered = True
        try:
            result, stop = self._terminal(kind, payload)
        except ApiError as e:                       # after the headers: an error event, no [DONE]
            await _send(resp, e.body())
            return True
        await _send(resp, reply.final_chunk(stop))
        if call.include_usage:
            await _send(resp, reply.usage_chunk(result))
        await resp.write(b"data: [DONE]\n\n")
        return True

    def _terminal(self, kind: str, payload) -> tuple:
        """(result, stop) of a finished job, or the ApiError it ended with."""
        if kind == "error":
            raise openai_api.from_ember(payload[0], payload[1])
        result, stop = payload
        if stop == "cancelled":
            raise ApiError(503, "the request was cancelled: the daemon is shutting down",
                           code="draining")
        if stop == "deadline":
            raise ApiError(503, "the request ran past its deadline", code="deadline_exceeded")
        return result, stop

    def _leave(self, job: HttpJob) -> None:
        """The handler is done with the job; one not answered yet is cancelled (client gone)."""
        self._jobs.discard(job)
        if job.answered or job.gone_at is not None:
            return
        job.gone_at = job.n_tokens
        if self.scheduler.cancel(job):           # still queued: dropped now, nothing computed
            self.metrics.disconnect(0)

    def _reply(self, call, job: HttpJob) -> openai_api.Reply:
        info = self.server.info
        # the job's own model: after a reload it may still run on the previous one
        tok = (job.gen.model if job.gen is not None else self.server.model).tokenizer
        fingerprint = "-".join(str(x) for x in ("ember", info.get("backend"), info.get("isa")) if x)
        return openai_api.Reply(call, lambda t: tok.token_to_piece(t, special=True), fingerprint,
                                info.get("model"))

    # -- other routes -------------------------------------------------------------------

    def _serves(self, name: str) -> bool:
        info = self.server.info
        served = info.get("model") or ""
        return name in (served, served.removesuffix(".gguf"), info.get("alias"))

    def _model_object(self) -> dict:
        info = self.server.info
        try:
            created = int(os.stat(info["path"]).st_mtime)
        except (OSError, KeyError):
            created = 0
        return {"id": info.get("model"), "object": "model", "created": created, "owned_by": "ember",
                "arch": info.get("arch"), "n_ctx": info.get("n_ctx"), "backend": info.get("backend")}

    async def models(self, request):
        from aiohttp import web
        return web.json_response({"object": "list", "data": [self._model_object()]})

    async def model(self, request):
        from aiohttp import web
        openai_api.check_model({"model": request.match_info["model"]}, self._serves)
        return web.json_response(self._model_object())

    async def embeddings(self, request):
        """Texts -> vectors: one `embed` job in the same queue as the generations."""
        from aiohttp import web
        self._open_for_work()
        body = await self._json(request)
        call = openai_api.parse_embeddings(body, self._serves, self.server.limits)
        self._require("embedding", "embeddings_unsupported")
        job = self._submit(HttpJob(rid=f"http-{next(self._ids)}", owner=None, source=call.inputs,
                                   sampling={}, stream=False, inbox=asyncio.Queue(), op="embed"))
        try:
            kind, payload = await self._first(job)
            job.answered = True
            result, _ = self._terminal(kind, payload)
            return web.json_response(openai_api.embeddings_reply(
                call, result.vectors, result.usage, self.server.info.get("model")))
        finally:
            self._leave(job)

    async def metrics_page(self, request):
        from aiohttp import web
        from ember.daemon.metrics import CONTENT_TYPE
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- health -------------------------------------------------------------------------

    async def health(self, request):
        """200 once the worker makes a token (a 1-token probe when idle), else 503 after
        ?timeout_ms= (default 5 s)."""
        from aiohttp import web
        self._open_for_work()
        timeout = _health_timeout(request.query.get("timeout_ms"))
        loop, t0 = asyncio.get_running_loop(), time.monotonic()
        proof = loop.create_future()
        self._health.append(proof)
        if self.scheduler.idle():
            self._probe()
        try:
            await asyncio.wait_for(asyncio.shield(proof), timeout)
        except TimeoutError:
            age = time.monotonic() - self.scheduler.heartbeat
            raise ApiError(503, f"no token within {timeout * 1e3:.0f} ms (worker silent for "
                                f"{age * 1e3:.0f} ms)", code="unhealthy") from None
        finally:
            if proof in self._health:
                self._health.remove(proof)
        return web.json_response({"status": "ok", "model": self.server.info.get("model"),
                                  "latency_ms": round((time.monotonic() - t0) * 1e3, 3)})

    def _probe(self) -> None:
        job = probe_job(self.server.info, "__http_health__", HttpJob)
        try:
            self.scheduler.submit(job)
        except Busy:
            pass                                  # the queued jobs' tokens will be the proof

    def _health_progress(self) -> None:
        for proof in self._health:
            if not proof.done():
                proof.set_result(True)
        self._health.clear()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _health_timeout(text: str | None) -> float:
    """GET /health?timeout_ms=N (1..60000, as the ZeroMQ `health` op), in seconds."""
    if text is None:
        return HEALTH_TIMEOUT_S
    if not text.isdigit() or not 1 <= int(text) <= 60_000:
        raise ApiError(400, f"timeout_ms must be an integer in [1, 60000], got {openai_api.clip(text)!r}",
                       "timeout_ms")
    return int(text) / 1e3


async def _send(resp, obj: dict) -> None:
    """One SSE event."""
    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _from_http(e, request) -> ApiError:
    """aiohttp's own refusals (no route, wrong method, body too large) in OpenAI's shape."""
    where = f"{request.method} {openai_api.clip(request.path)}"
    if e.status == 404:
        return ApiError(404, f"no route {where}; the API is under /v1 (see docs/http.md)",
                        code="unknown_route")
    if e.status == 405:
        return ApiError(405, f"{where}: method not allowed", code="method_not_allowed")
    if e.status == 413:
        return ApiError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes",
                        code="too_large")
    return ApiError(e.status, f"{where}: {e.reason}")


class _Refuse(asyncio.Protocol):
    """Past MAX_CONNECTIONS: answer 503 and close, without parsing anything."""

    BODY = json.dumps(ApiError(503, f"too many open connections (limit {MAX_CONNECTIONS})",
                               code="too_many_connections").body()).encode()

    def connection_made(self, transport) -> None:
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: " + str(len(self.BODY)).encode()
                        + b"\r\n\r\n" + self.BODY)
        transport.close()
