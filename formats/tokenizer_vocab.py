"""Read and validate a GGUF vocabulary; decide everything llama.cpp decides at load.

`load_vocab(metadata, metadata_types, path) -> Vocab` mirrors
llama_vocab::impl::load: the model and pre-tokenizer names, per-model
defaults (special ids, add_bos, leading space), token types as attribute
bits, the text-based fix-ups (control-looking tokens made control, the
end-of-generation set), and the special-token list the partition walks.

Where llama.cpp only warns about bad metadata (an id past the vocabulary, a
malformed byte token) we refuse: a TokenizerError naming the key, the index
and what is wrong. Every array is checked for element type and length, and
every token for size, before anything is built from it, so a hostile file
costs bounded time and cannot raise IndexError later.
"""
from __future__ import annotations

import operator

import numpy as np
import regex

from ember.formats import gguf
from ember.formats.errors import UserError
from ember.formats.tokenizer_models import (SPACE_ESC, BpeModel, SpmModel, WpmModel,
                                            compiled_merger, compiled_spm, space_splitter)
from ember.formats.tokenizer_pretok import PreTokenizer, supported as supported_pre

# ---------------------------------------------------------------------------
# Errors and constants
# ---------------------------------------------------------------------------


class TokenizerError(UserError, ValueError):
    """A vocabulary ember cannot (or will not) build a tokenizer from, or bad input to one."""


MODELS = {"llama": "spm", "gpt2": "bpe", "bert": "wpm", "gemma4": "bpe"}
MAX_TOKEN_BYTES = 1 << 16   # real tokens are at most a few hundred bytes (runs of spaces)
NO_TOKEN = (-1, 0xFFFFFFFF)  # "no such token" as converters store it (int32 -1 / uint32 max)

# llama_token_attr bits
ATTR_UNDEFINED, ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL = 0, 1, 2, 4, 8
ATTR_USER_DEFINED, ATTR_BYTE, ATTR_LSTRIP, ATTR_RSTRIP = 16, 32, 128, 256
# GGUF token_type value -> attribute (anything else: undefined)
TYPE_TO_ATTR = {1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED,
                5: ATTR_UNUSED, 6: ATTR_BYTE}

K = "tokenizer.ggml."
SPECIAL_KEYS = {  # attribute -> metadata key (fim also under older names)
    "bos_id": "bos_token_id", "eos_id": "eos_token_id", "eot_id": "eot_token_id",
    "eom_id": "eom_token_id", "unk_id": "unknown_token_id", "sep_id": "seperator_token_id",
    "pad_id": "padding_token_id", "mask_id": "mask_token_id",
    "fim_pre_id": "fim_pre_token_id", "fim_suf_id": "fim_suf_token_id",
    "fim_mid_id": "fim_mid_token_id", "fim_pad_id": "fim_pad_token_id",
    "fim_rep_id": "fim_rep_token_id", "fim_sep_id": "fim_sep_token_id",
}
OLD_FIM_KEYS = {"fim_pre_id": "prefix_token_id", "fim_suf_id": "suffix_token_id",
                "fim_mid_id": "middle_token_id"}
DEFAULT_IDS = {  # llama.cpp's per-model defaults, before metadata
    "llama": {"bos_id": 1, "eos_id": 2, "unk_id": 0},
    "bert": {"bos_id": 101, "unk_id": 100, "sep_id": 102, "pad_id": 0, "mask_id": 103},
    "gpt2": {"bos_id": 11, "eos_id": 11},
    "gemma4": {},
}
# Texts llama.cpp recognises when the metadata does not name the token (first found wins).
AUTO_IDS = {
    "eot_id": ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
               "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
               "<end_of_utterance>"],
    "eom_id": ["<|eom_id|>"],
    "fim_pre_id": ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                   "▁<PRE>", "<|code_prefix|>", "<|prefix|>"],
    "fim_suf_id": ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                   "▁<SUF>", "<|code_suffix|>", "<|suffix|>"],
    "fim_mid_id": ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                   "▁<MID>", "<|code_middle|>", "<|middle|>"],
    "fim_pad_id": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "fim_rep_id": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "fim_sep_id": ["<|file_sep|>"],
}
EOG_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
             "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
             "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
             "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~["]
_BYTE_TOKEN = regex.compile(r"<0x([0-9A-Fa-f]{2})>")

# ---------------------------------------------------------------------------
# The validated vocabulary
# ---------------------------------------------------------------------------


class Vocab:
    """Plain data: what the tokenizer needs, all checked. Built by load_vocab()."""

    model: str            # 'llama' | 'gpt2' | 'bert' | 'gemma4'
    kind: str             # 'spm' | 'bpe' | 'wpm'
    pre: str | None
    tokens: list[str]     # (n_vocab,)
    token_to_id: dict[str, int]
    scores: list[float]   # (n_vocab,)
    attrs: list[int]      # (n_vocab,) ATTR_* bits
    ranks: dict[str, int] | None
    merges: list[str]
    special_cache: list[tuple[str, int, int]]  # (text, id, attr), longest text first
    eog_ids: set[int]
    # also: bos_id eos_id eot_id eom_id unk_id sep_id pad_id mask_id fim_*_id (int | None),
    # add_bos add_eos add_space_prefix escape_whitespaces ignore_merges lowercase
    # strip_accents (bool), junctions (BPE: {left[-1] + right[0]} over the merges)

    def byte_value(self, tid: int) -> int:
        return self._byte_values[tid]

    def build_model(self):
        if self.kind == "spm":
            splitter = space_splitter(_chars_before_space_in(self.tokens))
            return SpmModel(self.token_to_id, self.scores, self._spm_byte_ids(), splitter, self.unk_id,
                            compiled_spm(self.tokens, self.token_to_id, self.scores))
        if self.kind == "wpm":
            return WpmModel(self.token_to_id, self.unk_id, max(map(len, self.tokens)),
                            lowercase=self.lowercase, strip_accents=self.strip_accents)
        gemma = self.pre == "gemma4"
        return BpeModel(self.token_to_id, self.ranks, PreTokenizer(self.pre),
                        byte_level=not gemma, ignore_merges=self.ignore_merges,
                        newline_words=gemma, byte_ids=self._bpe_byte_ids(not gemma),
                        junctions=self.junctions,
                        compiled=None if gemma else compiled_merger(self.token_to_id, self.merge_ids),
                        splitter=space_splitter(_chars_before_space_in_merges(self.merges))
                        if gemma else None)

    def _spm_byte_ids(self) -> list[int | None]:
        t2i = self.token_to_id
        return [t2i.get(f"<0x{b:02X}>", t2i.get(chr(b)) if b < 0x80 else None) for b in range(256)]

    def _bpe_byte_ids(self, byte_level: bool) -> list[int | None]:
        t2i = self.token_to_id
        if byte_level:  # a lone UTF-8 byte is a valid string only below 0x80
            return [t2i.get(chr(b)) if b < 0x80 else None for b in range(256)]
        return [t2i.get(f"<0x{b:02X}>") for b in range(256)]


def _chars_before_space_in(tokens: list[str]) -> set[str]:
    """Characters that some token holds right before a ▁ (see tokenizer_models' note)."""
    out: set[str] = set()
    for t in tokens:
        i = t.find(SPACE_ESC, 1)
        while i > 0:
            out.add(t[i - 1])
            i = t.find(SPACE_ESC, i + 1)
    return out


def _chars_before_space_in_merges(merges: list[str]) -> set[str]:
    # a merge "a b" yields a+b: "c▁" inside a or b, or a ending in c and b starting with ▁
    return set(regex.findall(f"([^\\x00 ]) ?{SPACE_ESC}", "\x00".join(merges)))


# ---------------------------------------------------------------------------
# Loading, in llama.cpp's order
# ---------------------------------------------------------------------------

def load_vocab(md: dict, types: dict, path: str = "<gguf>") -> Vocab:
    v = Vocab()
    v.path = path
    _read_model(v, md)
    _read_tokens(v, md, types)
    _read_scores_and_types(v, md, types)
    if v.kind == "bpe":
        _read_merges(v, md, types)
    else:
        v.ranks, v.merges = None, []
    _check_byte_tokens(v)
    _read_special_ids(v, md)
    _read_flags(v, md)
    _fix_up_specials(v, md)
    v.special_cache = _special_cache(v)
    return v


def _err(v: Vocab, msg: str) -> TokenizerError:
    return TokenizerError(f"{v.path}: {msg}")


def _read_model(v: Vocab, md: dict) -> None:
    model = md.get(K + "model")
    if not isinstance(model, str):
        raise _err(v, f"{K}model is missing or not a string ({model!r})")
    if model not in MODELS:
        raise _err(v, f"unknown tokenizer model {model!r} ({K}model); "
                      f"supported: {', '.join(sorted(MODELS))}")
    v.model, v.kind = model, MODELS[model]
    pre = md.get(K + "pre")
    if model == "gemma4":
        pre = "gemma4"
    elif v.kind == "bpe":
        if not isinstance(pre, str):
            raise _err(v, f"{K}pre is missing or not a string ({pre!r}); a gpt2 vocabulary needs "
                          f"its pre-tokenizer named; supported: {', '.join(supported_pre())}")
        if pre not in supported_pre() or pre == "gemma4":
            raise _err(v, f"unknown pre-tokenizer {pre!r} ({K}pre); "
                          f"supported: {', '.join(p for p in supported_pre() if p != 'gemma4')}")
    v.pre = pre if v.kind == "bpe" else (pre if isinstance(pre, str) else None)


def _array(v: Vocab, md: dict, types: dict, key: str, etypes: tuple, required: bool):
    if key not in md:
        if required:
            raise _err(v, f"{key} is missing")
        return None
    vtype, etype = types.get(key, (None, None))
    if vtype != gguf.ARRAY or etype not in etypes:
        names = "/".join(gguf.VALUE_TYPE_NAMES[e] for e in etypes)
        got = gguf.VALUE_TYPE_NAMES.get(vtype, vtype)
        if vtype == gguf.ARRAY:
            got = f"ARRAY of {gguf.VALUE_TYPE_NAMES.get(etype, etype)}"
        raise _err(v, f"{key} must be an ARRAY of {names}, not {got}")
    return md[key].tolist()   # the file's lazy view, decoded here: what the tokenizer keeps


def _read_tokens(v: Vocab, md: dict, types: dict) -> None:
    tokens = _array(v, md, types, K + "tokens", (gguf.STRING,), True)
    if not tokens:
        raise _err(v, f"{K}tokens is empty")
    if len(tokens) >= 2 ** 31:
        raise _err(v, f"{K}tokens has {len(tokens)} entries; token ids are int32")
    longest = max(tokens, key=len)
    if len(longest.encode("utf-8")) > MAX_TOKEN_BYTES:
        i = tokens.index(longest)
        raise _err(v, f"{K}tokens[{i}] is {len(longest.encode('utf-8'))} bytes long "
                      f"(limit {MAX_TOKEN_BYTES}); not a real vocabulary")
    if "" in tokens:  # llama.cpp renames empty tokens rather than failing
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    t2i = dict(zip(tokens, range(len(tokens))))
    if len(t2i) != len(tokens):
        dup = _first_duplicate(tokens)
        raise _err(v, f"duplicate token in {K}tokens: {tokens[dup]!r} has ids "
                      f"{tokens.index(tokens[dup])} and {dup}")
    v.tokens, v.token_to_id = tokens, t2i


def _first_duplicate(tokens: list[str]) -> int:
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        if t in seen:
            return i
        seen.add(t)
    return -1


def _read_scores_and_types(v: Vocab, md: dict, types: dict) -> None:
    n = len(v.tokens)
    scores = _array(v, md, types, K + "scores", (gguf.FLOAT32, gguf.INT32), False)
    if scores is not None and len(scores) < n:
        raise _err(v, f"{K}scores has {len(scores)} entries for {n} tokens")
    v.scores = [float(s) for s in scores[:n]] if scores is not None else [0.0] * n
    ttypes = _array(v, md, types, K + "token_type", (gguf.INT32,), False)
    if ttypes is not None and len(ttypes) < n:
        raise _err(v, f"{K}token_type has {len(ttypes)} entries for {n} tokens")
    if ttypes is None:
        v.attrs = [ATTR_NORMAL] * n
    else:
        # type -> attribute through a lookup table; every unknown type (negative, >6) -> 0
        lut = np.array([TYPE_TO_ATTR.get(t, ATTR_UNDEFINED) for t in range(8)], dtype=np.int64)
        v.attrs = lut[np.clip(np.asarray(ttypes[:n], dtype=np.int64), 0, 7)].tolist()


def _read_merges(v: Vocab, md: dict, types: dict) -> None:
    merges = _array(v, md, types, K + "merges", (gguf.STRING,), True)
    halves, junctions, parts = _merge_halves(merges)
    v.merge_ids = None
    if halves is None or not v.token_to_id.keys() >= halves:
        _find_bad_merge(v, merges)   # raises, or sets v.junctions for unusual spacing
    else:
        v.junctions = junctions
        v.merge_ids = _merge_ids(v.token_to_id, parts)
    # the first occurrence of a pair keeps its rank (llama.cpp's emplace)
    n = len(merges)
    v.ranks = dict(zip(reversed(merges), range(n - 1, -1, -1)))
    v.merges = merges


def _merge_halves(merges: list[str]):
    """({left and right parts}, {left[-1] + right[0]}) at C speed over one joined string,
    or (None, None) when some merge is not 'left right' with exactly one inner space."""
    joined = "\x00".join(merges)
    if joined.count(" ") != len(merges) or "\x00 " in joined or joined[:1] == " ":
        return None, None, None
    parts = joined.replace(" ", "\x00").split("\x00")   # [left0, right0, left1, ...]
    halves = set(parts)
    if "" in halves:
        return None, None, None
    last, first = operator.itemgetter(-1), operator.itemgetter(0)
    junctions = set(map(operator.add, map(last, parts[0::2]), map(first, parts[1::2])))
    return halves, junctions, parts


def _merge_ids(t2i: dict[str, int], parts: list[str]):
    """(left, right, result) token ids per merge, int32 (n_merges,) each, for the compiled
    merge loop; None when some merge's result is not a token (then the Python loop runs)."""
    results = list(map(t2i.get, map(operator.add, parts[0::2], parts[1::2])))
    if None in results:
        return None
    ids = [np.array(list(map(t2i.__getitem__, parts[k::2])), dtype=np.int32) for k in (0, 1)]
    return ids[0], ids[1], np.array(results, dtype=np.int32)


def _find_bad_merge(v: Vocab, merges: list[str]) -> None:
    """Slow path: llama.cpp's split (first space after position 0), both parts must be tokens."""
    t2i = v.token_to_id
    junctions = set()
    for i, m in enumerate(merges):
        p = m.find(" ", 1)
        if p < 0 or m[:p] not in t2i or m[p + 1:] not in t2i:
            raise _err(v, f"{K}merges[{i}] = {m[:80]!r} does not name two tokens of the vocabulary")
        junctions.add(m[p - 1] + m[p + 1])
    v.junctions = junctions


def _check_byte_tokens(v: Vocab) -> None:
    v._byte_values = {}
    for i in np.flatnonzero(np.asarray(v.attrs) & ATTR_BYTE).tolist():
        m = _BYTE_TOKEN.fullmatch(v.tokens[i])
        if m is None:
            raise _err(v, f"{K}tokens[{i}] = {v.tokens[i][:40]!r} has type BYTE but is not "
                          f"of the form <0xHH>")
        v._byte_values[i] = int(m.group(1), 16)


def _int_value(v: Vocab, md: dict, key: str):
    val = md.get(key)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int):
        raise _err(v, f"{key} must be an integer, not {type(val).__name__} ({val!r})")
    return val


def _read_special_ids(v: Vocab, md: dict) -> None:
    n = len(v.tokens)
    defaults = DEFAULT_IDS[v.model]
    for attr, key in SPECIAL_KEYS.items():
        tid = defaults.get(attr)
        if tid is not None and tid >= n:
            tid = None  # llama.cpp disables a default that is out of range
        given = _int_value(v, md, K + key)
        if given is None and attr in OLD_FIM_KEYS:
            given = _int_value(v, md, K + OLD_FIM_KEYS[attr])
        if given in NO_TOKEN:
            given = None  # converters write -1 for "none"; llama.cpp then keeps its default
        if given is not None:
            if not 0 <= given < n:
                raise _err(v, f"{K}{key} = {given} is outside the vocabulary (0..{n - 1})")
            tid = given
        setattr(v, attr, tid)


def _bool_value(v: Vocab, md: dict, key: str, default: bool) -> bool:
    val = md.get(key, default)
    if not isinstance(val, bool):
        raise _err(v, f"{key} must be a boolean, not {type(val).__name__} ({val!r})")
    return val


def _read_flags(v: Vocab, md: dict) -> None:
    spm, wpm, bpe = v.kind == "spm", v.kind == "wpm", v.kind == "bpe"
    llama3 = bpe and v.pre in ("llama-bpe", "llama3", "llama-v3")
    v.add_space_prefix = _bool_value(v, md, K + "add_space_prefix", spm)
    v.add_bos = _bool_value(v, md, K + "add_bos_token", spm or wpm or llama3)
    v.add_eos = _bool_value(v, md, K + "add_eos_token", False)
    if v.pre == "gemma4":
        v.add_bos = True  # llama.cpp forces it for Gemma 4
    v.escape_whitespaces = v.pre == "gemma4"
    v.ignore_merges = llama3
    v.lowercase = _bool_value(v, md, K + "normalizer.lowercase", True)
    v.strip_accents = _bool_value(v, md, K + "normalizer.strip_accents", v.lowercase)
    if v.add_bos and v.bos_id is None:
        raise _err(v, f"{K}add_bos_token is true, but {K}bos_token_id is not set")
    if v.add_eos and v.eos_id is None:
        raise _err(v, f"{K}add_eos_token is true, but {K}eos_token_id is not set")


def _fix_up_specials(v: Vocab, md: dict) -> None:
    """Text-based fix-ups: control-looking tokens, the EOG set, per-model strip rules."""
    t2i, attrs = v.token_to_id, v.attrs
    for attr, texts in AUTO_IDS.items():
        if getattr(v, attr) is None:
            found = next((t2i[t] for t in texts if t in t2i), None)
            if found is not None:
                setattr(v, attr, found)
                attrs[found] |= ATTR_CONTROL
    eog = {i for i in (v.fim_pad_id, v.fim_rep_id, v.fim_sep_id) if i is not None}
    for t in EOG_TEXTS:
        if t in t2i:
            eog.add(t2i[t])
            attrs[t2i[t]] |= ATTR_CONTROL
    for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        if t in t2i:
            attrs[t2i[t]] = ATTR_USER_DEFINED
    eog |= {i for i in (v.eos_id, v.eot_id, v.eom_id) if i is not None}
    _drop_eog_exceptions(v, eog)
    v.eog_ids = eog
    _strip_attrs(v, md)


def _drop_eog_exceptions(v: Vocab, eog: set[int]) -> None:
    texts = {v.tokens[i]: i for i in eog}
    if "<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                               or ("<|calls|>" in texts and "<|flush|>" in texts)
                               or ("<|call|>" in texts and "<|flush|>" in texts)):
        eog.discard(texts["<|end|>"])
        v.attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(texts["</s>"])
        v.attrs[texts["</s>"]] = ATTR_NORMAL


def _strip_attrs(v: Vocab, md: dict) -> None:
    name = md.get("general.name")
    name = name.lower() if isinstance(name, str) else ""
    if "phi-3" in name or "phi3" in name:
        t2i = v.token_to_id
        for i, a in enumerate(v.attrs):
            if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN):
                v.attrs[i] |= ATTR_RSTRIP
        if "</s>" in t2i:
            v.attrs[t2i["</s>"]] |= ATTR_RSTRIP
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in t2i:
                v.attrs[t2i[t]] &= ~ATTR_RSTRIP


def _special_cache(v: Vocab) -> list[tuple[str, int, int]]:
    mask = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
    ids = np.flatnonzero(np.asarray(v.attrs) & mask).tolist()
    ids.sort(key=lambda i: (-len(v.tokens[i].encode("utf-8")), i))
    return [(v.tokens[i], i, v.attrs[i]) for i in ids]
