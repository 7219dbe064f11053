"""Chat templates: the files' real templates, the ChatML fallback, and hostile templates
(loops, explosions, escapes) that must end in ChatTemplateError within their limits.

The model families' real templates (tests/daemon/data/chat_templates, and the
vocabulary files' own in ../shared/conformance) render to exactly the text that
jinja2 gives when set up the way Hugging Face transformers' apply_chat_template
sets it up (`hf_render` below mirrors transformers' _compile_jinja_template and
render_jinja_template)."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.daemon.chat import FALLBACK_TEMPLATE, ChatTemplate, ChatTemplateError, render
from ember.formats import gguf
from tests.conftest import conformance_path

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def file_template(name: str) -> str:
    with gguf.open(conformance_path("models", name)) as f:
        return f.metadata["tokenizer.chat_template"]


# ---------------------------------------------------------------------------
# The model families' templates render as Hugging Face renders them
# ---------------------------------------------------------------------------

TEMPLATES = Path(__file__).with_name("data") / "chat_templates"
# family -> (template source: a data file or a conformance vocabulary, bos_token, eos_token)
FAMILIES = {
    "gemma-2": ("gemma-2.jinja", "<bos>", "<eos>"),
    "gemma-3": ("gemma-3.jinja", "<bos>", "<eos>"),
    "llama-3.1": ("llama-3.1.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.2": ("llama-3.2.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "phi-3": ("tokenizer/ggml-vocab-phi-3.gguf", "<s>", "<|endoftext|>"),
    "phi-3.5-mini": ("phi-3.5-mini.jinja", "<s>", "<|endoftext|>"),
    "phi-4-mini": ("phi-4-mini.jinja", "<|endoftext|>", "<|endoftext|>"),
    "granite-3.3": ("granite-3.3.jinja", "<|end_of_text|>", "<|end_of_text|>"),
    "smollm2": ("arch/tokenizer/ggml-vocab-smollm.gguf", "<|im_start|>", "<|im_end|>"),
    "smollm3": ("smollm3.jinja", "<|im_start|>", "<|im_end|>"),
    "qwen2": ("tokenizer/ggml-vocab-qwen2.gguf", "<|endoftext|>", "<|im_end|>"),
    "lfm2.5": ("lfm2.5.jinja", "<|startoftext|>", "<|im_end|>"),
}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi there"}],
    "system+user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "turns": MSGS[1:],
    "system+turns": MSGS,
    "spaces and specials": [{"role": "user", "content": "  a <b> & 'c' \n\n"},
                            {"role": "assistant", "content": " x "},
                            {"role": "user", "content": "{{ not jinja }} é 🦙"}],
    "assistant first": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}],
}


def family_template(family: str) -> str:
    where = FAMILIES[family][0]
    if where.endswith(".jinja"):
        return (TEMPLATES / where).read_text(encoding="utf-8")
    with gguf.open(conformance_path(*where.split("/"))) as f:
        return f.metadata["tokenizer.chat_template"]


class _HFGeneration(jinja2.ext.Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_support"), [], [], body).set_lineno(lineno)

    def _support(self, caller):
        return caller()


def hf_render(source: str, messages, add_generation_prompt: bool, bos: str, eos: str):
    """The text transformers' apply_chat_template renders, or the exception it raises."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_HFGeneration, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source).render(messages=messages, tools=None, documents=None,
                                              add_generation_prompt=add_generation_prompt,
                                              bos_token=bos, eos_token=eos)
    except jinja2.exceptions.TemplateError as e:
        return e


def test_every_family_has_its_template():
    assert {f for f, (w, _, _) in FAMILIES.items() if w.endswith(".jinja")} <= \
        {p.stem for p in TEMPLATES.glob("*.jinja")}
    assert {p.name for p in TEMPLATES.glob("*.jinja")} <= {w for w, _, _ in FAMILIES.values()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
def test_family_template_renders_as_hugging_face_does(family, conversation, add_generation_prompt):
    source, (_, bos, eos), messages = family_template(family), FAMILIES[family], \
        CONVERSATIONS[conversation]
    want = hf_render(source, messages, add_generation_prompt, bos, eos)
    template = ChatTemplate(source, bos_token=bos, eos_token=eos)
    if isinstance(want, Exception):   # e.g. Gemma refuses a leading assistant turn
        with pytest.raises(ChatTemplateError, match="template raised"):
            template.render(messages, add_generation_prompt)
        return
    assert template.render(messages, add_generation_prompt) == want


# (template: a family name or a conformance model file, messages, bos_token, exact text): what
# each family does of its own, spelled out by hand beside the Hugging Face comparison above
EXACT = {
    # SmolLM2's file template: ChatML plus a default system message when none is given
    "smollm2 default system prompt": (
        "smollm2", MSGS[1:2], "",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "gemma-3 folds the system prompt into the first turn": (
        "gemma-3", MSGS, "<bos>",
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"),
    "qwen2 from the file": (
        "v151k-qwen2-Q8_0.gguf", MSGS[1:2], "",
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "phi3 uses bos_token": (
        "v32k-phi3-Q8_0.gguf", MSGS[1:3], "<s>",
        "<s><|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"),
}


@pytest.mark.parametrize("template, messages, bos, want", EXACT.values(), ids=EXACT.keys())
def test_real_template_renders_exactly(template, messages, bos, want):
    source = file_template(template) if template.endswith(".gguf") else family_template(template)
    assert render(messages, source, bos_token=bos) == want


def test_smollm2_keeps_a_given_system_prompt():
    assert render(MSGS[:2], family_template("smollm2")).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")


def test_hugging_face_environment_details():
    """What differs from jinja2's defaults: a trailing newline of the source is dropped,
    tojson does not escape HTML or sort keys, loop controls and {% generation %} parse."""
    assert render(MSGS[1:2], "{{ messages[0].content }}\n") == "Hi"
    assert render(MSGS[1:2], "{{ {'b': '<&>', 'a': 1} | tojson }}") == '{"b": "<&>", "a": 1}'
    src = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
           "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}{{ tools is none }}")
    assert render(MSGS, src) == "Be brief.True"
    with pytest.raises(ChatTemplateError, match="indent"):
        render(MSGS, "{{ messages | tojson(indent=100000000) }}")


# ---------------------------------------------------------------------------
# The ChatML fallback and the template features real files use
# ---------------------------------------------------------------------------

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
