"""sd_notify over a real AF_UNIX datagram socket standing in for systemd."""
import os
import socket

import pytest

from ember.daemon.notify import Notifier


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def recv(sock) -> dict:
    lines = sock.recv(4096).decode().split("\n")
    return dict(line.split("=", 1) for line in lines)


def test_no_socket_is_a_noop():
    n = Notifier({})
    assert not n.enabled
    n.ready()
    n.status("x")
    n.stopping()
    assert n.watchdog_due() is False


def test_lifecycle_messages_arrive_in_order(listener):
    path, sock = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    n.status("loading model")
    n.ready("serving stories260K")
    n.watchdog()
    n.stopping()
    assert recv(sock) == {"STATUS": "loading model"}
    ready = recv(sock)
    assert ready["READY"] == "1" and ready["MAINPID"] == str(os.getpid())
    assert recv(sock) == {"WATCHDOG": "1"}
    assert recv(sock)["STOPPING"] == "1"
    n.close()


def test_abstract_namespace_socket():
    name = f"ember-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hi")
        assert recv(sock) == {"STATUS": "hi"}
    finally:
        sock.close()


def test_watchdog_due_every_half_interval(listener):
    path, _ = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    assert n.watchdog_interval == 1.0
    assert n.watchdog_due()
    n.watchdog()
    t = n._last_ping
    assert not n.watchdog_due(now=t + 0.4)
    assert n.watchdog_due(now=t + 0.5)


@pytest.mark.parametrize("env", [
    {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "abc"}, {"WATCHDOG_USEC": "-5"},
    {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"},
])
def test_watchdog_disabled_when_not_for_us(listener, env):
    path, _ = listener
    n = Notifier({"NOTIFY_SOCKET": path, **env})
    assert n.watchdog_interval is None and not n.watchdog_due()


def test_relative_socket_path_ignored():
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
