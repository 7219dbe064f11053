"""Shared fixtures: where the llama.cpp conformance oracle lives, and skips without it.

A test whose oracle is missing skips with the reason. In CI a skip would let
the suite quietly shrink, so two variables turn those skips into failures:
EMBER_REQUIRE_CONFORMANCE=1 for ../shared/conformance (the stored llama.cpp
outputs and models), EMBER_REQUIRE_ORACLES=1 for the live llama.cpp oracles
(libggml's C quantizer, llama-cpp-python's tokenizer). Every such skip goes
through `absent()`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = (ROOT / ".." / "shared" / "conformance").resolve()
REQUIRE_CONFORMANCE = "EMBER_REQUIRE_CONFORMANCE"
REQUIRE_ORACLES = "EMBER_REQUIRE_ORACLES"


# ---------------------------------------------------------------------------
# Skip, or fail when required
# ---------------------------------------------------------------------------

def required(flag: str) -> bool:
    """Whether `flag` (an EMBER_REQUIRE_* variable) is set: "1" yes; unset, "" or "0" no."""
    value = os.environ.get(flag, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise pytest.UsageError(f"{flag}={value!r}: set it to 1 (missing oracles fail) or 0 / unset "
                            "(they skip)")


def absent(reason: str, flag: str = REQUIRE_CONFORMANCE) -> NoReturn:
    """Skip a test whose oracle is missing — or fail it when `flag`=1 requires the oracle."""
    if required(flag):
        pytest.fail(f"{reason}; {flag}=1 requires it", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "absent(reason, flag): the oracle is missing; "
                                       "skips, or fails under the flag")
    for flag in (REQUIRE_CONFORMANCE, REQUIRE_ORACLES):
        required(flag)                  # a typo'd value stops the run before any test


@pytest.hookimpl(tryfirst=True)      # before fixtures that would need the oracle
def pytest_runtest_setup(item):
    mark = item.get_closest_marker("absent")
    if mark is not None:
        absent(*mark.args, **mark.kwargs)


# ---------------------------------------------------------------------------
# ../shared/conformance
# ---------------------------------------------------------------------------

def conformance_path(*parts: str) -> Path:
    """A path inside ../shared/conformance; skips the test (with why) when absent."""
    p = CONFORMANCE.joinpath(*parts)
    if not p.exists():
        absent(f"conformance data not found at {p} (../shared/conformance is absent)")
    return p


def conformance_models() -> list[str]:
    """Names of the oracle's model files, for parametrization (empty when absent)."""
    d = CONFORMANCE / "models"
    return sorted(p.name for p in d.glob("*.gguf")) if d.is_dir() else []


def conformance_cases(*folder: str) -> list[dict]:
    """The refs manifest's cases, for parametrization (empty when absent). `folder`
    names a sub-oracle with its own refs/ (e.g. "arch")."""
    m = CONFORMANCE.joinpath(*folder, "refs", "manifest.json")
    return json.loads(m.read_text())["cases"] if m.is_file() else []


def oracle_params(values: list, n_args: int = 1) -> list:
    """Parameters taken from the oracle; when there are none (../shared/conformance absent),
    one placeholder that skips with that reason, instead of pytest's bare "empty parameter set"."""
    if values:
        return values
    why = f"conformance data not found at {CONFORMANCE} (../shared/conformance is absent)"
    return [pytest.param(*[None] * n_args, id="no-oracle", marks=pytest.mark.absent(why))]


@pytest.fixture
def conformance():
    """Path to ../shared/conformance; skips the test when it is absent."""
    return conformance_path()


# ---------------------------------------------------------------------------
# Comparing logits: the README's KL measure and thresholds
# ---------------------------------------------------------------------------

FLOAT_TYPES = ("F32", "F16", "BF16")


def kl_rows(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(ours)) per row (..., n_vocab) -> (...,), in float64."""
    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def kl_thresholds(model: str) -> tuple[float, float]:
    """(mean, max) KL bounds from the conformance README: float weights vs quantized."""
    stem = model.removesuffix(".gguf")
    is_float = stem == "stories260K" or stem.rsplit("-", 1)[-1] in FLOAT_TYPES
    return (1e-4, 1e-3) if is_float else (2e-3, 1e-2)


def assert_matches_oracle(label: str, case: dict, z, logits: np.ndarray) -> None:
    """The oracle case's positions of `logits` (n_tokens, n_vocab) against llama.cpp's stored
    logits `z`, within the README's (mean, max) KL bounds for the case's model."""
    kl = kl_rows(z["logits"], logits[z["positions"]])
    mean_max, max_max = kl_thresholds(case["model"])
    assert kl.mean() <= mean_max and kl.max() <= max_max, (
        f"{label} {case['ref']}: KL mean {kl.mean():.3e} (<= {mean_max}), max {kl.max():.3e} "
        f"(<= {max_max}) at position {int(z['positions'][kl.argmax()])}")
