"""The prompt cache's LRU and its files (daemon/promptcache.py).

The engine's use of it — reuse, identical output, no reuse across models,
preemption — is tested in test_engine.py; the daemon's reports in
test_server.py and test_http.py."""
from __future__ import annotations

import numpy as np
import pytest

from ember.daemon import engine, promptcache
from ember.plugins.types import KVState
from tests.conftest import conformance_path


def _state(n: int) -> KVState:
    return KVState(n, [np.arange(n * 4, dtype=np.uint8), np.full(3, n, np.float32)], {"kept": [n]})


def _ids(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int32)


def test_longest_prefix_wins_and_lru_evicts_the_oldest():
    pc = promptcache.PromptCache(2)
    pc.put(_ids(1, 2, 3), _state(3))
    pc.put(_ids(1, 7, 8, 9), _state(4))
    entry, n = pc.best(_ids(1, 7, 8, 5))
    assert n == 3 and entry.tokens.tolist() == [1, 7, 8, 9]
    pc.touch(pc.best(_ids(1, 2))[0])                        # [1, 2, 3] is now the newest
    pc.put(_ids(4, 4), _state(2))                           # evicts [1, 7, 8, 9]
    assert sorted(e.tokens.tolist() for e in pc._entries.values()) == [[1, 2, 3], [4, 4]]
    assert pc.best(_ids(9))[1] == 0


def test_an_entry_replaces_the_ones_it_extends():
    pc = promptcache.PromptCache(4)
    pc.put(_ids(1, 2), _state(2))
    pc.put(_ids(1, 2, 3, 4), _state(4))
    assert len(pc) == 1 and pc.holds(_ids(1, 2, 3, 4)) and not pc.holds(_ids(1, 2, 3, 4, 5))


def test_zero_slots_keep_nothing_and_bad_counts_are_refused():
    pc = promptcache.PromptCache(0)
    pc.put(_ids(1, 2), _state(2))
    assert len(pc) == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="integer >= 0"):
            promptcache.PromptCache(bad)


def test_files_round_trip_and_damaged_ones_are_skipped(tmp_path):
    pc = promptcache.PromptCache(3)
    pc.put(_ids(1, 2, 3), _state(3))
    pc.put(_ids(5, 6), _state(2))
    assert pc.save(tmp_path) == 2
    (tmp_path / "7.npz").write_bytes(b"not a zip")         # a damaged file loses only itself
    back = promptcache.PromptCache(3)
    assert back.load(tmp_path) == 2
    entry, n = back.best(_ids(1, 2, 3, 4))
    assert n == 3 and entry.state.n_past == 3 and entry.state.extra == {"kept": [3]}
    for a, b in zip(entry.state.arrays, _state(3).arrays):
        np.testing.assert_array_equal(a, b)


def test_a_restarted_model_reads_its_cache_back_and_another_file_does_not(tmp_path):
    path = conformance_path("models", "stories260K.gguf")
    prompt = "Once upon a time there was a little girl named Lily. " * 4
    kw = dict(temperature=0, max_tokens=8)
    with engine.load(path, backend="cpu", n_ctx=256, cache_dir=tmp_path) as m:
        first = list(m.generate(prompt, **kw))[-1]
    with engine.load(path, backend="cpu", n_ctx=256, cache_dir=tmp_path) as m:
        assert len(m.prompt_cache) == 1
        again = list(m.generate(prompt, **kw))[-1]
    assert again.usage["cached_tokens"] == again.usage["prompt_tokens"] - 1
    assert again.tokens == first.tokens
    other = tmp_path / "copy.gguf"                          # another file: another folder
    other.write_bytes(path.read_bytes())
    with engine.load(other, backend="cpu", n_ctx=256, cache_dir=tmp_path) as m:
        assert len(m.prompt_cache) == 0
    with engine.load(path, backend="cpu", n_ctx=128, cache_dir=tmp_path) as m:   # another context
        assert len(m.prompt_cache) == 0
