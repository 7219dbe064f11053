"""The conformance suite against EVERY available backend: llama.cpp's logits as the oracle.

Parametrized over (backend, case): each backend that probes available on this
machine (reference, cpu, onnx, cuda, webgpu, ...) runs every case of
../shared/conformance/refs/manifest.json, teacher-forced from llama.cpp's
own prompt tokens, through the engine's stable surface
(``engine.load(path, backend=name)`` and ``Model.logits``), and is held to
the README's KL thresholds. stories260K (a trained model, stable argmax) must
also reproduce llama.cpp's greedy continuation token for token, decoded one
token at a time through the runner's KV cache.

Backends that build artefacts (onnx's graph cache) write them into a
temporary EMBER_CACHE_DIR for the module.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from ember.daemon import cli, engine
from ember.formats import gguf
from ember.plugins import registry
from tests.conftest import (REQUIRE_ORACLES, REQUIRE_WEBGPU, absent, assert_matches_oracle,
                            conformance_cases, conformance_path, oracle_params, required)

CASES = conformance_cases()
BACKENDS = registry.available()
GREEDY_MODELS = ("stories260K.gguf",)


def _params(cases):
    return [pytest.param(b, c, id=f"{b}-{c['ref'].removesuffix('.npz')}")
            for b in BACKENDS for c in cases]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """get(backend, model) -> engine Model; keeps only the last one loaded (cases come
    grouped by model), so at most one model is resident at a time."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EMBER_CACHE_DIR", str(tmp_path_factory.mktemp("ember-cache")))
    held: dict[tuple[str, str], engine.Model] = {}

    def get(backend: str, model: str) -> engine.Model:
        if (backend, model) not in held:
            for m in held.values():
                m.close()
            held.clear()
            path = conformance_path("models", model)
            held[(backend, model)] = engine.load(path, backend=backend, n_ctx=128)
        return held[(backend, model)]
    yield get
    for m in held.values():
        m.close()
    mp.undo()


@pytest.mark.parametrize("backend,case", oracle_params(_params(CASES), 2))
def test_logits_match_llama_cpp(backend, case, models):
    z = np.load(conformance_path("refs", case["ref"]))
    m = models(backend, case["model"])
    assert m.backend == backend
    logits = m.logits(z["tokens"].tolist())
    assert logits.dtype == np.float32 and logits.shape == (len(z["tokens"]), m.n_vocab)
    assert_matches_oracle(backend, case, z, logits)


@pytest.mark.parametrize("backend,case",
                         oracle_params(_params([c for c in CASES if c["model"] in GREEDY_MODELS]), 2))
def test_greedy_text_matches_llama_cpp(backend, case, models):
    z = np.load(conformance_path("refs", case["ref"]))
    want = z["greedy"].tolist()
    r = models(backend, case["model"]).runner
    r.reset()
    got = [int(np.argmax(r.prefill(z["tokens"].tolist())))]
    while len(got) < len(want):
        got.append(int(np.argmax(r.decode(got[-1]))))
    assert got == want, f"{backend} {case['ref']}: greedy diverges at {_first_diff(got, want)}"


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_the_suite_covers_every_available_backend():
    if not CASES:
        absent("conformance manifest absent (../shared/conformance is absent)")
    assert "reference" in BACKENDS
    assert "onnx" in BACKENDS, registry.probe("onnx").reason  # CI installs the [onnx] extra
    if required(REQUIRE_WEBGPU):     # CI installs the [webgpu] extra and lavapipe
        assert "webgpu" in BACKENDS, registry.probe("webgpu").reason
    assert len({c["model"] for c in CASES}) >= 20


# ---------------------------------------------------------------------------
# IQ4_XS: no stored reference, so llama.cpp evaluates the file live
# ---------------------------------------------------------------------------

LLAMA_PYTHON = os.environ.get("EMBER_LLAMA_PYTHON", "/work/llamaenv/bin/python")
LIVE_LOGITS = """
import json, sys, numpy as np
from llama_cpp import Llama
path, out, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m = Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0)
m.eval(tokens)
np.save(out, np.array(m.scores[:len(tokens)], dtype=np.float32))
"""


@pytest.fixture(scope="module")
def iq4_xs_case(tmp_path_factory):
    """s512-llama-F32 quantized to IQ4_XS: every matrix IQ4_XS (--pure), and the
    llama.cpp mix (Q5_K attn_v/ffn_down, Q6_K output); llama.cpp's logits for
    each, teacher-forced on the tokens of a stored s512 prompt."""
    if not os.path.exists(LLAMA_PYTHON):
        absent(f"llama-cpp-python interpreter not found at {LLAMA_PYTHON} (set EMBER_LLAMA_PYTHON)",
               REQUIRE_ORACLES)
    d = tmp_path_factory.mktemp("iq4_xs")
    tokens = np.load(conformance_path("refs", "s512-llama-F32.p2.npz"))["tokens"].tolist()
    out = {}
    for name, extra in (("pure", ["--pure"]), ("mix", [])):
        path = d / f"s512-llama-IQ4_XS-{name}.gguf"
        assert cli.main(["quantize", str(conformance_path("models", "s512-llama-F32.gguf")),
                         str(path), "IQ4_XS", "--quiet", *extra]) == 0
        r = subprocess.run([LLAMA_PYTHON, "-c", LIVE_LOGITS, str(path), str(d / f"{name}.npy"),
                            json.dumps(tokens)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[name] = (path, np.load(d / f"{name}.npy"))
    return tokens, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["pure", "mix"])
def test_iq4_xs_logits_match_live_llama_cpp(backend, variant, iq4_xs_case, monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    tokens, cases = iq4_xs_case
    path, ref = cases[variant]
    with gguf.open(path) as f:
        assert "IQ4_XS" in {t.type for t in f.tensors.values()}
    m = engine.load(path, backend=backend, n_ctx=128)
    try:
        logits = m.logits(tokens)
    finally:
        m.close()
    # every position is a reference position; the quantized-weights bounds apply
    assert_matches_oracle(backend, {"model": path.name, "ref": f"IQ4_XS ({variant})"},
                          {"logits": ref, "positions": np.arange(len(tokens))}, logits)
