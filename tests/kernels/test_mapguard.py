"""kernels/c/mapguard.c (through _native.MapGuard): a file truncated under its map.

Each case runs in a child process, so that a guard that fails kills the child
(exit -SIGBUS, reported here) and not the test run. The reads are the C thread
pool's (`read_bandwidth`: every worker thread streams its share of the buffer),
like the forward pass's, so faults land on threads other than the caller's.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import mmap, os, sys
    import numpy as np
    from ember.kernels import _native

    path, guarded = sys.argv[1], sys.argv[2] == "guarded"
    with open(path, "wb") as f:
        f.write(np.arange(1 << 20, dtype=np.uint8).tobytes())    # 1 MiB, 256 pages
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = np.frombuffer(m, dtype=np.uint8)
    other = np.zeros(4096, np.uint8)
    g = _native.MapGuard(buf if guarded else other)    # "unguarded": a guard elsewhere only
    _native.read_bandwidth(4, buf, 1)                  # all pages resident, no fault
    assert g.faults == 0
    os.truncate(path, 64 << 10)                        # keep 16 pages of 256
    _native.read_bandwidth(4, buf, 2)                  # 4 pool threads read past the end
    head_ok = bool((buf[:64 << 10] == np.arange(64 << 10, dtype=np.uint8)).all())
    print(g.faults, head_ok, int(buf[64 << 10:].max()))
    g.close()
    print("closed", g.faults)
""")


def _child(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "f.bin"), mode],
                          capture_output=True, text=True, timeout=120)


def test_truncated_pages_read_as_zeros_and_are_counted(tmp_path):
    r = _child(tmp_path, "guarded")
    assert r.returncode == 0, f"child died: {r.returncode} {r.stderr[-2000:]}"
    faults, head_ok, tail_max = r.stdout.split("\n")[0].split()
    assert int(faults) == 240          # every cut page faulted exactly once, on whichever thread
    assert head_ok == "True" and tail_max == "0"
    assert r.stdout.split("\n")[1] == "closed 0"


def test_a_sigbus_outside_every_guard_still_kills(tmp_path):
    """The handler must not swallow faults it does not own: the default action runs."""
    r = _child(tmp_path, "unguarded")
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr[-2000:])
