"""Tokenizers against llama.cpp's own vectors, the refs' prompt tokens, and hostile vocabularies.

Oracles: ../shared/conformance/tokenizer (llama.cpp's test-tokenizer-0 vectors,
15 vocabularies), ../shared/conformance/arch/tokenizer (the same format for two
vocabularies extracted from real models: SmolLM2's `smollm` BPE and Gemma 3's
262k SentencePiece), and ../shared/conformance/refs (prompt tokens with BOS).
Hostile vocabularies are written by the test with ember's own GGUF writer.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from tests.conftest import CONFORMANCE, conformance_cases, conformance_path, oracle_params
from ember.formats import gguf
from ember.formats.tokenizer import Tokenizer, TokenizerError
from ember.formats import tokenizer_models
from ember.formats.tokenizer_models import SPACE_ESC, byte_encode



def _vocab_names(folder) -> list[str]:
    return sorted(p.name[len("ggml-vocab-"):-len(".gguf")] for p in folder.glob("ggml-vocab-*.gguf")) \
        if folder.is_dir() else []


VOCABS = _vocab_names(CONFORMANCE / "tokenizer")                  # the original 15
ARCH_VOCABS = _vocab_names(CONFORMANCE / "arch" / "tokenizer")    # the architectures' own, kept apart
# Vocabularies that cannot give the text back, and why.
LOSSY = {"bert-bge": "WordPiece lowercases, strips accents, drops whitespace and has [UNK]"}
SEP = "\n__ggml_vocab_test__\n"

_loaded: dict[str, Tokenizer] = {}


def vocab_path(name: str):
    folder = ("arch", "tokenizer") if name in ARCH_VOCABS else ("tokenizer",)
    return conformance_path(*folder, f"ggml-vocab-{name}.gguf")


def vocab(name: str) -> Tokenizer:
    """One Tokenizer per vocabulary for the whole module (loading is the slow part)."""
    if name not in _loaded:
        _loaded[name] = Tokenizer.from_gguf(vocab_path(name))
    return _loaded[name]


def model_tokenizer(model: str) -> Tokenizer:
    key = "model:" + model
    if key not in _loaded:
        _loaded[key] = Tokenizer.from_gguf(conformance_path("models", model))
    return _loaded[key]


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """test-tokenizer-0's reading: split the .inp on "\\n__ggml_vocab_test__\\n", a trailing
    separator opens no new case; .out has one line of ids per case (empty line: no ids)."""
    base = vocab_path(name)
    raw = base.with_name(base.name + ".inp").read_bytes().decode("utf-8")
    cases, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            cases.append(raw[pos:])
            break
        cases.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = base.with_name(base.name + ".out").read_text().splitlines()
    assert len(lines) == len(cases), f"{name}: {len(cases)} inputs but {len(lines)} output lines"
    return [(s, [int(x) for x in line.split()]) for s, line in zip(cases, lines)]


# ---------------------------------------------------------------------------
# 1. llama.cpp's vectors, exactly
# ---------------------------------------------------------------------------

def test_all_fifteen_vocabularies_are_present():
    conformance_path("tokenizer")
    assert len(VOCABS) == 15, VOCABS


def test_both_new_vocabularies_are_present():
    conformance_path("arch", "tokenizer")
    assert ARCH_VOCABS == ["gemma-3", "smollm"]


@pytest.mark.parametrize("name", oracle_params(VOCABS) + oracle_params(ARCH_VOCABS))
def test_llama_cpp_vectors(name):
    tok = vocab(name)
    cases = read_vectors(name)
    assert len(cases) >= 46
    wrong = [(s, want, got) for s, want in cases if (got := tok.encode(s)) != want]
    assert not wrong, "\n".join(f"{s!r}\n  want {w}\n  got  {g}" for s, w, g in wrong[:5])


# ---------------------------------------------------------------------------
# 2. decode(encode(s)) == s, and the stream decoder agrees with decode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", oracle_params(VOCABS) + oracle_params(ARCH_VOCABS))
def test_roundtrip_and_stream(name):
    tok = vocab(name)
    for s, _ in read_vectors(name):
        ids = tok.encode(s)
        text = tok.decode(ids)
        if name not in LOSSY:
            assert text == s, f"{s!r} -> {ids} -> {text!r}"
        dec = tok.stream_decoder(strip_space_prefix=True)
        parts = [dec.feed(i) for i in ids] + [dec.flush()]
        assert "".join(parts) == text
        assert all("\ufffd" not in p for p in parts) or "\ufffd" in s


def test_lossy_vocabulary_really_is_lossy():
    tok = vocab("bert-bge")
    assert tok.decode(tok.encode("Äpfel  X")) == " apfel x"


def test_stream_decoder_holds_partial_utf8():
    tok = vocab("llama-spm")
    ids = tok.encode("🦙")                      # no such token: four <0xXX> byte tokens
    assert [tok.token_text(i)[:3] for i in ids[-4:]] == ["<0x"] * 4
    dec = tok.stream_decoder()
    out = [dec.feed(i) for i in ids]
    assert out[-4:] == ["", "", "", "🦙"]
    assert dec.flush() == ""
    dec = tok.stream_decoder()
    assert [dec.feed(i) for i in ids[-4:-1]] == ["", "", ""]
    assert dec.flush() == "\ufffd"              # an unfinished sequence is not emitted raw


def test_token_to_piece_is_bytes_of_partial_characters():
    tok = vocab("gpt-2")
    ids = tok.encode("é")
    assert b"".join(tok.token_to_piece(i) for i in ids) == "é".encode()


def awkward_texts(name: str) -> list[str]:
    """Long pieces: every vector at once, CJK without spaces, a space-less run, symbol soup."""
    rng = random.Random(7)
    cjk = "".join(chr(rng.randrange(0x4E00, 0x9FA5)) if rng.random() < 0.8 else rng.choice("，。🦙é")
                  for _ in range(1500))
    letters = "".join(rng.choice("abcdeéfghij0123") for _ in range(1500))
    soup = "".join(rng.choice("->=<(){}[]::..,;!!??**//\\__") for _ in range(800))
    return ["".join(s for s, _ in read_vectors(name)), cjk, letters, soup]


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2", "gemma-4"])
def test_cutting_and_caching_change_nothing(name):
    """The speed-ups (cuts before ▁ and at non-junction pairs, word caches, the compiled
    merge loop) against the plain Python algorithm on whole, uncut pieces."""
    tok = vocab(name)
    m = tok._model
    if name in ("llama-spm", "llama-bpe", "qwen2"):   # so this compares the C loop with Python
        assert (m.compiled is not None) == (tokenizer_models._tokenize is not None)
    for text in awkward_texts(name):
        m.cache.clear()
        m.piece_cache.clear()
        if name == "llama-spm":
            want = list(m._merge((" " + text).replace(" ", SPACE_ESC)))
        elif name == "gemma-4":
            want = []
            for w in m.pre.split(text.replace(" ", SPACE_ESC)):
                whole = m.token_to_id.get(w) if w[0] == "\n" else None
                want += [whole] if whole is not None else m._merge(w)
        else:
            want = []
            for w in m.pre.split(text):
                whole = m.token_to_id.get(byte_encode(w)) if m.ignore_merges else None
                want += [whole] if whole is not None else m._merge(byte_encode(w))
        assert tok.encode(text) == want
        assert tok.encode(text) == want   # again, from a warm cache
        if getattr(m, "compiled", None) is not None:   # and the Python path with its cuts
            compiled, m.compiled = m.compiled, None
            try:
                m.cache.clear()
                assert tok.encode(text) == want
            finally:
                m.compiled = compiled
                m.cache.clear()


# ---------------------------------------------------------------------------
# 3. prompt tokens of every refs case (BOS added)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", oracle_params(conformance_cases()), ids=lambda c: c["ref"])
def test_refs_prompt_tokens(case):
    tok = model_tokenizer(case["model"])
    want = np.load(conformance_path("refs", case["ref"]))["tokens"].tolist()
    assert tok.encode(case["prompt"], add_special=True) == want


# ---------------------------------------------------------------------------
# Special tokens, attributes, end of generation
# ---------------------------------------------------------------------------

def test_control_tokens_only_parsed_when_asked():
    tok = vocab("llama-bpe")
    text = "hi<|eot_id|>"
    plain = tok.encode(text)
    assert 128009 not in plain and tok.decode(plain) == text
    assert tok.encode(text, parse_special=True)[-1] == 128009
    assert tok.is_eog(128009) and tok.is_eog(tok.eos_id) and not tok.is_eog(plain[0])
    assert tok.decode([128009]) == "" and tok.decode([128009], special=True) == "<|eot_id|>"


def test_qwen2_im_end_is_eog_and_not_smuggled():
    tok = vocab("qwen2")
    assert tok.eot_id == tok.encode("<|im_end|>", parse_special=True)[0] == 151645
    assert tok.is_eog(151645) and tok.is_eog(151643)
    assert 151645 not in tok.encode("<|im_end|>")


def test_add_special_follows_the_vocabulary():
    spm = vocab("llama-spm")
    assert (spm.n_vocab, spm.bos_id, spm.eos_id, spm.add_bos, spm.add_eos) == (32000, 1, 2, True, False)
    assert spm.encode("Hello", add_special=True) == [1] + spm.encode("Hello")
    assert spm.encode("", add_special=True) == [1] and spm.encode("") == []
    gpt2 = vocab("gpt-2")
    assert not gpt2.add_bos and gpt2.encode("Hello", add_special=True) == gpt2.encode("Hello")
    bert = vocab("bert-bge")  # WordPiece: [CLS] ... [SEP]
    assert bert.encode("hello", add_special=True) == [101, *bert.encode("hello"), 102]


def test_ids_out_of_range_are_typed_errors():
    tok = vocab("llama-spm")
    for bad in (-1, tok.n_vocab, "3"):
        with pytest.raises(TokenizerError):
            tok.decode([bad])
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")


def test_lone_surrogate_is_replacement_character():
    tok = vocab("llama-bpe")
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_qwen2_vocab_loads_whole():
    # 152k tokens + 151k merges; load speed is measured in bench/tokenizer_speed.py
    tok = Tokenizer.from_gguf(conformance_path("tokenizer", "ggml-vocab-qwen2.gguf"))
    assert tok.n_vocab > 150_000
    assert tok.decode(tok.encode("Hello, world")) == "Hello, world"


def test_from_open_gguf_file_leaves_it_usable():
    with gguf.open(conformance_path("tokenizer", "ggml-vocab-llama-spm.gguf")) as f:
        tok = Tokenizer.from_gguf(f)
        assert f.metadata["tokenizer.ggml.model"] == "llama"
    assert tok.encode("Hello world") == vocab("llama-spm").encode("Hello world")


# ---------------------------------------------------------------------------
# 4. hostile metadata: a TokenizerError at load, never IndexError or a crash
# ---------------------------------------------------------------------------

A = "ARRAY"
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "▁b", "ab"]


def spm_file(**change):
    """A small valid SentencePiece vocabulary; `change` replaces/deletes (None) keys."""
    n = len(SPM_TOKENS)
    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": list(SPM_TOKENS),
        "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -2.0, -3.0, -3.0, -4.0],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (n - 259),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    types = {"tokenizer.ggml.tokens": (A, "STRING"), "tokenizer.ggml.scores": (A, "FLOAT32"),
             "tokenizer.ggml.token_type": (A, "INT32"), "tokenizer.ggml.bos_token_id": "UINT32",
             "tokenizer.ggml.eos_token_id": "UINT32", "tokenizer.ggml.unknown_token_id": "UINT32"}
    for k, v in change.items():
        key = "tokenizer.ggml." + k
        if v is None:
            md.pop(key, None)
            types.pop(key, None)
        else:
            md[key], types[key] = v if isinstance(v, tuple) else (v, types.get(key))
            if types[key] is None:
                del types[key]
    return md, types


def bpe_file(merges=("a b",), pre="gpt-2"):
    toks = ["a", "b", "ab", "Ġ"]
    md = {"general.architecture": "gpt2", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.tokens": toks, "tokenizer.ggml.merges": list(merges),
          "tokenizer.ggml.token_type": [1] * len(toks)}
    types = {"tokenizer.ggml.tokens": (A, "STRING"), "tokenizer.ggml.merges": (A, "STRING"),
             "tokenizer.ggml.token_type": (A, "INT32")}
    return md, types


def load(tmp_path, md_types) -> Tokenizer:
    path = tmp_path / "vocab.gguf"
    gguf.write(path, md_types[0], types=md_types[1])
    return Tokenizer.from_gguf(path)


def test_hand_made_vocabularies_work(tmp_path):
    spm = load(tmp_path, spm_file())
    # "▁ab▁b": "▁a" (score -3) beats "ab" (-4), and "▁ab" is no token
    assert spm.encode("ab b") == [SPM_TOKENS.index(t) for t in ("▁a", "b", "▁b")]
    assert spm.encode("é") == [SPM_TOKENS.index("▁"), 3 + 0xC3, 3 + 0xA9]
    bpe = load(tmp_path, bpe_file())
    assert bpe.encode("ab a") == [2, 3, 0] and bpe.decode([2, 3, 0]) == "ab a"


HOSTILE_SPM = {
    "tokens of INT32": (dict(tokens=([1, 2, 3], (A, "INT32"))), "ARRAY of STRING"),
    "tokens not an array": (dict(tokens=("abc", "STRING")), "ARRAY of STRING"),
    "tokens missing": (dict(tokens=None), "missing"),
    "scores of STRING": (dict(scores=(["x"] * len(SPM_TOKENS), (A, "STRING"))), "scores"),
    "scores too short": (dict(scores=([0.0] * 5, (A, "FLOAT32"))), "5 entries"),
    "token_type of FLOAT32": (dict(token_type=([1.0] * len(SPM_TOKENS), (A, "FLOAT32"))), "token_type"),
    "token_type too short": (dict(token_type=([1] * 3, (A, "INT32"))), "3 entries"),
    "byte token <0x-1>": (dict(tokens=(SPM_TOKENS[:3] + ["<0x-1>"] + SPM_TOKENS[4:], (A, "STRING"))), "<0xHH>"),
    "byte token <0xZZ>": (dict(tokens=(SPM_TOKENS[:3] + ["<0xZZ>"] + SPM_TOKENS[4:], (A, "STRING"))), "<0xHH>"),
    "bos id = n_vocab": (dict(bos_token_id=(len(SPM_TOKENS), "UINT32")), "outside the vocabulary"),
    "eos id huge": (dict(eos_token_id=(1 << 40, "UINT64")), "outside the vocabulary"),
    "unk id negative": (dict(unknown_token_id=(-5, "INT32")), "outside the vocabulary"),
    "eos id a string": (dict(eos_token_id=("2", "STRING")), "must be an integer"),
    "add_bos not a bool": (dict(add_bos_token=(1, "UINT8")), "must be a boolean"),
    "10 MB token": (dict(tokens=(SPM_TOKENS[:-1] + ["x" * 10_000_000], (A, "STRING"))), "bytes long"),
    "duplicate token": (dict(tokens=(SPM_TOKENS[:-1] + ["a"], (A, "STRING"))), "duplicate token"),
    "unknown model": (dict(model=("sentencepiece2", "STRING")), "bert, gemma4, gpt2, llama"),
    "model not a string": (dict(model=(3, "UINT32")), "not a string"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SPM))
def test_hostile_spm_metadata(tmp_path, case):
    change, message = HOSTILE_SPM[case]
    with pytest.raises(TokenizerError) as e:
        load(tmp_path, spm_file(**change))
    assert message in str(e.value)
    assert "vocab.gguf" in str(e.value)


HOSTILE_BPE = {
    "merge names unknown token": (dict(merges=["a b", "a zz"]), "merges[1]"),
    "merge without a space": (dict(merges=["ab"]), "merges[0]"),
    "unknown pre-tokenizer": (dict(pre="klingon"), "'klingon'"),
}


@pytest.mark.parametrize("case", list(HOSTILE_BPE))
def test_hostile_bpe_metadata(tmp_path, case):
    kwargs, message = HOSTILE_BPE[case]
    with pytest.raises(TokenizerError) as e:
        load(tmp_path, bpe_file(**kwargs))
    assert message in str(e.value)


def test_unknown_names_list_the_supported_ones(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load(tmp_path, bpe_file(pre="klingon"))
    for name in ("llama-bpe", "qwen2", "qwen35", "gpt-2", "deepseek-llm", "deepseek-coder",
                 "falcon", "mpt", "starcoder", "refact", "command-r"):
        assert name in str(e.value)
    md, types = bpe_file()
    md["tokenizer.ggml.merges"] = [1, 2]
    types["tokenizer.ggml.merges"] = (A, "INT32")
    with pytest.raises(TokenizerError, match="ARRAY of STRING"):
        load(tmp_path, (md, types))


def test_spm_without_byte_tokens_gives_unk(tmp_path):
    # llama.cpp would throw on a byte with no <0xXX> token; we give <unk>
    toks = SPM_TOKENS[:3] + [f"<x{b:02X}>" for b in range(256)] + SPM_TOKENS[259:]
    tok = load(tmp_path, spm_file(tokens=(toks, (A, "STRING")),
                                  token_type=([2, 3, 3] + [1] * (len(toks) - 3), (A, "INT32"))))
    assert tok.encode("a é") == [SPM_TOKENS.index("▁a"), SPM_TOKENS.index("▁"), 0, 0]


def test_add_bos_without_a_bos_token(tmp_path):
    md, types = bpe_file()   # gpt2's default BOS (11) is outside this 4-token vocabulary
    md["tokenizer.ggml.add_bos_token"] = True
    with pytest.raises(TokenizerError, match="bos_token_id is not set"):
        load(tmp_path, (md, types))


def test_minus_one_means_no_token(tmp_path):
    # converters store "none" as 0xFFFFFFFF; llama.cpp keeps its default, so do we
    tok = load(tmp_path, spm_file(bos_token_id=(0xFFFFFFFF, "UINT32"), eot_token_id=(-1, "INT32")))
    assert tok.bos_id == 1 and tok.eot_id is None
