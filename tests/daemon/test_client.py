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

from ember.daemon.client import (AsyncClient, Client, EmberError, EmberTimeout, EmberUnavailable,
                                 Token)
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
        rest = [t.text for t in stream]
    assert st["current"]["id"] == stream.id and ids == model.tokenize("hello")
    want = None
    for want in model.generate("Once upon a time", max_tokens=300, temperature=0.0, ignore_eos=True):
        pass
    assert first.text + "".join(rest) == want.text


def test_error_reply_raises_typed(emberd):
    with emberd.client() as c:
        with pytest.raises(EmberError) as e:
            list(c.generate("x", top_p=0.0))
        assert e.value.code == "bad_request" and "top_p" in e.value.message


def test_nothing_listening_fails_fast(tmp_path):
    for endpoint in (f"ipc://{tmp_path}/nobody", "tcp://127.0.0.1:1"):
        t = time.monotonic()
        with Client(endpoint, timeout=30) as c:
            with pytest.raises(EmberUnavailable) as e:
                c.ping()
        assert time.monotonic() - t < 2.0
        assert isinstance(e.value, ConnectionError) and isinstance(e.value, EmberError)
        assert e.value.code == "unavailable" and f"no emberd at {endpoint}" in str(e.value)
        assert "emberd --model" in str(e.value)


def test_a_silent_daemon_is_a_typed_timeout(emberd):
    with emberd.client(timeout=0.05) as c:
        with pytest.raises(EmberTimeout) as e:     # connected, but no reply within 50 ms
            c.complete("Once upon a time", **LONG)
    assert isinstance(e.value, TimeoutError) and e.value.code == "timeout"
    with emberd.client() as c:                      # the abandoned request was cancelled
        end = time.monotonic() + 10
        while c.status()["current"] is not None and time.monotonic() < end:
            time.sleep(0.01)
        r = c.status()["recent"][-1]
        assert r["stop"] == "cancelled" and r["tokens"] < LONG["max_tokens"]


def test_tokens_are_dataclasses_with_the_wire_facts(emberd, model):
    with emberd.client() as c:
        stream = c.generate("Once upon a time", max_tokens=6, temperature=0.0, logprobs=True,
                            top_logprobs=2)
        toks = list(stream)
    assert all(isinstance(t, Token) for t in toks)
    assert [t.index for t in toks] == list(range(6))
    assert "".join(t.text for t in toks) == stream.done["text"] == greedy_local(model, "Once upon a time", 6)
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in toks)
    assert toks[0].id == toks[0].top_logprobs[0][0]      # greedy: the most likely one was taken


def test_unknown_option_is_a_type_error_before_sending(emberd):
    with emberd.client() as c:
        with pytest.raises(TypeError, match="max_token.*valid: max_tokens"):
            c.generate("x", max_token=3)


def test_breaking_out_of_a_for_loop_cancels_on_the_server(emberd):
    with emberd.client() as c:
        stream = c.generate("Once upon a time", **LONG)
        for i, _ in enumerate(stream):
            if i == 4:
                break
        assert stream.done is not None and stream.done["stop"] == "cancelled"
        r = last_recent(c, stream.id)
        assert r["stop"] == "cancelled" and r["tokens"] < LONG["max_tokens"]


# ---------------------------------------------------------------------------
# asyncio client
# ---------------------------------------------------------------------------

def test_async_stream_and_aclose(emberd, model):
    async def main():
        async with AsyncClient(emberd.tcp, timeout=20) as c:
            hello = await c.hello()
            stream = await c.generate("Once upon a time", max_tokens=24, temperature=0.0)
            texts = [t.text async for t in stream]
            long = await c.generate("Once upon a time", **LONG)
            await long.__anext__()
            await long.aclose()
            return hello, texts, stream.done, long.done, await c.status()
    hello, texts, done, cancelled, st = asyncio.run(main())
    assert hello["version"] == 1
    assert "".join(texts) == done["text"] == greedy_local(model, "Once upon a time", 24)
    assert cancelled["stop"] == "cancelled"
    assert st["current"] is None


def test_async_client_has_the_same_methods():
    public = lambda cls: {n for n in vars(cls) if not n.startswith("_")}   # noqa: E731
    assert public(AsyncClient) == public(Client)


def test_async_client_ops_and_abandoned_async_for_cancels(emberd, model):
    async def main():
        async with AsyncClient(emberd.ipc, timeout=20) as c:
            ids = await c.tokenize("hello")
            text = await c.detokenize(ids)
            done = await c.complete("Once upon a time", max_tokens=8, temperature=0.0)
            stream = await c.generate("Once upon a time", **LONG)
            async for i, _ in _enumerate(stream):
                if i == 3:
                    break
            for _ in range(200):            # asyncio finalizes the abandoned generator
                if stream.done is not None:
                    break
                await asyncio.sleep(0.01)
            return ids, text, done, stream.done, await c.models(), await c.health()
    ids, text, done, cancelled, models, health = asyncio.run(main())
    assert ids == model.tokenize("hello") and text.strip() == "hello"
    assert done["text"] == greedy_local(model, "Once upon a time", 8)
    assert cancelled["stop"] == "cancelled" and cancelled["usage"]["completion_tokens"] < 100
    assert models[0]["name"] == "stories260K.gguf" and health["ok"]


async def _enumerate(stream):
    i = 0
    async for tok in stream:
        yield i, tok
        i += 1


def test_async_nothing_listening_fails_fast(tmp_path):
    async def main():
        async with AsyncClient(f"ipc://{tmp_path}/nobody", timeout=30) as c:
            await c.status()
    t = time.monotonic()
    with pytest.raises(EmberUnavailable):
        asyncio.run(main())
    assert time.monotonic() - t < 2.0


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
    r = ember("ping", "--endpoint", "tcp://127.0.0.1:1")
    assert r.returncode == 2 and "no emberd at" in r.stderr and "Traceback" not in r.stderr


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


def test_embed_sync_and_async_on_an_embedding_daemon():
    """Client.embed / AsyncClient.embed -> float32 (n, dim); a typed error from a text model."""
    import numpy as np
    from ember.daemon import engine
    from tests.conftest import conformance_path
    from tests.daemon.emberd_proc import start_emberd
    path = conformance_path("arch", "models", "bge-bert-F32.gguf")
    d = start_emberd(model=path)
    try:
        with engine.load(path, backend="reference") as m:
            want = m.embed(["hello", "a cat"])
        with Client(d.tcp, timeout=20) as c:
            got = c.embed(["hello", "a cat"], priority=3)

        async def main():
            async with AsyncClient(d.ipc, timeout=20) as c:
                return await c.embed("a cat", normalize=True)
        one = asyncio.run(main())
    finally:
        d.stop()
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(one, want[1:])


def test_embed_on_a_text_model_is_a_typed_error(emberd):
    with Client(emberd.tcp, timeout=20) as c, pytest.raises(EmberError) as e:
        c.embed("hello")
    assert e.value.code == "bad_request" and "makes no embeddings" in str(e.value)
