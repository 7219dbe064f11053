"""The C forward pass (kernels/forward.py + c/forward.c) against the numpy reference decoder.

The reference (plugins/reference.py) computes in float32/float64 over
dequantized weights; the C pass quantizes activations to 8 bits for quantized
weights (as llama.cpp does) and keeps K/V in f16, so logits are compared as
distributions (KL), with the README's bounds. Then the properties the pass
must have: the same numbers for any thread count and any prefill chunking,
and decode == batched prefill. The per-token Python overhead (< 1 ms) is a
timing, not a property: `python3 bench/python_overhead.py` measures it (its
"Runner" row is what this file used to assert, flakily on a loaded machine).
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.formats import gguf
from ember.kernels import forward
from ember.plugins import cpu, reference
from ember.formats.model_config import config_from_gguf
from ember.kernels.rope import rope_cos_sin
from ember.plugins.types import CacheTooShort
from tests.conftest import conformance_path, kl_rows, kl_thresholds

MODELS = ["stories260K.gguf", "stories260K-Q8_0.gguf", "s512-llama-Q4_K_M.gguf", "s512-llama-BF16.gguf",
          "s512-qwen2-F32.gguf", "s512-qwen3-Q4_K_M.gguf", "v32k-phi3-Q8_0.gguf"]


def _open(name: str):
    f = gguf.open(conformance_path("models", name))
    return f, config_from_gguf(f)


def _cpu(name: str, n_ctx: int = 96, threads: int = 2, **options) -> cpu.CpuRunner:
    f, c = _open(name)
    return cpu.CpuRunner(f, c, n_ctx, threads, options)


def _prompt(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, n_vocab, size=n - 1).tolist()


# ---------------------------------------------------------------------------
# against the numpy reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_logits_match_the_reference_decoder(model):
    f, c = _open(model)
    ref = reference.ReferenceRunner(f, c, 96)
    ours = _cpu(model)
    ids = _prompt(c.n_vocab, 70)
    want, got = ref.prefill(ids, all_logits=True), ours.prefill(ids, all_logits=True)
    kl = kl_rows(want, got)
    mean_max, max_max = kl_thresholds(model)
    assert kl.mean() <= mean_max and kl.max() <= max_max, \
        f"{model}: KL mean {kl.mean():.2e}, max {kl.max():.2e} at position {kl.argmax()}"
    ref.close()
    ours.close()


def test_rope_table_matches_the_reference():
    f, c = _open("s512-qwen2-F32.gguf")
    cos, sin = rope_cos_sin(c, 300)
    cs = forward.rope_table(c, 300, None).reshape(300, -1, 2)
    assert np.array_equal(cs[..., 0], cos) and np.array_equal(cs[..., 1], sin)


# ---------------------------------------------------------------------------
# properties of the pass
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["s512-llama-Q4_K_M.gguf", "v32k-phi3-Q8_0.gguf"])
def test_thread_count_does_not_change_a_bit(model):
    """Every output row is computed whole by one thread, so 1, 2 or 3 threads agree exactly."""
    outs = []
    for threads in (1, 2, 3):
        r = _cpu(model, threads=threads)
        ids = _prompt(r.n_vocab, 40)
        outs.append(np.concatenate([r.prefill(ids, all_logits=True), r.decode(5)[None]]))
        r.close()
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("max_batch", [1, 7, 64])
def test_prefill_chunking_does_not_change_the_result(max_batch):
    whole = _cpu("s512-qwen3-Q4_K_M.gguf", max_batch=64)
    ids = _prompt(whole.n_vocab, 64)
    want = whole.prefill(ids, all_logits=True)
    chunked = _cpu("s512-qwen3-Q4_K_M.gguf", max_batch=max_batch)
    got = chunked.prefill(ids, all_logits=True)
    last = _cpu("s512-qwen3-Q4_K_M.gguf", max_batch=max_batch).prefill(ids)
    assert kl_rows(want, got).max() <= 1e-6
    assert np.array_equal(got[-1], last)     # the last-token path equals the all-logits row


@pytest.mark.parametrize("model,n_first", [("stories260K.gguf", 40), ("s512-qwen2-F32.gguf", 300)])
def test_decode_equals_batched_pass(model, n_first):
    n = 330
    r = _cpu(model, n_ctx=n)
    ids = _prompt(r.n_vocab, n, seed=1)
    batched = r.prefill(ids, all_logits=True)
    r.reset()
    steps = [r.prefill(ids[:n_first], all_logits=True)] + [r.decode(t)[None] for t in ids[n_first:]]
    kl = kl_rows(batched, np.concatenate(steps))
    assert kl.max() <= 1e-6, f"max KL {kl.max():.3e} at position {kl.argmax()}"


def test_physical_cores_is_a_positive_count():
    assert 1 <= forward.physical_cores() <= 4096


# ---------------------------------------------------------------------------
# sliding-window rings and conv layers (gemma2/3, lfm2)
# ---------------------------------------------------------------------------

RING_MODELS = ["s512-gemma2-F32.gguf", "s512-gemma3-Q8_0.gguf", "s512-lfm2-F32.gguf", "s512-lfm2-Q8_0.gguf"]


def _arch_cpu(name: str, n_ctx: int = 256, threads: int = 2, **options) -> cpu.CpuRunner:
    f = gguf.open(conformance_path("arch", "models", name))
    return cpu.CpuRunner(f, config_from_gguf(f), n_ctx, threads, options)


def _ring_rows(r: cpu.CpuRunner) -> list[int]:
    c = r.dec.config
    return [r.dec.fw.cache_rows(il) for il in range(c.n_layer)
            if c.is_swa(il) or c.layer_kind(il) == "conv"]


@pytest.mark.parametrize("model", RING_MODELS)
@pytest.mark.parametrize("max_batch", [1, 5, 16])
def test_chunked_prefill_equals_one_batch_through_rings(model, max_batch):
    """200 tokens cross every window (16 or 32) and wrap every ring (window + chunk - 1
    rows) many times, and carry the conv states across 200 / chunk calls; chunks must
    compute what one batch does."""
    whole = _arch_cpu(model, max_batch=256)
    ids = _prompt(whole.n_vocab, 200, seed=2)
    want = whole.prefill(ids, all_logits=True)
    chunked = _arch_cpu(model, max_batch=max_batch)
    rows = _ring_rows(chunked)
    assert rows and max(rows) < 64, rows      # the rings really are short and really wrap
    got = chunked.prefill(ids, all_logits=True)
    kl = kl_rows(want, got)
    assert kl.max() <= 1e-6, f"max KL {kl.max():.3e} at position {kl.argmax()}"
    whole.close()
    chunked.close()


@pytest.mark.parametrize("model", ["s512-gemma2-Q8_0.gguf", "s512-lfm2-Q8_0.gguf"])
def test_thread_count_does_not_change_a_bit_through_rings(model):
    outs = []
    for threads in (1, 2, 3):
        r = _arch_cpu(model, threads=threads, max_batch=8)
        ids = _prompt(r.n_vocab, 60, seed=5)
        outs.append(np.concatenate([r.prefill(ids, all_logits=True), r.decode(5)[None]]))
        r.close()
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("model", RING_MODELS)
def test_decode_through_rings_equals_the_batched_pass(model):
    r = _arch_cpu(model, max_batch=8)
    ids = _prompt(r.n_vocab, 120, seed=3)
    batched = r.prefill(ids, all_logits=True)
    r.reset()
    steps = [r.prefill(ids[:30], all_logits=True)] + [r.decode(t)[None] for t in ids[30:]]
    kl = kl_rows(batched, np.concatenate(steps))
    assert kl.max() <= 1e-6, f"max KL {kl.max():.3e} at position {kl.argmax()}"
    r.close()


def test_truncate_goes_back_as_far_as_the_rings_hold():
    r = _arch_cpu("s512-gemma3-Q8_0.gguf", max_batch=8)   # rings of 16 - 1 + 8 rows
    ids = _prompt(r.n_vocab, 100, seed=4)
    full = r.prefill(ids, all_logits=True)
    r.truncate(93)                              # within the last chunk's reach: allowed
    again = np.stack([r.decode(t) for t in ids[93:]])
    assert kl_rows(full[93:], again).max() <= 1e-6
    with pytest.raises(CacheTooShort, match="reset"):
        r.truncate(40)                          # those positions left the rings long ago
    assert r.n_past == 100                      # a refused truncate changes nothing
    r.truncate(0)                               # a reset always works
    assert kl_rows(full[:50], r.prefill(ids[:50], all_logits=True)).max() <= 1e-6
    r.close()


def test_conv_state_cannot_go_back_but_restarts_from_zero():
    r = _arch_cpu("s512-lfm2-F32.gguf", max_batch=8)
    ids = _prompt(r.n_vocab, 30, seed=6)
    full = r.prefill(ids, all_logits=True)
    with pytest.raises(CacheTooShort, match="convolution"):
        r.truncate(29)
    r.truncate(30)                              # no-op: allowed
    r.reset()                                   # the next prefill starts from a zero state
    assert np.array_equal(r.prefill(ids, all_logits=True), full)
    r.close()


@pytest.mark.parametrize("model", RING_MODELS + ["s512-olmo2-Q8_0.gguf", "s512-phi3-F32.gguf"])
def test_cache_and_scratch_sizes_mirror_the_c_model(model):
    """The plan's numbers (forward.cache_bytes / scratch_bytes) are the C model's allocations."""
    r = _arch_cpu(model, n_ctx=300, max_batch=16)
    c = r.dec.config
    assert forward.cache_bytes(c, 300, 16) == r.dec.cache_bytes
    assert forward.scratch_bytes(c, 300, r.threads, 16) == r.dec.scratch_bytes
    assert [forward.cache_rows(c, il, 300, 16) for il in range(c.n_layer)] == \
        [r.dec.fw.cache_rows(il) for il in range(c.n_layer)]
    r.close()


def test_plan_counts_the_sliding_window_rings_at_8192():
    f = gguf.open(conformance_path("arch", "models", "s512-gemma3-Q8_0.gguf"))
    c = config_from_gguf(f)
    plan = cpu.plan(c, 8192, {}, threads=2)
    full = 2 * c.n_layer * 8192 * c.n_head_kv * c.head_dim * 2
    rows = 16 - 1 + forward.DEFAULT_MAX_BATCH        # window + chunk - 1
    assert plan.kv_cache == 2 * (5 * rows + 1 * 8192) * c.n_head_kv * c.head_dim * 2 < full / 5
    assert any("sliding-window layers keep a ring" in n and "saved" in n for n in plan.notes), plan.notes
