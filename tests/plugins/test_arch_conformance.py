"""The architectures beyond the llama family against llama.cpp: ../shared/conformance/arch.

Every decoder case of arch/refs/manifest.json (gemma2, gemma3, smollm3,
granite, olmo2, lfm2, phi3 with LongRoPE, qwen2 with YaRN; F32 and Q8_0),
teacher-forced from llama.cpp's own prompt tokens at the case's n_ctx (1024:
phi3 then uses its long rope factors), through the engine's stable surface,
and held to the README's KL thresholds. The 501-token prompt crosses every
sliding window and both original rope contexts.

A backend computes a model or refuses it at load with one line naming the
missing feature (features.FEATURES). BACKENDS lists the backends held to every
case; a backend in PARTIAL is held to the cases whose features it implements
and must refuse the others by name.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.daemon import engine
from ember.formats import gguf
from ember.plugins import cpu, cuda, onnx, reference, registry
from ember.formats.model_config import UnsupportedModel, config_from_gguf
from ember.plugins.features import FEATURES, features
from tests.conftest import (CONFORMANCE, assert_matches_oracle, conformance_cases, conformance_path,
                            oracle_params)

CASES = [c for c in conformance_cases("arch") if c.get("kind") != "embedding"]
MODELS = sorted({c["model"] for c in CASES})
# backend -> the features.FEATURES it implements. BACKENDS must run every case; a PARTIAL
# backend runs what its IMPLEMENTED covers (so the cases follow as a backend grows) and
# refuses the rest. cuda runs only where a GPU probes available. (cpu runs every case
# here at the kernels' chosen ISA; tests/plugins/test_cpu.py repeats them per ISA.)
BACKENDS = {"reference": reference.IMPLEMENTED, "cpu": cpu.IMPLEMENTED}
PARTIAL = {"onnx": onnx.IMPLEMENTED, "cuda": cuda.IMPLEMENTED}
ALL = {**BACKENDS, **{b: f for b, f in PARTIAL.items() if b in registry.available()}}


def _features(model: str) -> set[str]:
    with gguf.open(CONFORMANCE / "arch" / "models" / model) as f:
        return set(features(config_from_gguf(f)))


FEATURES_OF = {m: _features(m) for m in MODELS}


def _case_params():
    return [pytest.param(b, c, id=f"{b}-{c['ref'].removesuffix('.npz')}")
            for b, implemented in ALL.items() for c in CASES
            if FEATURES_OF[c["model"]] <= implemented]


def _refusal_params():
    return [pytest.param(b, m, id=f"{b}-{m.removesuffix('.gguf')}")
            for b, implemented in ALL.items() for m in MODELS
            if not FEATURES_OF[m] <= implemented]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """get(backend, model, n_ctx) -> engine Model; only the last one stays loaded."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EMBER_CACHE_DIR", str(tmp_path_factory.mktemp("ember-cache")))
    held: dict[tuple, engine.Model] = {}

    def get(backend: str, model: str, n_ctx: int) -> engine.Model:
        key = (backend, model, n_ctx)
        if key not in held:
            for m in held.values():
                m.close()
            held.clear()
            held[key] = engine.load(conformance_path("arch", "models", model), backend=backend,
                                    n_ctx=n_ctx)
        return held[key]
    yield get
    for m in held.values():
        m.close()
    mp.undo()


def _ref(case: dict):
    return np.load(conformance_path("arch", "refs", case["ref"]))


@pytest.mark.parametrize("backend,case", oracle_params(_case_params(), 2))
def test_logits_match_llama_cpp(backend, case, models):
    z = _ref(case)
    m = models(backend, case["model"], case["n_ctx"])
    logits = m.logits(z["tokens"].tolist())
    assert logits.dtype == np.float32 and logits.shape == (len(z["tokens"]), m.n_vocab)
    assert_matches_oracle(backend, case, z, logits)


@pytest.mark.parametrize("backend,case", oracle_params(
    [p for p in _case_params() if p.values[1]["model"].endswith("-F32.gguf")], 2))
def test_greedy_decode_matches_llama_cpp(backend, case, models):
    """One token at a time through the caches (rings, conv states) reproduces llama.cpp's
    greedy continuation."""
    z = _ref(case)
    want = z["greedy"].tolist()
    r = models(backend, case["model"], case["n_ctx"]).runner
    r.reset()
    got = [int(np.argmax(r.prefill(z["tokens"].tolist())))]
    while len(got) < len(want):
        got.append(int(np.argmax(r.decode(got[-1]))))
    assert got == want


@pytest.mark.parametrize("backend,model", oracle_params(_refusal_params(), 2))
def test_a_backend_refuses_what_it_lacks_by_name(backend, model):
    missing = [FEATURES[f] for f in FEATURES if f in FEATURES_OF[model] - ALL[backend]]
    arch = model.split("-")[1]
    with pytest.raises(UnsupportedModel) as e:
        engine.load(conformance_path("arch", "models", model), backend=backend, n_ctx=64)
    msg = str(e.value)
    assert msg in [f"{backend}: {arch} {what} is not implemented" for what in missing], msg
    assert "\n" not in msg


def test_every_decoder_architecture_is_covered():
    if not CASES:
        pytest.skip(f"conformance data not found at {CONFORMANCE / 'arch'}")
    archs = {m.split("-")[1] for m in MODELS}
    assert archs == {"gemma2", "gemma3", "smollm3", "granite", "olmo2", "lfm2", "phi3", "qwen2"}
    assert all(len([c for c in CASES if c["model"] == m]) == 3 for m in MODELS)
