"""sd_notify: tell systemd what the daemon is doing, without libsystemd.

The protocol is one datagram of newline-separated KEY=VALUE lines sent to the
AF_UNIX socket named by $NOTIFY_SOCKET ("@" prefix = abstract namespace).
Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same way
outside systemd.

The watchdog is fed from the serving loop itself (`Notifier.watchdog_due()`
polled there), never from a helper thread: a thread would keep pinging while
the loop is hung, which is exactly what the watchdog exists to catch.
"""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to systemd; a no-op without NOTIFY_SOCKET."""

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._sock = None
        self._last_ping = 0.0
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    # -- messages, in lifecycle order -----------------------------------------

    def status(self, text: str) -> None:
        self._send(f"STATUS={_one_line(text)}")

    def ready(self, text: str = "serving") -> None:
        self._send(f"READY=1\nSTATUS={_one_line(text)}\nMAINPID={os.getpid()}")

    def watchdog_due(self, now: float | None = None) -> bool:
        """True when half the watchdog interval has passed since the last ping."""
        if self.watchdog_interval is None or not self.enabled:
            return False
        now = time.monotonic() if now is None else now
        return now - self._last_ping >= self.watchdog_interval / 2

    def watchdog(self) -> None:
        self._last_ping = time.monotonic()
        self._send("WATCHDOG=1")

    def stopping(self, text: str = "stopping") -> None:
        self._send(f"STOPPING=1\nSTATUS={_one_line(text)}")

    # -- transport ------------------------------------------------------------

    def _send(self, payload: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(payload.encode("utf-8", "replace"), self.address)
        except OSError:
            pass  # systemd gone or socket full: notification is best-effort

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(path: str):
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    return None  # systemd only ever gives absolute or abstract paths


def _watchdog_interval(env) -> float | None:
    """WATCHDOG_USEC in seconds, if it is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]
