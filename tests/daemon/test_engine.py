"""The engine's stable surface on the reference backend, against llama.cpp's references:
tokens, greedy text, teacher-forced logits, and the Generation life cycle
(stop reasons, cancel, suspend/resume after another request used the runner)."""
from __future__ import annotations

import numpy as np
import pytest

from ember.daemon import engine
from ember.daemon.chat import ChatTemplateError
from ember.daemon.sampling import SamplingError
from ember.formats.model_config import UnsupportedModel
from ember.plugins.types import BackendError, ContextOverflow, ModelKindError
from tests.conftest import conformance_cases, conformance_path, kl_rows, oracle_params

CASES = conformance_cases()
STORIES = "stories260K.gguf"


@pytest.fixture(scope="module")
def models():
    """One loaded Model per file for the whole module (the big vocabularies load once)."""
    cache: dict[str, engine.Model] = {}

    def get(name: str, n_ctx: int = 256) -> engine.Model:
        if name not in cache:
            cache[name] = engine.load(conformance_path("models", name), backend="reference",
                                      n_ctx=n_ctx)
        return cache[name]
    yield get
    for m in cache.values():
        m.close()


@pytest.fixture
def stories(models):
    return models(STORIES)


def _ref(case):
    return np.load(conformance_path("refs", case["ref"]))


def _case_id(case):
    return case["ref"].removesuffix(".npz")


def run(gen: engine.Generation):
    events = list(gen)
    return events, gen.result


# ---------------------------------------------------------------------------
# Against llama.cpp
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", oracle_params(CASES), ids=_case_id)
def test_prompt_tokens_match_llama_cpp(case, models):
    assert models(case["model"]).tokenize(case["prompt"]) == _ref(case)["tokens"].tolist()


@pytest.mark.parametrize("case", oracle_params([c for c in CASES if c["model"] == STORIES]), ids=_case_id)
def test_stories_greedy_generation_matches_llama_cpp(case, stories):
    want = _ref(case)["greedy"].tolist()
    events, r = run(stories.start(case["prompt"], temperature=0, max_tokens=len(want)))
    assert r.tokens == want and [e.id for e in events] == want
    assert r.stop_reason == "length"
    assert "".join(e.text for e in events) == r.text == case["greedy_text"]
    assert r.usage == {"prompt_tokens": case["n_prompt_tokens"], "completion_tokens": len(want)}


def test_logits_are_teacher_forced_from_an_empty_cache(stories):
    case = next(c for c in CASES if c["model"] == STORIES)
    z = _ref(case)
    run(stories.start("Something else first", temperature=0, max_tokens=5))
    logits = stories.logits(z["tokens"].tolist())
    assert logits.dtype == np.float32 and logits.shape == (len(z["tokens"]), stories.n_vocab)
    assert kl_rows(z["logits"], logits).max() < 1e-3


# ---------------------------------------------------------------------------
# Generation life cycle
# ---------------------------------------------------------------------------

def test_same_seed_same_text_and_seed_is_reported(stories):
    a = run(stories.start("Once upon a time", temperature=1.0, max_tokens=20, seed=42))[1]
    b = run(stories.start("Once upon a time", temperature=1.0, max_tokens=20, seed=42))[1]
    c = run(stories.start("Once upon a time", temperature=1.0, max_tokens=20, seed=a.seed + 1))[1]
    assert a.tokens == b.tokens and a.seed == 42 and a.tokens != c.tokens


def test_suspend_and_resume_after_another_request_equals_an_uninterrupted_run(stories):
    kw = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, max_tokens=30, seed=7,
              repeat_penalty=1.1)
    whole = run(stories.start("Lily went to the park", **kw))[1]
    gen = stories.start("Lily went to the park", **kw)
    first = [gen.step() for _ in range(10)]
    gen.suspend()
    other = run(stories.start("Tom had a big red ball", temperature=0, max_tokens=12))[1]
    stories.logits([1, 2, 3])                                   # the cache is someone else's now
    rest = list(gen)
    r = gen.result
    assert [e.id for e in first + rest] == r.tokens == whole.tokens
    assert r.text == whole.text and len(other.tokens) == 12
    assert r.timings["reprefill_ms"] > 0 and whole.timings["reprefill_ms"] == 0


def test_explicit_resume_rebuilds_the_cache(stories):
    kw = dict(temperature=0.7, max_tokens=16, seed=3)
    whole = run(stories.start("The cat", **kw))[1]
    gen = stories.start("The cat", **kw)
    for _ in range(6):
        gen.step()
    run(stories.start("A dog", temperature=0, max_tokens=4))
    gen.resume()
    assert stories.owner is gen and stories.runner.n_past == len(gen.prompt) + 6
    run(gen)
    assert gen.result.tokens == whole.tokens


def test_cancel_between_tokens(stories):
    gen = stories.start("Once upon a time", temperature=0, max_tokens=50)
    gen.step(), gen.step()
    gen.cancel()
    assert gen.step() is None
    assert gen.result.stop_reason == "cancelled" and gen.result.usage["completion_tokens"] == 2


def test_stop_string_is_not_emitted(stories):
    case = next(c for c in CASES if c["model"] == STORIES)
    full = run(stories.start(case["prompt"], temperature=0, max_tokens=24))[1].text
    stop = full.split()[3]                                       # a word from the middle
    events, r = run(stories.start(case["prompt"], temperature=0, max_tokens=24, stop=[stop]))
    assert r.stop_reason == "stop" and stop not in r.text
    assert r.text == full[: full.index(stop)] == "".join(e.text for e in events)


def test_stop_token_ends_with_eos_and_its_text_is_dropped(stories):
    greedy = run(stories.start("Once upon a time", temperature=0, max_tokens=12))[1]
    tok = greedy.tokens[4]
    first = greedy.tokens.index(tok)
    events, r = run(stories.start("Once upon a time", temperature=0, max_tokens=12,
                                  stop_tokens=[tok]))
    assert r.stop_reason == "eos" and r.tokens == greedy.tokens[: first + 1]
    assert r.text == stories.tokenizer.decode(greedy.tokens[:first], strip_space_prefix=False)


def test_model_eog_tokens_stop_unless_ignore_eos(stories):
    """stories260K never samples EOS itself, so check the stop set the generation uses."""
    eos = stories.tokenizer.eos_id
    assert stories.start("Once", max_tokens=2)._eog(eos)
    assert not stories.start("Once", max_tokens=2, ignore_eos=True)._eog(eos)


def test_timings_and_usage(stories):
    events, r = run(stories.start("Once upon a time", temperature=0, max_tokens=8))
    t = r.timings
    assert set(t) >= {"queue_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s"}
    assert 0 <= t["queue_ms"] <= t["ttft_ms"] <= t["total_ms"]
    assert t["prefill_tok_s"] > 0 and t["decode_tok_s"] > 0
    assert len(events) == r.usage["completion_tokens"] == 8


def test_default_context_is_min_of_trained_and_4096():
    with engine.load(conformance_path("models", STORIES), backend="reference") as m:
        assert m.n_ctx == min(m.config.n_ctx_train, engine.DEFAULT_MAX_CTX) == 2048


# ---------------------------------------------------------------------------
# Chat prompts
# ---------------------------------------------------------------------------

def test_chat_messages_render_with_the_files_template(models):
    m = models("v32k-phi3-Q8_0.gguf")
    msgs = [{"role": "user", "content": "Hi there"}]
    gen = m.start(msgs, temperature=0, max_tokens=2)
    text = "<s><|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert m.chat_template.render(msgs) == text
    want = m.tokenize(text, add_special=True, parse_special=True)
    assert want[:2] == [1, 1] and gen.prompt == want[1:]       # one BOS, not two
    assert m.tokenizer.token_text(gen.prompt[1]) == "<|user|>"  # specials parsed


def test_chat_fallback_is_chatml_and_logged_once(caplog):
    with engine.load(conformance_path("models", STORIES), backend="reference", n_ctx=64) as m:
        with caplog.at_level("INFO", logger="emberd.engine"):
            for _ in range(3):
                assert m.chat_template.is_fallback
                assert m.chat_template.render([{"role": "user", "content": "x"}]) == \
                    "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
                m.start([{"role": "user", "content": "y"}], max_tokens=1)
    said = [r.getMessage() for r in caplog.records if "ChatML fallback" in r.getMessage()]
    assert len(said) == 1 and STORIES in said[0]


# ---------------------------------------------------------------------------
# Bad input: typed errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(prompt, stories):
    with pytest.raises(engine.EmptyPrompt):
        stories.start(prompt)


@pytest.mark.parametrize("prompt", [None, 42, [1.5], [[1]], {"role": "user"}, [-1], [512]])
def test_bad_prompt_types(prompt, stories):
    with pytest.raises(engine.EngineError):
        stories.start(prompt)


def test_prompt_longer_than_context():
    with engine.load(conformance_path("models", STORIES), backend="reference", n_ctx=32) as m:
        with pytest.raises(ContextOverflow, match="exceeds the context of 32"):
            m.start("Once upon a time " * 10, max_tokens=1)
        with pytest.raises(ContextOverflow, match="max_tokens"):
            m.start("Once upon a time", max_tokens=30)
        with pytest.raises(ContextOverflow):
            m.logits(list(range(1, 40)))
        assert run(m.start("Once upon a time", max_tokens=20, temperature=0))[1].stop_reason


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=float("nan")),
                                dict(max_tokens=0), dict(stop=7), dict(stop=[None]),
                                dict(seed="abc"), dict(bogus=1)])
def test_bad_sampling(kw, stories):
    with pytest.raises(SamplingError):
        stories.start("hi", **kw)


def test_bad_messages(stories):
    with pytest.raises(ChatTemplateError):
        stories.start([{"role": "user", "content": 5}])


@pytest.mark.parametrize("kw,err", [(dict(n_ctx=0), engine.EngineError),
                                    (dict(n_ctx="big"), engine.EngineError),
                                    (dict(threads=-2), engine.EngineError),
                                    (dict(backend="nope"), BackendError)])
def test_bad_load_arguments(kw, err):
    with pytest.raises(err):
        engine.load(conformance_path("models", STORIES), **kw)


def test_closed_model_is_a_typed_error():
    m = engine.load(conformance_path("models", STORIES), backend="reference", n_ctx=64)
    gen = m.start("Once upon a time", max_tokens=5)
    gen.step()
    m.close()
    m.close()
    with pytest.raises(engine.EngineError, match="closed"):
        gen.step()
    with pytest.raises(engine.EngineError, match="closed"):
        m.logits([1, 2])


def test_unsupported_architecture_at_load(tmp_path):
    from ember.formats import gguf
    f = gguf.open(conformance_path("models", STORIES))
    md = dict(f.metadata, **{"general.architecture": "mamba"})
    gguf.write(tmp_path / "m.gguf", md, f.tensors, types=f.metadata_types)
    f.close()
    with pytest.raises(UnsupportedModel, match="'mamba'"):
        engine.load(tmp_path / "m.gguf")


# ---------------------------------------------------------------------------
# Embedding models (bert): Model.embed, and each kind refusing the other's work
# ---------------------------------------------------------------------------

BGE = ("arch", "models", "bge-bert-F32.gguf")


@pytest.fixture(scope="module")
def bge():
    with engine.load(conformance_path(*BGE), backend="reference") as m:
        yield m


def test_embed_is_one_unit_vector_per_text_in_input_order(bge):
    texts = ["the cat sat", "Once upon a time", "the cat sat"]
    v = bge.embed(texts)
    assert v.dtype == np.float32 and v.shape == (3, bge.config.n_embd)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(v[0], v[2])
    assert not np.allclose(v[0], v[1])
    np.testing.assert_array_equal(bge.embed("the cat sat"), v[:1])   # a str is one text
    assert bge.is_embedding and bge.info()["kind"] == "embedding"


def test_embed_unnormalised_is_the_pooled_hidden_state(bge):
    """The file pools by CLS: the first row of the encoder's output, before any scaling."""
    ids = bge.tokenize("the cat sat")
    raw = bge.embed("the cat sat", normalize=False)[0]
    np.testing.assert_array_equal(raw, bge.runner.encode(ids)[0])
    np.testing.assert_allclose(raw / np.linalg.norm(raw), bge.embed("the cat sat")[0], rtol=1e-6)


def test_encode_counts_tokens_and_takes_token_ids_as_they_are(bge):
    ids = bge.tokenize("the cat sat")                       # [CLS] the cat sat [SEP]
    e = bge.encode(["the cat sat", ids, ids[1:-1]])
    assert e.usage == {"prompt_tokens": 2 * len(ids) + len(ids) - 2,
                       "total_tokens": 2 * len(ids) + len(ids) - 2}
    np.testing.assert_array_equal(e.vectors[0], e.vectors[1])
    assert not np.allclose(e.vectors[0], e.vectors[2])     # no [CLS]/[SEP] added to ids
    assert e.timings["compute_ms"] > 0


@pytest.mark.parametrize("inputs,err,match", [
    ([], engine.EngineError, "non-empty list"),
    (None, engine.EngineError, "got NoneType"),
    (["ok", 3.5], engine.EngineError, "input 1 is float"),
    ([[101, 10 ** 6]], engine.EngineError, "outside the vocabulary"),
    ([[]], engine.EmptyPrompt, "input 0 has no tokens"),
    (["ok", "word " * 600], ContextOverflow, "input 1 has 602 tokens; .* at most 512"),
])
def test_embed_refuses_bad_input_before_computing_any(bge, inputs, err, match):
    with pytest.raises(err, match=match):
        bge.embed(inputs)


def test_an_embedding_model_refuses_to_generate(bge):
    for call in (lambda: bge.start("hello", max_tokens=2), lambda: bge.logits([101, 102]),
                 lambda: list(bge.generate("hi"))):
        with pytest.raises(ModelKindError, match="is an embedding model \\(bert\\): it cannot "
                                                 "generate text"):
            call()


def test_a_generation_model_refuses_to_embed(stories):
    with pytest.raises(ModelKindError, match="is a text-generation model \\(llama\\): it makes "
                                             "no embeddings"):
        stories.embed("hello")
    assert stories.info()["kind"] == "generation"
