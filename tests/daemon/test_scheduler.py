"""The scheduler in-process with the real engine and model (no sockets): ordering, busy,
cancel and deadline within one token, preemption that resumes with identical text."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from ember.daemon.scheduler import Busy, Job, Scheduler
from tests.daemon.emberd_proc import model  # noqa: F401

LONG = {"max_tokens": 300, "ignore_eos": True, "temperature": 0.0}


class Events:
    """The scheduler's `post` callback: records every event in order."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.log: list[tuple[str, Job, object]] = []
        self.lock = threading.Lock()

    sched: Scheduler | None = None

    def __call__(self, kind, job, payload, wake=True):
        self.q.put((kind, job, payload))
        if kind == "token" and self.sched is not None:   # what the server's loop does
            self.sched.delivered(job, payload[0] + 1)

    def until(self, kind: str, job: Job, timeout: float = 20.0):
        end = time.monotonic() + timeout
        while True:
            for k, j, p in self.log:
                if k == kind and j is job:
                    return p
            self.log.append(self.q.get(timeout=max(0.01, end - time.monotonic())))

    def drain(self) -> None:
        while True:
            try:
                self.log.append(self.q.get_nowait())
            except queue.Empty:
                return

    def kinds(self, job: Job) -> list[str]:
        self.drain()
        return [k for k, j, _ in self.log if j is job]


@pytest.fixture
def sched(model):
    ev = Events()
    s = Scheduler(model, ev, max_queue=4)
    ev.sched = s
    s.start()
    yield s, ev
    s.close()


def job(source="Once upon a time", priority=0, deadline=None, **sampling) -> Job:
    return Job(rid=id(sampling), owner=b"me", source=source, sampling=sampling or dict(LONG),
               priority=priority, deadline=deadline)


def test_queue_order_priority_then_deadline_then_arrival(sched):
    s, ev = sched
    blocker = job(priority=1000)
    s.submit(blocker)
    ev.until("token", blocker)
    now = time.monotonic()
    a = job(priority=0, max_tokens=1)
    b = job(priority=0, deadline=now + 60, max_tokens=1)
    c = job(priority=5, max_tokens=1)
    d = job(priority=0, deadline=now + 30, max_tokens=1)
    for j in (a, b, c, d):
        s.submit(j)
    assert [q["priority"] for q in s.snapshot(time.monotonic())["queue"]] == [5, 0, 0, 0]
    s.cancel(blocker)
    for j in (a, b, c, d):
        ev.until("done", j)
    starts = [j for k, j, _ in ev.log if k == "start" and j is not blocker]
    assert starts == [c, d, b, a]


def test_full_queue_is_busy_at_once(sched):
    s, ev = sched
    running = job()
    s.submit(running)
    ev.until("start", running)
    waiting = [job() for _ in range(4)]
    for j in waiting:
        s.submit(j)
    t = time.perf_counter()
    with pytest.raises(Busy):
        s.submit(job())
    # the running job never ends by itself: "at once" means not waiting on it
    assert time.perf_counter() - t < 0.5
    for j in waiting:
        assert s.cancel(j) is True          # queued: dropped, the caller answers
    s.cancel(running)
    ev.until("done", running)
    assert s.idle()


def test_cancel_stops_within_one_token(sched):
    s, ev = sched
    j = job()
    s.submit(j)
    ev.until("token", j)
    ev.drain()
    assert s.cancel(j) is False              # running: the worker ends it
    n_at_cancel = j.n_tokens
    result, stop = ev.until("done", j)
    assert stop == "cancelled"
    assert j.n_tokens - n_at_cancel <= 1     # at most the token already being computed
    assert result.usage["completion_tokens"] == j.n_tokens


def test_deadline_mid_generation_and_in_queue(sched):
    s, ev = sched
    j = job(deadline=time.monotonic() + 0.05)
    s.submit(j)
    result, stop = ev.until("done", j)
    assert stop == "deadline" and 0 < j.n_tokens < LONG["max_tokens"]
    blocker = job(priority=1000)
    s.submit(blocker)
    ev.until("start", blocker)
    late = job(deadline=time.monotonic() + 0.01)
    s.submit(late)
    time.sleep(0.03)
    assert s.expire(time.monotonic()) == [late]
    assert s.next_deadline() is None
    s.cancel(blocker)
    ev.until("done", blocker)


def test_engine_refusals_become_typed_errors(sched):
    s, ev = sched
    too_long = job(max_tokens=5000)
    s.submit(too_long)
    assert ev.until("error", too_long)[0] == "context_overflow"
    empty = job(source="", max_tokens=4)
    s.submit(empty)
    assert ev.until("error", empty)[0] == "bad_request"
    ok = job(max_tokens=2)
    s.submit(ok)
    assert ev.until("done", ok)[1] in ("length", "eos")     # the worker survived both


def test_an_internal_value_error_is_internal_not_the_clients(sched, model, monkeypatch):  # noqa: F811
    """Only a UserError is `bad_request`: a numpy ValueError inside the engine is our bug."""
    s, ev = sched

    def broken(prompt):           # a shape bug in the engine's own code, raised by numpy
        return np.zeros(3).reshape(2, 2).tolist()
    monkeypatch.setattr(model, "prompt_tokens", broken)
    bad = job(max_tokens=2)
    s.submit(bad)
    code, message, detail = ev.until("error", bad)
    assert code == "internal" and "ValueError" in message and "reshape" in detail
    monkeypatch.undo()
    ok = job(max_tokens=2)
    s.submit(ok)
    assert ev.until("done", ok)[1] in ("length", "eos")


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_preemption_resumes_with_the_uninterrupted_text(sched, model, temperature):
    s, ev = sched
    params = dict(max_tokens=120, ignore_eos=True, temperature=temperature, seed=11)
    ref = None
    for ref in model.generate("Once upon a time", **params):
        pass
    low = job(priority=0, **params)
    s.submit(low)
    wait_tokens(low, 10)
    high = job(source="The dog", priority=9, max_tokens=6, temperature=0.0)
    s.submit(high)
    result, stop = ev.until("done", low)
    kinds = ev.kinds(low)
    assert "suspended" in kinds and low.preemptions == 1
    high_done = [i for i, (k, j, _) in enumerate(ev.log) if k == "done" and j is high][0]
    low_done = [i for i, (k, j, _) in enumerate(ev.log) if k == "done" and j is low][0]
    assert high_done < low_done
    assert result.text == ref.text and result.tokens == ref.tokens
    assert stop == "length" and result.timings["reprefill_ms"] > 0


def test_jobs_lists_running_queued_and_suspended(sched):
    s, ev = sched
    low = job(priority=0, max_tokens=200, ignore_eos=True, temperature=0.0)
    s.submit(low)
    wait_tokens(low, 3)
    high = job(source="The dog", priority=9, max_tokens=200, ignore_eos=True, temperature=0.0)
    waiting = job(priority=-5, max_tokens=2)
    s.submit(high)
    s.submit(waiting)
    wait_tokens(high, 1)
    assert s.jobs()[0] is high and {low, waiting} <= set(s.jobs())
    assert low.state == "suspended" and low.gen is not None        # it still holds its model
    assert s.cancel(waiting) is True                  # queued: dropped at once
    for j in (high, low):                             # running (or resumed): ends with done
        if not s.cancel(j):
            ev.until("done", j)
    assert s.jobs() == []


def test_equal_priority_does_not_preempt(sched):
    s, ev = sched
    a, b = job(max_tokens=40, ignore_eos=True, temperature=0.0), job(max_tokens=5, temperature=0.0)
    s.submit(a)
    ev.until("token", a)
    s.submit(b)
    ev.until("done", b)
    assert "suspended" not in ev.kinds(a)
    order = [j for k, j, _ in ev.log if k == "done"]
    assert order == [a, b]


def test_token_ids_as_source(sched, model):
    s, ev = sched
    ids = np.asarray(model.tokenize("Once upon a time"), dtype=np.int32)
    j = job(source=ids, max_tokens=8, temperature=0.0)
    s.submit(j)
    result, _ = ev.until("done", j)
    ref = None
    for ref in model.generate("Once upon a time", max_tokens=8, temperature=0.0):
        pass
    assert result.text == ref.text


def test_close_stops_the_running_job(model):
    ev = Events()
    s = Scheduler(model, ev, max_queue=2)
    ev.sched = s
    s.start()
    j = job()
    s.submit(j)
    ev.until("token", j)
    t = time.perf_counter()
    s.close()
    assert time.perf_counter() - t < 2.0
    assert ev.until("done", j)[1] == "cancelled"


def wait_tokens(j: Job, n: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while j.n_tokens < n:
        assert time.monotonic() < end, f"{j.n_tokens} of {n} tokens within {timeout} s"
        time.sleep(0.001)


def test_worker_keeps_at_most_one_token_in_flight(model):
    """Pacing: token n+1 is computed only once token n-1 reached the socket, so a client
    found gone at a failed send costs at most one more token, however loaded the machine."""
    ev = Events()
    s = Scheduler(model, ev, max_queue=2)       # nobody reports deliveries: the loop is "stuck"
    s.start()
    try:
        j = job()
        s.submit(j)
        wait_tokens(j, 2)
        time.sleep(0.2)                         # ~100 tokens' worth of time
        assert j.n_tokens == 2                  # token 2 computed while token 1 is "in flight"
        s.delivered(j, 2)
        wait_tokens(j, 4)
        time.sleep(0.2)
        assert j.n_tokens == 4
        j.stop = "cancelled"                    # what the loop does when a send fails
        s.delivered(j, 3)
        result, stop = ev.until("done", j)
        assert stop == "cancelled" and j.n_tokens == 4
    finally:
        s.close()


def test_submit_cancel_storm_keeps_the_heap_small(sched):
    s, ev = sched
    running = job(priority=1000)
    s.submit(running)
    ev.until("start", running)
    for _ in range(2000):
        j = job()
        s.submit(j)
        assert s.cancel(j) is True
    assert len(s._heap) <= 2 * s.max_queue + 65
    assert s.snapshot(time.monotonic())["queue_len"] == 0
    s.cancel(running)
    assert ev.until("done", running)[1] == "cancelled"


# ---------------------------------------------------------------------------
# Between prefill chunks (issue 19): the same checks act inside a long prompt
# ---------------------------------------------------------------------------

PROMPT = "Once upon a time there was a little girl named Lily. " * 25     # ~300 tokens


def test_cancel_lands_mid_prefill(sched, model, monkeypatch):  # noqa: F811
    monkeypatch.setattr(model, "chunk_tokens", 1)            # ~300 chunks: cancel lands inside
    s, ev = sched
    j = job(source="Zebra. " + PROMPT, max_tokens=5, temperature=0.0)
    s.submit(j)
    ev.until("start", j)
    assert s.cancel(j) is False
    result, stop = ev.until("done", j)
    assert stop == "cancelled" and result.tokens == [] and "token" not in ev.kinds(j)
    assert model.runner.n_past < len(j.gen.prompt)           # the prefill was cut short


def test_preemption_mid_prefill_resumes_from_its_chunks(sched, model, monkeypatch):  # noqa: F811
    params = dict(max_tokens=12, temperature=0.0)
    ref = None
    for ref in model.generate("Yak. " + PROMPT, **params):
        pass
    model.logits([1])                                        # the live cache is not that prompt
    model.prompt_cache = type(model.prompt_cache)(4)
    monkeypatch.setattr(model, "chunk_tokens", 1)
    s, ev = sched
    low = job(source="Yak. " + PROMPT, priority=0, **params)
    s.submit(low)
    ev.until("start", low)
    high = job(source="The dog", priority=9, max_tokens=2, temperature=0.0)
    s.submit(high)
    result, stop = ev.until("done", low)
    kinds = ev.kinds(low)
    assert low.preemptions == 1 and kinds.index("suspended") < kinds.index("token")
    assert model.prompt_cache.tokens_reused > 1              # it got its finished chunks back
    assert result.tokens == ref.tokens and result.text == ref.text
