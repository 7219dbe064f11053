"""The Runner contract that plugins/types.py's CacheBookkeeping gives every backend.

One test, parametrized over every backend available here, instead of a copy
per backend: the bound on n_ctx is a typed ContextOverflow that leaves the
cache as it was, bad token ids are a typed TokenOutOfRange, and reset and
truncate move the cursor only.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.daemon import engine
from ember.plugins import registry
from ember.plugins.types import ContextOverflow, TokenOutOfRange
from tests.conftest import conformance_path

BACKENDS = registry.available()


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    """Backends that build artefacts (onnx's graph) write them into a temporary cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EMBER_CACHE_DIR", str(tmp_path_factory.mktemp("ember-cache")))
    yield
    mp.undo()


@pytest.fixture(params=BACKENDS)
def runner(request):
    model = engine.load(conformance_path("models", "stories260K.gguf"), backend=request.param, n_ctx=16)
    yield model.runner
    model.close()


def test_context_overflow_is_typed_and_leaves_the_cache_alone(runner):
    runner.prefill(list(range(1, 11)))
    with pytest.raises(ContextOverflow, match="n_ctx is 16"):
        runner.prefill(list(range(1, 8)))
    assert runner.n_past == 10
    for t in range(6):
        runner.decode(t + 1)
    with pytest.raises(ContextOverflow):
        runner.decode(1)
    assert runner.n_past == 16
    runner.reset()
    assert runner.n_past == 0
    assert runner.prefill([1]).shape == (runner.n_vocab,)


@pytest.mark.parametrize("tokens", [[], [-1], [512], [[1, 2]], [1.5]])
def test_bad_tokens_are_typed_and_leave_the_cache_alone(runner, tokens):
    runner.prefill([1, 2, 3])
    with pytest.raises(TokenOutOfRange):
        runner.prefill(tokens)
    assert runner.n_past == 3


def test_truncate_moves_the_cursor_within_what_is_cached(runner):
    first = runner.prefill([1, 2, 3, 4], all_logits=True)
    runner.truncate(2)
    assert runner.n_past == 2
    again = runner.prefill([3, 4], all_logits=True)
    assert abs(again - first[2:]).max() < 1e-3  # the same positions recomputed
    for bad in (-1, 5, 2.0):
        with pytest.raises(ValueError):
            runner.truncate(bad)


# ---------------------------------------------------------------------------
# save_state / load_state: the prompt cache's copies (backends that have them)
# ---------------------------------------------------------------------------

STATEFUL = [b for b in BACKENDS if b in ("reference", "cpu")]


def _arch_model(name: str):
    return conformance_path("arch", "models", name) if name.startswith("s512") \
        else conformance_path("models", name)


@pytest.mark.parametrize("backend", STATEFUL)
@pytest.mark.parametrize("name,n_ctx", [("stories260K.gguf", 96),
                                        ("s512-gemma3-F32.gguf", 96),   # window-16 rings, wrapped
                                        ("s512-lfm2-F32.gguf", 96)])    # conv states
def test_a_loaded_state_continues_like_the_cache_it_copied(backend, name, n_ctx):
    """Copy the cache at 50 positions, overwrite it with other tokens, load the copy
    back: the next 30 tokens' logits equal those of the never-disturbed cache —
    bit for bit on cpu (its rows are computed independently), to rounding on
    reference (numpy's batched products)."""
    rng = np.random.default_rng(5)
    small = {"max_batch": 16} if backend == "cpu" else None   # cpu rings: window - 1 + chunk rows
    with engine.load(_arch_model(name), backend=backend, n_ctx=n_ctx, options=small) as m:
        r = m.runner
        if backend == "cpu" and "gemma3" in name:
            assert r.dec.ring_layers()                               # the rings are real
        ids = rng.integers(3, r.n_vocab, size=80).tolist()
        want = r.prefill(ids, all_logits=True)[50:]
        r.reset()
        r.prefill(ids[:50])
        state = r.save_state()
        assert state.n_past == 50 and state.nbytes > 0
        r.reset()
        r.prefill(rng.integers(3, r.n_vocab, size=90).tolist())    # someone else's tokens
        r.load_state(state)
        assert r.n_past == 50
        got = r.prefill(ids[50:], all_logits=True)
        if backend == "cpu":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("backend", STATEFUL)
def test_a_state_of_another_layout_is_refused_and_changes_nothing(backend):
    with engine.load(conformance_path("models", "stories260K.gguf"), backend=backend, n_ctx=64) as a, \
            engine.load(conformance_path("models", "stories260K.gguf"), backend=backend, n_ctx=32) as b:
        a.runner.prefill(list(range(1, 41)))
        state = a.runner.save_state()                                 # 40 positions: b has 32
        b.runner.prefill([1, 2, 3])
        with pytest.raises(ValueError, match="does not fit"):
            b.runner.load_state(state)
        state.arrays.pop()
        with pytest.raises(ValueError, match="does not fit"):
            a.runner.load_state(state)
        assert b.runner.n_past == 3 and a.runner.n_past == 40
