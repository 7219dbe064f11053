"""tests/conftest.py: the EMBER_REQUIRE_* flags that turn a missing oracle's skips into failures."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REQUIRE_CONFORMANCE, REQUIRE_ORACLES, ROOT, absent, required


@pytest.mark.parametrize("value, want", [(None, False), ("", False), ("0", False), (" 0 ", False),
                                         ("1", True), ("1\n", True)])
def test_required_parses_the_flag(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(REQUIRE_ORACLES, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_ORACLES, value)
    assert required(REQUIRE_ORACLES) is want


@pytest.mark.parametrize("value", ["yes", "true", "2", "on"])
def test_required_refuses_other_values(monkeypatch, value):
    monkeypatch.setenv(REQUIRE_CONFORMANCE, value)
    with pytest.raises(pytest.UsageError, match=f"{REQUIRE_CONFORMANCE}='{value}'"):
        required(REQUIRE_CONFORMANCE)


def test_absent_skips_or_fails_by_its_own_flag(monkeypatch):
    monkeypatch.delenv(REQUIRE_CONFORMANCE, raising=False)
    monkeypatch.setenv(REQUIRE_ORACLES, "1")
    with pytest.raises(pytest.skip.Exception, match="no data"):
        absent("no data")                                  # conformance: not required
    with pytest.raises(pytest.fail.Exception, match=f"no lib; {REQUIRE_ORACLES}=1 requires it"):
        absent("no lib", REQUIRE_ORACLES)


SAMPLE = textwrap.dedent("""
    import pytest
    from tests.conftest import absent, oracle_params

    def test_explicit():
        absent("the oracle is not here")

    @pytest.mark.parametrize("case", oracle_params([]))
    def test_parametrized(case):
        raise AssertionError("must not run without its oracle")
""")


@pytest.mark.parametrize("flag, outcome", [("0", "2 skipped"), ("1", "1 failed, 1 error")])
def test_a_real_run_skips_or_fails(tmp_path, flag, outcome):
    """Through pytest itself: the explicit skip and the empty-oracle placeholder both obey it."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_configure, "
                                          "pytest_runtest_setup  # noqa: F401\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**os.environ, REQUIRE_CONFORMANCE: flag, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs",
                        str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=env)
    assert outcome in r.stdout, r.stdout[-2000:]     # (the placeholder fails in its setup)
    assert r.returncode == (1 if flag == "1" else 0)
    if flag == "1":
        assert "the oracle is not here; EMBER_REQUIRE_CONFORMANCE=1 requires it" in r.stdout
        assert "(../shared/conformance is absent); EMBER_REQUIRE_CONFORMANCE=1 requires it" in r.stdout
