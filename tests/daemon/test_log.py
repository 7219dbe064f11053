"""daemon/log.py: a log line that cannot be written never takes emberd down.

A real emberd with its stderr on /dev/full (every write fails with ENOSPC),
logging at info level, through the paths that write the most: a SIGHUP
reload (the "now serving" notice), a vanished client, a refused request.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from ember.daemon import log as emberd_log
from ember.daemon.client import EmberError
from tests.daemon.emberd_proc import start_emberd


def test_emberd_keeps_serving_with_stderr_on_a_full_disk():
    d = start_emberd("--log-level", "debug", ipc=False, stderr="/dev/full")
    try:
        with d.client() as c:
            d.proc.send_signal(signal.SIGHUP)            # reload: "now serving ..." on stderr
            end = time.monotonic() + 5
            while time.monotonic() < end:                # through the reload, still answering
                assert c.ping() < 2.0
                time.sleep(0.05)
            gone = d.client()
            stream = gone.generate("Once upon a time", max_tokens=200, ignore_eos=True)
            next(stream)
            gone.sock.close(linger=0)                    # logged: client gone, cancelling
            with pytest.raises(EmberError):
                c.complete("x", max_tokens=0)            # logged: a refused request
            assert c.complete("Once", max_tokens=4)["usage"]["completion_tokens"] == 4
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
    finally:
        d.stop()


def test_a_failed_write_is_dropped_and_counted():
    r, w = os.pipe()
    os.close(r)                                          # writes now fail with EPIPE
    saved = os.dup(2)
    handler = emberd_log.StderrHandler("%(message)s")
    logger = logging.getLogger("test.emberd.log")
    logger.addHandler(handler)
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        os.dup2(w, 2)
        logger.warning("lost")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
        signal.signal(signal.SIGPIPE, old)
        logger.removeHandler(handler)
    assert handler.dropped == 1
