"""`ember run` as a user runs it: a real subprocess on the real stories260K model."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import conformance_cases, conformance_path


def ember(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.daemon.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stories() -> str:
    return str(conformance_path("models", "stories260K.gguf"))


def test_run_prints_readable_english_then_timings(stories):
    p = ember("run", stories, "-p", "Once upon a time", "--max-tokens", "60",
              "--temperature", "0", "--backend", "reference")
    assert p.returncode == 0, p.stderr
    words = re.findall(r"[A-Za-z']+", p.stdout)
    common = {"the", "a", "was", "and", "to", "he", "she", "they", "said", "day", "one", "her",
              "his", "with", "big", "little", "happy", "play"}
    assert len(words) >= 30 and sum(w.lower() in common for w in words) >= 8, p.stdout
    assert "tok/s" in p.stderr and "time to first token" in p.stderr and "[length]" in p.stderr
    assert "tok/s" not in p.stdout                    # timings stay off the text stream


def test_run_greedy_equals_llama_cpp(stories):
    case = next(c for c in conformance_cases() if c["model"] == "stories260K.gguf")
    want = np.load(conformance_path("refs", case["ref"]))["greedy"]
    p = ember("run", stories, "-p", case["prompt"], "--max-tokens", str(len(want)),
              "--temperature", "0", "--backend", "reference")
    assert p.returncode == 0, p.stderr
    assert p.stdout == case["greedy_text"] + "\n"


def test_run_seed_reproduces_and_stop_cuts(stories):
    args = ["run", stories, "-p", "Lily", "--max-tokens", "40", "--temperature", "1.0",
            "--seed", "11", "--backend", "reference"]
    a, b = ember(*args), ember(*args)
    assert a.returncode == 0 and a.stdout == b.stdout
    stop = a.stdout.split()[2]
    c = ember(*args, "--stop", stop)
    assert c.returncode == 0 and "[stop]" in c.stderr
    assert c.stdout == a.stdout[: a.stdout.index(stop)] + "\n"


@pytest.mark.parametrize("extra,message", [
    (["-p", ""], "prompt is empty"),
    (["-p", "hi", "--temperature", "-1"], "temperature"),
    (["-p", "hi", "--top-p", "nan"], "top_p"),
    (["-p", "hi", "--max-tokens", "0"], "max_tokens"),
    (["-p", "hi", "--max-tokens", "100", "--n-ctx", "16"], "exceeds the context"),
    (["-p", "hi", "--backend", "nope"], "unknown backend"),
])
def test_run_bad_input_is_one_line_exit_2(stories, extra, message):
    p = ember("run", stories, *extra)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_run_missing_file(tmp_path):
    p = ember("run", str(tmp_path / "none.gguf"), "-p", "hi")
    assert p.returncode == 2 and "No such file" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------
# every architecture fixture (../shared/conformance/arch)
# ---------------------------------------------------------------------------

ARCH_CASES = [c for c in conformance_cases("arch")
              if c.get("kind") != "embedding" and c["ref"].endswith(".p1.npz")]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["model"].removesuffix(".gguf"))
                                  for c in ARCH_CASES] or [pytest.param(None, marks=pytest.mark.skip(
                                      reason="../shared/conformance/arch is absent"))])
def test_run_each_architecture_greedy_equals_llama_cpp(case):
    """gemma2/3, smollm3, granite, olmo2, lfm2, phi3 (LongRoPE), qwen2 (YaRN) from the
    command line on the cpu backend, at the case's n_ctx (the reference backend's greedy
    decode is held in test_arch_conformance): on the F32 files, llama.cpp's greedy text for the
    same prompt. The Q8_0 files run too, but their continuations meet near-ties of random
    weights where one 8-bit activation rounding picks the other token (qwen2-Q8_0: top-2
    logits 0.002 apart), so only their logits are held to llama.cpp (test_arch_conformance)."""
    want = np.load(conformance_path("arch", "refs", case["ref"]))["greedy"]
    p = subprocess.run([sys.executable, "-m", "ember.daemon.cli", "run",
                        str(conformance_path("arch", "models", case["model"])), "-p", case["prompt"],
                        "--max-tokens", str(len(want)), "--temperature", "0",
                        "--n-ctx", str(case["n_ctx"]), "--backend", "cpu", "--threads", "2"],
                       capture_output=True, timeout=120)   # bytes: the text holds bare \r
    stderr = p.stderr.decode(errors="replace")
    assert p.returncode == 0, stderr
    assert "backend cpu" in stderr and "tok/s" in stderr
    if case["model"].endswith("-F32.gguf"):
        assert p.stdout.decode() == case["greedy_text"] + "\n"
    else:
        assert p.stdout.strip()


def test_run_on_an_embedding_model_says_what_it_is_for():
    r = ember("run", str(conformance_path("arch", "models", "bge-bert-F32.gguf")), "-p", "hello")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("ember run: bge-bert-F32.gguf is an embedding model (bert): it "
                                "cannot generate text or logits; use embed() (the `embed` op, "
                                "POST /v1/embeddings)")
