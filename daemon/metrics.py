"""emberd's Prometheus metrics (served by the HTTP gateway at GET /metrics).

Design. prometheus_client does the bookkeeping and the text format (it is
the reference client, thread-safe, and its parser is what the tests read the
page back with). Everything lives in a private CollectorRegistry, so two
daemons in one process (tests) never share counters, and nothing from the
library's global registry leaks in.

Where numbers come from:
* generations — the gateway sees every event the scheduler's worker posts,
  from both front doors (ZeroMQ and HTTP), and calls `generation()` on each
  terminal `done`: tokens, time to first token (arrival -> first token, on
  the server's clock, so it includes queueing), prefill and decode speed;
* HTTP requests by endpoint and status — `request()` from the gateway;
* client disconnects — how many tokens the worker computed after the
  gateway learned the client was gone (the "cancel within one token" promise,
  measured in production, not only in a test);
* queue length, served totals and model facts — read at scrape time from
  the scheduler and the server's info; process RSS, CPU and open files from
  prometheus_client's ProcessCollector.
"""
from __future__ import annotations

import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               ProcessCollector, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOK_S_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)
EXTRA_TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16)


class Metrics:
    """One daemon's metrics; `render()` is the /metrics page."""

    def __init__(self, server):
        self.server = server
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self.requests = Counter("ember_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.generations = Counter("ember_generations", "finished generations by stop reason "
                                   "(both front doors)", ["stop"], registry=r)
        self.prompt_tokens = Counter("ember_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.embedded = Counter("ember_embedded_inputs", "texts embedded (both front doors)",
                                registry=r)
        self.completion_tokens = Counter("ember_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("ember_time_to_first_token_seconds", "request arrival to first "
                              "token, queueing included", buckets=TTFT_BUCKETS, registry=r)
        self.prefill = Histogram("ember_prefill_tokens_per_second", "prompt tokens / prefill time",
                                 buckets=TOK_S_BUCKETS, registry=r)
        self.decode = Histogram("ember_decode_tokens_per_second", "decoded tokens / decode time",
                                buckets=TOK_S_BUCKETS, registry=r)
        self.extra = Histogram("ember_http_disconnect_extra_tokens", "tokens computed after the "
                               "gateway saw the client disconnect", buckets=EXTRA_TOKEN_BUCKETS,
                               registry=r)
        self._scrape_time_gauges(r)

    def _scrape_time_gauges(self, r: CollectorRegistry) -> None:
        sched = self.server.scheduler
        Gauge("ember_queue_length", "generate requests waiting", registry=r).set_function(
            lambda: sched.snapshot(time.monotonic())["queue_len"])
        Gauge("ember_queue_capacity", "waiting requests allowed before 429/busy",
              registry=r).set_function(lambda: sched.max_queue)
        Gauge("ember_running", "1 while a generation computes", registry=r).set_function(
            lambda: sched.running is not None)
        Gauge("ember_draining", "1 while the daemon drains for shutdown", registry=r).set_function(
            lambda: bool(self.server.draining))
        self.model = Info("ember_model", "the loaded model", registry=r)
        self.model_info()

    def model_info(self) -> None:
        """Refresh the model facts (after a reload swapped the model)."""
        info = self.server.info
        self._shown = info.get("model")
        self.model.info({k: str(info.get(k)) for k in ("model", "arch", "backend", "isa", "n_ctx",
                                                       "n_vocab")})

    # -- observations -----------------------------------------------------------------

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def generation(self, job, result, stop: str) -> None:
        """A finished generation (any front door); called on the worker's thread."""
        self.generations.labels(stop).inc()
        self.prompt_tokens.inc(int(result.usage.get("prompt_tokens", 0)))
        self.completion_tokens.inc(job.n_tokens)
        if job.t_first is not None:
            self.ttft.observe(job.t_first - job.t_arrival)
        t = result.timings
        if t.get("prefill_tok_s"):
            self.prefill.observe(t["prefill_tok_s"])
        if t.get("decode_tok_s"):
            self.decode.observe(t["decode_tok_s"])

    def embedding(self, job, result, stop: str) -> None:
        """A finished embed request (any front door); called on the worker's thread."""
        self.generations.labels(stop).inc()
        self.prompt_tokens.inc(int(result.usage.get("prompt_tokens", 0)))
        self.embedded.inc(len(result.vectors))

    def failed(self, code: str) -> None:
        """A generation refused by the engine or ended by an error (any front door)."""
        self.generations.labels(f"error:{code}").inc()

    def disconnect(self, extra_tokens: int) -> None:
        self.extra.observe(max(0, extra_tokens))

    def render(self) -> bytes:
        if self._shown != self.server.info.get("model"):
            self.model_info()
        return generate_latest(self.registry)
