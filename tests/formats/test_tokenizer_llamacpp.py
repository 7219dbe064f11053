"""Live cross-check against llama.cpp itself, where llama-cpp-python is installed.

The stored vectors (test_tokenizer.py) cover plain text only. Here llama.cpp,
run in its own virtualenv as a subprocess (never imported into ember's),
answers for the things the engine relies on beyond them: special tokens
parsed from chat templates, BOS/EOS added, the end-of-generation set, control
flags, and every token's piece; and, for every pre-tokenizer name ember runs,
the encoding of a small vocabulary declaring it (the name table end to end). Skips, saying why, when that interpreter
(EMBER_LLAMA_PYTHON, default /work/llamaenv/bin/python) or the vocabularies
are absent.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REQUIRE_ORACLES, absent, conformance_path
from ember.formats import gguf
from ember.formats.tokenizer import Tokenizer
from ember.formats.tokenizer_models import BYTE_TO_UNICODE
from ember.formats.tokenizer_pretok import supported

LLAMA_PYTHON = os.environ.get("EMBER_LLAMA_PYTHON", "/work/llamaenv/bin/python")
# One of each behaviour (the other seven differ from these only in pre-tokenizer regexes,
# which the stored vectors cover); all 15 + the four v* models agreed when last run in full.
VOCABS = ["llama-spm", "phi-3", "llama-bpe", "qwen2", "gemma-4", "deepseek-llm", "mpt", "bert-bge"]
# The architectures' vocabularies from real models (../shared/conformance/arch/tokenizer): SmolLM2's
# `smollm` BPE and Gemma 3's 262k SentencePiece with its <start_of_turn> specials.
ARCH_VOCABS = ["smollm", "gemma-3"]
# Where several tokens qualify as EOT and the file names none, llama.cpp keeps the first its
# token_to_id unordered_map happens to iterate (libstdc++'s bucket order); ember takes the first
# of its own list. Both ids are end-of-generation tokens, so generation stops on either.
EOT_BY_HASH_ORDER = {"smollm": ("<|im_end|>", "<|endoftext|>")}
PIECE_STRIDE = 16  # every 16th token's piece, plus every control / user-defined one

TEXTS = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi  there!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
    "<s>[INST] Hello [/INST] Hi</s><s>[INST] again [/INST]",
    "<|user|>\nHow are you?<|end|>\n<|assistant|>\n  fine </s>  x",
    "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello<|END_OF_TURN_TOKEN|>",
    "plain text with <unk> and <|endoftext|> inside, and [PAD151650] too",
    " leading space and trailing  ",
    "",
    "\n\n\t  \u3000 mixed\u00a0space\u2003",
    "ø õ ÷ and é accents Ω K",
    "<|fim_prefix|>def f():<|fim_suffix|>\n    return 1<|fim_middle|>",
    "Hello world! 🦙🚀 中文测试 한국어 русский",
    # deepseek-llm's letter class holds NFC-unstable singletons (U+1F7D, U+2126, ...),
    # and its wregex patterns see U+3000 as U+000B
    "a\u1f7d\u1fbe\u1fd3\u1fdb\u2126\u212a\u1f5f\u03ce\u03a9K\u00b5b x\u3000\u3001y \u3000 z",
]

WORKER = r"""
import ctypes, json, sys
import llama_cpp as L
L.llama_backend_init()
p = L.llama_model_default_params(); p.vocab_only = True
m = L.llama_model_load_from_file(sys.argv[1].encode(), p)
v = L.llama_model_get_vocab(m)
n = L.llama_vocab_n_tokens(v)
req = json.loads(sys.stdin.read())
buf = ctypes.create_string_buffer(1 << 16)
def piece(i, special):
    k = L.llama_token_to_piece(v, i, buf, len(buf), 0, special)
    return buf.raw[:k].hex()
def tokenize(text, add, special):
    data = text.encode()
    out = (L.llama_token * (len(data) + 8))()
    k = L.llama_tokenize(v, data, len(data), out, len(out), add, special)
    return list(out[:k])
special_ids = [i for i in range(n) if L.llama_vocab_get_attr(v, i) & (8 | 16 | 1)]
ids = sorted(set(range(0, n, req["stride"])) | set(special_ids))
print(json.dumps({
    "eog": [i for i in range(n) if L.llama_vocab_is_eog(v, i)],
    "control": [i for i in range(n) if L.llama_vocab_is_control(v, i)],
    "eot": L.llama_vocab_eot(v), "bos": L.llama_vocab_bos(v), "eos": L.llama_vocab_eos(v),
    "add_bos": L.llama_vocab_get_add_bos(v), "add_eos": L.llama_vocab_get_add_eos(v),
    "encode": [[tokenize(t, a, s) for a in (False, True) for s in (False, True)] for t in req["texts"]],
    "pieces": {str(i): [piece(i, False), piece(i, True)] for i in ids},
}))
"""


def llama_cpp_answers(path) -> dict:
    if not os.path.exists(LLAMA_PYTHON):
        absent(f"llama-cpp-python interpreter not found at {LLAMA_PYTHON} (set EMBER_LLAMA_PYTHON)",
               REQUIRE_ORACLES)
    r = subprocess.run([LLAMA_PYTHON, "-c", WORKER, str(path)], capture_output=True, text=True,
                       input=json.dumps({"texts": TEXTS, "stride": PIECE_STRIDE}), timeout=300)
    if r.returncode != 0:
        absent(f"llama.cpp worker failed to run: {r.stderr.strip()[-300:]}", REQUIRE_ORACLES)
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", VOCABS + ARCH_VOCABS)
def test_agrees_with_live_llama_cpp(name):
    folder = ("arch", "tokenizer") if name in ARCH_VOCABS else ("tokenizer",)
    path = conformance_path(*folder, f"ggml-vocab-{name}.gguf")
    want = llama_cpp_answers(path)
    tok = Tokenizer.from_gguf(path)
    none = -1  # llama.cpp's LLAMA_TOKEN_NULL
    assert sorted(tok.eog_ids) == want["eog"]
    assert [i for i in range(tok.n_vocab) if tok.is_control(i)] == want["control"]
    if name in EOT_BY_HASH_ORDER:
        texts = {tok.token_text(tok.eot_id), tok.token_text(want["eot"])}
        assert texts <= set(EOT_BY_HASH_ORDER[name]) and {tok.eot_id, want["eot"]} <= tok.eog_ids
    else:
        assert (tok.eot_id if tok.eot_id is not None else none) == want["eot"]
    assert (tok.bos_id if tok.bos_id is not None else none) == want["bos"]
    assert (tok.eos_id if tok.eos_id is not None else none) == want["eos"]
    assert (tok.add_bos, tok.add_eos) == (want["add_bos"], want["add_eos"])
    for text, rows in zip(TEXTS, want["encode"]):
        got = [tok.encode(text, add_special=a, parse_special=s) for a in (False, True) for s in (False, True)]
        assert got == rows, f"{text!r}"
    wrong = [(i, p) for i, p in want["pieces"].items()
             if [tok.token_to_piece(int(i)).hex(), tok.token_to_piece(int(i), special=True).hex()] != p]
    assert not wrong, wrong[:5]


# ---------------------------------------------------------------------------
# Every pre-tokenizer name of the table, through llama.cpp's own loader
# ---------------------------------------------------------------------------

NAMES_WORKER = r"""
import json, sys
import llama_cpp as L
L.llama_backend_init()
req = json.loads(sys.stdin.read())
out = {}
for name, path in req["files"].items():
    p = L.llama_model_default_params(); p.vocab_only = True
    m = L.llama_model_load_from_file(path.encode(), p)
    if not m:
        out[name] = None
        continue
    v = L.llama_model_get_vocab(m)
    def tokenize(text, add, special):
        data = text.encode()
        buf = (L.llama_token * (len(data) + 8))()
        return list(buf[:L.llama_tokenize(v, data, len(data), buf, len(buf), add, special)])
    out[name] = {"bos": L.llama_vocab_bos(v), "add_bos": L.llama_vocab_get_add_bos(v),
                 "encode": [[tokenize(t, a, s) for a in (False, True) for s in (False, True)]
                            for t in req["texts"]]}
    L.llama_model_free(m)
print(json.dumps(out))
"""
# Words that exercise the regex sets (digits, contractions, CJK, folded whitespace, chameleon's
# sentinels) and a vocabulary whose merges make whole words ("hello", "Ġthe": ignore_merges).
NAME_TEXTS = ["Hello world, it's 1234567 'LL THE theme!", "  leading\n\n\ttabs  and  spaces  ",
              "東京 123 ١٢٣ café naïve 🦙", "<s>hi</s> x<|im_end|>", "a\u3000b\xa0c  \n  d",
              "IMGIMGABZ <sentinel:3> ok", "x"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "▁ t", "▁t h", "t h", "1 2", "12 3", "Ġ Ġ",
          "ĠĠ ĠĠ", "Ċ Ċ", "' s", "l l", "' ll", "e ll", "h ell", "hell o", "▁ ▁"]


def synthetic_vocab(path, pre: str) -> None:
    """A small BPE vocabulary llama.cpp loads vocab-only: GPT-2 byte characters, <0xXX> bytes
    (for the raw-UTF-8 types), '▁', three specials and every merge result."""
    specials = ["<s>", "</s>", "<|im_end|>"]
    toks = list(dict.fromkeys(specials + list(BYTE_TO_UNICODE) + [f"<0x{b:02X}>" for b in range(256)]
                              + ["▁", "\n", "\n\n"] + [m.replace(" ", "") for m in MERGES]))
    ttype = [3 if t in specials else 6 if t.startswith("<0x") and len(t) == 6 else 1 for t in toks]
    md = {"general.architecture": "llama", "llama.block_count": 1, "llama.context_length": 128,
          "llama.embedding_length": 64, "llama.feed_forward_length": 128,
          "llama.attention.head_count": 4, "llama.attention.layer_norm_rms_epsilon": 1e-5,
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": toks,
          "tokenizer.ggml.token_type": ttype, "tokenizer.ggml.merges": MERGES,
          "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    gguf.write(path, md, types={"tokenizer.ggml.token_type": (gguf.ARRAY, gguf.INT32),
                                "llama.attention.layer_norm_rms_epsilon": gguf.FLOAT32})


def test_every_pre_tokenizer_name_agrees_with_live_llama_cpp(tmp_path):
    """The name table end to end (name -> regex set, ignore_merges, add_bos, BOS cleared):
    each name ember runs encodes like llama.cpp on the same vocabulary."""
    names = supported()
    files = {}
    for n in names:
        files[n] = str(tmp_path / f"{n}.gguf")
        synthetic_vocab(files[n], n)
    if not os.path.exists(LLAMA_PYTHON):
        absent(f"llama-cpp-python interpreter not found at {LLAMA_PYTHON} (set EMBER_LLAMA_PYTHON)",
               REQUIRE_ORACLES)
    r = subprocess.run([LLAMA_PYTHON, "-c", NAMES_WORKER], capture_output=True, text=True,
                       input=json.dumps({"files": files, "texts": NAME_TEXTS}), timeout=600)
    assert r.returncode == 0, r.stderr[-500:]
    want = json.loads(r.stdout)
    wrong = []
    for n in names:
        tok, w = Tokenizer.from_gguf(files[n]), want[n]
        assert w is not None, f"llama.cpp did not load the {n!r} vocabulary"
        got = {"bos": -1 if tok.bos_id is None else tok.bos_id, "add_bos": tok.add_bos,
               "encode": [[tok.encode(t, add_special=a, parse_special=s) for a in (False, True)
                           for s in (False, True)] for t in NAME_TEXTS]}
        if got != w:
            wrong.append(n)
    assert not wrong, f"{len(wrong)} of {len(names)} names differ from llama.cpp: {wrong}"
