"""emberd's lifecycle on real processes: sd_notify, watchdog, drain on SIGTERM, reload.

systemd is played by a real AF_UNIX datagram socket (NOTIFY_SOCKET) that
records every notification with its arrival time. The daemon is a real
`python -m ember.daemon.emberd` on loopback with stories260K on the
reference backend (~250 tokens/s here, so a 1500-token request is
reliably in flight when a signal lands).

The hung-loop case uses emberd's documented test-only switch:
EMBER_DEBUG_HANG=SECONDS makes SIGUSR1 block the serving loop that long.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ember.daemon.client import Client, EmberError, Token
from tests.conftest import conformance_path
from tests.daemon.emberd_proc import _read_endpoints, model, model_path  # noqa: F401

PROMPT = "Once upon a time"


def slow_model():
    """v32k-llama: its 32k vocabulary makes a token ~10x slower than stories260K's."""
    return conformance_path("models", "v32k-llama-Q8_0.gguf")


# ---------------------------------------------------------------------------
# Fake systemd and a launcher
# ---------------------------------------------------------------------------

class NotifyListener:
    """A NOTIFY_SOCKET: collects (monotonic time, {KEY: VALUE}) per datagram."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def keys(self) -> list[str]:
        """One token per message: READY, WATCHDOG, STOPPING, or STATUS."""
        out = []
        for _, f in self.messages:
            out.append(next((k for k in ("READY", "WATCHDOG", "STOPPING") if k in f), "STATUS"))
        return out

    def times(self, key: str) -> list[float]:
        return [t for t, f in self.messages if key in f]

    def wait_for(self, key: str, timeout: float = 30.0, count: int = 1) -> None:
        end = time.monotonic() + timeout
        while len(self.times(key)) < count:
            assert time.monotonic() < end, f"no {key} (x{count}) within {timeout} s: {self.messages}"
            time.sleep(0.02)

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Proc:
    def __init__(self, args, env, workdir):
        self.log = Path(workdir) / "stderr.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "ember.daemon.emberd", *args],
                                     stdout=subprocess.PIPE, stderr=self.log.open("w"), env=env)
        self.endpoint = None

    def started(self, timeout=60.0) -> "Proc":
        self.endpoint = _read_endpoints(self.proc, 1, timeout)[0]
        return self

    def client(self, timeout=30.0) -> Client:
        return Client(self.endpoint, timeout=timeout)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=30.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="emberd-life-")   # short: AF_UNIX paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def notify(workdir):
    n = NotifyListener(workdir)
    yield n
    n.close()


@pytest.fixture
def launch(workdir, notify):
    procs = []

    def go(*args, model_file=None, watchdog_s=None, env=None, started=True):
        e = {**os.environ, "NOTIFY_SOCKET": notify.path, **(env or {})}
        e.pop("WATCHDOG_USEC", None)
        e.pop("WATCHDOG_PID", None)
        if watchdog_s is not None:
            e["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        model_args = [] if model_file is False else ["--model", str(model_file or model_path())]
        p = Proc([*model_args, "--backend", "reference", "--bind", "tcp://127.0.0.1:*", *args],
                 e, workdir)
        procs.append(p)
        return p.started() if started else p

    yield go
    for p in procs:
        p.kill()


def greedy(m, prompt, n, **kw):
    out = None
    for out in m.generate(prompt, max_tokens=n, temperature=0.0, **kw):
        pass
    return out.text


# ---------------------------------------------------------------------------
# sd_notify and the watchdog
# ---------------------------------------------------------------------------

def test_ready_status_watchdog_stopping_sequence(launch, notify):
    d = launch(watchdog_s=1.0)
    notify.wait_for("READY")
    with d.client() as c:                  # READY=1 means it answers now
        c.call("ping")
        with c.generate(PROMPT, max_tokens=8, temperature=0) as s:
            list(s)
    notify.wait_for("WATCHDOG", count=3, timeout=10)
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    keys = notify.keys()
    ready, stopping = keys.index("READY"), keys.index("STOPPING")
    assert keys[0] == "STATUS" and "loading" in notify.messages[0][1]["STATUS"]
    assert ready < stopping == len(keys) - 1 or keys[stopping + 1:] == []
    assert "WATCHDOG" in keys[ready:stopping] and "WATCHDOG" not in keys[:ready]
    assert notify.messages[ready][1]["MAINPID"] == str(d.proc.pid)
    serving = [f["STATUS"] for _, f in notify.messages[ready + 1:stopping] if "STATUS" in f]
    assert any("1 requests" in s for s in serving), serving
    pings = notify.times("WATCHDOG")
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 0.9, gaps           # every half interval (+ a quarter): inside WatchdogSec


def test_blocked_serving_loop_stops_the_pings(launch, notify):
    d = launch(watchdog_s=1.0, env={"EMBER_DEBUG_HANG": "3"})
    notify.wait_for("WATCHDOG", count=2, timeout=10)
    t_block = time.monotonic()
    d.signal(signal.SIGUSR1)               # the loop sleeps 3 s inside its tick
    before = len(notify.times("WATCHDOG"))
    notify.wait_for("WATCHDOG", count=before + 2, timeout=15)
    pings = notify.times("WATCHDOG")
    gaps = [(b - a, a) for a, b in zip(pings, pings[1:]) if b > t_block]
    assert max(g for g, _ in gaps) >= 2.5, gaps      # no ping while the loop was stuck
    with d.client() as c:                  # and it recovers
        c.call("ping")


def test_no_notify_socket_is_a_no_op(launch, workdir):
    d = launch(env={"NOTIFY_SOCKET": ""})
    with d.client() as c:
        c.call("ping")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


# ---------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------

def test_sigterm_mid_stream_drains_with_terminal_events(launch, notify):
    # On a fast CPU stories260K finished all 1,500 tokens inside the 1 s drain
    # (stop "length", not "cancelled"): a model ~10x slower per token keeps it running.
    d = launch("--drain-timeout", "1", model_file=slow_model())
    notify.wait_for("READY")
    with d.client() as a, d.client() as b, d.client(timeout=5) as late:
        stream = a.generate(PROMPT, max_tokens=4000, temperature=0, ignore_eos=True)
        first = next(stream)
        queued = b.send("generate", prompt="Hello", max_tokens=5, temperature=0)
        while late.status()["queue_len"] < 1:          # B waits behind A before the signal
            time.sleep(0.01)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", timeout=5)
        with pytest.raises(EmberError) as refused:
            late.call("generate", prompt="x", max_tokens=2)
        n = 1 + sum(1 for _ in stream)
        msg, _ = b.recv(queued, timeout=10)
        assert d.wait() == 0
        elapsed = time.monotonic() - t0
    assert isinstance(first, Token) and first.index == 0
    assert stream.done["stop"] == "cancelled" and 0 < n < 4000        # cut at the drain timeout
    assert stream.done["usage"]["completion_tokens"] == n
    assert msg["op"] == "error" and msg["code"] == "cancelled"        # the queued one: told
    assert refused.value.code == "busy" and "shutting down" in refused.value.message
    assert elapsed < 1 + 3, elapsed


def test_sigterm_lets_a_short_request_finish(launch, model):  # noqa: F811
    d = launch("--drain-timeout", "30")
    with d.client() as a:
        stream = a.generate(PROMPT, max_tokens=300, temperature=0, ignore_eos=True)
        next(stream)
        d.signal(signal.SIGTERM)
        list(stream)
        assert d.wait() == 0
    assert stream.done["stop"] == "length"
    assert stream.done["text"] == greedy(model, PROMPT, 300, ignore_eos=True)


def test_second_sigterm_aborts_at_once(launch, notify):
    d = launch("--drain-timeout", "60", model_file=slow_model())   # still running at signal 2
    with d.client() as a:
        stream = a.generate(PROMPT, max_tokens=1500, temperature=0, ignore_eos=True)
        next(stream)
        d.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", timeout=10)   # the first one handled: two would coalesce
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(15) == 1
        assert time.monotonic() - t0 < 10         # not the 60 s drain: at once, with CI slack
        stream.close()
    assert "second stop signal" in d.stderr()


def test_sigterm_during_model_load_sends_no_ready(launch, notify):
    """v128k-llama3 takes ~2 s from STATUS=loading to READY here (load + a 128k-token
    tokenizer); SIGTERM lands 0.2 s into it."""
    big = conformance_path("models", "v128k-llama3-Q8_0.gguf")
    d = launch(model_file=big, started=False)
    end = time.monotonic() + 30
    while not any("loading" in f.get("STATUS", "") for _, f in notify.messages):
        assert time.monotonic() < end and d.proc.poll() is None, d.stderr()
        time.sleep(0.01)
    assert "READY" not in notify.keys()           # SIGTERM lands inside the ~2 s load
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    keys = notify.keys()
    assert "READY" not in keys and keys[-1] == "STOPPING", notify.messages
    assert "Traceback" not in d.stderr()


def test_sigterm_during_startup_sends_no_ready(launch, notify, workdir):
    """The start-up is stuck fetching the default model from a slow hub when SIGTERM lands."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000000")
            self.end_headers()

        def do_GET(self):
            self.do_HEAD()
            self.wfile.write(b"GGUF")
            self.wfile.flush()
            release.wait(20)                     # a very slow network

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        d = launch("--cache-dir", os.path.join(workdir, "cache"), "--hub",
                   f"http://127.0.0.1:{httpd.server_address[1]}", model_file=False,
                   started=False)
        end = time.monotonic() + 30
        while not any("pulling the default model" in f.get("STATUS", "")
                      for _, f in notify.messages):
            assert time.monotonic() < end and d.proc.poll() is None, d.stderr()
            time.sleep(0.05)
        time.sleep(0.3)
        d.signal(signal.SIGTERM)
        assert d.wait(10) == 0
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
    keys = notify.keys()
    assert "READY" not in keys and keys[-1] == "STOPPING", notify.messages
    assert "Traceback" not in d.stderr()
    parts = list(Path(workdir, "cache").glob("*/*.part"))
    assert parts and parts[0].read_bytes() == b"GGUF"      # kept for `ember pull` to resume


# ---------------------------------------------------------------------------
# Reload: SIGHUP and the load op
# ---------------------------------------------------------------------------

def _readonly_copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o444)
    return dst


def _wait_model(client, name: str, timeout=30.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        st = client.status()
        if st["model"] == name:
            return st
        assert time.monotonic() < end, st
        time.sleep(0.05)


def test_sighup_swaps_models_with_a_request_in_flight(launch, workdir, model):  # noqa: F811
    from ember.daemon import engine
    old = _readonly_copy(model_path(), Path(workdir, "old.gguf"))
    new = _readonly_copy(model_path().with_name("stories260K-Q8_0.gguf"), Path(workdir, "new.gguf"))
    cfg = Path(workdir, "emberd.toml")
    cfg.write_text(f'model = "{old}"\nctx = 2048\n')
    d = launch("--config", str(cfg), model_file=False)
    with d.client() as a, d.client() as b:
        stream = a.generate(PROMPT, max_tokens=1500, temperature=0, ignore_eos=True)
        next(stream)
        cfg.write_text(f'model = "{new}"\nctx = 2048\n')
        d.signal(signal.SIGHUP)
        st = _wait_model(b, "new.gguf")
        assert st["current"] is not None, "the old request was still running at the swap"
        with b.generate(PROMPT, max_tokens=40, temperature=0) as s2:
            list(s2)
        list(stream)
    with engine.load(new, backend="reference", n_ctx=2048) as m_new:
        assert s2.done["text"] == greedy(m_new, PROMPT, 40)
    assert stream.done["stop"] == "length"
    assert stream.done["text"] == greedy(model, PROMPT, 1500, ignore_eos=True)
    assert "now serving new.gguf" in d.stderr()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_load_op(launch, workdir):
    other = _readonly_copy(model_path().with_name("stories260K-Q8_0.gguf"), Path(workdir, "q8.gguf"))
    closed = launch()
    with closed.client() as c, pytest.raises(EmberError) as e:
        c.call("load", model=str(other))
    assert e.value.code == "unauthorized"
    d = launch("--allow-load", "--load-dir", workdir)
    with d.client() as c:
        reply = c.call("load", model=str(other))[0]
        assert reply["model"] == "q8.gguf" and c.status()["model"] == "q8.gguf"
        with pytest.raises(EmberError) as e:
            c.call("load", model=str(Path(workdir, "absent.gguf")))
        assert e.value.code == "bad_request" and "not available to load" in e.value.message
        with pytest.raises(EmberError) as e:
            c.call("load", model="relative/name.gguf")
        assert e.value.code == "bad_request"
        assert c.status()["model"] == "q8.gguf"                 # a failed load changes nothing


def test_a_prompt_cache_entry_is_never_reused_after_a_model_swap(launch, workdir):
    """stories260K and its Q8_0 twin share every token: an entry of one would match the
    other's prompt perfectly. After the swap the same chat finds nothing cached, and its
    text is the new model's own (what a fresh load of it says)."""
    from ember.daemon import engine
    old = _readonly_copy(model_path(), Path(workdir, "f32.gguf"))
    new = _readonly_copy(model_path().with_name("stories260K-Q8_0.gguf"), Path(workdir, "q8.gguf"))
    d = launch("--allow-load", "--load-dir", workdir, model_file=old)
    prompt = "Lily and Tom went to the park to play with a big red ball. " * 3
    with d.client() as c:
        c.complete(prompt, max_tokens=8, temperature=0)
        before = c.complete(prompt, max_tokens=8, temperature=0)
        assert before["usage"]["cached_tokens"] == before["usage"]["prompt_tokens"] - 1
        st = c.status()
        mem = st["memory"]                                  # the slots are in the plan
        assert mem["cache_slots"] == 4 and mem["prompt_cache"] == 4 * mem["kv_cache"] > 0
        assert st["prompt_cache"]["hits"] >= 1 and st["prompt_cache"]["slots"] == 4
        assert c.call("load", model=str(new))[0]["model"] == "q8.gguf"
        after = c.complete(prompt, max_tokens=8, temperature=0)
        assert c.status()["prompt_cache"]["hits"] == 0
    assert after["usage"]["cached_tokens"] == 0
    with engine.load(new, backend="reference") as m:
        assert after["text"] == greedy(m, prompt, 8)


def test_load_outside_the_allowed_folders_leaks_nothing(launch, workdir):
    """Missing, unreadable, outside, a symlink out, a folder: one answer, naming only the request."""
    allowed = Path(workdir, "models")
    allowed.mkdir()
    secret = Path(workdir, "secret.txt")
    secret.write_text("GGUF? no: the first bytes of a private file")
    os.symlink(secret, allowed / "link.gguf")
    d = launch("--allow-load", "--load-dir", str(allowed))
    answers = set()
    with d.client() as c:
        for name in (str(secret), str(Path(workdir, "absent")), "/etc/passwd", "/etc",
                     "../secret.txt", "link.gguf", str(allowed / "missing.gguf"), "a\0b"):
            with pytest.raises(EmberError) as e:
                c.call("load", model=name)
            assert e.value.code == "bad_request"
            answers.add(e.value.message.replace(repr(name), "NAME"))
        assert c.status()["model"] == model_path().name
    assert len(answers) == 1, answers
    assert "private" not in answers.pop()


def test_reload_that_does_not_fit_beside_keeps_the_old_model(launch, workdir):
    probe = launch()
    with probe.client() as c:
        mem = c.status()["memory"]
    # room for one model, not two: half a model's plan (weights + KV + scratch) to spare, far
    # more than the few hundred KB by which the RSS counted as "process" differs between starts
    limit = mem["total"] + (mem["total"] - mem["process"]) // 2
    d = launch("--allow-load", "--load-dir", workdir, "--memory-budget", str(limit),
               "--ctx", str(mem["n_ctx"]), "--min-ctx", str(mem["n_ctx"]))
    with d.client() as c:
        with pytest.raises(EmberError) as e:
            c.call("load", model=str(_readonly_copy(model_path(), Path(workdir, "again.gguf"))))
        assert "old_model" in e.value.message and "over by" in e.value.message
        assert c.status()["model"] == model_path().name
        with c.generate(PROMPT, max_tokens=4, temperature=0) as s:
            list(s)
        assert s.done["usage"]["completion_tokens"] == 4
    assert re.search(r"reload failed, still serving the old model", d.stderr())


def test_sighup_with_a_fifo_config_keeps_answering(launch, workdir):
    """The config is read off the serving loop: a FIFO nobody writes blocks only the reload."""
    cfg = Path(workdir, "emberd.toml")
    cfg.write_text(f'model = "{model_path()}"\n')
    d = launch("--config", str(cfg), model_file=False)
    with d.client(timeout=5) as c:
        c.ping()
        cfg.unlink()
        os.mkfifo(cfg)                                   # open() blocks until a writer comes
        d.signal(signal.SIGHUP)
        end = time.monotonic() + 7                       # past the reload's 5 s read limit
        while time.monotonic() < end:
            assert c.ping() < 1.0
            time.sleep(0.05)
        while "not read within" not in d.stderr():
            assert time.monotonic() < end + 10, d.stderr()
            time.sleep(0.05)
        assert c.complete("Once", max_tokens=2)["usage"]["completion_tokens"] == 2
    d.signal(signal.SIGTERM)
    assert d.wait(15) == 0
