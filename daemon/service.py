"""emberd in production: budgeted load, signals, sd_notify, drain, reload, watch.

Design. emberd.py runs the stages (flags, load, server, bind, serve); this
module is what makes them safe to leave running for months, hooked in
without owning the server:

* load (`load_model`): model path (or the default model from the cache,
  pulled on first start), model-file checks (daemon/modelfile.py), the
  memory plan against the budget (daemon/budget.py: shrink n_ctx or refuse
  with the breakdown) as the plan step of engine.load, the one loading path.
* `Service.attach(server)`: CURVE on the socket (daemon/security.py), the
  `load` and draining `generate` handlers, the plan in `status`, and one
  `tick` that the server's loop runs every turn (at least once a second).
  The tick feeds the systemd watchdog — from the loop itself, so a hung
  loop stops the pings — sends STATUS lines, advances a drain, swaps in a
  reloaded model, checks the mapped file has not shrunk, and updates the
  peak RSS that `status` reports beside the plan.

Signals only set flags; the tick acts on them. SIGTERM (or SIGINT) starts a
drain: STOPPING=1, new requests are refused (`busy`, "shutting down"),
queued ones get a terminal `cancelled` error, the running one may finish
until --drain-timeout and is then cancelled (its client gets `done` with
stop "cancelled"); when nothing is in flight the loop returns and emberd
exits 0. A second SIGTERM exits at once (status 1). SIGTERM during the load
ends the start-up before READY=1 is ever sent (exit 0).

Reload (SIGHUP, or the `load` op when --allow-load): on a helper thread
(never the serving loop: the config may be a FIFO or on a hung mount) the
config is read again within CONFIG_READ_S, the CURVE allow-list too, and
the model loads beside the old one, charged to
the budget with the old one still in it; the loop swaps the server's and
scheduler's model in one turn. A generation already started keeps the old
model (its Generation holds it) and finishes there; the old model is closed
once no job holds it.

Test-only hook: with EMBER_DEBUG_HANG=SECONDS in the environment, SIGUSR1
blocks the serving loop for that long (the watchdog test uses it to show
that a hung loop stops the pings). Without the variable SIGUSR1 keeps its
default action.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field

from ember.daemon import budget as budget_mod
from ember.daemon import modelcache, modelfile, promptcache, security, speculative
from ember.daemon.log import say as log_say
from ember.daemon.notify import Notifier
from ember.formats import protocol
from ember.formats.protocol import ProtocolError

log = logging.getLogger("emberd")

DEFAULT_MIN_CTX = 256
DEFAULT_DRAIN_S = 10.0
STATUS_EVERY_S = 10.0
WATCH_EVERY_S = 1.0
STUCK_GRACE_S = 5.0          # a worker that ignores cancel for this long is left behind
DRAIN_TICK_S = 0.05          # how often a draining loop checks its deadline
CONFIG_READ_S = 5.0          # SIGHUP: a config file not read within this fails the reload
TRIM_EVERY_S = 10.0          # between requests, at most this often: malloc_trim
# the plan's `receive` line: room for this many maximal requests arriving at once (budget.py)
RECEIVE = 4 * protocol.Limits().max_frames * protocol.Limits().max_frame_bytes


class Stopped(BaseException):
    """SIGTERM/SIGINT arrived before the daemon was serving."""


# ---------------------------------------------------------------------------
# Flags (added to emberd's parser)
# ---------------------------------------------------------------------------

def add_arguments(p) -> None:
    from ember.daemon import config
    config.add_argument(p)
    g = p.add_argument_group("production")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="memory for weights + KV cache + scratch + runtime, e.g. 1.5G "
                        "(default: config, else the cgroup's memory.max, else unlimited)")
    g.add_argument("--cache-slots", type=_slots, default=None, metavar="N",
                   help="prompt cache: KV caches of earlier requests kept for prefix reuse, each "
                        "counted in the memory plan as one KV cache (default: what the budget "
                        f"leaves, up to {promptcache.DEFAULT_SLOTS}; 0: reuse only the live cache)")
    g.add_argument("--prompt-cache-dir", metavar="DIR",
                   help="save the prompt cache here at exit and read it back at start "
                        "(per model file, backend and context)")
    g.add_argument("--min-ctx", type=int, default=DEFAULT_MIN_CTX, metavar="N",
                   help=f"never shrink the context below N to fit the budget (default {DEFAULT_MIN_CTX})")
    g.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_S, metavar="S",
                   help="on SIGTERM, let the running request finish for S seconds, then cancel it")
    g.add_argument("--server-key", metavar="PATH", help="CURVE secret key (NAME.key_secret)")
    g.add_argument("--allowed-clients", metavar="DIR", help="folder of allowed client .key files")
    g.add_argument("--insecure", action="store_true", default=False,
                   help="allow binding beyond loopback without CURVE keys (anyone may connect)")
    g.add_argument("--allow-load", action="store_true", default=False,
                   help="enable the `load` op (clients may swap the model)")
    g.add_argument("--load-dir", metavar="DIR",
                   help="besides the model cache, the one folder whose models `load` may open")
    g.add_argument("--cache-dir", help="model cache (default $CACHE_DIRECTORY/models or "
                                       "~/.cache/ember/models)")
    g.add_argument("--hub", help="model hub base URL for the default model (default $EMBER_HUB "
                                 "or huggingface.co)")
    g.add_argument("--no-pull", action="store_true", default=False,
                   help="never download the default model; say what to run instead")
    g.add_argument("--strict-model-file", action="store_true", default=False,
                   help="refuse a model file this user could write (a file truncated while "
                        "mapped kills the daemon); default: serve it with a warning")


def _slots(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return n


# ---------------------------------------------------------------------------
# Loading within the budget
# ---------------------------------------------------------------------------

@dataclass
class Loaded:
    model: object
    fit: budget_mod.Fit
    watch: modelfile.Watch
    checked: modelfile.Checked
    messages: list[str] = field(default_factory=list)
    name: str | None = None           # what the user called it (--model demo, REPO:QUANT)


def resolve_model(args, say) -> str:
    root = modelcache.cache_dir(override=getattr(args, "cache_dir", None))
    if args.model:      # a path, or a name `ember models` prints (demo, REPO/FILE, REPO:QUANT)
        return str(modelcache.resolve(args.model, root))
    hub = modelcache.hub_url(override=getattr(args, "hub", None))
    return str(modelcache.default_model(root, hub, allow_pull=not args.no_pull, say=say))


def budget_of(args) -> tuple[int | None, str]:
    from_config = "memory_budget" in getattr(args, "config_keys", ())
    if from_config:
        return budget_mod.resolve(None, args.memory_budget)
    return budget_mod.resolve(args.memory_budget)


def _draft_plan(args, draft: str | None):
    """plan_at(n_ctx) of a draft model on the chosen backend, or None (no draft model)."""
    if draft in (None, speculative.PROMPT_LOOKUP):
        return None
    from ember.formats import gguf
    from ember.formats.model_config import config_from_gguf
    from ember.plugins import registry
    with gguf.open(draft) as f:
        cfg = config_from_gguf(f)
    name, _ = registry.choose(args.backend)
    return lambda c: registry.plan(name, cfg, c, {})


def _with_draft(plan, draft, path: str):
    """The target's plan plus a draft model's (one interpreter: the runtime counts once)."""
    from ember.plugins.types import MemoryPlan
    return MemoryPlan(
        weights=plan.weights + draft.weights, kv_cache=plan.kv_cache + draft.kv_cache,
        scratch=plan.scratch + draft.scratch, runtime=max(plan.runtime, draft.runtime),
        device=plan.device + draft.device,
        notes=[*plan.notes, f"includes the draft model {os.path.basename(path)}: weights "
                            f"{draft.weights}, KV cache {draft.kv_cache}, scratch {draft.scratch} bytes"])


def resolve_draft(args) -> str | None:
    """--draft as given: None, "prompt-lookup", or a draft model's resolved path."""
    draft = getattr(args, "draft", None)
    if not draft or draft == speculative.PROMPT_LOOKUP:
        return draft or None
    root = modelcache.cache_dir(override=getattr(args, "cache_dir", None))
    return str(modelcache.resolve(draft, root))


def load_model(args, process: int | None = None, beside: int = 0, say=None) -> Loaded:
    """Check the file, then engine.load with the budget choosing the context."""
    from ember.daemon import engine
    say = say or log_say
    path = resolve_model(args, say)
    checked = modelfile.check(path, strict=getattr(args, "strict_model_file", False))
    if checked.warning and Path(path) != modelcache.DEMO_PATH:   # the demo: part of the package
        say(checked.warning)
    process = budget_mod.rss_bytes() if process is None else process
    limit, source = budget_of(args)
    slots = getattr(args, "cache_slots", None)
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 0):
        raise budget_mod.BudgetError(f"cache_slots must be an integer >= 0, got {slots!r}")
    fits: list[budget_mod.Fit] = []
    draft = resolve_draft(args)
    draft_plan = _draft_plan(args, draft)     # charged beside the target, at the same context

    def fit(plan_at, n_ctx: int) -> int:
        """The context that fits with the prompt cache's slots (and the draft model, charged
        beside the target): --cache-slots N are part of the plan; by default they take what
        the budget leaves (budget.size_prompt_cache)."""
        both = plan_at if draft_plan is None else (
            lambda c: _with_draft(plan_at(c), draft_plan(c), draft))
        planned = budget_mod.fit(lambda c: budget_mod.with_prompt_cache(both(c), slots or 0),
                                 n_ctx, max(1, args.min_ctx or 1), limit, source, process, beside,
                                 RECEIVE)
        if slots is None:
            budget_mod.size_prompt_cache(planned, promptcache.DEFAULT_SLOTS)
        else:
            planned.cache_slots = slots
        fits.append(planned)
        for m in planned.messages:
            say(m)
        return planned.n_ctx

    modelfile.recheck(checked)
    model = engine.load(path, backend=args.backend, n_ctx=args.ctx, threads=args.threads, fit=fit,
                        cache_slots=0)
    planned = fits[0]
    model.use_prompt_cache(planned.cache_slots, getattr(args, "prompt_cache_dir", None))
    if model.prompt_cache.slots < planned.cache_slots:   # the backend cannot copy its cache (logged)
        planned.plan, planned.cache_slots = budget_mod.with_prompt_cache(planned.plan, 0), 0
    try:
        model.set_draft(draft, getattr(args, "draft_max", None), args.threads)
        watch = modelfile.Watch(checked, model.gguf.size)
    except BaseException:
        model.close()
        raise
    return Loaded(model, fits[0], watch, checked, list(fits[0].messages), args.model)


# ---------------------------------------------------------------------------
# The service around a Server
# ---------------------------------------------------------------------------

class Service:
    """Signals, sd_notify and the per-turn tick for one emberd process."""

    def __init__(self, args, argv=None, parser_factory=None):
        self.args, self.argv, self.parser_factory = args, argv, parser_factory
        self.notify = Notifier()
        self.server = None
        self.loaded: Loaded | None = None
        self.exit_code = 0
        self.curve: security.Curve | None = None
        self._serving = False
        self._terms = 0
        self._hup = False
        self._hang = False
        self._drain_deadline: float | None = None
        self._reload: threading.Thread | None = None
        self._config_reader: threading.Thread | None = None
        self._swap: tuple | None = None          # (Loaded | Exception, reply target)
        self._retired: list[Loaded] = []
        self._last_status = (0.0, None)
        self._last_watch = 0.0
        self._last_trim = 0.0
        self._peak = 0
        self._over_warned = False
        self._install_signals()

    # -- signals -----------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        if os.environ.get("EMBER_DEBUG_HANG"):
            signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_term(self, signum, frame) -> None:
        self._terms += 1
        if self._terms > 1:
            try:
                os.write(2, b"emberd: second stop signal: exiting now without draining\n")
            except OSError:
                pass
            os._exit(1)
        if not self._serving:
            self.notify.stopping("stopped during start-up")
            raise Stopped()
        self._wake_loop()

    def _on_hup(self, signum, frame) -> None:
        self._hup = True
        self._wake_loop()

    def _wake_loop(self) -> None:
        """The drain (or reload) starts now, not at the loop's next tick up to a second later
        (queued requests could start meanwhile). From a thread: the handler runs on the main
        thread, which may hold the wake lock."""
        if self.server is not None:
            threading.Thread(target=self.server.wake, daemon=True).start()

    def _on_usr1(self, signum, frame) -> None:
        self._hang = True

    # -- start-up ----------------------------------------------------------------

    def status(self, text: str) -> None:
        self.notify.status(text)

    def security(self, endpoints: list[str]) -> None:
        """Before the load: refuse an open bind without keys (cheap, so it comes first)."""
        keys = security.server_keys(self.args.server_key, self.args.allowed_clients)
        for w in security.check_binds(endpoints, keys, self.args.insecure):
            log_say(w)
        self.curve = security.Curve(keys) if keys else None

    def load(self) -> Loaded:
        self.status(f"loading {self.args.model or 'the default model'}")
        self.loaded = load_model(self.args, say=self._say)
        fit = self.loaded.fit
        self._cap_private()
        self.status(f"loaded {os.path.basename(self.loaded.model.path)}: n_ctx {fit.n_ctx}, plan "
                    f"{budget_mod.human(fit.total)}")
        return self.loaded

    def _say(self, msg: str) -> None:
        log_say(msg)
        self.status(msg)

    def attach(self, server) -> None:
        """Wire security, handlers, status and the tick into a built (not yet bound) Server."""
        self.server = server
        if self.curve is not None:
            server.before_bind.append(self.curve.secure)
            server.admit.append(self.curve.admit)
        self._orig_generate = server.register_op("generate", self._on_generate)
        server.register_op("load", self._on_load)
        server.on_tick.append(self.tick)
        if self.notify.watchdog_interval:   # wake often enough to ping every half interval
            server.tick_s = min(server.tick_s, self.notify.watchdog_interval / 4)
        server.info["memory"] = self._memory()
        server.info["alias"] = self.loaded.name

    def ready(self) -> None:
        """After bind: READY=1 (the model is loaded and the socket bound)."""
        self._serving = True
        if self._terms:                       # a SIGTERM raced the last step of start-up
            raise Stopped()
        self.notify.ready(self._serving_text())

    def stop_security(self) -> None:
        """End the ZAP authenticator (it shares the server's context; stop it before the server)."""
        if self.curve is not None:
            self.curve.stop()

    def close(self) -> None:
        self.stop_security()
        for old in self._retired:
            old.model.close()
            old.watch.close()
        if self.loaded is not None:
            self.loaded.watch.close()
        self.notify.close()

    # -- the tick: once per loop turn ----------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        if self._hang:
            self._hang = False
            time.sleep(float(os.environ.get("EMBER_DEBUG_HANG", "0") or 0))
        if self.notify.watchdog_due(now):
            self.notify.watchdog()
        if self._terms:
            self._drain(now)
        elif self._hup:
            self._hup = False
            if self.curve is not None:
                self.curve.reload_allowed()
            self.start_reload(None)
        if self._swap is not None:
            self._finish_reload()
        self._close_retired()
        self._trim_when_idle(now)
        if now - self._last_watch >= WATCH_EVERY_S:
            self._last_watch = now
            self._watch_file()
            self._update_memory()
        self._status_line(now)

    def _trim_when_idle(self, now: float) -> None:
        """Between requests, now and then, give freed heap pages back (budget.py)."""
        if (now - self._last_trim >= TRIM_EVERY_S and not self._retired
                and self.server.scheduler.idle()):
            self._last_trim = now
            budget_mod.release_free_memory()

    def _serving_text(self) -> str:
        s, info = self.server.scheduler, self.server.info
        return (f"serving {info.get('model')} (n_ctx {info.get('n_ctx')}): "
                f"{s.requests_served} requests, {s.tokens_served} tokens")

    def _status_line(self, now: float) -> None:
        text = self._serving_text()
        last_t, last_text = self._last_status
        changed = text != last_text and now - last_t >= 1.0     # at most one a second
        if self._terms or not (changed or now - last_t >= STATUS_EVERY_S):
            return
        self._last_status = (now, text)
        self.status(text)

    # -- memory in status -----------------------------------------------------------

    def _memory(self) -> dict:
        mem = self.loaded.fit.to_wire()
        rss = budget_mod.rss_bytes()
        self._peak = max(self._peak, budget_mod.peak_rss_bytes(), rss)
        mem.update(rss_bytes=rss, peak_rss_bytes=self._peak,
                   within_plan=self._peak <= mem["total"] + mem.get("old_model", 0))
        return mem

    def _update_memory(self) -> None:
        mem = self._memory()
        self.server.info["memory"] = mem
        if not mem["within_plan"] and not self._over_warned:
            self._over_warned = True     # once: the plan is wrong for this backend; say by how much
            log.warning("peak RSS %s exceeds the memory plan %s",
                        budget_mod.human(mem["peak_rss_bytes"]), budget_mod.human(mem["total"]))

    def _watch_file(self) -> None:
        msg = self.loaded.watch.shrunk() or self.loaded.model.changed
        if msg is None:
            return
        log_say(f"{msg}; stopping")
        self.status(msg)
        self.exit_code = 1
        self.server.request_stop()

    # -- draining ------------------------------------------------------------------

    def _on_generate(self, owner: bytes, req) -> None:
        if self._terms:
            raise ProtocolError("busy", "the daemon is shutting down")
        self._orig_generate(owner, req)

    def _drain(self, now: float) -> None:
        srv = self.server
        if self._drain_deadline is None:
            self._drain_deadline = now + max(0.0, self.args.drain_timeout)
            srv.draining = True
            srv.tick_s = min(srv.tick_s, DRAIN_TICK_S)   # the deadline lands on a tick, not up to 1 s past it
            self.notify.stopping("draining: finishing the running request")
            self._cancel_queued()
        running = srv.scheduler.running
        if running is not None and now >= self._drain_deadline and running.stop is None:
            srv.scheduler.cancel(running)      # ends within a token with done/cancelled
        idle = srv.scheduler.idle() and not srv.active_jobs()
        if idle or now >= self._drain_deadline + STUCK_GRACE_S:
            srv.request_stop()

    def _cancel_queued(self) -> None:
        srv = self.server
        for job in srv.active_jobs():
            if job is srv.scheduler.running or job.state not in ("queued", "suspended"):
                continue                       # (cancel() on the running job would stop it)
            if srv.scheduler.cancel(job):      # True: it was waiting and is dropped now
                srv.end_job(job)
                srv.send(job.owner, protocol.error("cancelled", "the daemon is shutting down",
                                                    job.rid))

    # -- reload -------------------------------------------------------------------

    def _on_load(self, owner: bytes, req) -> None:
        if not self.args.allow_load:
            raise ProtocolError("unauthorized", "the load op is not enabled on this daemon "
                                                "(start it with --allow-load)")
        if self._reload is not None or self._terms:
            raise ProtocolError("busy", "a model load is already in progress")
        path = self._load_target(req.fields["model"])
        self.start_reload((owner, req.id), path)

    def _load_target(self, name: str) -> str:
        """A name `ember models` prints (demo, REPO/FILE, FILE, REPO:QUANT), or a file in
        the cache or under --load-dir.

        Anything else gets one answer whatever it names: missing, unreadable, a folder,
        outside, a symlink out — so `load` cannot probe the host's files (nor read their
        first bytes back in a "not a GGUF file" error).
        """
        root = modelcache.cache_dir(override=self.args.cache_dir)
        try:
            found = modelcache.lookup(name, root)
        except modelcache.ModelNotFound as e:     # several cached files match: names only
            raise ProtocolError("bad_request", str(e)) from None
        if found is not None:
            return str(found)
        folders = [os.path.realpath(root)]
        if self.args.load_dir:
            folders.append(os.path.realpath(self.args.load_dir))
        try:
            real = os.path.realpath(os.path.join(folders[-1], name))   # absolute: join keeps it
            if os.path.isfile(real) and any(os.path.commonpath([real, f]) == f for f in folders):
                return real
        except (OSError, ValueError):      # a NUL byte, a loop: the same answer
            pass
        raise ProtocolError("bad_request", f"model {name!r} is not available to load: give a cached "
                                           "model (see `ember models`) or a file under the "
                                           "daemon's --load-dir")

    def start_reload(self, reply_to, path: str | None = None) -> None:
        if self._reload is not None:
            log.warning("reload already in progress; ignoring")
            return
        self.status(f"reloading {path or 'the configured model'} beside "
                    f"{self.server.info.get('model')}")
        self._reload = threading.Thread(target=self._load_beside, args=(path, reply_to),
                                        name="ember-reload", daemon=True)
        self._reload.start()

    def _fresh_args(self) -> argparse.Namespace:
        """The config file read again (flags still win), off the serving loop and in bounded time.

        The file may be a FIFO or sit on a hung mount: the read gets its own thread and
        CONFIG_READ_S; past that the reload fails (the old model keeps serving) and the
        reader is left behind, blocked, and the next reload fails too until it returns.
        """
        if self.parser_factory is None:
            return argparse.Namespace(**vars(self.args))
        from ember.daemon import config
        if self._config_reader is not None and self._config_reader.is_alive():
            raise config.ConfigError(f"config {self.args.config}: still blocked in the read "
                                     "started by an earlier reload")
        box: dict = {}
        self._config_reader = threading.Thread(target=self._read_config, args=(box,),
                                               name="ember-config", daemon=True)
        self._config_reader.start()
        self._config_reader.join(CONFIG_READ_S)
        if self._config_reader.is_alive():
            raise config.ConfigError(f"config {self.args.config}: not read within "
                                     f"{CONFIG_READ_S:.0f} s (a FIFO, or a hung mount?)")
        if box.get("args") is None:
            log.error("config no longer valid; reloading with the start-up settings")
            return argparse.Namespace(**vars(self.args))
        return box["args"]

    def _read_config(self, box: dict) -> None:
        from ember.daemon import config
        try:
            box["args"] = config.parse_args(self.parser_factory(), self.argv)
        except SystemExit:           # a bad file: parse_args has said why
            box["args"] = None

    def _load_beside(self, path: str | None, reply_to) -> None:
        try:
            args = self._fresh_args()
            if path is not None:
                args.model = path
            old = self.loaded.fit
            new = load_model(args, process=old.process, beside=old.plan.host_total,
                             say=lambda m: log.warning("%s", m))
            new.model.tokenize("warm up")
            result = new
        except Exception as e:  # noqa: BLE001 - a bad reload keeps the old model serving
            result = e
        self._swap = (result, reply_to)
        self.server.wake()

    def _finish_reload(self) -> None:
        (result, reply_to), self._swap = self._swap, None
        self._reload = None
        if isinstance(result, BaseException):
            msg = str(result).replace("\n", "; ")
            log_say(f"reload failed, still serving the old model: {msg}")
            if reply_to:
                self.server.send(reply_to[0], protocol.error("bad_request", f"load: {msg}",
                                                              reply_to[1]))
            self.status(self._serving_text())
            return
        self._swap_in(result)
        if reply_to:
            info = self.server.info
            self.server.send(reply_to[0], protocol.reply(
                "load", reply_to[1], model=info["model"], n_ctx=info["n_ctx"],
                backend=info["backend"]))

    def _swap_in(self, new: Loaded) -> None:
        srv, old = self.server, self.loaded
        srv.set_model(new.model, {**new.model.info(), "memory": None})   # for jobs opened from now on
        self.loaded = new
        self._peak = 0
        srv.info["memory"] = self._memory()
        srv.info["alias"] = new.name
        self._retired.append(old)
        log_say(f"now serving {srv.info['model']} (n_ctx {srv.info['n_ctx']})")
        self.status(self._serving_text())

    def _close_retired(self) -> None:
        if not self._retired:
            return
        in_use = self._models_in_use()
        keep = []
        for old in self._retired:
            if old.model in in_use:
                keep.append(old)
            else:
                old.model.close()
                old.watch.close()
                log.info("closed the previous model %s", old.model.path)
        self._retired = keep
        if not keep:
            self._cap_private()              # the old model's memory is back: re-measure

    def _cap_private(self) -> None:
        cap = budget_mod.cap_private(self.loaded.fit.budget)
        if cap is not None:
            log.info("private memory capped at %s (RLIMIT_DATA: bounds what libzmq may buffer)",
                     budget_mod.human(cap))

    def _models_in_use(self) -> set:
        # the scheduler's jobs too: an HTTP job (daemon/http.py) suspended by a preemption
        # holds its Generation, and so the old model, without being one of the server's
        jobs = self.server.active_jobs() + self.server.scheduler.jobs()
        return {j.gen.model for j in jobs if j.gen is not None}
