"""Model files the daemon may map: regular, not writable by us, not shrinking.

Design. The weights are used straight from a read-only mmap of the file. Two
things can go wrong with a mapped file that no amount of validation at open
time prevents:

* The file is truncated while mapped. Touching a page past the new end
  raises SIGBUS, which kills the process with no Python exception to catch.
  So the daemon refuses files its own user could write (a bug, or a
  compromised daemon, could then not truncate its own model), checks the
  size again right before the load, and `watch()` compares the mapped
  file's size with the size it was mapped at, so a shrink is noticed and
  reported before the next request pages it in.
* The path names something that is not a plain file (a FIFO blocks the
  open, a device or /proc file has no stable size). Only regular files pass.

Replacing the file by atomic rename (write elsewhere, `rename()` over the
path) is the safe way to update a model: the daemon keeps the old inode
mapped until it reloads (SIGHUP), and the request in flight never sees a
change.

"Writable by the daemon's user" is judged by the permission bits against the
effective uid and groups — what a process without CAP_DAC_OVERRIDE could do.
A daemon running as root could write anything; the systemd unit runs it as
an unprivileged DynamicUser instead.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ember.formats.errors import UserError


class ModelFileError(UserError, ValueError):
    """The model file is unsafe to map; the message says what to do."""


@dataclass(frozen=True)
class Checked:
    """A model file that passed: its path, identity and size at check time."""

    path: str
    dev: int
    ino: int
    size: int


# ---------------------------------------------------------------------------
# Before the load
# ---------------------------------------------------------------------------

def check(path: str | os.PathLike) -> Checked:
    """Refuse anything but a regular file that the daemon's user cannot write."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"model {path}: no such file") from None
    except OSError as e:
        raise ModelFileError(f"model {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"model {path}: not a regular file ({_kind(st.st_mode)}); "
                             "give the path of a .gguf file")
    if writable_by_us(st):
        raise ModelFileError(
            f"model {path}: writable by the daemon's user (mode {stat.filemode(st.st_mode)}, "
            f"owner uid {st.st_uid}); a file truncated while mapped kills the process (SIGBUS). "
            f"Make it read-only: chmod a-w {path}")
    return Checked(path, st.st_dev, st.st_ino, st.st_size)


def writable_by_us(st: os.stat_result) -> bool:
    """Would the permission bits let this process's uid/gids write the file?"""
    mode = st.st_mode
    if st.st_uid == os.geteuid():
        return bool(mode & stat.S_IWUSR)
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return bool(mode & stat.S_IWGRP)
    return bool(mode & stat.S_IWOTH)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def recheck(checked: Checked, needed: int | None = None) -> None:
    """Right before use: the same file, no smaller than at check time (and than `needed`)."""
    try:
        st = os.stat(checked.path)
    except OSError as e:
        raise ModelFileError(f"model {checked.path}: vanished before the load ({e.strerror})") from None
    if (st.st_dev, st.st_ino) == (checked.dev, checked.ino):
        _no_shrink(checked.path, st.st_size, max(checked.size, needed or 0))
    else:   # replaced in between: judge the new file afresh
        new = check(checked.path)
        _no_shrink(new.path, new.size, needed or 0)


def _no_shrink(path: str, size: int, needed: int) -> None:
    if size < needed:
        raise ModelFileError(f"model {path}: shrank to {size} bytes, {needed} are needed; "
                             "replace models by atomic rename, never in place")


# ---------------------------------------------------------------------------
# While mapped
# ---------------------------------------------------------------------------

class Watch:
    """Remembers the inode a model was mapped from and its mapped size."""

    def __init__(self, checked: Checked, mapped_size: int):
        self.checked, self.mapped_size = checked, mapped_size
        # an O_PATH-like handle on the mapped inode: fstat still answers after a rename
        self._fd = os.open(checked.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        if (st.st_dev, st.st_ino) != (checked.dev, checked.ino):
            os.close(self._fd)
            self._fd = -1
            raise ModelFileError(f"model {checked.path}: replaced while loading; load it again")

    def shrunk(self) -> str | None:
        """A message when the mapped inode is now smaller than the map, else None."""
        if self._fd < 0:
            return None
        size = os.fstat(self._fd).st_size
        if size >= self.mapped_size:
            return None
        return (f"model {self.checked.path} was truncated under the map ({size} < "
                f"{self.mapped_size} bytes); serving it further would crash with SIGBUS")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
