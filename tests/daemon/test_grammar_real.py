"""Constrained output with a real chat model: SmolLM2-135M-Instruct (tests/daemon/real_model.py).

Must show: 100% of 50 generations (5 schemas x 10 seeds, sampled) validate with
`jsonschema`; the demo-model half is in test_grammar.py, with the same schemas.
A trained model also shows what a random one cannot: asked for JSON in its
chat template, it *finishes* the document (stop reason eos), free-form strings
and objects included.
"""
from __future__ import annotations

import json

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="the test extra's jsonschema is not installed")

from ember.daemon import engine  # noqa: E402
from tests.daemon.real_model import real_chat_model  # noqa: E402
from tests.daemon.test_grammar import SCHEMAS, run  # noqa: E402

ASK = {
    "person": "Invent a person: give a name and an age.",
    "mood": "How do you feel today? Answer with a mood, whether you are happy, and a score.",
    "tags": "Give a few tags for a blog post about baking bread.",
    "story": "Invent a short story title, its hero and the hero's friends.",
    "code": "Make up a product code and a month.",
}


@pytest.fixture(scope="module")
def chat_model():
    m = engine.load(real_chat_model(), backend="cpu", n_ctx=1024)
    yield m
    m.close()


def ask(name: str) -> list[dict]:
    return [{"role": "system", "content": "You answer in JSON."},
            {"role": "user", "content": ASK[name]}]


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sampled_generation_validates_under_its_schema(chat_model, name):
    schema = SCHEMAS[name]
    for seed in range(10):
        r = run(chat_model, ask(name), json_schema=json.dumps(schema), seed=seed,
                temperature=0.8, max_tokens=300)
        assert r.stop_reason == "eos", (seed, r.text)
        jsonschema.validate(json.loads(r.text), schema)


def test_json_object_and_grammar_complete(chat_model):
    r = run(chat_model, ask("person"), json_object=True, seed=1, max_tokens=300)
    assert r.stop_reason == "eos" and isinstance(json.loads(r.text), dict), r.text
    yes_no = 'root ::= ("yes" | "no") "\\n"'
    r = run(chat_model, [{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
            grammar=yes_no, temperature=0.0, max_tokens=10)
    assert r.stop_reason == "eos" and r.text in ("yes\n", "no\n"), r.text   # 135M: not always right
