"""emberd's log lines on stderr: written once, dropped on failure, never raised.

Design. A daemon that dies because its log could not be written has turned a
full disk into an outage. Every line emberd writes to stderr goes through the
logging module, into `StderrHandler`: one unbuffered `os.write(2, ...)` per
record. A write that fails (a full disk, a closed pipe) is counted and
dropped: nothing stays behind in a buffer to fail again later (a buffered
sys.stderr that cannot be flushed at exit would turn a clean exit into
status 120), and nothing is raised into the serving loop.

Two loggers: "emberd" carries diagnostics at --log-level ("emberd: WARNING
..."); `say()` carries the operator's notices that emberd always prints
("emberd: now serving ..."), whatever the level.
"""
from __future__ import annotations

import logging
import os

SAY = "emberd.say"


class StderrHandler(logging.Handler):
    """One os.write(2) per record; a failed write is dropped and counted."""

    def __init__(self, fmt: str):
        super().__init__()
        self.setFormatter(logging.Formatter(fmt))
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - a bad format string is the logger's, not the daemon's
            self.dropped += 1
            return
        try:
            os.write(2, line)
        except OSError:
            self.dropped += 1


def setup(level: str = "warning") -> None:
    """Route emberd's diagnostics and notices to stderr (called once, by emberd's main)."""
    logging.raiseExceptions = False      # a failing handler reports nowhere: it drops
    root = logging.getLogger()
    root.handlers[:] = [StderrHandler("emberd: %(levelname)s %(message)s")]
    root.setLevel(level.upper())
    notices = logging.getLogger(SAY)
    notices.handlers[:] = [StderrHandler("emberd: %(message)s")]
    notices.setLevel(logging.INFO)
    notices.propagate = False


def say(msg: str) -> None:
    """An operator notice, always written (start-up facts, reloads, refusals)."""
    logging.getLogger(SAY).info(msg)
