"""ISA dispatch: EMBER_ISA parsing, forcing, errors, and the one log line.

Each case runs a fresh interpreter, because the ISA is chosen at import.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ember.kernels import dispatch

PROBE = ("import logging; logging.basicConfig(level=logging.INFO, format='LOG %(message)s'); "
         "from ember.kernels import dispatch, quant_ops; import ember.kernels.dispatch; "
         "print('ISA', dispatch.ISA, dispatch.current_isa())")


def run_probe(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EMBER_ISA"}
    if value is not None:
        env["EMBER_ISA"] = value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)


def test_available_isas_start_with_generic_and_include_the_default():
    avail = dispatch.available_isas()
    assert avail[0] == "generic"
    assert dispatch.ISA in avail


@pytest.mark.parametrize("value,want", [(None, None), ("", None), ("auto", None), (" AUTO ", None),
                                        ("generic", "generic"), ("AVX2", "avx2"), (" neon", "neon")])
def test_parse_isa(value, want):
    assert dispatch.parse_isa(value) == want


def test_parse_isa_rejects_unknown_names():
    with pytest.raises(dispatch.ISAError, match="not an ISA"):
        dispatch.parse_isa("sse9")


def test_default_is_the_widest_and_logged_once():
    p = run_probe(None)
    assert p.returncode == 0, p.stderr
    widest = dispatch.available_isas()[-1]
    assert f"ISA {widest} {widest}" in p.stdout
    logs = [line for line in p.stderr.splitlines() if line.startswith("LOG kernels: ISA")]
    assert len(logs) == 1 and "auto" in logs[0]


@pytest.mark.parametrize("isa", dispatch.available_isas())
def test_forcing_each_available_isa(isa):
    p = run_probe(isa.upper())
    assert p.returncode == 0, p.stderr
    assert f"ISA {isa} {isa}" in p.stdout
    assert "forced by EMBER_ISA" in p.stderr


def test_forcing_an_isa_the_cpu_lacks_is_a_clear_error():
    missing = [i for i in dispatch.ISA_NAMES if i not in dispatch.available_isas()]
    assert missing, "every ISA runs here?"   # x86 lacks neon, ARM lacks avx*
    p = run_probe(missing[0])
    assert p.returncode != 0
    assert f"ISA {missing[0]!r} is not supported by this CPU" in p.stderr
    assert "ISAError" in p.stderr


def test_unknown_isa_name_is_a_clear_error():
    p = run_probe("avx1024")
    assert p.returncode != 0
    assert "EMBER_ISA='avx1024' is not an ISA" in p.stderr


def test_variant_names_the_isa_and_its_extension():
    before = dispatch.current_isa()
    try:
        for isa in dispatch.available_isas():
            dispatch.use(isa)
            assert dispatch.current_variant().split("+")[0] == isa
    finally:
        dispatch.use(before)


def test_use_switches_and_refuses_missing():
    before = dispatch.current_isa()
    try:
        assert dispatch.use("generic") == "generic" and dispatch.current_isa() == "generic"
    finally:
        dispatch.use(before)
    with pytest.raises(dispatch.ISAError):
        dispatch.use("mmx")
