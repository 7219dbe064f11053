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
from ember.plugins import cpu, cuda, onnx, reference, registry, webgpu
from ember.formats.model_config import POOLING_TYPES, UnsupportedModel, config_from_gguf
from ember.plugins.features import FEATURES, features
from tests.conftest import (CONFORMANCE, assert_matches_oracle, conformance_cases, conformance_path,
                            oracle_params)

CASES = [c for c in conformance_cases("arch") if c.get("kind") != "embedding"]
MODELS = sorted({c["model"] for c in CASES})
# backend -> the features.FEATURES it implements. BACKENDS must run every case; a PARTIAL
# backend runs what its IMPLEMENTED covers (so the cases follow as a backend grows) and
# refuses the rest. cuda runs only where a GPU probes available, webgpu where wgpu finds an
# adapter (lavapipe in CI). (cpu runs every case
# here at the kernels' chosen ISA; tests/plugins/test_cpu.py repeats them per ISA.)
BACKENDS = {"reference": reference.IMPLEMENTED, "cpu": cpu.IMPLEMENTED}
PARTIAL = {"onnx": onnx.IMPLEMENTED, "cuda": cuda.IMPLEMENTED, "webgpu": webgpu.IMPLEMENTED}
ALL = {**BACKENDS, **{b: f for b, f in PARTIAL.items() if b in registry.available()}}


def _features(model: str) -> set[str]:
    """The model's features; none when the file is absent (a partial copy of the oracle, as
    the GPU machine gets): its cases then stay in, and each says it is absent when run."""
    path = CONFORMANCE / "arch" / "models" / model
    if not path.is_file():
        return set()
    with gguf.open(path) as f:
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


# ---------------------------------------------------------------------------
# Encoders (bert): sentence embeddings against llama.cpp's Llama(embedding=True).embed
# ---------------------------------------------------------------------------

EMBED_CASES = [c for c in conformance_cases("arch") if c.get("kind") == "embedding"]
EMBED_MODELS = sorted({c["model"] for c in EMBED_CASES})
COSINE_MIN = 0.9999      # arch/README.md: embeddings (F32)
ENCODERS = [b for b in ALL if "encoder" in ALL[b]]      # reference, cpu (its C products)


@pytest.mark.parametrize("backend,case", oracle_params(
    [pytest.param(b, c, id=f"{b}-{c['ref'].removesuffix('.npz')}") for b in ENCODERS
     for c in EMBED_CASES], 2))
def test_embeddings_match_llama_cpp(backend, case, models):
    z = _ref(case)
    m = models(backend, case["model"], case["n_ctx"])
    assert (case["pooling"], case["normalize"]) == (m.config.pooling, "l2")
    assert m.tokenize(case["prompt"]) == z["tokens"].tolist()      # [CLS] ... [SEP]
    got = m.embed([case["prompt"]])
    assert got.dtype == np.float32 and got.shape == (1, m.config.n_embd)
    cos = float(got[0] @ z["embedding"]) / float(np.linalg.norm(z["embedding"]))
    assert cos >= COSINE_MIN, f"{case['ref']}: cosine {cos:.6f} < {COSINE_MIN}"
    assert np.linalg.norm(got[0]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("backend", ENCODERS)
@pytest.mark.parametrize("case", oracle_params(EMBED_CASES[:1]))
def test_a_batch_embeds_each_text_as_if_alone(case, backend, models):
    """Texts of different lengths in one call: no padding or attention leaks between them."""
    m = models(backend, case["model"], case["n_ctx"])
    texts = [c["prompt"] for c in EMBED_CASES] + ["", "x"]
    batch = m.embed(texts)
    alone = np.concatenate([m.embed(t) for t in texts])
    assert batch.shape == (len(texts), m.config.n_embd)
    np.testing.assert_array_equal(batch, alone)


# The stored refs pool by CLS only. llama.cpp itself (llama-cpp-python in its own venv, as
# tests/formats/test_tokenizer_llamacpp.py runs it) answers for the other pooling types, on
# copies of the bge fixture that differ only in bert.pooling_type, normalised and raw.
POOLING_WORKER = r"""
import json, sys
from llama_cpp import Llama
req = json.loads(sys.stdin.read())
out = {}
for path in req["models"]:
    m = Llama(model_path=path, embedding=True, n_ctx=512, verbose=False)
    out[path] = {"l2": m.embed(req["texts"], normalize=True),
                 "raw": m.embed(req["texts"], normalize=False)}
print(json.dumps(out))
"""
POOLING_TEXTS = ["hello world", "Once upon a time, there was a girl named Lily.", "x"]


def _llama_embed(paths: list[str], texts: list[str]) -> dict:
    """{path: {"l2": (n, dim), "raw": (n, dim)}}: llama.cpp's embeddings, from its own venv."""
    import json
    import os
    import subprocess
    from tests.conftest import REQUIRE_ORACLES, absent
    from tests.formats.test_tokenizer_llamacpp import LLAMA_PYTHON
    if not os.path.exists(LLAMA_PYTHON):
        absent(f"llama.cpp's interpreter {LLAMA_PYTHON} is absent (set EMBER_LLAMA_PYTHON)",
               REQUIRE_ORACLES)
    run = subprocess.run([LLAMA_PYTHON, "-c", POOLING_WORKER], capture_output=True, text=True,
                         input=json.dumps({"models": paths, "texts": texts}), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    return {p: {k: np.asarray(v, np.float32) for k, v in out[p].items()} for p in paths}


@pytest.fixture(scope="module")
def llama_pooling(tmp_path_factory):
    """{pooling: (path, {"l2": (n, dim), "raw": (n, dim)})} from llama.cpp, for mean/cls/last."""
    src = gguf.open(conformance_path("arch", "models", "bge-bert-F32.gguf"))
    d, paths = tmp_path_factory.mktemp("pooling"), {}
    for kind, pooling in POOLING_TYPES.items():
        md = {**src.metadata, "bert.pooling_type": kind}
        types = {k: t for k, t in src.metadata_types.items() if k != "bert.pooling_type"}
        paths[pooling] = str(d / f"bge-{pooling}.gguf")
        gguf.write(paths[pooling], md, dict(src.tensors), types=types)
    src.close()
    out = _llama_embed(list(paths.values()), POOLING_TEXTS)
    return {p: (path, out[path]) for p, path in paths.items()}


@pytest.mark.parametrize("backend", ENCODERS)
@pytest.mark.parametrize("pooling", list(POOLING_TYPES.values()))
@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_every_pooling_matches_llama_cpp_live(llama_pooling, pooling, normalize, backend):
    path, ref = llama_pooling[pooling]
    want = ref["l2" if normalize else "raw"]
    with engine.load(path, backend=backend) as m:
        assert m.config.pooling == pooling
        got = m.embed(POOLING_TEXTS, normalize=normalize)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= COSINE_MIN, f"{pooling}: cosine {cos}"
    # the raw vectors keep llama.cpp's length too (normalize=False is not a rescaled copy)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-4)


# nomic-bert has no stored refs: a synthetic one (random weights, the bge fixture's vocabulary
# and token table), written here with ember's GGUF writer, against llama.cpp live.
NOMIC = {"context_length": 512, "embedding_length": 32, "block_count": 2, "feed_forward_length": 64,
         "attention.head_count": 2}


def write_nomic_bert(path) -> None:
    """nomic-bert as llama.cpp loads it: fused attn_qkv, no biases but the LayerNorms',
    SwiGLU FFN (ffn_gate, ffn_up, ffn_down), rope neox base 1000, mean pooling, no positions."""
    src = gguf.open(conformance_path("arch", "models", "bge-bert-F32.gguf"))
    rng = np.random.default_rng(7)
    d, ff, a = NOMIC["embedding_length"], NOMIC["feed_forward_length"], "nomic-bert."
    md = {k: v for k, v in src.metadata.items() if k.startswith(("tokenizer.", "general."))}
    types = {k: t for k, t in src.metadata_types.items() if k in md}
    for k, v in NOMIC.items():
        md[a + k], types[a + k] = v, src.metadata_types["bert." + k]
    md.update({"general.architecture": "nomic-bert", "general.name": "synthetic-nomic-bert",
               a + "attention.layer_norm_epsilon": 1e-12, a + "attention.causal": False,
               a + "pooling_type": 1, a + "rope.freq_base": 1000.0})
    for k in ("attention.layer_norm_epsilon", "attention.causal", "pooling_type"):
        types[a + k] = src.metadata_types["bert." + k]
    types[a + "rope.freq_base"] = src.metadata_types["bert.attention.layer_norm_epsilon"]  # f32

    def w(*shape, s=0.2):
        return rng.normal(0, s, shape).astype(np.float32)
    t = {"token_embd.weight": np.asarray(src.tensors["token_embd.weight"].numpy(), np.float32),
         "token_types.weight": w(2, d, s=0.02),
         "token_embd_norm.weight": 1 + w(d, s=0.1), "token_embd_norm.bias": w(d, s=0.1)}
    for i in range(NOMIC["block_count"]):
        p = f"blk.{i}."
        t.update({p + "attn_qkv.weight": w(3 * d, d), p + "attn_output.weight": w(d, d),
                  p + "attn_output_norm.weight": 1 + w(d, s=0.1), p + "attn_output_norm.bias": w(d, s=0.1),
                  p + "ffn_up.weight": w(ff, d), p + "ffn_gate.weight": w(ff, d),
                  p + "ffn_down.weight": w(d, ff),
                  p + "layer_output_norm.weight": 1 + w(d, s=0.1), p + "layer_output_norm.bias": w(d, s=0.1)})
    gguf.write(path, md, t, types=types)
    src.close()


@pytest.fixture(scope="module")
def llama_nomic(tmp_path_factory):
    """(path, {"l2", "raw"}) of a synthetic nomic-bert, embedded by llama.cpp."""
    path = str(tmp_path_factory.mktemp("nomic") / "nomic-bert-F32.gguf")
    write_nomic_bert(path)
    return path, _llama_embed([path], POOLING_TEXTS)[path]


@pytest.mark.parametrize("backend", ENCODERS)
def test_nomic_bert_matches_llama_cpp_live(llama_nomic, backend):
    path, ref = llama_nomic
    with engine.load(path, backend=backend) as m:
        c = m.config
        assert (c.arch, c.encoder_positions, c.encoder_ffn, c.rope_style, c.rope_base, c.pooling) == \
            ("nomic-bert", "rope", "swiglu", "neox", 1000.0, "mean")
        for key, normalize in (("l2", True), ("raw", False)):
            got, want = m.embed(POOLING_TEXTS, normalize=normalize), ref[key]
            cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            assert cos.min() >= COSINE_MIN, f"{key}: cosine {cos}"


# Files people download are quantized. The bge fixture in Q8_0 (ember's quantizer, which
# matches llama.cpp's), both engines on the same file. cpu quantizes activations to Q8_0 as
# llama.cpp does; reference keeps them float32, so it is held to the brief's 0.999.
Q8_COSINE_MIN = {"cpu": COSINE_MIN, "reference": 0.999}


@pytest.fixture(scope="module")
def llama_q8(tmp_path_factory):
    import subprocess
    import sys
    path = str(tmp_path_factory.mktemp("q8") / "bge-bert-Q8_0.gguf")
    subprocess.run([sys.executable, "-m", "ember.daemon.cli", "quantize", "--quiet",
                    str(conformance_path("arch", "models", "bge-bert-F32.gguf")), path, "Q8_0"],
                   check=True, capture_output=True, timeout=300)
    return path, _llama_embed([path], POOLING_TEXTS)[path]


@pytest.mark.parametrize("backend", ENCODERS)
def test_a_q8_0_encoder_matches_llama_cpp_live(llama_q8, backend):
    path, ref = llama_q8
    with engine.load(path, backend=backend) as m:
        assert m.config.tensors["blk.0.ffn_up.weight"].type == "Q8_0"
        got = m.embed(POOLING_TEXTS)
    cos = np.sum(got * ref["l2"], axis=1) / np.linalg.norm(ref["l2"], axis=1)
    assert cos.min() >= Q8_COSINE_MIN[backend], f"cosine {cos}"


@pytest.mark.parametrize("backend,model", oracle_params(
    [pytest.param(b, m, id=f"{b}-{m.removesuffix('.gguf')}") for b in ALL for m in EMBED_MODELS
     if "encoder" not in ALL[b]], 2))
def test_backends_without_encoders_refuse_bert_by_name(backend, model):
    with pytest.raises(UnsupportedModel) as e:
        engine.load(conformance_path("arch", "models", model), backend=backend, n_ctx=64)
    assert str(e.value) == f"{backend}: bert {FEATURES['encoder']} is not implemented"


@pytest.mark.parametrize("model", oracle_params(EMBED_MODELS))
def test_auto_takes_the_best_backend_that_computes_encoders(model):
    best = next(s.name for s in registry.backends() if registry.probe(s.name).available
                and (s.features is None or "encoder" in s.features))
    with engine.load(conformance_path("arch", "models", model)) as m:
        assert m.backend == best == "cpu" and m.is_embedding


@pytest.mark.parametrize("model", oracle_params(EMBED_MODELS))
def test_the_cpu_encoder_splits_products_across_threads_bit_identically(model):
    text = "the little dog ran to the big tree by the river"
    got = {}
    for threads in (1, 2, 3):
        with engine.load(conformance_path("arch", "models", model), backend="cpu",
                         threads=threads) as m:
            assert m.runner.threads == threads
            got[threads] = m.embed([text, "x"])
    np.testing.assert_array_equal(got[1], got[2])
    np.testing.assert_array_equal(got[1], got[3])


@pytest.mark.parametrize("model", oracle_params(EMBED_MODELS))
def test_cpu_and_reference_encoders_agree(model):
    """The cpu backend's C products against the numpy recipe, on a 500-token text."""
    text = " ".join(["the little dog ran to the big tree by the river"] * 45)
    with engine.load(conformance_path("arch", "models", model), backend="cpu") as m:
        ids = m.tokenize(text)
        got = m.runner.encode(ids)
    with engine.load(conformance_path("arch", "models", model), backend="reference") as m:
        want = m.runner.encode(ids)
    assert len(ids) > 450 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-4)
