"""The unit file is reviewed like code: systemd itself checks it."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "emberd.service"
MAX_EXPOSURE = 2.0


def analyze(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def installed_unit(tmp_path):
    """The unit with ExecStart pointing at this environment's emberd, as an install would."""
    emberd = shutil.which("emberd")
    if emberd is None:
        pytest.skip("emberd console script not on PATH (pip install -e . first)")
    text = UNIT.read_text().replace("/usr/local/bin/emberd", emberd)
    path = tmp_path / "emberd.service"
    path.write_text(text)
    return path


def test_unit_verifies(installed_unit):
    r = analyze("verify", str(installed_unit))
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "emberd.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_security_exposure_is_low():
    r = analyze("security", "--offline=yes", str(UNIT))
    m = re.search(r"Overall exposure level for emberd\.service:\s*([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def test_unit_has_the_lifecycle_the_daemon_implements():
    directives = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )
    assert directives["Type"] == "notify"
    assert directives["DynamicUser"] == "yes"
    assert int(directives["WatchdogSec"]) > 0
    for key in ("CacheDirectory", "StateDirectory", "RuntimeDirectory", "MemoryMax", "MemoryHigh"):
        assert directives.get(key), key


def test_gpu_drop_in_keeps_the_exposure_low(tmp_path):
    """systemd/emberd-gpu.conf (docs/systemd.md) applied on top of the unit still rates <= 2.0."""
    drop_in = UNIT.with_name("emberd-gpu.conf").read_text()
    service = drop_in.split("[Service]", 1)[1]
    merged = UNIT.read_text().replace("\n[Install]", service + "\n[Install]")
    path = tmp_path / "emberd.service"
    path.write_text(merged)
    r = analyze("security", "--offline=yes", str(path))
    m = re.search(r"Overall exposure level for emberd\.service:\s*([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout
    assert "DeviceAllow=/dev/nvmap rw" in merged and "PrivateDevices=no" in merged
