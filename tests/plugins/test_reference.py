"""The reference backend against llama.cpp's logits, and the Runner contract.

Conformance: every case in ../shared/conformance/refs/manifest.json, teacher-
forced from llama.cpp's own prompt tokens, compared as per-position
KL(p_llama.cpp || p_ember) against the README's thresholds. Case ids read
like "s512-llama-Q4_0.p1", so a failure names model and prompt.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.formats import gguf
from ember.plugins import reference, registry
from ember.formats.model_config import UnsupportedModel, config_from_gguf
from ember.plugins.types import MemoryPlan
from tests.conftest import (absent, assert_matches_oracle, conformance_cases, conformance_path, kl_rows,
                            oracle_params)

CASES = conformance_cases()


def _case_id(case: dict) -> str:
    return case["ref"].removesuffix(".npz")


def load_runner(name: str, n_ctx: int = 128):
    f = gguf.open(conformance_path("models", name))
    return reference.ReferenceRunner(f, config_from_gguf(f), n_ctx)


@pytest.fixture(scope="module")
def runners():
    """One loaded runner per model for the whole module (the 150k-vocab ones load once)."""
    cache: dict[str, reference.ReferenceRunner] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_runner(name)
        return cache[name]
    yield get
    for r in cache.values():
        r.close()


def _ref(case: dict):
    return np.load(conformance_path("refs", case["ref"]))


# ---------------------------------------------------------------------------
# 1. logits conformance, every case
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", oracle_params(CASES), ids=_case_id)
def test_logits_match_llama_cpp(case, runners):
    z = _ref(case)
    r = runners(case["model"])
    r.reset()
    logits = r.prefill(z["tokens"].tolist(), all_logits=True)
    assert logits.dtype == np.float32 and logits.shape == (len(z["tokens"]), r.n_vocab)
    assert_matches_oracle("reference", case, z, logits)


def test_every_case_ran():
    if not CASES:
        absent("conformance manifest absent (../shared/conformance is absent)")
    assert len({c["model"] for c in CASES}) >= 20


# ---------------------------------------------------------------------------
# 2. greedy continuation (stories260K is a trained model: the argmax is stable)
# ---------------------------------------------------------------------------

def greedy(r, prompt: list[int], n: int) -> list[int]:
    r.reset()
    out = [int(np.argmax(r.prefill(prompt)))]
    while len(out) < n:
        out.append(int(np.argmax(r.decode(out[-1]))))
    return out


STORIES = [c for c in CASES if c["model"] in ("stories260K.gguf", "s512-llama-F32.gguf",
                                              "s512-qwen2-F32.gguf", "s512-qwen3-F32.gguf")]


@pytest.mark.parametrize("case", oracle_params(STORIES), ids=_case_id)
def test_greedy_continuation_matches_llama_cpp(case, runners):
    z = _ref(case)
    want = z["greedy"].tolist()
    got = greedy(runners(case["model"]), z["tokens"].tolist(), len(want))
    assert got == want


# ---------------------------------------------------------------------------
# 3. prefill-then-decode == one batched pass, past position 512
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("model,n_first", [("stories260K.gguf", 40), ("s512-qwen3-F32.gguf", 500),
                                           ("v32k-phi3-Q8_0.gguf", 510)])
def test_decode_equals_batched_pass(model, n_first):
    n = 560                                     # > 512 and > two attention chunks
    r = load_runner(model, n_ctx=n)
    ids = np.random.default_rng(0).integers(3, r.n_vocab, size=n).tolist()
    batched = r.prefill(ids, all_logits=True)   # (n, n_vocab)
    r.reset()
    steps = [r.prefill(ids[:n_first], all_logits=True)]
    steps += [r.decode(t)[None] for t in ids[n_first:]]
    kl = kl_rows(batched, np.concatenate(steps))
    assert r.n_past == n
    assert kl.max() <= 1e-6, f"max KL {kl.max():.3e} at position {kl.argmax()}"
    r.close()


def load_arch_runner(name: str, n_ctx: int):
    f = gguf.open(conformance_path("arch", "models", name))
    return reference.ReferenceRunner(f, config_from_gguf(f), n_ctx)


@pytest.mark.parametrize("model,chunks", [
    ("s512-gemma3-F32.gguf", [5, 20, 1, 1, 40]),   # window 16: chunks shorter, longer than it
    ("s512-gemma2-F32.gguf", [31, 33, 1, 2]),      # window 32 on layer 0
    ("s512-lfm2-F32.gguf", [1, 1, 7, 30, 1]),      # conv state carried between calls
])
def test_rings_and_conv_states_carry_across_calls(model, chunks):
    """Prefilling in pieces and decoding through the sliding-window rings (which wrap
    several times here) and the conv states gives the single batched pass."""
    n = sum(chunks)
    r = load_arch_runner(model, n_ctx=n)
    ids = np.random.default_rng(1).integers(3, r.n_vocab, size=n).tolist()
    batched = r.prefill(ids, all_logits=True)
    r.reset()
    steps, at = [], 0
    for k in chunks:
        steps.append(r.prefill(ids[at:at + k], all_logits=True) if k > 1 else r.decode(ids[at])[None])
        at += k
    kl = kl_rows(batched, np.concatenate(steps))
    assert kl.max() <= 1e-6, f"max KL {kl.max():.3e} at position {kl.argmax()}"
    if "gemma3" in model:   # the local layers hold only their window
        assert [len(k) for k in r.k_cache] == [16] * 5 + [n]
    r.close()


def test_truncate_goes_back_only_as_far_as_rings_and_conv_states_allow():
    r = load_arch_runner("s512-gemma3-F32.gguf", n_ctx=64)
    ids = np.random.default_rng(2).integers(3, 512, size=40).tolist()
    full = r.prefill(ids[:12], all_logits=True)       # window 16 not yet full: any truncate
    r.truncate(3)
    full = np.concatenate([full[:3], r.prefill(ids[3:], all_logits=True)])
    r.truncate(39)                                    # one back: the ring still holds it
    assert kl_rows(full[39:], r.decode(ids[39])[None]).max() <= 1e-6
    with pytest.raises(reference.CacheTooShort, match="keep only the last 16 positions"):
        r.truncate(30)
    assert r.n_past == 40                             # refused: nothing changed
    r.truncate(0)                                     # going back to empty is a reset
    assert kl_rows(full, r.prefill(ids, all_logits=True)).max() <= 1e-6
    r.close()
    r = load_arch_runner("s512-lfm2-F32.gguf", n_ctx=64)
    r.prefill(ids)
    with pytest.raises(reference.CacheTooShort, match="convolution layers"):
        r.truncate(39)
    r.close()


def test_truncate_then_decode_rebuilds_the_same_logits(runners):
    r = runners("stories260K.gguf")
    r.reset()
    ids = [1, 403, 407, 261, 378, 300, 30, 259, 271]
    full = r.prefill(ids, all_logits=True)
    r.truncate(5)
    assert r.n_past == 5
    again = np.stack([r.decode(t) for t in ids[5:]])
    assert kl_rows(full[5:], again).max() <= 1e-6
    with pytest.raises(ValueError, match="truncate"):
        r.truncate(r.n_past + 1)


# ---------------------------------------------------------------------------
# The cache bound and bad tokens: typed errors, state untouched
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [[], [-1], [512], [1, 2, 10**9], [[1, 2]], [1.5]])
def test_bad_tokens_are_typed(tokens, runners):
    r = runners("stories260K.gguf")
    r.reset()
    with pytest.raises(reference.TokenOutOfRange):
        r.prefill(tokens)
    assert r.n_past == 0


# ---------------------------------------------------------------------------
# Load-time checks: unsupported architecture, missing tensors
# ---------------------------------------------------------------------------

def _rewrite(tmp_path, src: str, name: str, md_change=None, drop=()):
    f = gguf.open(conformance_path("models", src))
    md, types = dict(f.metadata), dict(f.metadata_types)
    for k, v in (md_change or {}).items():
        md[k] = v
    tensors = {n: t for n, t in f.tensors.items() if n not in drop}
    out = tmp_path / name
    gguf.write(out, md, tensors, types=types)
    f.close()
    return gguf.open(out)


def test_unsupported_architecture_fails_naming_it(tmp_path):
    f = _rewrite(tmp_path, "stories260K.gguf", "gpt2.gguf",
                 md_change={"general.architecture": "gpt2"})
    with pytest.raises(UnsupportedModel, match="'gpt2'"):
        config_from_gguf(f)
    f.close()


def test_missing_tensor_fails_naming_it(tmp_path):
    f = _rewrite(tmp_path, "stories260K.gguf", "no_ffn.gguf", drop=("blk.3.ffn_up.weight",))
    with pytest.raises(UnsupportedModel, match="blk.3.ffn_up.weight"):
        reference.ReferenceRunner(f, config_from_gguf(f), 16)
    f.close()


def test_linear_rope_scaling_equals_uniform_rope_freqs(tmp_path):
    """Two ways to halve every rope frequency must give the same logits (both were also
    checked once against llama.cpp 0.3.36 on 343 positions: KL mean 2e-7)."""
    ids = np.random.default_rng(2).integers(3, 512, size=300).tolist()
    linear = _rewrite(tmp_path, "s512-llama-F32.gguf", "linear.gguf",
                      md_change={"llama.rope.scaling.type": "linear",
                                 "llama.rope.scaling.factor": 2.0})
    src = gguf.open(conformance_path("models", "s512-llama-F32.gguf"))
    tensors = dict(src.tensors, **{"rope_freqs.weight": np.full(16, 2.0, np.float32)})
    gguf.write(tmp_path / "freqs.gguf", src.metadata, tensors, types=src.metadata_types)
    freqs = gguf.open(tmp_path / "freqs.gguf")
    out = []
    for f in (linear, freqs, src):
        r = reference.ReferenceRunner(f, config_from_gguf(f), 300)
        out.append(r.prefill(ids, all_logits=True))
        r.close()
    assert kl_rows(out[0], out[1]).max() <= 1e-9
    assert kl_rows(out[0], out[2]).mean() > 1e-2          # the scaling does change the model
    for f in (linear, freqs, src):
        f.close()


def test_tied_embeddings_use_token_embd():
    r = load_runner("v32k-llama-Q8_0.gguf", n_ctx=8)
    assert r.c.tied_embeddings and r.w.output is r.w.token_embd
    r.close()


# ---------------------------------------------------------------------------
# The plugin surface
# ---------------------------------------------------------------------------

def test_registered_probe_and_plan():
    specs = {s.name: s for s in registry.backends()}
    assert specs["reference"].priority == 10
    assert registry.probe("reference").available
    f = gguf.open(conformance_path("models", "v32k-phi3-Q8_0.gguf"))
    cfg = config_from_gguf(f)
    plan = registry.plan("reference", cfg, 64)
    assert isinstance(plan, MemoryPlan)
    r = registry.load("reference", f, cfg, n_ctx=64)
    # the plan counts exactly what the runner holds: float copies + cache
    held = {id(a): a.nbytes for a in [r.w.token_embd, r.w.output, r.w.output_norm]
            + [a for L in r.w.layers for a in vars(L).values() if isinstance(a, np.ndarray)]}
    assert plan.weights == sum(held.values())
    assert plan.kv_cache == sum(a.nbytes for a in r.k_cache + r.v_cache)
    r.close()
    f.close()
