"""Sampling: statistical checks against analytic distributions, exact penalty arithmetic,
reproducibility, parameter validation, and the stop-string matcher."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ember.daemon.sampling import (SamplingError, SamplingParams, Sampler, StopMatcher,
                                   apply_penalties, filter_candidates)
from ember.formats import protocol

LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.0, -0.7, -1.5], dtype=np.float32)
N_DRAWS = 20000


def softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def chi2_critical(dof: int, z: float = 3.29) -> float:
    """Wilson–Hilferty upper quantile of chi-square (z = 3.29: p ~ 0.0005)."""
    a = 2.0 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def draw_counts(params: SamplingParams, logits=LOGITS) -> np.ndarray:
    s = Sampler(params)
    counts = np.zeros(logits.size, dtype=np.int64)
    for _ in range(N_DRAWS):
        counts[s.sample(logits).id] += 1
    return counts


def assert_matches(counts: np.ndarray, expected: np.ndarray):
    """Zero-probability tokens never drawn; the rest pass a chi-square test."""
    assert counts[expected == 0].sum() == 0, f"excluded tokens drawn: {counts}"
    live = expected > 0
    exp = expected[live] * counts.sum()
    stat = float(((counts[live] - exp) ** 2 / exp).sum())
    dof = int(live.sum()) - 1
    if dof > 0:
        assert stat < chi2_critical(dof), f"chi2 {stat:.1f} (dof {dof}); {counts} vs {exp.round()}"


def base(**kw) -> SamplingParams:
    """No filters, no penalties, fixed seed: each test turns on one stage."""
    args = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty_last_n=0, seed=1234)
    return SamplingParams.parse(**{**args, **kw})


# ---------------------------------------------------------------------------
# The chain against analytic distributions (chi-square)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("temp", [1.0, 0.5, 2.0])
def test_temperature(temp):
    assert_matches(draw_counts(base(temperature=temp)), softmax(LOGITS / temp))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k(k):
    expected = np.zeros(LOGITS.size)
    expected[:k] = softmax(LOGITS[:k] / 0.8)          # LOGITS is sorted descending
    assert_matches(draw_counts(base(top_k=k, temperature=0.8)), expected)


@pytest.mark.parametrize("p", [0.5, 0.8, 0.95])
def test_top_p(p):
    probs = softmax(LOGITS)                          # top_p looks at the untempered distribution
    keep = int(np.searchsorted(np.cumsum(probs), p)) + 1
    expected = np.zeros(LOGITS.size)
    expected[:keep] = softmax(LOGITS[:keep] / 1.5)   # temperature comes last (llama.cpp order)
    assert 1 < keep < LOGITS.size
    assert_matches(draw_counts(base(top_p=p, temperature=1.5)), expected)


@pytest.mark.parametrize("min_p", [0.1, 0.3])
def test_min_p(min_p):
    probs = softmax(LOGITS)
    keep = probs >= min_p * probs.max()
    expected = np.where(keep, softmax(np.where(keep, LOGITS, -np.inf)), 0.0)
    assert 1 < keep.sum() < LOGITS.size
    assert_matches(draw_counts(base(min_p=min_p)), expected)


def test_chain_order_top_k_then_top_p_then_min_p():
    ids, vals = filter_candidates(LOGITS.astype(np.float64), base(top_k=6, top_p=0.9, min_p=0.2))
    p6 = softmax(LOGITS[:6])
    keep = int(np.searchsorted(np.cumsum(p6), 0.9)) + 1
    pk = softmax(LOGITS[:keep])
    want = [i for i in range(keep) if pk[i] >= 0.2 * pk[0]]
    assert ids.tolist() == want


def naive_filter(logits, top_k, top_p, min_p):
    """llama.cpp's order over a full stable sort: the definition the fast path must meet."""
    order = np.lexsort((np.arange(logits.size), -logits))
    if 0 < top_k < order.size:
        order = order[:top_k]
    if top_p < 1.0:
        cum = np.cumsum(softmax(logits[order]))
        order = order[: int(np.searchsorted(cum, top_p)) + 1]
    if min_p > 0.0:
        order = order[logits[order] >= logits[order[0]] + math.log(min_p)]
    return order


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.9, 0.0), (0, 0.999, 0.0), (40, 0.95, 0.05),
                                               (0, 1.0, 0.02), (5000, 0.7, 0.0),
                                               (0, 0.5, 0.3), (1, 0.5, 0.5)])
def test_fast_filter_equals_full_sort_on_a_large_vocabulary(top_k, top_p, min_p):
    rng = np.random.default_rng(top_k)
    logits = (rng.normal(size=151936) * 2).astype(np.float32)
    logits[rng.integers(0, logits.size, 3000)] = 1.5      # many exact ties
    ids, vals = filter_candidates(logits, base(top_k=top_k, top_p=top_p, min_p=min_p))
    want = naive_filter(logits, top_k, top_p, min_p)
    if top_p < 1.0 or top_k:
        assert ids.tolist() == want.tolist()
    else:
        assert sorted(ids.tolist()) == sorted(want.tolist())
    assert vals.tolist() == logits[ids].tolist()


def test_greedy_is_argmax_whatever_the_filters():
    s = Sampler(SamplingParams.parse(temperature=0.0, top_k=3, top_p=0.1, seed=1))
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert all(s.sample(logits).id == int(np.argmax(logits)) for _ in range(20))


# ---------------------------------------------------------------------------
# Penalties move exactly the logits they should
# ---------------------------------------------------------------------------

def test_penalties_exact_arithmetic():
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    history = [5, 0, 1, 1, 2, 1]                     # token 5 falls outside a window of 5
    p = base(repeat_penalty=1.25, frequency_penalty=0.5, presence_penalty=0.25, penalty_last_n=5)
    out = apply_penalties(logits, history, p)
    counts = {0: 1, 1: 3, 2: 1}
    want = logits.copy()
    for t, c in counts.items():
        v = want[t] / 1.25 if want[t] > 0 else want[t] * 1.25
        want[t] = v - c * 0.5 - 0.25
    assert out.tolist() == want.tolist()
    assert out[3] == logits[3] and out[4] == logits[4] and out[5] == logits[5]


def test_penalty_window_all_and_off():
    logits = np.array([1.0, 1.0, 1.0])
    hist = [0, 1, 2, 2]
    whole = apply_penalties(logits, hist, base(presence_penalty=1.0, penalty_last_n=-1))
    assert whole.tolist() == [0.0, 0.0, 0.0]
    off = apply_penalties(logits, hist, base(presence_penalty=1.0, penalty_last_n=0))
    assert off.tolist() == logits.tolist()
    last1 = apply_penalties(logits, hist, base(frequency_penalty=1.0, penalty_last_n=1))
    assert last1.tolist() == [1.0, 1.0, 0.0]


def test_accepted_tokens_are_penalized():
    s = Sampler(base(temperature=0.0, presence_penalty=2.0, penalty_last_n=8))
    logits = np.array([1.0, 0.5, 0.0])
    first = s.sample(logits).id
    s.accept(first)
    assert first == 0 and s.sample(logits).id == 1


# ---------------------------------------------------------------------------
# Reproducibility and log-probabilities
# ---------------------------------------------------------------------------

def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = np.random.default_rng(1).normal(size=500).astype(np.float32)

    def run(seed):
        s = Sampler(SamplingParams.parse(seed=seed, temperature=1.0, top_k=0, top_p=1.0,
                                         min_p=0.0))
        return [s.sample(logits).id for _ in range(50)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_unseeded_sampler_reports_its_seed():
    s = Sampler(SamplingParams.parse(temperature=1.0))
    again = Sampler(SamplingParams.parse(temperature=1.0, seed=s.seed))
    logits = np.linspace(0, 1, 50)
    assert [s.sample(logits).id for _ in range(20)] == [again.sample(logits).id for _ in range(20)]


def test_logprobs_are_the_models():
    logits = np.array([3.0, 1.0, 2.0, -1.0], dtype=np.float32)
    s = Sampler(base(temperature=0.0, logprobs=True, top_logprobs=2, repeat_penalty=2.0,
                     penalty_last_n=4))
    c = s.sample(logits)
    lsm = np.log(softmax(logits))
    assert c.id == 0 and c.logprob == pytest.approx(lsm[0])
    assert [t for t, _ in c.top_logprobs] == [0, 2]
    assert [lp for _, lp in c.top_logprobs] == pytest.approx([lsm[0], lsm[2]])
    assert Sampler(base()).sample(logits).logprob is None


# ---------------------------------------------------------------------------
# Validation: typed errors naming the parameter
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", 1e9), ("temperature", "hot"), ("temperature", True),
    ("top_k", -1), ("top_k", 2.5), ("top_k", 10**12), ("top_p", 0.0), ("top_p", 1.5),
    ("min_p", -0.1), ("min_p", 2), ("repeat_penalty", 0), ("repeat_penalty", -1.0),
    ("frequency_penalty", 5.0), ("presence_penalty", -3), ("penalty_last_n", -2),
    ("seed", -1), ("seed", 2**64), ("seed", "x"), ("max_tokens", 0), ("max_tokens", -5),
    ("max_tokens", 10**9), ("max_tokens", 3.0), ("stop", 42), ("stop", [1, 2]),
    ("stop", {"a": 1}), ("stop", [""]), ("stop", ["x"] * 17), ("stop", ["x" * 300]),
    ("stop_tokens", 5), ("stop_tokens", [-1]), ("stop_tokens", ["a"]),
    ("ignore_eos", 1), ("logprobs", "yes"), ("top_logprobs", 21), ("top_logprobs", -1),
])
def test_bad_values_are_typed(key, value):
    with pytest.raises(SamplingError, match=key):
        SamplingParams.parse(**{key: value})


def test_unknown_keys_are_typed():
    with pytest.raises(SamplingError, match="'temprature'"):
        SamplingParams.parse(temprature=0.5)


def test_good_values_parse():
    p = SamplingParams.parse(temperature=0, top_k=0, top_p=1, min_p=0, seed=2**64 - 1,
                             stop="###", stop_tokens=[2], max_tokens=1)
    assert p.stop == ("###",) and p.temperature == 0.0 and p.seed == 2**64 - 1


# ---------------------------------------------------------------------------
# Stop strings
# ---------------------------------------------------------------------------

def feed_all(stops, pieces):
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    return out, m.flush(), m.stopped


def test_stop_split_across_pieces_is_never_emitted():
    out, tail, hit = feed_all(["</s>"], ["Hello <", "/", "s> world"])
    assert out == ["Hello ", "", ""] and tail == "" and hit == "</s>"


def test_held_prefix_is_released_when_it_does_not_complete():
    out, tail, hit = feed_all(["STOP"], ["a ST", "ART", " b S"])
    assert "".join(out) + tail == "a START b S" and hit is None
    assert out[0] == "a "                            # "ST" was held back


def test_earliest_stop_wins_and_rest_is_dropped():
    out, tail, hit = feed_all(["cd", "b"], ["abcdef"])
    assert out == ["a"] and hit == "b" and tail == ""


def test_feed_after_stop_emits_nothing():
    m = StopMatcher(["x"])
    assert m.feed("axb") == "a" and m.feed("more") == "" and m.flush() == ""


# ---------------------------------------------------------------------------
# One range table: the wire and the engine refuse and accept the same values
# ---------------------------------------------------------------------------

def _edges(r):
    """(accepted, refused) values at both ends of a range row."""
    step = 1 if r.kind is int else 1e-3
    ok = [r.hi] + ([] if r.lo_open else [r.lo])
    bad = [r.hi + step, r.lo if r.lo_open else r.lo - step]
    return [r.kind(v) for v in ok], [r.kind(v) for v in bad]


@pytest.mark.parametrize("name", sorted(protocol.SAMPLING_RANGES))
def test_wire_and_engine_share_the_sampling_ranges(name):
    r = protocol.SAMPLING_RANGES[name]
    ok, bad = _edges(r)
    for v in ok:
        assert protocol.SAMPLING[name](name, v, protocol.Limits()) == v
        assert getattr(SamplingParams.parse(**{name: v}), name) == v
    for v in bad:
        with pytest.raises(protocol.ProtocolError, match=name):
            protocol.SAMPLING[name](name, v, protocol.Limits())
        with pytest.raises(SamplingError, match=name):
            SamplingParams.parse(**{name: v})
