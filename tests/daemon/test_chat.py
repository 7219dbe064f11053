"""Chat templates: the files' real templates, the ChatML fallback, and hostile templates
(loops, explosions, escapes) that must end in ChatTemplateError within their limits."""
from __future__ import annotations

import time

import pytest

from ember.daemon.chat import FALLBACK_TEMPLATE, ChatTemplate, ChatTemplateError, render
from ember.formats import gguf
from tests.conftest import conformance_path

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def file_template(name: str) -> str:
    with gguf.open(conformance_path("models", name)) as f:
        return f.metadata["tokenizer.chat_template"]


# ---------------------------------------------------------------------------
# Real templates
# ---------------------------------------------------------------------------

def test_qwen2_template_from_the_file():
    out = render(MSGS[1:2], file_template("v151k-qwen2-Q8_0.gguf"))
    assert out == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_phi3_template_uses_bos_token():
    out = render(MSGS[1:3], file_template("v32k-phi3-Q8_0.gguf"), bos_token="<s>")
    assert out == "<s><|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"


def test_add_generation_prompt_switch():
    t = ChatTemplate(None)
    assert t.render(MSGS[1:2], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert t.render(MSGS[1:2]).endswith("<|im_start|>assistant\n")


def test_fallback_is_chatml_for_every_message():
    t = ChatTemplate(None, bos_token="<s>")
    assert t.is_fallback and t.source == FALLBACK_TEMPLATE
    out = t.render(MSGS)
    assert out.count("<|im_start|>") == 5 and out.count("<|im_end|>") == 4
    assert out.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_llama3_style_template_features():
    # loop.first/last, eos_token, strftime_now, trim_blocks: what real templates use
    src = ("{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content | trim }}"
           "{% if not loop.last %}|{% endif %}{% endfor %}{{ eos_token }}"
           "{% set d = strftime_now('%Y') %}{{ d | length }}")
    assert render([{"role": "user", "content": " a "}, {"role": "x", "content": "b"}], src,
                  bos_token="B", eos_token="E") == "Buser:a|x:bE4"


def test_raise_exception_is_typed():
    src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render(MSGS, src)
    assert render(MSGS[1:], src) == ""


# ---------------------------------------------------------------------------
# Hostile templates: every one ends, typed, inside its limits
# ---------------------------------------------------------------------------

HOSTILE = {
    "silent nested loop": "{% for i in range(100000) %}{% for j in range(100000) %}"
                          "{% endfor %}{% endfor %}",
    "loop over a big string": "{% for a in 'x' * 100000 %}{% for b in 'y' * 100000 %}"
                              "{% endfor %}{% endfor %}",
    "output explosion": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx"
                        "{% endfor %}{% endfor %}",
    "doubling string": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "doubling by replace": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                           "{% set ns.s = ns.s.replace('a', ns.s) %}{% endfor %}{{ ns.s | length }}",
    "doubling by filter": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                          "{% set ns.s = [ns.s, ns.s] | join %}{% endfor %}{{ ns.s | length }}",
    "doubling by %": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                     "{% set ns.s = '%s%s' % (ns.s, ns.s) %}{% endfor %}{{ ns.s | length }}",
    "doubling by format": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                          "{% set ns.s = '{}{}'.format(ns.s, ns.s) %}{% endfor %}{{ ns.s | length }}",
    "huge % width": "{{ ('%9999999999s' % 'a') | length }}",
    "huge format width": "{{ '{:>9999999999}'.format('a') | length }}",
    "huge ljust": "{{ 'a'.ljust(10000000000) | length }}",
    "huge center": "{{ 'a' | center(10000000000) | length }}",
    "big repeat": "{{ 'a' * 10000000000 }}",
    "big power": "{{ 999999 ** 999999 }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "syntax error": "{% for m in messages %}{{ m.content }",
    "unsafe attribute": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "mutation": "{{ messages.append({'role': 'x'}) }}",
    "undefined call": "{{ os.system('true') }}",
}


@pytest.mark.parametrize("src", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_template_is_typed_and_bounded(src):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="chat template"):
        render(MSGS, src, timeout_s=0.5, max_bytes=100_000, max_mem_bytes=64 << 20)
    assert time.monotonic() - t0 < 3.0


def test_limits_allow_a_normal_render_after_an_interrupted_one():
    with pytest.raises(ChatTemplateError, match="longer than"):
        render(MSGS, HOSTILE["silent nested loop"], timeout_s=0.2)
    assert render(MSGS[1:2]).startswith("<|im_start|>user")


@pytest.mark.parametrize("msgs", [[], "hi", [{"role": "user"}], [{"role": 1, "content": "x"}],
                                  [["user", "x"]], [{"role": "user", "content": None}]])
def test_bad_messages_are_typed(msgs):
    with pytest.raises(ChatTemplateError, match="messages"):
        render(msgs)


def test_oversized_template_source():
    with pytest.raises(ChatTemplateError, match="at most"):
        ChatTemplate("x" * (2 << 20))
