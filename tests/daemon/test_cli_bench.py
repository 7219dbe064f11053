"""`ember bench`: real runs of the CLI on real files (a conformance model, a synthetic one).

The synthetic model is written by the command itself into a cache under
tmp_path (EMBER_CACHE_DIR), with ember's own GGUF writer and quantizer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ember.daemon.commands.bench import JSON_KEYS
from tests.conftest import conformance_path


def ember(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.daemon.cli", "bench", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_json_has_exactly_the_documented_keys(tmp_path):
    env = {"EMBER_CACHE_DIR": str(tmp_path)}
    r = ember("--synthetic", "llama-tiny", "--quant", "Q4_K_M", "--prompt-tokens", "24",
              "--gen-tokens", "8", "--threads", "2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert tuple(out) == JSON_KEYS
    assert all(isinstance(v, (int, float)) and v > 0 for v in out.values())
    assert out["peak_rss_mb"] < 1000
    cached = tmp_path / "synthetic" / "llama-tiny-Q4_K_M.gguf"
    assert cached.is_file()
    mtime = cached.stat().st_mtime_ns
    r = ember("--synthetic", "llama-tiny", "--quant", "Q4_K_M", "--prompt-tokens", "4",
              "--gen-tokens", "1", "--json", env=env)
    assert r.returncode == 0 and cached.stat().st_mtime_ns == mtime   # written once, reused


def test_human_output_on_a_real_model():
    model = str(conformance_path("models", "stories260K.gguf"))
    r = ember(model, "--backend", "cpu", "--prompt-tokens", "32", "--gen-tokens", "16")
    assert r.returncode == 0, r.stderr
    for word in ("load", "prefill", "decode", "ttft", "peak RSS", "backend      cpu"):
        assert word in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["/nonexistent/model.gguf"], "No such file"),
    (["--synthetic", "gpt-17"], "unknown synthetic shape"),
    (["--synthetic", "llama-tiny", "--quant", "Q3_X"], "unknown quant"),
    ([], "MODEL"),
    (["x.gguf", "--prompt-tokens", "0"], "--prompt-tokens"),
    (["x.gguf", "--threads", "0"], "--threads"),
])
def test_user_errors_are_one_line_and_exit_2(args, msg, tmp_path):
    r = ember(*args, env={"EMBER_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_unknown_backend_is_a_user_error():
    r = ember(str(conformance_path("models", "stories260K.gguf")), "--backend", "abacus")
    assert r.returncode == 2 and "abacus" in r.stderr
