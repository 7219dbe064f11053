"""The emberd server: a ZeroMQ ROUTER loop in front of the scheduler.

Design. One thread runs `serve()`: it polls the ROUTER socket (client
requests) and an inproc PAIR socket (the worker's wake-ups), and never does
compute. Requests are decoded by ember.formats.protocol (bounded, typed) and
dispatched through `self.handlers`, one method per op; cheap ops answer at
once, `generate` and `embed` become scheduler Jobs, `tokenize`/`detokenize` run on a
helper thread. The worker posts events into a deque and pings the PAIR
socket; the loop turns them into replies.

Safety on the socket: ZMQ_MAXMSGSIZE drops a peer that sends an oversized
frame; frames are received one at a time and those past the limit are
dropped unkept (but libzmq delivers a multipart message only once all of it
has arrived, so it has buffered the whole message by then: the number of
frames in one message is bounded by nothing in libzmq — with a memory budget
the daemon caps its private memory instead, see budget.cap_private); ROUTER_MANDATORY makes a reply to a vanished
client fail (EHOSTUNREACH) instead of vanishing silently — that failure is
how the server learns a client is gone and cancels its generation within a
token; ZMQ heartbeats close connections whose peer stopped answering.

Slow readers. A client that reads slower than it asks is alive, not gone:
when its send queue is full (EAGAIN) its replies wait here, in order, and
are retried every few milliseconds; a token counts as delivered (the
scheduler paces on it) only once it has left, so the request pauses instead
of computing for a queue nobody drains. Only EHOSTUNREACH (the connection is
closed, or heartbeats found it dead) means gone. A client whose held replies
have not moved for SLOW_READER_S, or that lets more than `held_max` pile up,
is treated as gone too: its requests are cancelled and its replies dropped.

Extension points for the production side (daemon/service.py), so that it
never reaches into the loop's state: `before_bind` (CURVE/ZAP and other
socket options, run on the ROUTER before bind), `admit` (checks on every
request's first frame, e.g. a revoked CURVE key), `register_op` (add or wrap
an op, e.g. `load`), `send` / `end_job` / `active_jobs` (answer and retire
requests), `set_model` (swap the served model), `wake` (from another
thread), `on_tick` callbacks run every loop turn (watchdog),
`request_stop()` / `draining` for signal handling, and `stop()` to release
everything.
The HTTP gateway (daemon/http.py) sits in front of `scheduler.post` and
posts a `progress` event for its own jobs' tokens, so `health` sees every
token, whichever door it went out of.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from ember.daemon import budget
from ember.daemon.scheduler import Busy, Job, Scheduler, probe_job
from ember.formats import protocol
from ember.formats.errors import UserError
from ember.formats.protocol import Limits, ProtocolError, Request

log = logging.getLogger("emberd")

SERVER_NAME = "emberd"
SERVER_VERSION = "0.1.0"
SLOW_READER_S = 30.0         # replies held this long without one leaving: the client is gone
HEARTBEAT_IVL_MS = 1000      # ZMQ heartbeat: PING every second, and drop a peer silent for
HEARTBEAT_TIMEOUT_MS = int(SLOW_READER_S * 1000)   # as long as a slow reader may stall (below)
HEALTH_TIMEOUT_MS = 5000
RECENT = 32                  # finished requests remembered for `status`
AUX_MAX_PENDING = 64         # tokenize/detokenize waiting for the helper thread; more -> busy
RETRY_S = 0.005              # while replies are held, retry the socket this often


# ---------------------------------------------------------------------------
# Socket setup
# ---------------------------------------------------------------------------

def make_router(ctx: zmq.Context, limits: Limits) -> zmq.Socket:
    """A ROUTER with the limits and liveness options the protocol relies on."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    # one running stream per client at most: room for every token of it
    sock.setsockopt(zmq.SNDHWM, limits.max_tokens + 256)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    # A client that stops reading fills its TCP window, and our PINGs queue behind the data it
    # has not read: its PONG cannot come back. So the heartbeat timeout can be no shorter than
    # the time a slow reader is allowed (a dead process is caught at once all the same: its
    # kernel closes the connection). No TCP_MAXRT for the same reason: Linux applies it to
    # zero-window probes, so it would cut a slow reader off too.
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    return sock


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class Server:
    """emberd's serving loop: `start()` binds, `serve()` loops, `stop()` releases."""

    def __init__(self, model, endpoints: list[str], limits: Limits | None = None,
                 info: dict | None = None):
        self.model = model                 # engine Model, or None until a `load`
        self.endpoints = list(endpoints)
        self.limits = limits or Limits()
        self.info = dict(info or {})       # model/backend/isa facts for hello and models
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.t_start = time.monotonic()
        self.draining = False
        self.on_tick: list[Callable[[], None]] = []
        self.before_bind: list[Callable[[zmq.Socket], None]] = []   # socket security, options
        self.admit: list[Callable[[zmq.Frame], None]] = []   # per request; raise ProtocolError to refuse
        self.tick_s = 1.0                  # longest sleep between ticks (the watchdog may need less)
        self.handlers: dict[str, Callable[[bytes, Request], None]] = {
            "hello": self.on_hello, "generate": self.on_generate, "cancel": self.on_cancel,
            "tokenize": self.on_tokenize, "detokenize": self.on_detokenize,
            "status": self.on_status, "models": self.on_models, "health": self.on_health,
            "ping": self.on_ping, "load": self.on_load, "embed": self.on_embed,
        }
        self._stop = threading.Event()
        self._events: collections.deque = collections.deque()
        self._active: dict[tuple[bytes, Any], Job] = {}      # (owner, id) -> job
        self._recent: collections.deque = collections.deque(maxlen=RECENT)
        self._health: list[tuple[bytes, Any, float, float]] = []  # (owner, id, t0, timeout)
        self._aux = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-aux")
        self._aux_pending = 0        # aux jobs submitted, reply not yet sent (loop thread only)
        self._held: dict[bytes, Held] = {}   # owner -> replies waiting for room in its queue
        self.held_max = self.limits.max_tokens + 256   # per client, beyond libzmq's SNDHWM
        self.scheduler = Scheduler(model, self._post, self.limits.max_queue)
        self.bound: list[str] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Create sockets, apply security, bind every endpoint, start the worker."""
        self.ctx = zmq.Context()
        self.sock = make_router(self.ctx, self.limits)
        for configure in self.before_bind:
            configure(self.sock)
        for ep in self.endpoints:
            self.sock.bind(ep)
            self.bound.append(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._wake_addr = f"inproc://ember-wake-{id(self)}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        self.scheduler.start()

    def register_op(self, op: str, handler: Callable[[bytes, Request], None]) -> Callable:
        """Serve `op` with handler(owner, request); returns the handler it replaces (to wrap it)."""
        if op not in protocol.REQUEST_OPS:
            raise ValueError(f"unknown op {op!r}: add it to protocol.REQUEST_OPS first")
        previous, self.handlers[op] = self.handlers[op], handler
        return previous

    def set_model(self, model, info: dict) -> None:
        """Serve `model` from the next request on (a running generation keeps the one it holds)."""
        self.model = model
        self.scheduler.model = model
        self.info = dict(info)

    def active_jobs(self) -> list[Job]:
        """Generate requests in flight (queued, running or suspended), oldest first."""
        return list(self._active.values())

    def serve(self) -> None:
        """Run the loop until `request_stop()`."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(self._poll_timeout_ms()))
            if self._wake_rx in ready:
                self._drain_wakes()
            self._drain_events()
            if self.sock in ready:
                self._drain_requests()
            if self._held:
                self._flush_held(time.monotonic())
            self._timers(time.monotonic())
            for tick in self.on_tick:
                tick()

    def request_stop(self) -> None:
        """Ask `serve()` to return (safe from a signal handler or another thread)."""
        self._stop.set()
        if self.ctx is not None:
            self.wake()

    def stop(self) -> None:
        """Cancel work, join threads, close sockets."""
        self._stop.set()
        self.scheduler.close()
        self._aux.shutdown(wait=False, cancel_futures=True)
        for s in (self.sock, getattr(self, "_wake_rx", None), getattr(self, "_wake_tx", None)):
            if s is not None:
                s.close(linger=0)
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    # -- the loop's pieces ----------------------------------------------------------

    def _poll_timeout_ms(self) -> int:
        now, wake = time.monotonic(), [self.tick_s]     # never sleep past a tick
        deadline = self.scheduler.next_deadline()
        if deadline is not None:
            wake.append(deadline - now)
        wake += [t0 + timeout - now for _, _, t0, timeout in self._health]
        if self._held:
            wake.append(RETRY_S)
        return max(0, int(min(wake) * 1000) + 1)

    def _drain_requests(self, budget: int = 256) -> None:
        for _ in range(budget):   # bounded, so the worker's events are never starved
            got = self._recv_bounded()
            if got is None:
                return
            first, frames = got
            if len(frames) >= 2:
                self._handle(first, frames[0], frames[1:])

    def _recv_bounded(self) -> tuple[zmq.Frame, list[bytes]] | None:
        """One multipart message, frame by frame; parts past the limit are discarded unseen.

        Also the first frame itself: it carries the connection's metadata (the CURVE key).
        """
        try:
            first = self.sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        frames = [first.bytes]
        cap, extra = self.limits.max_frames + 1, 0     # +1: the identity frame
        while self.sock.getsockopt(zmq.RCVMORE):
            part = self.sock.recv()
            if len(frames) < cap + 1:
                frames.append(part)
            else:
                extra += 1
        if extra:
            frames = frames[:cap + 1]   # decode_request answers too_large
        return first, frames

    def _handle(self, first: zmq.Frame, owner: bytes, frames: list[bytes]) -> None:
        req = None
        try:
            req = protocol.decode_request(frames, self.limits)
            for check in self.admit:
                check(first)
            self.handlers[req.op](owner, req)
        except ProtocolError as e:
            rid = e.id if req is None else req.id
            self.send(owner, protocol.error(e.code, e.message, rid))
        except Exception as e:  # noqa: BLE001 - the daemon keeps serving everyone else
            log.exception("request failed")
            rid = None if req is None else req.id
            self.send(owner, protocol.error("internal", f"{type(e).__name__}: {e}", rid))

    # -- sending: held replies for slow readers ------------------------------------

    def send(self, owner: bytes, msg: dict, frames: tuple = (),
             on_sent: Callable[[], None] | None = None) -> bool:
        """Send one reply, in order behind any held for this client; False: the client is gone.

        `on_sent` runs once the reply has left (at once, or later from the held queue).
        """
        parts = [owner, protocol.pack(msg), *frames]
        held = self._held.get(owner)
        if held is None:
            outcome = self._push(parts)
            if outcome == "gone":
                return False
            if outcome == "sent":
                if on_sent is not None:
                    on_sent()
                return True
            held = self._held[owner] = Held(time.monotonic())
        held.replies.append((parts, on_sent))
        if len(held.replies) > self.held_max:
            self._client_gone(owner, f"more than {self.held_max} replies unread")
            return False
        return True

    def _push(self, parts: list) -> str:
        """One send attempt: "sent", "full" (the client is slow) or "gone" (it disconnected)."""
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
            return "sent"
        except zmq.ZMQError as e:
            if e.errno == zmq.EAGAIN:
                return "full"
            if e.errno == zmq.EHOSTUNREACH:
                return "gone"
            raise

    def _flush_held(self, now: float) -> None:
        for owner, held in list(self._held.items()):
            while held.replies:
                parts, on_sent = held.replies[0]
                outcome = self._push(parts)
                if outcome != "sent":
                    break
                held.replies.popleft()
                held.t_moved = now
                if on_sent is not None:
                    on_sent()
            if not held.replies:
                del self._held[owner]
            elif outcome == "gone":
                self._client_gone(owner, "disconnected")
            elif now - held.t_moved > SLOW_READER_S:
                self._client_gone(owner, f"read nothing for {SLOW_READER_S:.0f} s")

    def _client_gone(self, owner: bytes, why: str) -> None:
        """Drop a client's held replies and cancel its requests (running ones end within a token)."""
        self._held.pop(owner, None)
        for job in [j for (o, _), j in self._active.items() if o == owner]:
            log.info("client of request %r: %s; cancelling", job.rid, why)
            job.gone = True
            if self.scheduler.cancel(job):          # it was queued: nobody will answer it
                self.end_job(job)
                self._recent.append({"id": job.rid, "stop": "cancelled", "tokens": 0, "gone": True})

    def _timers(self, now: float) -> None:
        for job in self.scheduler.expire(now):
            self.end_job(job)
            self.send(job.owner, protocol.error("deadline_exceeded",
                                                 "deadline passed while queued", job.rid))
        self._health_timeouts(now)

    # -- worker -> loop ------------------------------------------------------------

    def _post(self, kind: str, job: Job | None, payload: Any, wake: bool = True) -> None:
        """Called from the worker/aux threads: queue an event and (usually) wake the loop."""
        self._events.append((kind, job, payload))
        if wake:
            self.wake()

    def wake(self) -> None:
        """Make the loop take a turn now (thread-safe)."""
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass   # the pipe is full of wake-ups already: the loop will wake

    def _drain_wakes(self) -> None:
        while True:
            try:
                self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _drain_events(self) -> None:
        while self._events:
            kind, job, payload = self._events.popleft()
            getattr(self, f"_ev_{kind}")(job, payload)
            if kind in ("token", "done", "progress") and self._health:
                self._health_progress()   # a token was made: the worker is alive

    # a gone client's job sends nothing more: a reply could re-open a held queue for nobody

    def _ev_start(self, job: Job, _):
        if job.probe or job.gone:
            return
        ok = self.send(job.owner, protocol.reply(
            "start", job.rid, queue_ms=_ms(job.t_start - job.t_arrival)))
        self._delivered(job, ok)

    def _ev_token(self, job: Job, payload) -> None:
        i, ev = payload
        if job.stream and not job.probe and not job.gone:
            msg = protocol.reply("token", job.rid, i=i, token=int(ev.id), text=ev.text)
            if ev.logprob is not None:
                msg["logprob"] = float(ev.logprob)
            if ev.top_logprobs:
                msg["top_logprobs"] = [[int(t), float(lp)] for t, lp in ev.top_logprobs]
            # the worker may compute ahead only once this token has left (paced, see Scheduler._pace)
            sent = lambda: self.scheduler.delivered(job, i + 1)  # noqa: E731
            if not self.send(job.owner, msg, on_sent=sent):
                self._delivered(job, False)
                sent()                          # after the stop is set: the worker must not wait
            return
        self.scheduler.delivered(job, i + 1)

    def _ev_progress(self, job: None, _) -> None:
        """Another front door's job made a token (daemon/http.py): only health waiters care."""

    def _ev_suspended(self, job: Job, _) -> None:
        log.info("request %r preempted after %d tokens", job.rid, job.n_tokens)

    def _ev_done(self, job: Job, result) -> None:
        self.end_job(job)
        if job.probe:
            return
        msg, frames = (embed_message if job.op == "embed" else done_message)(job, result)
        if not job.gone:
            self.send(job.owner, msg, frames)
        self._recent.append({"id": job.rid, "stop": msg.get("stop", "embedded"), "tokens": job.n_tokens,
                             "gone": job.gone, "preemptions": job.preemptions})

    def _ev_error(self, job: Job, payload) -> None:
        code, message, detail = payload
        if detail:
            log.error("request %r: %s", job.rid, detail)
        self.end_job(job)
        if not job.probe:
            if not job.gone:
                self.send(job.owner, protocol.error(code, message, job.rid))
            self._recent.append({"id": job.rid, "stop": "error", "code": code,
                                 "tokens": job.n_tokens, "gone": job.gone})

    def _ev_reply(self, owner: bytes, payload) -> None:
        self._aux_pending -= 1
        msg, frames = payload
        self.send(owner, msg, frames)

    def _delivered(self, job: Job, ok: bool) -> None:
        """An undeliverable event means the client is gone: stop its job within a token."""
        if not ok and not job.gone:
            job.gone = True
            log.info("client of request %r is gone; cancelling", job.rid)
            self.scheduler.cancel(job)

    def end_job(self, job: Job) -> None:
        """Forget a finished (or dropped) job: it no longer counts as in flight for its client."""
        if job.owner is not None:
            self._active.pop((job.owner, job.rid), None)

    # -- ops ---------------------------------------------------------------------------

    def on_hello(self, owner: bytes, req: Request) -> None:
        wanted = req.fields.get("versions", [req.v])
        v = protocol.negotiate(wanted)
        if v is None:
            raise ProtocolError("unsupported_version", f"no common protocol version: client "
                                f"{wanted}, server {list(protocol.SUPPORTED_VERSIONS)}")
        self.send(owner, protocol.reply(
            "hello", req.id, version=v, versions=list(protocol.SUPPORTED_VERSIONS),
            server=SERVER_NAME, server_version=SERVER_VERSION, model=self.info.get("model"),
            backend=self.info.get("backend"), isa=self.info.get("isa"),
            n_ctx=self.info.get("n_ctx"), limits=self.limits.to_wire()))

    def on_ping(self, owner: bytes, req: Request) -> None:
        self.send(owner, protocol.reply("ping", req.id, time=time.time()))

    def on_generate(self, owner: bytes, req: Request) -> None:
        self._need_model("generation")
        self._queue(owner, req, self._job(owner, req))

    def on_embed(self, owner: bytes, req: Request) -> None:
        """Texts -> vectors, computed by the worker like a generation (same queue, same limits)."""
        self._need_model("embedding")
        f = req.fields
        sampling = {"normalize": f["normalize"]} if "normalize" in f else {}
        self._queue(owner, req, Job(rid=req.id, owner=owner, source=f["input"], sampling=sampling,
                                    stream=False, priority=f.get("priority", 0),
                                    deadline=_deadline(f), op="embed"))

    def _queue(self, owner: bytes, req: Request, job: Job) -> None:
        if (owner, req.id) in self._active:
            raise ProtocolError("bad_request", f"request id {req.id!r} is already in flight")
        if job.deadline is not None and job.deadline <= job.t_arrival:
            raise ProtocolError("deadline_exceeded", "the deadline had passed when the request arrived")
        try:
            self.scheduler.submit(job)
        except Busy as e:
            raise ProtocolError("busy", str(e)) from None
        self._active[(owner, req.id)] = job

    def _job(self, owner: bytes, req: Request) -> Job:
        f = req.fields
        if "tokens" in req.arrays:
            source = self._checked_ids(req.arrays["tokens"])
        else:
            source = f.get("prompt", f.get("messages"))
        sampling = {k: f[k] for k in protocol.SAMPLING if k in f}
        sampling["max_tokens"] = f.get("max_tokens", min(256, self.limits.max_tokens))
        return Job(rid=req.id, owner=owner, source=source, sampling=sampling,
                   stream=f.get("stream", True), priority=f.get("priority", 0),
                   deadline=_deadline(f))

    def _checked_ids(self, ids):
        n_vocab = self.info.get("n_vocab")
        if n_vocab is not None and ids.size and int(ids.max()) >= n_vocab:
            raise ProtocolError("bad_request", f"token id {int(ids.max())} out of range [0, {n_vocab})")
        return ids

    def on_cancel(self, owner: bytes, req: Request) -> None:
        target = req.fields["target"]
        job = self._active.get((owner, target))    # ids are per connection: only its own
        if job is None:
            self.send(owner, protocol.reply("cancel", req.id, target=target, found=False))
            return
        self.send(owner, protocol.reply("cancel", req.id, target=target, found=True))
        if self.scheduler.cancel(job):   # it was still queued: answered here
            self.end_job(job)
            self.send(owner, protocol.error("cancelled", "cancelled while queued", target))
            self._recent.append({"id": target, "stop": "cancelled", "tokens": 0, "gone": False})

    def on_tokenize(self, owner: bytes, req: Request) -> None:
        self._need_model()
        text, special = req.fields["text"], req.fields.get("add_special", True)
        self._aux_call(owner, req, lambda: self._tokenize(req.id, text, special))

    def _tokenize(self, rid, text: str, special: bool):
        ids = self.model.tokenize(text, add_special=special)
        return (protocol.reply("tokenize", rid, n=len(ids), frames=["tokens"]),
                (protocol.encode_tokens(ids),))

    def on_detokenize(self, owner: bytes, req: Request) -> None:
        self._need_model()
        ids = self._checked_ids(req.arrays["tokens"])
        self._aux_call(owner, req, lambda: (
            protocol.reply("detokenize", req.id, text=self.model.detokenize(ids.tolist())), ()))

    def _aux_call(self, owner: bytes, req: Request, fn: Callable) -> None:
        """Run fn off the loop; its (msg, frames) result or error becomes the reply.

        Bounded like the generate queue: each waiting job holds its request's text.
        """
        if self._aux_pending >= AUX_MAX_PENDING:
            raise ProtocolError("busy", f"{AUX_MAX_PENDING} tokenize/detokenize requests already waiting")
        self._aux_pending += 1

        def run():
            try:
                payload = fn()
            except UserError as e:          # engine refusals (bad ids, bad text) are the client's
                payload = (protocol.error("bad_request", f"{req.op}: {e}", req.id), ())
            except Exception as e:  # noqa: BLE001 - ours: the helper thread must live on
                log.exception("%s failed", req.op)
                payload = (protocol.error("internal", f"{type(e).__name__}: {e}", req.id), ())
            self._post("reply", owner, payload)
        self._aux.submit(run)

    def on_status(self, owner: bytes, req: Request) -> None:
        now = time.monotonic()
        snap = self.scheduler.snapshot(now)
        self.send(owner, protocol.reply(
            "status", req.id, uptime_s=round(now - self.t_start, 3), model=self.info.get("model"),
            backend=self.info.get("backend"), isa=self.info.get("isa"), rss_bytes=budget.rss_bytes(),
            recent=list(self._recent), draining=self.draining, memory=self.info.get("memory"),
            held={"clients": len(self._held), "replies": sum(len(h.replies) for h in self._held.values())},
            **snap))

    def on_models(self, owner: bytes, req: Request) -> None:
        models = [] if self.model is None else [{
            "name": self.info.get("model"), "path": self.info.get("path"),
            "arch": self.info.get("arch"), "n_ctx": self.info.get("n_ctx"),
            "n_vocab": self.info.get("n_vocab"), "backend": self.info.get("backend"),
            "loaded": True, "kind": self.info.get("kind", "generation"),
            "n_embd": self.info.get("n_embd")}]
        self.send(owner, protocol.reply("models", req.id, models=models))

    def on_load(self, owner: bytes, req: Request) -> None:
        """Refused by a bare Server; emberd's Service registers the real `load` (--allow-load)."""
        raise ProtocolError("unauthorized", "the load op is not enabled on this daemon")

    def _need_model(self, kind: str | None = None) -> None:
        """A model is loaded (and, if `kind` is given, of that kind: else bad_request at once,
        not after waiting in the queue)."""
        if self.model is None:
            raise ProtocolError("not_loaded", "no model is loaded")
        if kind is not None:
            try:
                self.model.require(kind)
            except UserError as e:
                raise ProtocolError("bad_request", str(e)) from None

    # -- health ---------------------------------------------------------------------------

    def on_health(self, owner: bytes, req: Request) -> None:
        """Answer once the worker proves it can still make a token, or say it cannot.

        Idle: a real one-token probe generation runs on the worker. Busy: the
        running request's next token (or the probe after it) is the proof.
        Either way, no proof within the timeout means unhealthy.
        """
        self._need_model()
        timeout = req.fields.get("timeout_ms", HEALTH_TIMEOUT_MS) / 1000
        self._health.append((owner, req.id, time.monotonic(), timeout))
        if self.scheduler.idle():
            self._probe()

    def _probe(self) -> None:
        job = probe_job(self.info, "__health__")
        try:
            self.scheduler.submit(job)
        except Busy:
            pass   # the queue's own jobs will prove progress

    def _health_progress(self) -> None:
        now = time.monotonic()
        for owner, rid, t0, _ in self._health:
            self.send(owner, protocol.reply("health", rid, ok=True, latency_ms=_ms(now - t0),
                                             worker="producing tokens"))
        self._health.clear()

    def _health_timeouts(self, now: float) -> None:
        keep = []
        for owner, rid, t0, timeout in self._health:
            if now - t0 < timeout:
                keep.append((owner, rid, t0, timeout))
                continue
            age = _ms(now - self.scheduler.heartbeat)
            self.send(owner, protocol.reply(
                "health", rid, ok=False, latency_ms=_ms(now - t0),
                worker=f"no token within {timeout * 1000:.0f} ms (worker silent for {age:.0f} ms)"))
        self._health = keep


# ---------------------------------------------------------------------------
# Reply builders
# ---------------------------------------------------------------------------

@dataclass
class Held:
    """Replies to one slow client, waiting for room in its ZeroMQ queue, oldest first."""

    t_moved: float                                     # when the last one left (or the first was held)
    replies: collections.deque = field(default_factory=collections.deque)  # (frames, on_sent)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _deadline(f: dict) -> float | None:
    """The earlier of `deadline_ms` (relative) and `deadline` (Unix time), as monotonic time."""
    now_mono, now_wall, ds = time.monotonic(), time.time(), []
    if "deadline_ms" in f:
        ds.append(now_mono + f["deadline_ms"] / 1000)
    if "deadline" in f:
        ds.append(now_mono + (f["deadline"] - now_wall))
    return min(ds) if ds else None


def done_message(job: Job, payload) -> tuple[dict, tuple]:
    """The terminal `done` event of a generation (and its token-ids frame)."""
    result, stop = payload
    t_end = time.monotonic()
    usage = {"prompt_tokens": int(result.usage.get("prompt_tokens", 0)),
             "completion_tokens": int(result.usage.get("completion_tokens", job.n_tokens))}
    msg = protocol.reply("done", job.rid, stop=stop, text=result.text, usage=usage,
                         timings=_timings(job, result.timings, t_end), seed=int(result.seed),
                         preemptions=job.preemptions, frames=["tokens"])
    return msg, (protocol.encode_tokens(result.tokens),)


def embed_message(job: Job, payload) -> tuple[dict, tuple]:
    """The `embed` reply: shape and usage in the header, the vectors as one float32 frame."""
    result, _ = payload
    n, dim = result.vectors.shape
    t_end = time.monotonic()
    timings = {"queue_ms": _ms((job.t_start or t_end) - job.t_arrival),
               "compute_ms": round(float(result.timings["compute_ms"]), 3),
               "total_ms": _ms(t_end - job.t_arrival)}
    msg = protocol.reply("embed", job.rid, n=int(n), dim=int(dim), usage=dict(result.usage),
                         timings=timings, frames=["embeddings"])
    return msg, (protocol.encode_vectors(result.vectors),)


def _timings(job: Job, engine_t: dict, t_end: float) -> dict:
    """Server-side clock for waits (arrival -> start, arrival -> first token), engine's for compute."""
    start = job.t_start or t_end
    out = {"queue_ms": _ms(start - job.t_arrival),
           "ttft_ms": _ms((job.t_first or t_end) - job.t_arrival),
           "total_ms": _ms(t_end - job.t_arrival)}
    for k in ("prefill_ms", "prefill_tok_s", "decode_ms", "decode_tok_s", "reprefill_ms"):
        if engine_t.get(k) is not None:
            out[k] = round(float(engine_t[k]), 3)
    return out
