"""Test helper: run a command with stdout and/or stderr on a real pseudo-terminal.

Terminal behaviour (progress bars, the newline after streamed text) depends on
isatty(), so the tests give the child a pty from `pty.openpty()` rather than
faking the check. What the child wrote to the terminal comes back as bytes.
"""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios


def run_on_tty(cmd: list[str], *, stdout: bool = False, stderr: bool = False, env=None,
               timeout: float = 120) -> tuple[int, bytes, bytes]:
    """(exit code, bytes written to the terminal, the other stream's bytes through a pipe)."""
    master, slave = pty.openpty()
    # a fresh pty is 0x0; give it a real terminal's size, as tqdm sizes its bar to it
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env,
                                stdout=slave if stdout else subprocess.PIPE,
                                stderr=slave if stderr else subprocess.PIPE)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    os.close(slave)             # only the child holds it now: EIO on read once it exits
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:     # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
        piped = proc.communicate(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    other = piped[0] if stderr and not stdout else piped[1] if stdout and not stderr else b""
    return proc.returncode, shown, other or b""
