"""The scheduler: one generation computes at a time, on one worker thread.

Design. Latency of a single request is the product, so exactly one request
runs; the others wait in a bounded priority heap ordered by (priority high
first, then earliest deadline, then arrival). A full heap refuses at once
(`Busy`), so a client learns immediately rather than after a timeout.

Two threads share this object and nothing else:
* the server's ZeroMQ loop calls `submit`, `cancel`, `expire`, `snapshot`;
* the worker thread (`_work`) takes the best job, steps its engine
  `Generation` one token at a time and posts events (start, token, done,
  error, suspended) to the loop through `post` — a callback the server wires
  to a deque plus an inproc ZeroMQ wake-up, so the loop never waits on compute.

All heap and job-state changes happen under one lock. Between two tokens the
worker looks at the running job once: a stop request (client cancel, client
gone, server stop) or a passed deadline ends it with a terminal `done`; a
better job at the top of the heap preempts it — the engine suspends it
(keeping its RNG and tokens), it goes back into the heap with its original
arrival number, and resumes later with the same text an uninterrupted run
would have produced. So every stop takes effect within one token.

An `embed` job (an embedding model's request) waits in the same heap and
runs on the same worker, but in one step: it encodes all its texts and posts
`done` with the engine's Embeddings (no start or token events). A stop asked
while it computes applies to nothing left; its reply still goes out.

The worker picks the next job itself when one ends: no round trip through
the loop between requests.
"""
from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ember.formats.errors import UserError

# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------

PACE_TIMEOUT_S = 1.0   # a loop that stops taking tokens for this long no longer holds the worker


class Busy(Exception):
    """The queue is full."""


@dataclass(eq=False)
class Job:
    """One generate (or embed) request from its arrival to its terminal event."""

    rid: Any                          # the client's request id
    owner: bytes | None               # ROUTER identity; None for the server's own health probe
    source: Any                       # prompt str | chat messages list | token ids (n,) int32
                                      # embed: list of texts (or token id lists)
    sampling: dict                    # engine sampling keywords (max_tokens included); embed: normalize
    stream: bool = True
    priority: int = 0
    deadline: float | None = None     # time.monotonic() seconds
    seq: int = 0                      # arrival order, kept across preemption
    t_arrival: float = field(default_factory=time.monotonic)
    # --- worker-side progress -------------------------------------------------
    state: str = "queued"             # queued | running | suspended | finished
    stop: str | None = None           # set by the loop: "cancelled" (cancel, client gone, shutdown)
    gone: bool = False                # the client vanished (a reply was undeliverable)
    gen: Any = None                   # the engine's Generation, once opened
    t_start: float | None = None
    t_first: float | None = None
    n_tokens: int = 0
    delivered: int = 0                # tokens the loop has tried to send (pacing, see _pace)
    preemptions: int = 0
    probe: bool = False               # health probe: not counted as served
    op: str = "generate"              # "generate" | "embed"

    def key(self) -> tuple:
        deadline = self.deadline if self.deadline is not None else math.inf
        return (-self.priority, deadline, self.seq)

    def summary(self, now: float) -> dict:
        return {"id": self.rid, "priority": self.priority, "state": self.state,
                "tokens": self.n_tokens, "age_ms": round((now - self.t_arrival) * 1e3, 3)}


# ---------------------------------------------------------------------------
# The scheduler: heap + worker
# ---------------------------------------------------------------------------

class Scheduler:
    """Bounded priority queue plus the single worker thread that runs jobs."""

    def __init__(self, model, post: Callable[..., None], max_queue: int = 16):
        self.model = model
        self.post = post                   # (kind, job, payload, wake=True) -> None; thread-safe
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[tuple, Job]] = []
        self._queued = 0                   # live (not cancelled) entries in the heap
        self._seq = itertools.count()
        self._progress = threading.Condition()   # loop -> worker: a token was handed to the socket
        self.running: Job | None = None
        self._closing = False
        self.heartbeat = time.monotonic()  # last time the worker proved it is alive
        self.tokens_served = 0
        self.requests_served = 0
        self._thread = threading.Thread(target=self._work, name="ember-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the running job within a token, drop the queue, join the worker."""
        with self._lock:
            self._closing = True
            if self.running is not None:
                self.running.stop = "cancelled"
            self._wake.notify_all()
        with self._progress:
            self._progress.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- loop-side API --------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job (raises Busy when the queue is full)."""
        with self._lock:
            if self._queued >= self.max_queue:
                raise Busy(f"queue full ({self.max_queue} waiting)")
            job.seq = next(self._seq)
            self._push(job)
            self._wake.notify()

    def cancel(self, job: Job) -> bool:
        """Stop a job. True: it was queued and is dropped now (the caller answers);
        False: it is running and the worker ends it within a token with `done`."""
        with self._lock:
            if job.state in ("queued", "suspended") and job is not self.running:
                self._drop(job)
                return True
            job.stop = "cancelled"
        with self._progress:
            self._progress.notify_all()       # a worker pacing on this job must see the stop
        return False

    def expire(self, now: float) -> list[Job]:
        """Remove queued jobs whose deadline has passed; the caller answers them."""
        with self._lock:
            dead = [j for _, j in self._heap if j.state != "finished" and j.deadline is not None
                    and j.deadline <= now and j is not self.running]
            for j in dead:
                self._drop(j)
            return dead

    def delivered(self, job: Job, n: int) -> None:
        """The loop has tried to send the job's first n tokens (a failure set job.stop first)."""
        with self._progress:
            job.delivered = n
            self._progress.notify_all()

    def next_deadline(self) -> float | None:
        with self._lock:
            ds = [j.deadline for _, j in self._heap if j.deadline is not None and j.state != "finished"]
            return min(ds) if ds else None

    def idle(self) -> bool:
        with self._lock:
            return self.running is None and self._queued == 0

    def jobs(self) -> list[Job]:
        """Every unfinished job — running, queued or suspended — whichever front door sent it."""
        with self._lock:
            live = [j for _, j in self._heap if j.state != "finished"]
            return ([self.running] if self.running is not None else []) + live

    def snapshot(self, now: float) -> dict:
        with self._lock:
            queue = sorted((k, j) for k, j in self._heap if j.state != "finished")
            return {"current": self.running.summary(now) if self.running else None,
                    "queue": [j.summary(now) for _, j in queue],
                    "queue_len": len(queue), "queue_max": self.max_queue,
                    "tokens_served": self.tokens_served, "requests_served": self.requests_served,
                    "worker_heartbeat_age_ms": round((now - self.heartbeat) * 1e3, 3)}

    # -- heap (caller holds the lock) -------------------------------------------

    def _push(self, job: Job) -> None:
        heapq.heappush(self._heap, (job.key(), job))
        self._queued += 1

    def _drop(self, job: Job) -> None:
        # lazy deletion: the entry stays in the heap, marked finished, skipped on pop;
        # rebuilt when dead entries pile up (a submit/cancel storm behind a long job)
        if job.state != "finished":
            job.state = "finished"
            self._queued -= 1
        if len(self._heap) > 2 * self.max_queue + 64:
            self._heap = [e for e in self._heap if e[1].state != "finished"]
            heapq.heapify(self._heap)

    def _top(self) -> Job | None:
        while self._heap and self._heap[0][1].state == "finished":
            heapq.heappop(self._heap)
        return self._heap[0][1] if self._heap else None

    def _pop(self) -> Job | None:
        job = self._top()
        if job is not None:
            heapq.heappop(self._heap)
            self._queued -= 1
        return job

    # -- worker thread ----------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - one bad request must not kill the worker
                self._fail(job, *_failure(e))

    def _take(self) -> Job | None:
        with self._lock:
            while True:
                if self._closing:
                    return None
                job = self._pop()
                if job is not None:
                    job.state, self.running = "running", job
                    return job
                self.running = None
                self._wake.wait(timeout=1.0)
                self.heartbeat = time.monotonic()

    def _run(self, job: Job) -> None:
        if job.op == "embed":
            return self._embed(job)
        if job.gen is None and not self._open(job):
            return
        while True:
            self._pace(job)
            reason = self._interrupt(job)
            if reason == "preempt":
                return self._suspend(job)
            if reason is not None:
                job.gen.cancel()
                job.gen.step()                    # computes nothing; records the result
                return self._finish(job, job.gen.result, reason)
            event = job.gen.step()
            self.heartbeat = time.monotonic()
            if event is not None:
                self._token(job, event, wake=not job.gen.done)   # the last one leaves with `done`
            if job.gen.done:
                return self._finish(job, job.gen.result)

    def _open(self, job: Job) -> bool:
        """Check the request in the engine; a refused one ends here with a typed error."""
        from ember.daemon import engine   # imported on first use: kernels load lazily
        job.t_start = time.monotonic()
        if job.deadline is not None and job.deadline <= job.t_start:
            self._fail(job, "deadline_exceeded", "deadline passed before the request started")
            return False
        try:
            job.gen = self.model.start(job.source, **job.sampling)
        except engine.ContextOverflow as e:
            self._fail(job, "context_overflow", str(e))
            return False
        except UserError as e:           # EngineError, SamplingError, ChatTemplateError, ...
            self._fail(job, "bad_request", str(e))
            return False                 # anything else is ours: `internal`, from _work
        # no wake-up: `start` leaves with the first token. Waking the loop now would
        # make it fight the prefill for the GIL, for a message nobody waits on.
        self.post("start", job, None, False)
        return True

    def _embed(self, job: Job) -> None:
        """An embed job, whole: the engine's Embeddings go out with `done`."""
        from ember.daemon import engine
        job.t_start = time.monotonic()
        if job.deadline is not None and job.deadline <= job.t_start:
            return self._fail(job, "deadline_exceeded", "deadline passed before the request started")
        try:
            result = self.model.encode(job.source, **job.sampling)
        except engine.ContextOverflow as e:
            return self._fail(job, "context_overflow", str(e))
        except UserError as e:           # ModelKindError (a text-generation model), bad input
            return self._fail(job, "bad_request", str(e))
        self.heartbeat = time.monotonic()
        self._finish(job, result, "embedded")

    def _pace(self, job: Job) -> None:
        """Compute token n+1 only once token n-1 has reached the socket.

        The loop learns that a client is gone when a send fails; keeping at most
        one token in flight means that, whatever the machine's load, the worker
        has computed at most one token past the failed one when it sees the stop.
        In steady state the loop sends token n while token n+1 is computed, so
        this never waits.
        """
        if job.n_tokens - job.delivered <= 1:
            return
        with self._progress:
            self._progress.wait_for(lambda: job.n_tokens - job.delivered <= 1 or job.stop is not None
                                    or self._closing, timeout=PACE_TIMEOUT_S)

    def _interrupt(self, job: Job) -> str | None:
        """Why the running job must stop before its next token, if it must."""
        if job.stop is not None:
            return job.stop
        if job.deadline is not None and time.monotonic() >= job.deadline:
            return "deadline"
        with self._lock:
            top = self._top()
            if top is not None and top.key() < job.key() and top.priority > job.priority:
                return "preempt"
        return None

    def _token(self, job: Job, event, wake: bool = True) -> None:
        if job.t_first is None:
            job.t_first = time.monotonic()
        job.n_tokens += 1
        # the index travels with the event: the loop reads it later, when n_tokens has moved on
        self.post("token", job, (job.n_tokens - 1, event), wake)

    def _suspend(self, job: Job) -> None:
        job.gen.suspend()
        with self._lock:
            job.state = "suspended"
            job.preemptions += 1
            self._push(job)
            self.running = None
        self.post("suspended", job, None)

    def _finish(self, job: Job, result, reason: str | None = None) -> None:
        """End a job: `reason` overrides the engine's stop reason (deadline, cancelled)."""
        with self._lock:
            job.state = "finished"
            self.running = None
            if not job.probe:
                self.tokens_served += job.n_tokens
                self.requests_served += 1
        self.post("done", job, (result, reason or result.stop_reason))

    def _fail(self, job: Job, code: str, message: str, detail: str | None = None) -> None:
        with self._lock:
            job.state = "finished"
            self.running = None
        self.post("error", job, (code, message, detail))


def probe_job(info: dict, rid: str, cls: type = Job) -> Job:
    """A health probe for the served model: one greedy token, or (an embedding model, which
    makes no tokens) the embedding of one short text. Lowest priority; not counted as served."""
    text = info.get("probe_prompt", "a")
    if info.get("kind") == "embedding":
        return cls(rid=rid, owner=None, source=[text], sampling={}, stream=False, priority=-1001,
                   probe=True, op="embed")
    return cls(rid=rid, owner=None, source=text, sampling={"max_tokens": 1, "temperature": 0.0},
               stream=False, priority=-1001, probe=True)


def _failure(e: Exception) -> tuple[str, str, str | None]:
    """(code, message, detail) for an exception that escaped a running job."""
    from ember.daemon import engine
    if isinstance(e, engine.ModelChanged):    # the file shrank under the map mid-request
        return "model_changed", str(e), None
    return "internal", f"{type(e).__name__}: {e}", traceback.format_exc()
