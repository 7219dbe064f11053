"""CURVE on emberd's socket: allow-listed keys in, everyone else out, fail closed.

Real ZeroMQ everywhere: an in-process Server (model-less: hello needs no
model) with daemon/security.py's Curve on its ROUTER, real client sockets on
loopback, a socket monitor to see the handshake fail on the server side; and
real emberd processes for the bind refusal and the end-to-end key setup.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from ember.daemon import security
from ember.daemon.client import Client, EmberError
from ember.daemon.server import Server
from tests.daemon.emberd_proc import model_path, start_emberd

FAIL_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
               zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


# ---------------------------------------------------------------------------
# Which binds need keys
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("ep", ["tcp://127.0.0.1:5555", "tcp://127.9.9.9:1", "tcp://localhost:5",
                                "tcp://[::1]:5555", "ipc:///run/emberd/emberd.sock", "inproc://x"])
def test_local_endpoints(ep):
    assert security.is_local(ep)


@pytest.mark.parametrize("ep", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.5:5555",
                                "tcp://eth0:5555", "tcp://[::]:5555", "tcp://example.com:1",
                                "udp://127.0.0.1:5", "ws://127.0.0.1:5"])
def test_open_endpoints(ep):
    assert not security.is_local(ep)


def test_open_bind_without_keys_refused_unless_insecure():
    with pytest.raises(security.SecurityError, match="--insecure"):
        security.check_binds(["tcp://127.0.0.1:1", "tcp://0.0.0.0:2"], None, insecure=False)
    warnings = security.check_binds(["tcp://0.0.0.0:2"], None, insecure=True)
    assert len(warnings) == 1 and "tcp://0.0.0.0:2" in warnings[0]
    assert security.check_binds(["tcp://127.0.0.1:1", "ipc:///tmp/x"], None, False) == []


def test_keys_must_come_in_pairs(tmp_path):
    security.write_pair(str(tmp_path), "server")
    with pytest.raises(security.SecurityError, match="both"):
        security.server_keys(str(tmp_path / "server.key_secret"), None)
    with pytest.raises(security.SecurityError, match="no .key files"):
        (tmp_path / "empty").mkdir()
        security.server_keys(str(tmp_path / "server.key_secret"), str(tmp_path / "empty"))
    with pytest.raises(security.SecurityError, match="no secret key"):
        security.server_keys(str(tmp_path / "server.key"), str(tmp_path))


def test_write_pair_modes_and_refusals(tmp_path):
    pub, sec = security.write_pair(str(tmp_path), "laptop")
    assert oct(os.stat(sec).st_mode & 0o777) == "0o600"
    assert oct(os.stat(pub).st_mode & 0o777) == "0o644"
    with pytest.raises(security.SecurityError, match="exists"):
        security.write_pair(str(tmp_path), "laptop")
    with pytest.raises(security.SecurityError, match="key name"):
        security.write_pair(str(tmp_path), "../evil")


# ---------------------------------------------------------------------------
# An in-process CURVE server
# ---------------------------------------------------------------------------

@pytest.fixture
def keyring(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    security.write_pair(str(keys), "server")
    pub, _ = security.write_pair(str(keys), "friend")
    security.write_pair(str(keys), "stranger")
    os.link(pub, allowed / "friend.key")
    return keys, allowed


@pytest.fixture
def curve_server(keyring):
    keys, allowed = keyring
    curve = security.Curve(security.server_keys(str(keys / "server.key_secret"), str(allowed)))
    server = Server(None, ["tcp://127.0.0.1:*"])
    server.before_bind.append(curve.secure)
    server.start()
    monitor = server.sock.get_monitor_socket()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server, curve, monitor, keys
    server.request_stop()
    thread.join(5)
    server.sock.disable_monitor()
    monitor.close(linger=0)
    curve.stop()
    server.stop()


def _client(server, keys, who: str | None, timeout: float = 1.5) -> Client:
    curve = None if who is None else security.client_curve(str(keys / "server.key"),
                                                            str(keys / f"{who}.key_secret"))
    return Client(server.bound[0], timeout=timeout, ctx=zmq.Context.instance(), curve=curve)


def _handshake_failed(monitor, timeout_s: float = 3.0) -> bool:
    """Did the server report a failed handshake (auth or protocol)?"""
    while monitor.poll(int(timeout_s * 1000)):
        if recv_monitor_message(monitor)["event"] in FAIL_EVENTS:
            return True
    return False


def test_allowed_key_connects(curve_server):
    server, _, _, keys = curve_server
    with _client(server, keys, "friend", timeout=10) as c:
        assert c.call("hello")[0]["server"] == "emberd"


def test_unknown_key_refused(curve_server):
    server, _, monitor, keys = curve_server
    with _client(server, keys, "stranger") as c, pytest.raises(EmberError) as e:
        c.call("ping")
    assert e.value.code == "timeout"
    assert _handshake_failed(monitor)


def test_plaintext_client_refused(curve_server):
    server, _, monitor, keys = curve_server
    with _client(server, keys, None) as c, pytest.raises(EmberError) as e:
        c.call("ping")
    assert e.value.code == "timeout"
    assert _handshake_failed(monitor)


def test_dead_zap_handler_fails_closed(curve_server):
    server, curve, monitor, keys = curve_server
    with _client(server, keys, "friend", timeout=10) as c:     # works while the handler lives
        c.call("ping")
    curve.stop()                                                 # the ZAP handler is gone
    with _client(server, keys, "friend") as c, pytest.raises(EmberError) as e:
        c.call("ping")
    assert e.value.code == "timeout"
    assert _handshake_failed(monitor)


# ---------------------------------------------------------------------------
# Real emberd processes
# ---------------------------------------------------------------------------

def _emberd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.daemon.emberd", "--model", str(model_path()),
                           "--backend", "reference", *args], capture_output=True, text=True,
                          timeout=60)


def test_emberd_refuses_open_bind_without_keys():
    r = _emberd("--bind", "tcp://0.0.0.0:*")
    assert r.returncode == 2
    assert "refusing to listen beyond loopback" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_emberd_insecure_warns():
    d = start_emberd("--bind", "tcp://0.0.0.0:*", "--insecure", ipc=False)
    try:
        with d.client() as c:
            c.call("ping")
        assert "WARNING: --insecure" in d.stderr()
    finally:
        d.stop()


def test_emberd_curve_end_to_end(keyring):
    keys, allowed = keyring
    d = start_emberd("--server-key", str(keys / "server.key_secret"), "--allowed-clients",
                     str(allowed), ipc=False)
    try:
        curve = security.client_curve(str(keys / "server.key"), str(keys / "friend.key_secret"))
        with Client(d.tcp, timeout=20, curve=curve) as c:
            with c.generate("Once upon a time", max_tokens=4, temperature=0) as s:
                list(s)
            assert s.done["usage"]["completion_tokens"] == 4
        with Client(d.tcp, timeout=1.5) as c, pytest.raises(EmberError):
            c.call("ping")
        env = {**os.environ, "EMBER_SERVER_KEY": str(keys / "server.key"),
               "EMBER_CLIENT_KEY": str(keys / "friend.key_secret")}
        r = subprocess.run([sys.executable, "-m", "ember.daemon.cli", "ping", "--endpoint", d.tcp],
                           capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 0, r.stderr
    finally:
        d.stop()


def test_ember_keys_cli(tmp_path):
    def keys():
        return subprocess.run([sys.executable, "-m", "ember.daemon.cli", "keys", "--dir",
                               str(tmp_path), "--name", "pi"], capture_output=True, text=True,
                              timeout=60)
    r = keys()
    assert r.returncode == 0 and "pi.key_secret" in r.stdout
    # the pair loads both ways: pi.key as a server key, pi.key_secret as a client pair
    server_pub, client_pub, _ = security.client_curve(str(tmp_path / "pi.key"),
                                                      str(tmp_path / "pi.key_secret"))
    assert server_pub == client_pub and len(server_pub) == 40          # Z85 text
    r = keys()
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr


def _curve_emberd(keyring, *extra: str):
    keys, allowed = keyring
    return start_emberd("--server-key", str(keys / "server.key_secret"), "--allowed-clients",
                        str(allowed), *extra, ipc=False)


def test_curve_emberd_exits_0_on_sigterm_within_the_drain_timeout(keyring):
    """ctx.term() used to wait forever on the ZAP handler's sockets (the same context)."""
    keys, _ = keyring
    d = _curve_emberd(keyring, "--drain-timeout", "1")
    try:
        curve = security.client_curve(str(keys / "server.key"), str(keys / "friend.key_secret"))
        with Client(d.tcp, timeout=20, curve=curve) as c:
            c.call("ping")
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:
            rc = d.proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0 and time.monotonic() - t0 < 1 + 1, (rc, time.monotonic() - t0)
    finally:
        d.stop()


def test_sighup_reloads_the_allow_list(keyring):
    """A key removed from the folder can no longer connect after SIGHUP, and its open
    connection's next request is refused; a key added is let in."""
    keys, allowed = keyring
    d = _curve_emberd(keyring)
    try:
        friend = security.client_curve(str(keys / "server.key"), str(keys / "friend.key_secret"))
        stranger = security.client_curve(str(keys / "server.key"), str(keys / "stranger.key_secret"))
        with Client(d.tcp, timeout=20, curve=friend) as open_conn:
            open_conn.call("ping")
            os.unlink(allowed / "friend.key")
            os.link(keys / "stranger.key", allowed / "stranger.key")
            d.proc.send_signal(signal.SIGHUP)
            end = time.monotonic() + 20
            while True:                                  # the reload is asynchronous: poll for it
                with Client(d.tcp, timeout=2, curve=stranger) as c:
                    try:
                        c.call("ping")
                        break
                    except EmberError:
                        assert time.monotonic() < end, "the added key never got in"
            with Client(d.tcp, timeout=2, curve=friend) as c, pytest.raises(EmberError) as e:
                c.call("ping")
            assert e.value.code == "timeout"               # the handshake is refused
            with pytest.raises(EmberError) as e:
                open_conn.call("ping")
            assert e.value.code == "unauthorized"
        assert d.alive()
    finally:
        d.stop()
