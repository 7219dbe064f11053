"""ember.daemon.client (sync and asyncio) and the `ember generate/chat/status/ping` commands,
against a real emberd over loopback and ipc."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.daemon.client import AsyncClient, Client, EmberError
from tests.daemon.emberd_proc import emberd, greedy_local, model  # noqa: F401

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.0}


def last_recent(client, rid) -> dict:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        st = client.status()
        hits = [r for r in st["recent"] if r["id"] == rid]
        if hits and st["current"] is None:
            return hits[-1]
        time.sleep(0.01)
    raise AssertionError(f"request {rid} never finished")


def ember(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.daemon.cli", *args], capture_output=True,
                          text=True, timeout=60, **kw)


# ---------------------------------------------------------------------------
# sync client
# ---------------------------------------------------------------------------

def test_closing_a_stream_cancels_on_the_server(emberd):
    with emberd.client() as c:
        stream = c.generate("Once upon a time", **LONG)
        for _ in range(5):
            next(stream)
        stream.close()
        assert stream.done["stop"] == "cancelled"
        r = last_recent(c, stream.id)
        assert r["stop"] == "cancelled" and r["tokens"] < LONG["max_tokens"] and not r["gone"]


def test_leaving_a_with_block_cancels(emberd):
    with emberd.client() as c:
        with pytest.raises(RuntimeError):
            with c.generate("Once upon a time", **LONG) as stream:
                next(stream)
                raise RuntimeError("caller gave up")
        assert stream.done["stop"] == "cancelled"


def test_interleaved_requests_on_one_socket(emberd, model):
    with emberd.client(emberd.ipc) as c:
        # long enough to still run when status arrives: 30 tokens could all be computed
        # (the worker paces on the socket, not on this reader) before a loaded client asks
        stream = c.generate("Once upon a time", max_tokens=300, temperature=0.0, ignore_eos=True)
        first = next(stream)
        st = c.status()                     # replies are routed by id while the stream runs
        ids = c.tokenize("hello")
        rest = [t["text"] for t in stream]
    assert st["current"]["id"] == stream.id and ids == model.tokenize("hello")
    want = None
    for want in model.generate("Once upon a time", max_tokens=300, temperature=0.0, ignore_eos=True):
        pass
    assert first["text"] + "".join(rest) == want.text


def test_error_reply_raises_typed(emberd):
    with emberd.client() as c:
        with pytest.raises(EmberError) as e:
            list(c.generate("x", top_p=0.0))
        assert e.value.code == "bad_request" and "top_p" in e.value.message


def test_unreachable_daemon_times_out_cleanly(tmp_path):
    with Client(f"ipc://{tmp_path}/nobody", timeout=0.2) as c:
        with pytest.raises(EmberError) as e:
            c.ping()
    assert e.value.code == "timeout"


# ---------------------------------------------------------------------------
# asyncio client
# ---------------------------------------------------------------------------

def test_async_stream_and_aclose(emberd, model):
    async def main():
        async with AsyncClient(emberd.tcp, timeout=20) as c:
            hello = await c.hello()
            stream = await c.generate("Once upon a time", max_tokens=24, temperature=0.0)
            texts = [t["text"] async for t in stream]
            long = await c.generate("Once upon a time", **LONG)
            await long.__anext__()
            await long.aclose()
            return hello, texts, stream.done, long.done, await c.status()
    hello, texts, done, cancelled, st = asyncio.run(main())
    assert hello["version"] == 1
    assert "".join(texts) == done["text"] == greedy_local(model, "Once upon a time", 24)
    assert cancelled["stop"] == "cancelled"
    assert st["current"] is None


# ---------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------

def test_ember_generate_prints_only_the_completion(emberd, model):
    r = ember("generate", "--endpoint", emberd.tcp, "--max-tokens", "32", "--temperature", "0",
              "Once upon a time")
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy_local(model, "Once upon a time", 32)


def test_ember_generate_bad_value_is_one_line(emberd):
    r = ember("generate", "--endpoint", emberd.tcp, "--temperature", "nan", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "temperature" in r.stderr
    r = ember("ping", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "0.3")
    assert r.returncode == 2 and "timeout" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_on_ember_generate_cancels_on_the_daemon(emberd):
    p = subprocess.Popen([sys.executable, "-m", "ember.daemon.cli", "generate", "--endpoint", emberd.tcp,
                          "--max-tokens", "2000", "--temperature", "0", "Once upon a time"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.read(8)                 # streaming has begun
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and b"Traceback" not in err
    with emberd.client() as c:
        end = time.monotonic() + 10
        while c.status()["current"] is not None and time.monotonic() < end:
            time.sleep(0.01)
        r = c.status()["recent"][-1]
    assert r["stop"] == "cancelled" and r["tokens"] < 2000


def test_ember_chat_multi_turn(emberd):
    r = ember("chat", "--endpoint", emberd.ipc, "--max-tokens", "12", "--temperature", "0",
              input="Hello\n/reset\nHello\nWhat next?\n")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.split("\n")
    assert replies[0] and replies[0] == replies[1]   # /reset: same first turn, same reply
    assert len([x for x in replies if x]) == 3


def test_ember_status_and_ping(emberd):
    r = ember("status", "--endpoint", emberd.tcp, "--json")
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["model"] == "stories260K.gguf" and st["queue_max"] == 16
    r = ember("status", "--endpoint", emberd.tcp)
    assert "stories260K.gguf" in r.stdout and "queue" in r.stdout
    r = ember("ping", "--endpoint", emberd.ipc, "--count", "3", "--health")
    assert r.returncode == 0 and "pong" in r.stdout and "health: ok" in r.stdout


def test_endpoint_from_environment(emberd):
    r = ember("ping", env={**os.environ, "EMBER_ENDPOINT": emberd.tcp})
    assert r.returncode == 0 and emberd.tcp in r.stdout


# ---------------------------------------------------------------------------
# a second language: the Node.js client in tests/daemon/node (must-show 5)
# ---------------------------------------------------------------------------

NODE_DIR = Path(__file__).parent / "node"


def _node_workdir() -> Path:
    """A cached copy of tests/daemon/node with its npm packages installed (`npm ci`)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node/npm not installed (.ci/run installs them)")
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    work = cache / "ember-tests" / f"node-{hashlib.sha256(lock).hexdigest()[:16]}"
    work.mkdir(parents=True, exist_ok=True)
    for f in NODE_DIR.iterdir():
        if f.is_file():
            shutil.copy2(f, work / f.name)
    if not (work / "node_modules" / "zeromq").is_dir():
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=work, capture_output=True,
                           text=True, timeout=600)
        offline = any(s in r.stderr for s in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT"))
        if r.returncode and offline and not os.environ.get("EMBER_REQUIRE_NODE"):
            pytest.skip(f"npm ci could not reach the registry: {r.stderr.strip().splitlines()[-1]}")
        assert r.returncode == 0, r.stderr
    return work


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_node_client_streams_a_generation(emberd, model, transport):
    work = _node_workdir()
    r = subprocess.run(["node", "stream.mjs", getattr(emberd, transport), "Once upon a time", "40"],
                       cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "hello" and events[0]["version"] == 1
    tokens = [e for e in events if e["event"] == "token"]
    done = next(e for e in events if e["event"] == "done")
    want = greedy_local(model, "Once upon a time", 40)
    assert "".join(t["text"] for t in tokens) == done["text"] == want
    assert [t["i"] for t in tokens] == list(range(len(tokens))) and len(tokens) == 40
    assert tokens[0]["t_ms"] < done["t_ms"]             # streamed, not delivered in one burst
    assert next(e for e in events if e["event"] == "tokenize")["ids"] == model.tokenize("Once upon a time")
    assert next(e for e in events if e["event"] == "detokenize")["text"] == "Once upon a time"
    assert next(e for e in events if e["event"] == "error")["code"] == "bad_request"
    assert kinds[-1] == "ping"
