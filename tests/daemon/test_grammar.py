"""Constrained output (daemon/grammar.py) through the engine, on the bundled demo model.

Must show: every one of 50 sampled generations under 5 JSON Schemas validates
with `jsonschema` (an independent validator, not llguidance); llama.cpp's own
example GBNF grammars (tests/daemon/data/llama_grammars) are accepted and what
is generated under them parses; bad constraints are typed errors before any
token. The real chat model's run is in test_grammar_real.py; the wire fields
in test_server.py and test_http.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema", reason="the test extra's jsonschema is not installed")

from ember.daemon import engine, grammar  # noqa: E402
from ember.daemon.modelcache import DEMO_PATH  # noqa: E402
from ember.daemon.sampling import SamplingError  # noqa: E402

GRAMMARS = Path(__file__).parent / "data" / "llama_grammars"
PROMPT = "Once upon a time"

# Five schemas that cover what apps ask for: required keys, bounded strings,
# integer ranges, enums, booleans, null, arrays with bounds, nesting, patterns. (No free
# floats: a 260K-parameter model writes digits until max_tokens, legally.)
SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
               "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 24},
                              "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "mood": {"type": "object", "required": ["mood", "happy", "score"], "additionalProperties": False,
             "properties": {"mood": {"enum": ["sad", "glad", "angry", "calm"]},
                            "happy": {"type": "boolean"},
                            "score": {"type": "integer", "minimum": 1, "maximum": 5}}},
    "tags": {"type": "array", "minItems": 1, "maxItems": 4,
             "items": {"type": "string", "maxLength": 12}},
    "story": {"type": "object", "required": ["title", "hero"], "additionalProperties": False,
              "properties": {"title": {"type": "string", "maxLength": 30},
                             "hero": {"type": "object", "required": ["name", "friends"],
                                      "additionalProperties": False,
                                      "properties": {"name": {"type": "string", "maxLength": 16},
                                                     "friends": {"type": "array", "maxItems": 3,
                                                                 "items": {"type": "string",
                                                                           "maxLength": 10}}}}}},
    "code": {"type": "object", "required": ["id", "when"], "additionalProperties": False,
             "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                            "when": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]$"},
                            "note": {"type": ["string", "null"], "maxLength": 20}}},
}


@pytest.fixture(scope="module")
def demo():
    m = engine.load(DEMO_PATH, backend="cpu")
    yield m
    m.close()


def run(m, prompt=PROMPT, **kw) -> engine.Result:
    out = None
    for out in m.generate(prompt, **kw):
        pass
    return out


# ---------------------------------------------------------------------------
# Must show: 50 generations under 5 schemas, all valid
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sampled_generation_validates_under_its_schema(demo, name):
    schema = SCHEMAS[name]
    for seed in range(10):
        r = run(demo, json_schema=json.dumps(schema), seed=seed, temperature=1.0, max_tokens=400)
        assert r.stop_reason == "eos", (seed, r.text)
        jsonschema.validate(json.loads(r.text), schema)   # raises, with the path, if not


def closes_into_json(text: str) -> bool:
    """Whether cut-off JSON text becomes valid JSON by closing what is open (the demo model
    writes stories into strings until max_tokens: the output is a prefix, and must be one)."""
    closers, in_str, esc = [], False, False
    for ch in text:
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            closers.append("}" if ch == "{" else "]")
        elif ch in "}]":
            closers.pop()
    head = text[:-1] if esc else text
    quote, tail = ('"' if in_str else ""), "".join(reversed(closers))
    for middle in ("", "null", ":null"):  # a cut after a key or its colon needs a value too
        try:
            json.loads(head + quote + middle + tail)
            return True
        except ValueError:
            pass
    return False


def test_json_object_is_one_json_object(demo):
    for seed in range(5):
        r = run(demo, json_object=True, seed=seed, max_tokens=200)
        assert r.text.startswith("{")
        if r.stop_reason == "eos":
            assert isinstance(json.loads(r.text), dict)
        else:
            assert r.stop_reason == "length" and closes_into_json(r.text), r.text


def test_regex_output_matches_in_full(demo):
    pattern = r"[A-Z][a-z]{1,8} (is|was) [0-9]{1,3} years old\."
    for seed in range(5):
        r = run(demo, regex=pattern, seed=seed, max_tokens=100)
        assert r.stop_reason == "eos" and re.fullmatch(pattern, r.text), r.text


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_mask_applies_on_the_host_for_every_backend(backend):
    with engine.load(DEMO_PATH, backend=backend) as m:
        schema = SCHEMAS["person"]
        r = run(m, json_schema=json.dumps(schema), temperature=0.0, max_tokens=200)
        jsonschema.validate(json.loads(r.text), schema)


# ---------------------------------------------------------------------------
# llama.cpp's own GBNF grammars
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(GRAMMARS.glob("*.gbnf")), ids=lambda p: p.name)
def test_llama_cpp_grammars_are_accepted_and_followed(demo, path):
    text = path.read_text()
    r = run(demo, grammar=text, seed=3, max_tokens=60, temperature=1.0)
    assert r.stop_reason in ("eos", "length") and r.tokens
    # an independent check where the language allows one: complete output parses
    if path.name in ("json.gbnf", "json_arr.gbnf"):
        assert json.loads(r.text) if r.stop_reason == "eos" else closes_into_json(r.text)
    if path.name == "list.gbnf":
        lines = r.text.split("\n")
        assert all(line.startswith("- ") for line in lines[:-1]) and lines[0].startswith("- ")


def test_json_gbnf_output_is_json_or_a_prefix_of_it(demo):
    for seed in range(4):
        r = run(demo, grammar=(GRAMMARS / "json.gbnf").read_text(), seed=seed, max_tokens=200)
        assert r.text.startswith("{")
        assert json.loads(r.text) if r.stop_reason == "eos" else closes_into_json(r.text), r.text


# ---------------------------------------------------------------------------
# Bad constraints: typed errors before any token
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,words", [
    ({"grammar": "root ::= [a-"}, "does not parse"),
    ({"grammar": "root ::= missing"}, "missing"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": "[1, 2]"}, "must be a JSON object"),
    ({"json_schema": '{"$ref": "#/$defs/nowhere"}'}, "does not exist"),
])
def test_bad_constraints_are_refused_at_start(demo, kw, words):
    with pytest.raises(grammar.GrammarError, match=re.escape(words)):
        demo.start(PROMPT, **kw)


@pytest.mark.parametrize("kw,words", [
    ({"regex": "a", "grammar": "root ::= \"a\""}, "at most one"),
    ({"json_object": True, "json_schema": "{}"}, "at most one"),
    ({"regex": ""}, "non-empty string"),
    ({"grammar": 7}, "non-empty string"),
    ({"json_schema": "x" * ((1 << 18) + 1)}, "limit"),
    ({"json_object": "yes"}, "true or false"),
])
def test_malformed_constraint_fields_are_sampling_errors(demo, kw, words):
    with pytest.raises(SamplingError, match=words):
        demo.start(PROMPT, **kw)


# ---------------------------------------------------------------------------
# Mechanics: the overlapped mask, preemption, log-probabilities, ignore_eos
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("overlap_above_s", [0.0, float("inf")], ids=["mask-thread", "inline"])
def test_prefetched_mask_equals_the_matchers_own(demo, overlap_above_s):
    """The mask computed on the mask thread (or inline) is llguidance's for the same state."""
    gen = demo.start(PROMPT, json_schema=json.dumps(SCHEMAS["story"]), seed=1)
    c = gen.constraint
    c.overlap_above_s = overlap_above_s
    for _ in range(12):
        c.prefetch()
        assert (c._next is not None) == (overlap_above_s == 0.0)
        got = c.mask().copy()       # waits for the mask thread; the matcher is free again
        bits = np.frombuffer(c.matcher.compute_bitmask(), dtype=np.uint8)
        want = np.unpackbits(bits, bitorder="little")[: demo.n_vocab].astype(bool)
        np.testing.assert_array_equal(got, want)
        if gen.step() is None:
            break


def test_only_costly_masks_go_to_the_mask_thread(demo):
    """The first mask overlaps (its cost is unknown); then a cheap grammar's masks stay inline."""
    c = demo.start(PROMPT, regex="[a-z]+", seed=1).constraint
    c.prefetch()
    assert c._next is not None
    c.mask()
    c.overlap_above_s = c._cost * 2           # as if the hand-off cost more than this mask
    c.prefetch()
    assert c._next is None and c.mask().any()


def test_preempted_constrained_generation_resumes_identically(demo):
    kw = dict(json_schema=json.dumps(SCHEMAS["story"]), seed=11, temperature=1.0, max_tokens=200)
    alone = run(demo, **kw)
    gen = demo.start(PROMPT, **kw)
    for i in range(200):
        if gen.step() is None:
            break
        if i % 5 == 2:
            gen.suspend()
            run(demo, "The dog", max_tokens=3)    # another request takes the KV cache
    assert gen.result.text == alone.text and gen.result.tokens == alone.tokens


def test_logprobs_are_the_models_own_not_the_masked_ones(demo):
    r = run(demo, regex="[0-9]+!", temperature=0.0, max_tokens=1, logprobs=True)
    gen = demo.start(PROMPT, regex="[0-9]+!", temperature=0.0, max_tokens=1, logprobs=True)
    ev = gen.step()
    raw = demo.logits(gen.prompt)[-1].astype(np.float64)
    lse = raw.max() + np.log(np.exp(raw - raw.max()).sum())
    assert ev.id == r.tokens[0] and ev.logprob == pytest.approx(raw[ev.id] - lse, abs=1e-5)
    assert ev.logprob < np.max(raw) - lse      # a digit is not the model's favourite here


def test_ignore_eos_does_not_run_past_a_complete_output(demo):
    r = run(demo, regex="(yes|no)", ignore_eos=True, max_tokens=50)
    assert r.stop_reason == "eos" and r.text in ("yes", "no")
