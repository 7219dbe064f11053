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
from ember.plugins.arch import config_from_gguf
from tests.conftest import conformance_path
from tests.plugins.test_reference import kl_rows, thresholds

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
    mean_max, max_max = thresholds(model)
    assert kl.mean() <= mean_max and kl.max() <= max_max, \
        f"{model}: KL mean {kl.mean():.2e}, max {kl.max():.2e} at position {kl.argmax()}"
    ref.close()
    ours.close()


def test_rope_table_matches_the_reference():
    f, c = _open("s512-qwen2-F32.gguf")
    cos, sin = reference.rope_tables(c, 300, None)
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
