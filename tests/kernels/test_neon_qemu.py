"""NEON kernels vs the portable C kernels, cross-compiled and run under qemu-user.

tests/kernels/neon/run_qemu.sh builds kernels/c + driver.c for aarch64 and runs
the driver on an emulated CPU with dotprod (`-cpu max`) and one without
(`-cpu cortex-a72`); the driver compares every weight type's products,
activation quantization and dequantization with the generic C results.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "neon" / "run_qemu.sh"
TOOLS = ("aarch64-linux-gnu-gcc", "qemu-aarch64-static")


@pytest.fixture(scope="module")
def qemu_run():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install gcc-aarch64-linux-gnu qemu-user-static)")
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)


def test_neon_matches_generic_on_both_emulated_cpus(qemu_run):
    out = qemu_run.stdout
    assert qemu_run.returncode == 0, f"{out[-4000:]}\n{qemu_run.stderr[-4000:]}"
    assert out.count("ALL PASSED") == 2
    assert "FAIL" not in out


def test_every_type_ran_under_both_neon_builds(qemu_run):
    out = qemu_run.stdout
    for variant in ("neon", "neon+dotprod"):
        ran = set(re.findall(rf"^PASS (\S+)\s+n=\d+\s+{re.escape(variant)}\s", out, re.M))
        assert len(ran) == 15, f"{variant}: only {sorted(ran)}"
