"""daemon/openai_api.py: OpenAI request bodies -> checked calls, and the reply objects.

No daemon here: the rules are plain functions (test_http.py runs them end to
end through a real emberd, against the engine's text). Token events and
results are the engine's own dataclasses; `piece` stands for the tokenizer's
token_to_piece on a three-token vocabulary, so logprob text is checkable by eye.
"""
from __future__ import annotations

import pytest

from ember.daemon import openai_api
from ember.daemon.engine import Result, TokenEvent
from ember.daemon.openai_api import ApiError
from ember.formats.protocol import Limits

LIMITS = Limits()
MSG = [{"role": "user", "content": "Hi"}]


def served(name: str) -> bool:
    return name in ("m.gguf", "m")


def parse(kind: str, **body):
    return openai_api.parse(kind, {"model": "m", **body}, served, LIMITS)


def refused(kind: str, status: int = 400, **body) -> ApiError:
    with pytest.raises(ApiError) as e:
        openai_api.parse(kind, body, served, LIMITS)
    assert e.value.status == status, e.value.message
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return e.value


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

def test_chat_fields_map_onto_engine_sampling():
    c = parse("chat", messages=MSG, temperature=0.5, top_p=0.9, seed=3, stop="\n",
              presence_penalty=0.1, frequency_penalty=-0.2, max_completion_tokens=9, user="u1",
              n=1, stream=True, stream_options={"include_usage": True})
    assert c.source == MSG and c.stream and c.include_usage and c.user == "u1"
    assert c.sampling == {"temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n"],
                          "presence_penalty": 0.1, "frequency_penalty": -0.2, "max_tokens": 9}
    assert c.top_logprobs is None


def test_nulls_mean_not_given_and_defaults_are_embers():
    c = parse("chat", messages=MSG, temperature=None, stop=None, n=None, logprobs=None)
    assert c.sampling == {}          # no max_tokens: the engine runs to the end of the context


def test_logprobs_shapes():
    assert parse("chat", messages=MSG, logprobs=True).top_logprobs == 0
    assert parse("chat", messages=MSG, logprobs=True, top_logprobs=4).top_logprobs == 4
    assert parse("completion", prompt="x", logprobs=2).sampling["top_logprobs"] == 2
    refused("chat", model="m", messages=MSG, top_logprobs=2)            # needs logprobs: true
    refused("completion", model="m", prompt="x", logprobs=6)            # OpenAI's cap is 5


def test_prompts_a_string_a_batch_of_one_or_token_ids():
    assert parse("completion", prompt=["one"]).source == "one"
    assert parse("completion", prompt=[1, 2, 3]).source == [1, 2, 3]
    for bad in (["a", "b"], [], "", [1, -2], {"x": 1}):
        refused("completion", model="m", prompt=bad)


def test_text_content_parts_are_joined_other_parts_refused():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert parse("chat", messages=parts).source == [{"role": "user", "content": "ab"}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert refused("chat", model="m", messages=image).code == "unsupported_content"


@pytest.mark.parametrize("body,param,code", [
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"tools": []}, "tools", "unsupported_parameter"),
    ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
     "response_format.json_schema.schema", None),
    ({"grammar": ""}, "grammar", None),
    ({"bogus": 1}, "bogus", "unknown_parameter"),
    ({"temperature": "hot"}, "temperature", None),
    ({"temperature": float("nan")}, "temperature", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"max_tokens": True}, "max_tokens", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ({"seed": -1}, "seed", None),
])
def test_unsupported_and_wrong_fields_are_400_naming_the_field(body, param, code):
    e = refused("chat", model="m", messages=MSG, **body)
    assert e.param == param and e.code == code


def test_model_is_required_and_must_be_the_served_one():
    assert refused("chat", messages=MSG).param == "model"
    assert refused("chat", 404, model="gpt-4o", messages=MSG).code == "model_not_found"
    assert parse("chat", messages=MSG).model == "m"
    assert refused("chat", model="m").code == "missing_required_parameter"
    refused("chat", 400, model="m", messages="not a list")
    refused("completion", 400, model="m", prompt="x", echo=True)


def test_oversized_fields_are_413_and_body_must_be_an_object():
    big = "x" * (LIMITS.max_prompt_bytes + 1)
    assert refused("completion", 413, model="m", prompt=big).code == "too_large"
    with pytest.raises(ApiError):
        openai_api.parse("chat", ["not", "an", "object"], served, LIMITS)


# ---------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------

def piece(tid: int) -> bytes:
    return {1: b"Hel", 2: b"lo", 3: b"!"}[tid]


def result(text: str, tokens: list[int], stop: str = "length") -> Result:
    return Result(stop, text, tokens, {"prompt_tokens": 4, "completion_tokens": len(tokens)}, {}, 1)


def test_chat_stream_chunks_and_whole_agree():
    call = parse("chat", messages=MSG, stream=True, stream_options={"include_usage": True},
                 logprobs=True, top_logprobs=1)
    r = openai_api.Reply(call, piece, "ember-test", "m.gguf")
    events = [TokenEvent(1, "Hel", -0.5, [(1, -0.5)]), TokenEvent(2, "", -0.25, [(2, -0.25)])]
    chunks = [r.role_chunk(), *(r.token_chunk(e) for e in events), r.final_chunk("eos")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["logprobs"]["content"][0] == {
        "token": "Hel", "logprob": -0.5, "bytes": list(b"Hel"),
        "top_logprobs": [{"token": "Hel", "logprob": -0.5, "bytes": list(b"Hel")}]}
    assert chunks[2]["choices"][0]["delta"] == {"content": ""}            # logprobs still sent
    assert chunks[3]["choices"][0]["finish_reason"] == "stop" and chunks[3]["usage"] is None
    assert {c["id"] for c in chunks} == {r.id} and r.id.startswith("chatcmpl-")
    last = r.usage_chunk(result("Hello", [1, 2]))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 6
    whole = openai_api.Reply(call, piece, "ember-test", "m.gguf").whole(
        result("Hello", [1, 2]), "length", events)
    assert whole["object"] == "chat.completion" and whole["model"] == "m.gguf"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert [e["token"] for e in whole["choices"][0]["logprobs"]["content"]] == ["Hel", "lo"]


def test_completion_logprobs_keep_offsets_and_empty_text_is_skipped():
    call = parse("completion", prompt="x", logprobs=1, stream=True)
    r = openai_api.Reply(call, piece, "ember-test", "m.gguf")
    a = r.token_chunk(TokenEvent(1, "Hel", -1.0, [(1, -1.0)]))
    b = r.token_chunk(TokenEvent(2, "lo", -2.0, [(2, -2.0)]))
    assert a["choices"][0]["text"] == "Hel" and a["object"] == "text_completion"
    assert b["choices"][0]["logprobs"] == {"tokens": ["lo"], "token_logprobs": [-2.0],
                                           "top_logprobs": [{"lo": -2.0}], "text_offset": [3]}
    plain = openai_api.Reply(parse("completion", prompt="x", stream=True), piece, "f", "m.gguf")
    assert plain.token_chunk(TokenEvent(3, "")) is None                  # held-back text
    assert plain.final_chunk("length")["choices"][0]["finish_reason"] == "length"


def test_ember_error_codes_map_to_http_statuses():
    assert openai_api.from_ember("context_overflow", "x").status == 400
    assert openai_api.from_ember("context_overflow", "x").code == "context_length_exceeded"
    assert openai_api.from_ember("busy", "x").status == 429
    assert openai_api.from_ember("cancelled", "x").status == 503
    assert openai_api.from_ember("internal", "x").body()["error"]["type"] == "server_error"


def test_echoed_names_are_clipped():
    e = refused("chat", model="m", messages=MSG, **{"k" * 100_000: 1})
    assert len(e.message) < 1000 and len(e.param) < 120
    e = refused("chat", 404, model="x" * 100_000, messages=MSG)
    assert len(e.message) < 1000
