"""The emberd server: a ZeroMQ ROUTER loop in front of the scheduler.

Design. One thread runs `serve()`: it polls the ROUTER socket (client
requests) and an inproc PAIR socket (the worker's wake-ups), and never does
compute. Requests are decoded by ember.formats.protocol (bounded, typed) and
dispatched through `self.handlers`, one method per op; cheap ops answer at
once, `generate` becomes a scheduler Job, `tokenize`/`detokenize` run on a
helper thread. The worker posts events into a deque and pings the PAIR
socket; the loop turns them into replies.

Safety on the socket: ZMQ_MAXMSGSIZE drops a peer that sends an oversized
frame; frames are received one at a time so a message with too many parts is
discarded without being held; ROUTER_MANDATORY makes a reply to a vanished
client fail (EHOSTUNREACH) instead of vanishing silently — that failure is
how the server learns a client is gone and cancels its generation within a
token; ZMQ heartbeats close connections whose peer stopped answering.

Hooks for the production side (issue 7): `_secure_socket` (CURVE/ZAP before
bind), `handlers` (add ops, e.g. `load`), `on_tick` callbacks run every loop
turn (watchdog), `request_stop()` / `draining` for signal handling, and
`stop()` to release everything. The HTTP gateway (daemon/http.py) sits in
front of `scheduler.post` and posts a `progress` event for its own jobs'
tokens, so `health` sees every token, whichever door it went out of.
"""
from __future__ import annotations

import collections
import logging
import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import zmq

from ember.daemon.scheduler import Busy, Job, Scheduler
from ember.formats import protocol
from ember.formats.protocol import Limits, ProtocolError, Request

log = logging.getLogger("emberd")

SERVER_NAME = "emberd"
SERVER_VERSION = "0.1.0"
HEARTBEAT_IVL_MS = 1000      # ZMQ heartbeat: PING every second,
HEARTBEAT_TIMEOUT_MS = 5000  # and drop a peer silent for five
HEALTH_TIMEOUT_MS = 5000
RECENT = 32                  # finished requests remembered for `status`
AUX_MAX_PENDING = 64         # tokenize/detokenize waiting for the helper thread; more -> busy


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
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    return sock


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        self.tick_s = 1.0                  # longest sleep between ticks (the watchdog may need less)
        self.handlers: dict[str, Callable[[bytes, Request], None]] = {
            "hello": self.on_hello, "generate": self.on_generate, "cancel": self.on_cancel,
            "tokenize": self.on_tokenize, "detokenize": self.on_detokenize,
            "status": self.on_status, "models": self.on_models, "health": self.on_health,
            "ping": self.on_ping, "load": self.on_load,
        }
        self._stop = threading.Event()
        self._events: collections.deque = collections.deque()
        self._active: dict[tuple[bytes, Any], Job] = {}      # (owner, id) -> job
        self._recent: collections.deque = collections.deque(maxlen=RECENT)
        self._health: list[tuple[bytes, Any, float, float]] = []  # (owner, id, t0, timeout)
        self._aux = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-aux")
        self._aux_pending = 0        # aux jobs submitted, reply not yet sent (loop thread only)
        self.scheduler = Scheduler(model, self._post, self.limits.max_queue)
        self.bound: list[str] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Create sockets, apply security, bind every endpoint, start the worker."""
        self.ctx = zmq.Context()
        self.sock = make_router(self.ctx, self.limits)
        self._secure_socket(self.sock)
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

    def _secure_socket(self, sock: zmq.Socket) -> None:
        """Hook: CURVE server keys / ZAP setup before bind. Plain loopback by default."""

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
            self._timers(time.monotonic())
            for tick in self.on_tick:
                tick()

    def request_stop(self) -> None:
        """Ask `serve()` to return (safe from a signal handler or another thread)."""
        self._stop.set()
        if self.ctx is not None:
            self._wake()

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
        return max(0, int(min(wake) * 1000) + 1)

    def _drain_requests(self, budget: int = 256) -> None:
        for _ in range(budget):   # bounded, so the worker's events are never starved
            frames = self._recv_bounded()
            if frames is None:
                return
            if len(frames) >= 2:
                self._handle(frames[0], frames[1:])

    def _recv_bounded(self) -> list[bytes] | None:
        """One multipart message, frame by frame; parts past the limit are discarded unseen."""
        try:
            frames = [self.sock.recv(zmq.NOBLOCK)]
        except zmq.Again:
            return None
        cap, extra = self.limits.max_frames + 1, 0     # +1: the identity frame
        while self.sock.getsockopt(zmq.RCVMORE):
            part = self.sock.recv()
            if len(frames) < cap + 1:
                frames.append(part)
            else:
                extra += 1
        if extra:
            frames = frames[:cap + 1]   # decode_request answers too_large
        return frames

    def _handle(self, owner: bytes, frames: list[bytes]) -> None:
        req = None
        try:
            req = protocol.decode_request(frames, self.limits)
            self.handlers[req.op](owner, req)
        except ProtocolError as e:
            rid = e.id if req is None else req.id
            self._send(owner, protocol.error(e.code, e.message, rid))
        except Exception as e:  # noqa: BLE001 - the daemon keeps serving everyone else
            log.exception("request failed")
            rid = None if req is None else req.id
            self._send(owner, protocol.error("internal", f"{type(e).__name__}: {e}", rid))

    def _send(self, owner: bytes, msg: dict, frames: tuple = ()) -> bool:
        """Send one reply; False when the client is gone (or not reading)."""
        try:
            self.sock.send_multipart([owner, protocol.pack(msg), *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise

    def _timers(self, now: float) -> None:
        for job in self.scheduler.expire(now):
            self._end(job)
            self._send(job.owner, protocol.error("deadline_exceeded",
                                                 "deadline passed while queued", job.rid))
        self._health_timeouts(now)

    # -- worker -> loop ------------------------------------------------------------

    def _post(self, kind: str, job: Job | None, payload: Any, wake: bool = True) -> None:
        """Called from the worker/aux threads: queue an event and (usually) wake the loop."""
        self._events.append((kind, job, payload))
        if wake:
            self._wake()

    def _wake(self) -> None:
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

    def _ev_start(self, job: Job, _):
        if job.probe:
            return
        ok = self._send(job.owner, protocol.reply(
            "start", job.rid, queue_ms=_ms(job.t_start - job.t_arrival)))
        self._delivered(job, ok)

    def _ev_token(self, job: Job, payload) -> None:
        i, ev = payload
        if job.stream and not job.probe:
            msg = protocol.reply("token", job.rid, i=i, token=int(ev.id), text=ev.text)
            if ev.logprob is not None:
                msg["logprob"] = float(ev.logprob)
            if ev.top_logprobs:
                msg["top_logprobs"] = [[int(t), float(lp)] for t, lp in ev.top_logprobs]
            self._delivered(job, self._send(job.owner, msg))
        self.scheduler.delivered(job, i + 1)   # after _delivered: a gone client's stop is set first

    def _ev_progress(self, job: None, _) -> None:
        """Another front door's job made a token (daemon/http.py): only health waiters care."""

    def _ev_suspended(self, job: Job, _) -> None:
        log.info("request %r preempted after %d tokens", job.rid, job.n_tokens)

    def _ev_done(self, job: Job, result) -> None:
        self._end(job)
        if job.probe:
            return
        msg, frames = done_message(job, result)
        self._send(job.owner, msg, frames)
        self._recent.append({"id": job.rid, "stop": msg["stop"], "tokens": job.n_tokens,
                             "gone": job.gone, "preemptions": job.preemptions})

    def _ev_error(self, job: Job, payload) -> None:
        code, message, detail = payload
        if detail:
            log.error("request %r: %s", job.rid, detail)
        self._end(job)
        if not job.probe:
            self._send(job.owner, protocol.error(code, message, job.rid))
            self._recent.append({"id": job.rid, "stop": "error", "code": code,
                                 "tokens": job.n_tokens, "gone": job.gone})

    def _ev_reply(self, owner: bytes, payload) -> None:
        self._aux_pending -= 1
        msg, frames = payload
        self._send(owner, msg, frames)

    def _delivered(self, job: Job, ok: bool) -> None:
        """An undeliverable event means the client is gone: stop its job within a token."""
        if not ok and not job.gone:
            job.gone = True
            log.info("client of request %r is gone; cancelling", job.rid)
            self.scheduler.cancel(job)

    def _end(self, job: Job) -> None:
        if job.owner is not None:
            self._active.pop((job.owner, job.rid), None)

    # -- ops ---------------------------------------------------------------------------

    def on_hello(self, owner: bytes, req: Request) -> None:
        wanted = req.fields.get("versions", [req.v])
        v = protocol.negotiate(wanted)
        if v is None:
            raise ProtocolError("unsupported_version", f"no common protocol version: client "
                                f"{wanted}, server {list(protocol.SUPPORTED_VERSIONS)}")
        self._send(owner, protocol.reply(
            "hello", req.id, version=v, versions=list(protocol.SUPPORTED_VERSIONS),
            server=SERVER_NAME, server_version=SERVER_VERSION, model=self.info.get("model"),
            backend=self.info.get("backend"), isa=self.info.get("isa"),
            n_ctx=self.info.get("n_ctx"), limits=self.limits.to_wire()))

    def on_ping(self, owner: bytes, req: Request) -> None:
        self._send(owner, protocol.reply("ping", req.id, time=time.time()))

    def on_generate(self, owner: bytes, req: Request) -> None:
        self._need_model()
        if (owner, req.id) in self._active:
            raise ProtocolError("bad_request", f"request id {req.id!r} is already in flight")
        job = self._job(owner, req)
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
        job = self._active.get((owner, target))
        if job is None:
            if any(rid == target for (_, rid) in self._active):
                raise ProtocolError("unauthorized", f"request {target!r} belongs to another client")
            self._send(owner, protocol.reply("cancel", req.id, target=target, found=False))
            return
        self._send(owner, protocol.reply("cancel", req.id, target=target, found=True))
        if self.scheduler.cancel(job):   # it was still queued: answered here
            self._end(job)
            self._send(owner, protocol.error("cancelled", "cancelled while queued", target))
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
            except Exception as e:  # noqa: BLE001 - engine refusals (bad ids, bad text) are the client's
                payload = (protocol.error("bad_request", f"{req.op}: {e}", req.id), ())
            self._post("reply", owner, payload)
        self._aux.submit(run)

    def on_status(self, owner: bytes, req: Request) -> None:
        now = time.monotonic()
        snap = self.scheduler.snapshot(now)
        self._send(owner, protocol.reply(
            "status", req.id, uptime_s=round(now - self.t_start, 3), model=self.info.get("model"),
            backend=self.info.get("backend"), isa=self.info.get("isa"), rss_bytes=rss_bytes(),
            recent=list(self._recent), draining=self.draining, memory=self.info.get("memory"),
            **snap))

    def on_models(self, owner: bytes, req: Request) -> None:
        models = [] if self.model is None else [{
            "name": self.info.get("model"), "path": self.info.get("path"),
            "arch": self.info.get("arch"), "n_ctx": self.info.get("n_ctx"),
            "n_vocab": self.info.get("n_vocab"), "backend": self.info.get("backend"),
            "loaded": True}]
        self._send(owner, protocol.reply("models", req.id, models=models))

    def on_load(self, owner: bytes, req: Request) -> None:
        """Slot for model management (issue 7): not served by this build."""
        raise ProtocolError("unauthorized", "the load op is not enabled on this daemon")

    def _need_model(self) -> None:
        if self.model is None:
            raise ProtocolError("not_loaded", "no model is loaded")

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
        job = Job(rid="__health__", owner=None, source=self.info.get("probe_prompt", "a"),
                  sampling={"max_tokens": 1, "temperature": 0.0}, stream=False,
                  priority=-1001, probe=True)
        try:
            self.scheduler.submit(job)
        except Busy:
            pass   # the queue's own jobs will prove progress

    def _health_progress(self) -> None:
        now = time.monotonic()
        for owner, rid, t0, _ in self._health:
            self._send(owner, protocol.reply("health", rid, ok=True, latency_ms=_ms(now - t0),
                                             worker="producing tokens"))
        self._health.clear()

    def _health_timeouts(self, now: float) -> None:
        keep = []
        for owner, rid, t0, timeout in self._health:
            if now - t0 < timeout:
                keep.append((owner, rid, t0, timeout))
                continue
            age = _ms(now - self.scheduler.heartbeat)
            self._send(owner, protocol.reply(
                "health", rid, ok=False, latency_ms=_ms(now - t0),
                worker=f"no token within {timeout * 1000:.0f} ms (worker silent for {age:.0f} ms)"))
        self._health = keep


# ---------------------------------------------------------------------------
# Reply builders
# ---------------------------------------------------------------------------

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
