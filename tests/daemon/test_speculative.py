"""Speculative decoding (daemon/speculative.py through engine.Generation).

Greedy output with speculation equals plain decoding token for token, on
every conformance model (cpu backend; the llama family and the arch/ models
with sliding windows, soft-caps, fused projections...) and on the reference
backend, with prompt lookup and with a draft model. Random-weight models loop,
so prompt lookup finds matches and both paths — accepted drafts and rejected
ones rolled back — run (checked). The sampled rule is checked against the
plain sampler's distribution with the real Sampler. Then the set-up errors: a
draft with another vocabulary, a model whose cache cannot roll back, a bad
draft length; preemption with verified tokens still queued; the counters.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ember.daemon import engine, speculative
from ember.daemon.sampling import Sampler, SamplingParams
from tests.conftest import conformance_cases, conformance_path, oracle_params

STORIES = "stories260K.gguf"
# repeated text: drafts are proposed from the first turn, whatever the random weights say
PROMPT = ("Once upon a time, there was a little girl named Lily. She liked to play. " * 3 +
          "Once upon a time, there")
MODELS = sorted({c["model"] for c in conformance_cases()})
ARCH = sorted({c["model"] for c in conformance_cases("arch")
               if c.get("kind") != "embedding" and "lfm2" not in c["model"]})


def load(name: str, backend: str = "cpu", *folder: str, n_ctx: int = 256) -> engine.Model:
    return engine.load(conformance_path(*folder, "models", name), backend=backend, n_ctx=n_ctx,
                       threads=2)


def tokens(model: engine.Model, draft, prompt=PROMPT, **sampling) -> list[int]:
    model.set_draft(draft)
    if isinstance(model.drafter, speculative.PromptLookup):
        model.drafter.min_ngram = 1   # random weights rarely repeat a bigram: draft from unigrams
    gen = model.start(prompt, **{"max_tokens": 48, "temperature": 0.0, **sampling})
    for _ in gen:
        pass
    return gen.result.tokens


def same_as_plain(model: engine.Model, draft, **sampling) -> dict:
    plain = tokens(model, None, **sampling)
    spec = tokens(model, draft, **sampling)
    assert spec == plain, f"speculative {spec} != plain {plain}"
    stats = model.speculation()
    model.set_draft(None)
    return stats


# ---------------------------------------------------------------------------
# Greedy: identical to plain decoding
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", oracle_params(MODELS))
def test_prompt_lookup_greedy_equals_plain_on_cpu(name):
    with load(name) as m:
        stats = same_as_plain(m, "prompt-lookup")
        assert stats["steps"] > 0, "prompt lookup never drafted: nothing was verified"


@pytest.mark.parametrize("name", oracle_params(ARCH))
def test_prompt_lookup_greedy_equals_plain_on_arch_models(name):
    with load(name, "cpu", "arch") as m:
        same_as_plain(m, "prompt-lookup")


@pytest.mark.parametrize("name", oracle_params([STORIES, "s512-llama-Q4_0.gguf", "s512-qwen2-F32.gguf",
                                                "s512-qwen3-Q4_K_M.gguf"]))
def test_prompt_lookup_greedy_equals_plain_on_reference(name):
    with load(name, "reference") as m:
        same_as_plain(m, "prompt-lookup")


@pytest.mark.parametrize("name", oracle_params([STORIES, "s512-qwen2-F32.gguf"]))
def test_prompt_lookup_greedy_equals_plain_on_onnx(name):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    with load(name, "onnx") as m:
        same_as_plain(m, "prompt-lookup")


def test_sliding_window_ring_on_reference_falls_back_and_stays_identical():
    # the reference backend's rings hold exactly the window: rolling back may need a reset
    with load("s512-gemma2-F32.gguf", "reference", "arch", n_ctx=512) as m:
        same_as_plain(m, "prompt-lookup", max_tokens=96)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_draft_model_greedy_equals_plain(backend):
    with load(STORIES, backend) as m:
        stats = same_as_plain(m, str(conformance_path("models", "stories260K-Q8_0.gguf")))
        assert stats["accepted"] > 0 and stats["accepted"] < stats["drafted"], stats


def test_penalties_see_accepted_drafts_in_order():
    with load(STORIES) as m:
        same_as_plain(m, "prompt-lookup", repeat_penalty=1.3, frequency_penalty=0.2,
                      penalty_last_n=16)


def test_both_accepted_and_rejected_drafts_happen():
    with load(STORIES) as m:
        stats = same_as_plain(m, "prompt-lookup", max_tokens=96)
        assert 0 < stats["accepted"] < stats["drafted"], stats
        assert stats["acceptance_rate"] == round(stats["accepted"] / stats["drafted"], 4)


def test_constrained_output_decodes_plainly_under_a_drafter():
    """A grammar masks each token from the ones before it, which a batch of drafts skips:
    a constrained request is decoded token by token, within its grammar, drafter or not."""
    with load(STORIES) as m:
        plain = tokens(m, None, json_object=True, max_tokens=64)
        spec = tokens(m, "prompt-lookup", json_object=True, max_tokens=64)
        assert spec == plain and m.speculation()["drafted"] == 0
        m.set_draft(None)


def test_max_tokens_and_context_end_are_respected():
    with load(STORIES, n_ctx=82) as m:
        room = m.n_ctx - len(m.tokenize(PROMPT))                   # 12: drafts must be cut short
        for max_tokens in (1, 2, 7, room):
            same_as_plain(m, "prompt-lookup", max_tokens=max_tokens, ignore_eos=True)
            assert len(tokens(m, "prompt-lookup", max_tokens=max_tokens, ignore_eos=True)) == max_tokens


# ---------------------------------------------------------------------------
# Sampled: the acceptance rule keeps the distribution
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("draft_token", [0, 3, 7])
def test_acceptance_rule_draws_from_the_plain_distribution(draft_token):
    logits = np.array([2.0, 1.5, 0.2, 1.9, -1.0, 0.7, 0.0, 1.1], dtype=np.float32)
    params = SamplingParams.parse(temperature=0.9, top_k=6, top_p=0.97, min_p=0.0, seed=11)
    s = Sampler(params)
    ids, probs = s.distribution(logits)
    want = np.zeros(logits.size)
    want[ids] = probs
    n = 40_000
    counts = np.zeros(logits.size)
    rows = np.stack([logits, logits])                            # (k+1, n_vocab), k = 1
    for _ in range(n):
        s.history.clear()
        counts[speculative.verify(s, rows, [draft_token])[0].id] += 1
    got = counts / n
    assert np.abs(got - want).max() < 0.01, (got.round(4), want.round(4))
    if want[draft_token] == 0:                                   # filtered out: never accepted
        assert counts[draft_token] == 0


def test_sampled_generation_runs_and_reports_its_seed():
    with load(STORIES) as m:
        m.set_draft("prompt-lookup")
        gen = m.start(PROMPT, max_tokens=40, temperature=0.8, seed=5, ignore_eos=True)
        for _ in gen:
            pass
        assert len(gen.result.tokens) == 40 and gen.result.seed == 5
        assert gen.result.timings["draft_tokens"] >= gen.result.timings["draft_accepted"]


# ---------------------------------------------------------------------------
# Set-up errors, preemption, counters
# ---------------------------------------------------------------------------

def test_draft_with_another_vocabulary_is_refused():
    with load(STORIES) as m:
        with pytest.raises(speculative.DraftMismatch, match="does not share the vocabulary"):
            m.set_draft(str(conformance_path("models", "v32k-llama-Q8_0.gguf")))
        assert m.drafter is None


def test_a_cache_that_cannot_roll_back_is_refused_with_the_reason():
    with load("s512-lfm2-F32.gguf", "cpu", "arch") as m:
        with pytest.raises(speculative.SpeculationError, match="convolution"):
            m.set_draft("prompt-lookup")


@pytest.mark.parametrize("n", [0, 65, 2.5, True])
def test_bad_draft_length_is_refused(n):
    with load(STORIES) as m:
        with pytest.raises(speculative.SpeculationError, match="draft length"):
            m.set_draft("prompt-lookup", n)


def test_preempted_with_queued_tokens_continues_identically():
    with load("s512-llama-Q8_0.gguf") as m:
        plain = tokens(m, None, max_tokens=64)
        m.set_draft("prompt-lookup")
        gen = m.start(PROMPT, max_tokens=64, temperature=0.0)
        out = []
        while len(out) < 64 and not gen._queue:                  # until a pass queued tokens
            out.append(gen.step().id)
        assert gen._queue, "no speculative pass queued tokens in 64 steps"
        gen.suspend()
        m.logits(m.tokenize("another request uses the runner"))
        gen.resume()
        while (ev := gen.step()) is not None:
            out.append(ev.id)
        assert out == plain


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    d = speculative.PromptLookup(n_draft=3, max_ngram=2, min_ngram=1)
    assert d.draft([5, 6, 7, 8, 5, 6, 9, 9, 5, 6], 3) == [9, 9, 5]    # latest "5 6", not the first
    assert d.draft([1, 2, 3, 4], 3) == []                            # no earlier "4"
    assert d.draft([1, 2, 1], 5) == [2, 1]                           # up to the end of the text


# ---------------------------------------------------------------------------
# The daemon: --draft, status, /metrics
# ---------------------------------------------------------------------------

def test_emberd_draft_reports_acceptance_in_status_and_metrics(tmp_path):
    pytest.importorskip("prometheus_client", reason="the http extra is not installed")
    from tests.daemon.emberd_proc import model_path, start_emberd
    from tests.daemon.test_http import KEY, metrics, sample
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    with engine.load(model_path(), backend="reference") as local:
        want = tokens(local, None, max_tokens=40)
    d = start_emberd("--draft", "prompt-lookup", "--api-key-file", str(keys), ipc=False, http=True)
    try:
        with d.client() as c:
            done = c.complete(PROMPT, max_tokens=40, temperature=0.0)
            assert done["tokens"].tolist() == want                    # greedy: as without a draft
            spec = c.status()["speculative"]
        assert spec["draft"] == "prompt-lookup" and spec["drafted"] > 0 and spec["accepted"] > 0
        fams = metrics(d)
        assert sample(fams, "ember_draft_tokens") == spec["drafted"]
        assert sample(fams, "ember_draft_accepted_tokens") == spec["accepted"]
        assert sample(fams, "ember_draft_acceptance_rate") == pytest.approx(spec["acceptance_rate"],
                                                                             abs=1e-4)
        r = subprocess.run([sys.executable, "-m", "ember.daemon.cli", "status", "--endpoint", d.tcp],
                           capture_output=True, text=True, timeout=60)
        assert f"draft      prompt-lookup: {spec['accepted']} of {spec['drafted']}" in r.stdout, r
    finally:
        d.stop()
    assert "Traceback" not in d.stderr(), d.stderr()[-3000:]


def test_emberd_refuses_a_draft_with_another_vocabulary_at_load():
    from tests.daemon.emberd_proc import model_path
    other = conformance_path("models", "v32k-llama-Q8_0.gguf")
    r = subprocess.run([sys.executable, "-m", "ember.daemon.emberd", "--model", str(model_path()),
                        "--backend", "reference", "--bind", "tcp://127.0.0.1:*", "--draft", str(other)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "does not share the vocabulary" in r.stderr and "Traceback" not in r.stderr


def test_the_draft_model_is_charged_to_the_memory_plan():
    from ember.daemon import config, emberd, service
    from ember.formats import gguf
    from ember.formats.model_config import config_from_gguf
    from ember.plugins import registry
    target = str(conformance_path("models", STORIES))
    draft = str(conformance_path("models", "stories260K-Q8_0.gguf"))

    def loaded(*extra):
        args = config.parse_args(emberd.build_parser(), ["--model", target, "--backend", "reference",
                                                         "--ctx", "128", *extra])
        got = service.load_model(args, process=0, say=lambda m: None)
        got.model.close()
        got.watch.close()
        return got
    alone, both = loaded(), loaded("--draft", draft)
    with gguf.open(draft) as f:
        extra = registry.plan("reference", config_from_gguf(f), 128, {})
    assert both.fit.plan.weights == alone.fit.plan.weights + extra.weights
    assert both.fit.plan.kv_cache == alone.fit.plan.kv_cache + extra.kv_cache
    assert any("draft model stories260K-Q8_0.gguf" in n for n in both.fit.plan.notes)


def test_pacing_backs_off_after_passes_that_do_not_pay():
    p = speculative.Pacing()
    pattern = []
    for accepted in (0, 1, 0, 5, 0):
        assert p.due()
        p.record(accepted)
        skipped = 0
        while not p.due():
            skipped += 1
        pattern.append(skipped)
    assert pattern == [1, 2, 4, 0, 1]          # doubling while passes fail; a good one resets
    for _ in range(10):
        p.record(0)
    assert p.skip == speculative.MAX_BACKOFF
