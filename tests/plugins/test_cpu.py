"""The cpu backend against llama.cpp's logits, for every kernel ISA this CPU runs.

Conformance: every case of ../shared/conformance/refs/manifest.json and every
decoder case of arch/refs/manifest.json (gemma2/3, smollm3, granite, olmo2,
lfm2, phi3 LongRoPE, qwen2 YaRN; all stored positions, at the case's n_ctx),
per ISA variant (generic, avx2, avx512, ... whatever dispatch reports),
KL(p_llama.cpp || p_ember) within the README's bounds.
Each model is loaded once per ISA and runs its three prompts. Then the Runner
contract (overflow, truncate, bad tokens), the plugin hooks, and the promise
that decoding allocates nothing that grows.
"""
from __future__ import annotations

import gc
import resource
import tracemalloc

import numpy as np
import pytest

from ember.formats import gguf
from ember.kernels import dispatch
from ember.plugins import cpu, registry
from ember.formats.model_config import config_from_gguf
from ember.plugins.types import MemoryPlan
from tests.conftest import (absent, assert_matches_oracle, conformance_cases, conformance_path, kl_rows,
                            oracle_params)
from tests.plugins.test_reference import greedy

CASES = conformance_cases()
ISAS = dispatch.available_isas()
MODELS = sorted({c["model"] for c in CASES})
ARCH_CASES = [c for c in conformance_cases("arch") if c.get("kind") != "embedding"]
ARCH_MODELS = sorted({c["model"] for c in ARCH_CASES})


def load_runner(name: str, n_ctx: int = 128, threads: int = 2, **options):
    f = gguf.open(conformance_path("models", name))
    return cpu.CpuRunner(f, config_from_gguf(f), n_ctx, threads, options)


@pytest.fixture
def restore_isa():
    before = dispatch.current_isa()
    yield
    dispatch.use(before)


# ---------------------------------------------------------------------------
# 1. conformance: every case, every ISA
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", oracle_params(MODELS))
@pytest.mark.parametrize("isa", ISAS)
def test_logits_match_llama_cpp(isa, model, restore_isa):
    dispatch.use(isa)
    r = load_runner(model)
    assert r.isa == isa
    cases = [c for c in CASES if c["model"] == model]
    for case in cases:
        z = np.load(conformance_path("refs", case["ref"]))
        r.reset()
        logits = r.prefill(z["tokens"].tolist(), all_logits=True)
        assert logits.dtype == np.float32 and logits.shape == (len(z["tokens"]), r.n_vocab)
        assert_matches_oracle(isa, case, z, logits)
    r.close()


@pytest.mark.parametrize("model", oracle_params(ARCH_MODELS))
@pytest.mark.parametrize("isa", ISAS)
def test_arch_logits_match_llama_cpp(isa, model, restore_isa):
    dispatch.use(isa)
    cases = [c for c in ARCH_CASES if c["model"] == model]
    f = gguf.open(conformance_path("arch", "models", model))
    r = cpu.CpuRunner(f, config_from_gguf(f), cases[0]["n_ctx"], 2)   # phi3: n_ctx picks LongRoPE's factors
    for case in cases:
        z = np.load(conformance_path("arch", "refs", case["ref"]))
        r.reset()
        assert_matches_oracle(isa, case, z, r.prefill(z["tokens"].tolist(), all_logits=True))
    r.close()


def test_every_model_ran():
    if not CASES:
        absent("conformance manifest absent (../shared/conformance is absent)")
    assert len(MODELS) >= 20 and "generic" in ISAS
    assert len(ARCH_MODELS) >= 16    # 8 architectures, F32 and Q8_0


STORIES = [c for c in CASES if c["model"] == "stories260K.gguf"]


@pytest.mark.parametrize("case", oracle_params(STORIES), ids=lambda c: c["ref"])
def test_greedy_continuation_matches_llama_cpp(case):
    z = np.load(conformance_path("refs", case["ref"]))
    want = z["greedy"].tolist()
    r = load_runner("stories260K.gguf")
    assert greedy(r, z["tokens"].tolist(), len(want)) == want
    r.close()


# ---------------------------------------------------------------------------
# 2. the Runner contract
# ---------------------------------------------------------------------------

def test_truncate_then_decode_rebuilds_the_same_logits():
    r = load_runner("stories260K.gguf")
    ids = [1, 403, 407, 261, 378, 300, 30, 259, 271]
    full = r.prefill(ids, all_logits=True)
    r.truncate(5)
    again = np.stack([r.decode(t) for t in ids[5:]])
    assert kl_rows(full[5:], again).max() <= 1e-6
    with pytest.raises(ValueError, match="truncate"):
        r.truncate(r.n_past + 1)
    r.close()


@pytest.mark.parametrize("tokens", [[], [-1], [512], [1, 2, 10**9], [[1, 2]], [1.5]])
def test_bad_tokens_are_typed(tokens):
    r = load_runner("stories260K.gguf", n_ctx=8)
    with pytest.raises(cpu.TokenOutOfRange):
        r.prefill(tokens)
    with pytest.raises(cpu.TokenOutOfRange):
        r.decode(512)
    assert r.n_past == 0
    r.close()


def test_closed_runner_refuses():
    r = load_runner("stories260K.gguf", n_ctx=8)
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.prefill([1])


def test_bad_threads_is_a_backend_error():
    with pytest.raises(cpu.BackendError, match="threads"):
        load_runner("stories260K.gguf", threads=0)


# ---------------------------------------------------------------------------
# 3. the plugin hooks
# ---------------------------------------------------------------------------

def test_declared_probed_and_chosen_by_auto():
    specs = {s.name: s for s in registry.backends()}
    assert specs["cpu"].priority == 50
    p = registry.probe("cpu")
    assert p.available and p.isa == dispatch.current_isa() and p.isa in p.reason
    assert registry.choose("auto")[0] in ("cpu",) + tuple(
        s.name for s in registry.backends() if s.priority > 50)


def test_plan_counts_the_mapped_file_once_and_an_f16_cache():
    f = gguf.open(conformance_path("models", "v32k-llama-Q8_0.gguf"))
    c = config_from_gguf(f)
    plan = registry.plan("cpu", c, 256)
    assert isinstance(plan, MemoryPlan)
    assert plan.weights == c.weights_bytes
    assert plan.kv_cache == c.kv_cache_bytes(256, bytes_per_value=2)
    r = cpu.CpuRunner(f, c, 256, threads=2)
    assert r.dec.scratch_bytes <= plan.scratch    # the plan is not an underestimate
    r.close()


def test_load_hook_returns_a_runner_that_owns_no_weight_copy():
    f = gguf.open(conformance_path("models", "s512-llama-Q4_0.gguf"))
    c = config_from_gguf(f)
    r = registry.load("cpu", f, c, n_ctx=64, threads=1)
    assert isinstance(r, cpu.CpuRunner) and r.threads == 1
    # the C model points into the map: every matrix it holds is a read-only view of a tensor
    mats = [a for a in r.dec.fw.kept() if np.asarray(a).ndim == 2 and np.asarray(a).dtype == np.uint8]
    mats = [np.asarray(a) for a in mats]
    n_matrices = sum(len(t.shape) == 2 for t in f.tensors.values())
    assert len(mats) >= n_matrices   # token_embd twice: embedding and (tied or not) output
    for a in mats:
        assert not a.flags.writeable
        assert any(np.shares_memory(a, t.data) for t in f.tensors.values())
    r.close()


# ---------------------------------------------------------------------------
# 4. decoding allocates nothing that grows
# ---------------------------------------------------------------------------

def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() // 1024


def test_decoding_does_not_grow_memory():
    r = load_runner("v32k-llama-Q8_0.gguf", n_ctx=1100)
    tok = int(np.argmax(r.prefill(list(range(1, 50)))))
    for _ in range(50):                                # warm-up
        tok = int(np.argmax(r.decode(tok)))
    gc.collect()
    tracemalloc.start()
    rss0 = _rss_kb()
    snap0 = tracemalloc.take_snapshot()
    for _ in range(1000):
        tok = int(np.argmax(r.decode(tok)))
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename"))
    rss1 = _rss_kb()
    tracemalloc.stop()
    # 1000 tokens of logits would be 128 MB if any were kept; the f16 KV cache of 1000
    # positions touches 2 * 1000 * 2 layers * 128 * 2 bytes = 1 MB of fresh pages
    assert grown < 64 * 1024, f"Python heap grew {grown} bytes over 1000 decoded tokens"
    assert rss1 - rss0 < 4 * 1024, f"RSS grew {rss1 - rss0} kB over 1000 decoded tokens"
    r.close()
