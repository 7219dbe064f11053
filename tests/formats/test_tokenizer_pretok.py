"""The pre-tokenizer table against llama.cpp: every name it knows is run or refused by name.

Oracles: formats/tokenizer_pretok_table.py is llama.cpp's own table (verbatim
regexes, LLAMA_CPP_SOURCE), and tests/formats/data/pretok_llamacpp.json holds the
words llama.cpp's unicode_regex_split makes of 60 texts with every regex set
(recorded by tests/formats/record_pretok_oracle.py from the llama.cpp source).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.formats import gguf, tokenizer_pretok
from ember.formats.tokenizer import Tokenizer, TokenizerError
from ember.formats.tokenizer_pretok import (DIGIT_GROUPS, GPT2, LLAMA3, QWEN2, WS, PreTokenizer,
                                            refusal, supported, translate)
from ember.formats.tokenizer_pretok_table import LLAMA_CPP_SOURCE, NAMES, REFUSED, TYPES

ORACLE = json.loads((Path(__file__).with_name("data") / "pretok_llamacpp.json").read_text())

# ---------------------------------------------------------------------------
# The table is llama.cpp 0.3.36's, whole
# ---------------------------------------------------------------------------


def test_table_is_the_whole_llama_cpp_list():
    """91 `tokenizer.ggml.pre` names and 57 regex sets in llama-cpp-python 0.3.36's llama.cpp:
    a name dropped from the table (or a set left without a name) fails here."""
    assert "0.3.36" in LLAMA_CPP_SOURCE and ORACLE["source"] == LLAMA_CPP_SOURCE
    assert len(NAMES) == 91 and len(TYPES) == 57
    assert {p.type for p in NAMES.values()} == set(TYPES)
    assert set(REFUSED) <= set(TYPES)
    for name in ("smollm", "llama-bpe", "qwen2", "gpt-4o", "tekken", "lfm2", "exaone4", "olmo",
                 "granite-docling", "falcon3", "deepseek-v3", "megrez", "chatglm-bpe"):
        assert name in supported(), name


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_name_loads_or_is_refused_by_name(tmp_path, name):
    """A vocabulary declaring each name: it tokenizes, or the error names it and says why."""
    path = tmp_path / "vocab.gguf"
    toks = ["a", "b", "ab", "Ġ", "▁"]
    gguf.write(path, {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name,
                      "tokenizer.ggml.tokens": toks, "tokenizer.ggml.merges": ["a b"],
                      "tokenizer.ggml.bos_token_id": 0},
               types={"tokenizer.ggml.bos_token_id": "UINT32"})
    reason = refusal(name)
    if reason is not None:
        with pytest.raises(TokenizerError) as e:
            Tokenizer.from_gguf(path)
        assert f"pre-tokenizer {name!r}" in str(e.value) and reason in str(e.value)
        return
    tok = Tokenizer.from_gguf(path)
    assert tok.pre_name == name and tok._v.pre_type == NAMES[name].type
    ids = tok.encode("ab a")
    assert ids[:1] == [2]                         # "ab" merged, in every split and encoding
    assert tok.decode(ids) == "ab a"


def test_refused_names_say_why():
    assert refusal("kimi-k2") and "splitter" in refusal("kimi-k2")
    assert refusal("whitespace") and "session" in refusal("whitespace")
    with pytest.raises(ValueError, match="kimi-k2"):
        PreTokenizer("kimi-k2")
    assert sorted(n for n in NAMES if refusal(n)) == ["kimi-k2", "whitespace"]


def test_flags_follow_llama_cpp():
    assert NAMES["lfm2"].ignore_merges and NAMES["lfm2"].add_bos
    assert NAMES["dbrx"].type == "dbrx" and not NAMES["dbrx"].ignore_merges   # llama3 regex only
    assert NAMES["glm4"].no_bos and NAMES["glm4"].ignore_merges
    assert NAMES["granite-embed-multi-311m"].type == "gemma4"
    assert NAMES["granite-embed-multi-311m"].escape_whitespaces


# ---------------------------------------------------------------------------
# The words: llama.cpp's own splitter on every regex set
# ---------------------------------------------------------------------------

def test_oracle_covers_every_supported_set():
    assert set(ORACLE["word_lengths"]) == set(TYPES) - set(REFUSED)


@pytest.mark.parametrize("ptype", sorted(ORACLE["word_lengths"]))
def test_words_match_llama_cpp(ptype):
    name = next(n for n, p in NAMES.items() if p.type == ptype)
    pre = PreTokenizer(name)
    wrong = []
    for text, lengths in zip(ORACLE["texts"], ORACLE["word_lengths"][ptype]):
        words, pos = [], 0
        for n in lengths:
            words.append(text[pos:pos + n])
            pos += n
        got = pre.split(text)
        if got != words:
            wrong.append(f"{text!r}\n  llama.cpp {words}\n  ember     {got}")
    assert not wrong, f"{len(wrong)} texts differ; first:\n" + "\n".join(wrong[:3])


# ---------------------------------------------------------------------------
# Translation rules
# ---------------------------------------------------------------------------

def test_custom_splitters_are_picked_by_exact_string():
    assert translate(TYPES["gpt2"][0]) == (GPT2, False)
    assert translate(TYPES["llama3"][0]) == (LLAMA3, False)
    assert translate(TYPES["grok_2"][0]) == (QWEN2, False)
    assert translate(TYPES["afmoe"][0]) == (DIGIT_GROUPS, False)
    assert translate(TYPES["tiny_aya"][0]) == (DIGIT_GROUPS, False)


def test_translation_of_classes_and_anchors():
    # collapsed (a \p{..} is present): \p{Lu} is any letter, \s the whitespace table
    assert translate(r"[\p{Lu}]+\s") == (f"[\\p{{L}}]+[{WS}]", False)
    # std::wregex pattern: \d is ASCII, $ ends the fragment, text is whitespace-folded
    assert translate(r"\d+$") == ("[0-9]+\\Z", True)
    assert translate(r"[^\s\d]") == (f"[^{WS}0-9]", True)
    with pytest.raises(ValueError, match=r"\\w"):
        translate(r"\w+")


@pytest.mark.parametrize("text, words", [
    ("ab1234", ["ab1", "234"]),          # llama.cpp keeps the text before a run on its first group
    ("123456x7", ["123", "456", "x7"]),
    ("١٢٣٤", ["١", "٢٣٤"]),              # any \p{N}, not only ASCII digits
    ("no digits", ["no digits"]),
])
def test_digit_groups(text, words):
    assert tokenizer_pretok._digit_groups([text]) == words
