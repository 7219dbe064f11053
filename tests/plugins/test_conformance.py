"""The conformance suite against EVERY available backend: llama.cpp's logits as the oracle.

Parametrized over (backend, case): each backend that probes available on this
machine (reference, cpu, onnx, cuda, ...) runs every case of
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

import numpy as np
import pytest

from ember.daemon import engine
from ember.plugins import registry
from tests.conftest import absent, assert_matches_oracle, conformance_cases, conformance_path, oracle_params

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
    assert len({c["model"] for c in CASES}) >= 20
