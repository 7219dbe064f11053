"""Shared fixtures: where the llama.cpp conformance oracle lives, and skips without it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = (ROOT / ".." / "shared" / "conformance").resolve()


def conformance_path(*parts: str) -> Path:
    """A path inside ../shared/conformance; skips the test (with why) when absent."""
    p = CONFORMANCE.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"conformance data not found at {p} (../shared/conformance is absent)")
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
    return [pytest.param(*[None] * n_args, id="no-oracle", marks=pytest.mark.skip(reason=why))]


@pytest.fixture
def conformance():
    """Path to ../shared/conformance; skips the test when it is absent."""
    return conformance_path()
