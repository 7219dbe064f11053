"""BPE pre-tokenizers: split text into words before merges, exactly as llama.cpp does.

llama.cpp picks a list of regexes by `tokenizer.ggml.pre` and applies them
one after another: every regex re-splits every current fragment into its
matches *and* the unmatched gaps between them (a gap is a word too). We do
the same with the `regex` package, whose Unicode tables are the ones
llama.cpp generated its own character classes from (gen-unicode-data.py
classifies every code point with `regex`'s \\p{L}, \\p{N}, ... and \\s).

Three ways llama.cpp runs a pattern, and why one `regex` pattern reproduces each:

* hand-written splitters for the GPT-2 and Llama-3 patterns: they implement
  the pattern literally with llama.cpp's class table, so the pattern itself
  (with \\s spelled as that table's whitespace set) gives the same words;
* std::regex over a "collapsed" text (every non-ASCII code point replaced by
  one byte standing for its category, \\p{X} rewritten to that byte plus the
  ASCII members): equivalent to matching the real classes, since the
  collapsed classes keep exactly the members of the real ones;
* std::wregex for patterns with no \\p{...}: code points as they are, except
  that non-ASCII whitespace is replaced by U+000B first. That replacement
  is visible (a class like [　-。] then misses U+3000), so such patterns
  (`fold_ws`) are matched against a folded copy and cut from the original.

`$` in std::regex means "end of this fragment" only, so it is written \\Z.
"""
from __future__ import annotations

import regex

# ---------------------------------------------------------------------------
# Character classes
# ---------------------------------------------------------------------------

# llama.cpp's whitespace table is `regex`'s \s: Unicode White_Space.
WS = "\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
_S = f"[{WS}]"
_NS = f"[^{WS}]"
_NON_ASCII_WS = "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
                "\u2028\u2029\u202f\u205f\u3000"
FOLD_WS = str.maketrans({c: "\x0b" for c in _NON_ASCII_WS})

_CONTRACTIONS_CI = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)  (+ \s+, as llama.cpp's splitter)
GPT2 = (f"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{{L}}+| ?\\p{{N}}+| ?[^{WS}\\p{{L}}\\p{{N}}]+"
        f"|{_S}+(?!{_NS})|{_S}+")


def _llama3_like(digits: str, letters: str = "\\p{L}", other_extra: str = "") -> str:
    return (f"{_CONTRACTIONS_CI}|[^\\r\\n\\p{{L}}\\p{{N}}]?{letters}+|{digits}"
            f"| ?[^{WS}\\p{{L}}{other_extra}\\p{{N}}]+[\\r\\n]*|{_S}*[\\r\\n]+|{_S}+(?!{_NS})|{_S}+")


LLAMA3 = _llama3_like("\\p{N}{1,3}")
QWEN2 = _llama3_like("\\p{N}")
QWEN35 = _llama3_like("\\p{N}", letters="[\\p{L}\\p{M}]", other_extra="\\p{M}")

# deepseek-llm's letter class, as llama.cpp lists it (no \p{...}: a wregex pattern).
_DEEPSEEK_LETTERS = (  # \u escapes: several are NFC-unstable singletons (U+1F7D, U+2126, ...)
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
    "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-"
    "\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00"
    "-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
    "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
    "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
    "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13"
    "-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
_CJK = "[一-龥ࠀ-一가-퟿]+"

# ---------------------------------------------------------------------------
# Presets: pre name -> [(pattern, fold_ws)]
# ---------------------------------------------------------------------------

_P = (lambda pattern, fold_ws=False: (pattern, fold_ws))

PRESETS: dict[str, list[tuple[str, bool]]] = {
    "llama-bpe": [_P(LLAMA3)],
    "qwen2": [_P(QWEN2)],
    "qwen35": [_P(QWEN35)],
    "gpt-2": [_P(GPT2)],
    "mpt": [_P(GPT2)],
    "deepseek-llm": [
        _P("[\\r\\n]", True),
        _P(f"{_S}?[{_DEEPSEEK_LETTERS}]+", True),
        _P(f"{_S}?[!-/:-~！-／：-～‘-‟　-。]+", True),
        _P(f"{_S}+\\Z", True),
        _P(_CJK, True),
        _P("\\p{N}+"),
    ],
    "deepseek-coder": [
        _P("[\\r\\n]", True),
        _P(f"{_S}?\\p{{L}}+"),
        _P(f"{_S}?\\p{{P}}+"),
        _P(_CJK, True),
        _P("\\p{N}"),
    ],
    "falcon": [_P("[\\p{P}\\$\\+<=>\\^~\\|`]+"), _P(GPT2), _P("[0-9][0-9][0-9]", True)],
    "starcoder": [_P("\\p{N}"), _P(GPT2)],
    "refact": [_P("\\p{N}"), _P(GPT2)],
    "command-r": [_P("\\p{N}"), _P(GPT2)],
    "default": [_P("[\\p{P}\\$\\+<=>\\^~\\|]+"), _P(GPT2), _P("\\p{N}+"), _P("[0-9][0-9][0-9]", True)],
    # gemma4 escapes spaces to U+2581 first and only cuts at newlines.
    "gemma4": [_P("[^\\n]+|[\\n]+", True)],
}
# Other spellings llama.cpp maps onto the same pre-tokenizer.
ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "deepseek-r1-qwen": "qwen2",
           "phi-2": "gpt-2"}
# Patterns whose alternatives match every character: findall alone gives all words.
_TOTAL = {GPT2, LLAMA3, QWEN2, QWEN35}


def supported() -> list[str]:
    return sorted(set(PRESETS) | set(ALIASES))


# ---------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------

class PreTokenizer:
    """A compiled pre-tokenizer: `split(text) -> list[str]` of words, in order."""

    def __init__(self, name: str):
        self.name = ALIASES.get(name, name)
        steps = PRESETS[self.name]
        self._steps = [(regex.compile(p), fold, p in _TOTAL) for p, fold in steps]

    def split(self, text: str) -> list[str]:
        if len(self._steps) == 1 and self._steps[0][2]:
            return self._steps[0][0].findall(text)
        frags = [text]
        for rx, fold, _ in self._steps:
            frags = _resplit(frags, rx, fold)
        return frags


def _resplit(frags: list[str], rx, fold: bool) -> list[str]:
    """Each fragment becomes its matches and the gaps between them."""
    out: list[str] = []
    for frag in frags:
        probe = frag.translate(FOLD_WS) if fold else frag
        pos = 0
        for m in rx.finditer(probe):
            start, end = m.span()
            if start > pos:
                out.append(frag[pos:start])
            if end > start:
                out.append(frag[start:end])
            pos = end
        if pos < len(frag):
            out.append(frag[pos:])
    return out
