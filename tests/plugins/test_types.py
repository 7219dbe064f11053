"""The Runner contract that plugins/types.py's CacheBookkeeping gives every backend.

One test, parametrized over every backend available here, instead of a copy
per backend: the bound on n_ctx is a typed ContextOverflow that leaves the
cache as it was, bad token ids are a typed TokenOutOfRange, and reset and
truncate move the cursor only.
"""
from __future__ import annotations

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
