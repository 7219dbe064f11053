"""BPE pre-tokenizers: split text into words before merges, exactly as llama.cpp does.

llama.cpp picks a list of regexes by `tokenizer.ggml.pre` and applies them
one after another: every regex re-splits every current fragment into its
matches *and* the unmatched gaps between them (a gap is a word too). We do
the same with the `regex` package, whose Unicode tables are the ones
llama.cpp generated its own character classes from (gen-unicode-data.py
classifies every code point with `regex`'s \\p{L}, \\p{N}, ... and \\s).

Three ways llama.cpp runs a pattern, and why one `regex` pattern reproduces each:

* hand-written splitters for the GPT-2, Llama-3, Qwen2 and Qwen3.5 patterns
  (picked by the exact regex string): they implement the pattern literally
  with llama.cpp's class table, so the pattern itself (with \\s spelled as
  that table's whitespace set) gives the same words; a digit-grouping
  splitter (afmoe, tiny_aya) is reproduced by `_digit_groups`;
* std::regex over a "collapsed" text (every non-ASCII code point replaced by
  one byte standing for its category, \\p{X} rewritten to that byte plus the
  ASCII members): equivalent to matching the real classes, since the
  collapsed classes keep exactly the members of the real ones. The collapse
  knows only N, L, P, M, S: \\p{Lu}, \\p{Ll}, ... all become "any letter";
* std::wregex for patterns with no \\p{...}: code points as they are, except
  that non-ASCII whitespace is replaced by U+000B first. That replacement
  is visible (a class like [　-。] then misses U+3000), so such patterns
  (`fold_ws`) are matched against a folded copy and cut from the original.

`translate` applies these rules to llama.cpp's regexes as they are written in
its source (formats/tokenizer_pretok_table.py keeps them verbatim): \\s, \\S and
\\d become std::regex's C-locale classes, and `$` ("end of this fragment"
only) becomes \\Z. Checked against llama.cpp's own unicode_regex_split
(tests/formats/test_tokenizer_pretok.py).
"""
from __future__ import annotations

import regex

from ember.formats.tokenizer_pretok_table import NAMES, REFUSED, TYPES, Pre

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
# Patterns whose alternatives match every character: findall alone gives all words.
_TOTAL = {GPT2, LLAMA3, QWEN2, QWEN35}

# ---------------------------------------------------------------------------
# llama.cpp's regexes -> Python patterns
# ---------------------------------------------------------------------------

# Exact regex strings llama.cpp hands to its own splitters instead of std::regex
# (unicode_regex_split_custom); each maps to the pattern that splits the same way.
_CUSTOM = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)": GPT2,
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": LLAMA3,
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": LLAMA3,
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": QWEN2,
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": QWEN35,
}
# Digit grouping (afmoe, tiny_aya): a hand-written splitter, see _digit_groups.
DIGIT_GROUPS = "digit-groups"
_DIGIT_GROUP_REGEXES = {r"\p{AFMoE_digits}", r"\d{1,3}(?=(?:\d{3})*\b)"}
# The categories that make llama.cpp match on its collapsed text (one byte per category).
_COLLAPSING = regex.compile(r"\\p\{(?:N|L|P|M|S|Lu|Ll|Lt|Lm|Lo)\}")


def translate(rx: str) -> tuple[str, bool]:
    """A llama.cpp regex -> (Python `regex` pattern with the same matches, fold_ws).

    Collapsed patterns (any \\p{X}) see one category byte per non-ASCII code point,
    so \\p{Lu}, \\p{Ll}, ... all mean \\p{L}; \\s / \\S / \\d are std::regex's C-locale
    classes (non-ASCII whitespace reaches them as U+000B), written out here."""
    if rx in _CUSTOM:
        return _CUSTOM[rx], False
    if rx in _DIGIT_GROUP_REGEXES:
        return DIGIT_GROUPS, False
    collapsed = bool(_COLLAPSING.search(rx))
    out, inside, i = [], False, 0
    while i < len(rx):
        c = rx[i]
        if c == "\\" and i + 1 < len(rx):
            out.append(_escape(rx, i, inside, collapsed))
            i += len(_ESCAPE.match(rx, i).group(0))
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside and out[-1] not in ("[", "[^"):
            inside = False
        elif c == "^" and inside and out[-1] == "[":
            out[-1] = "[^"
            i += 1
            continue
        elif c == "$" and not inside:
            c = "\\Z"   # std::regex's $ is the end of the fragment only
        out.append(c)
        i += 1
    return "".join(out), not collapsed


_ESCAPE = regex.compile(r"\\(?:p\{\w+\}|.)", regex.S)


def _escape(rx: str, i: int, inside: bool, collapsed: bool) -> str:
    esc = _ESCAPE.match(rx, i).group(0)
    if esc == "\\s":
        return WS if inside else _S
    if esc == "\\S" and not inside:
        return _NS
    if esc == "\\d":
        return "0-9" if inside else "[0-9]"
    if esc in ("\\w", "\\W", "\\b", "\\B", "\\D", "\\S"):
        raise ValueError(f"llama.cpp regex {rx!r}: {esc} has no translation")
    if collapsed and esc in (r"\p{Lu}", r"\p{Ll}", r"\p{Lt}", r"\p{Lm}", r"\p{Lo}"):
        return r"\p{L}"
    return esc


# ---------------------------------------------------------------------------
# The table: every name llama.cpp knows (formats/tokenizer_pretok_table.py)
# ---------------------------------------------------------------------------

def entry(name: str) -> Pre:
    """The table's entry for a `tokenizer.ggml.pre` name; KeyError for unknown names."""
    return NAMES[name]


def refusal(name: str) -> str | None:
    """Why ember cannot tokenize like llama.cpp for this known name, or None when it can."""
    return REFUSED.get(NAMES[name].type)


def supported() -> list[str]:
    return sorted(n for n in NAMES if refusal(n) is None)


# ---------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------

class PreTokenizer:
    """A compiled pre-tokenizer: `split(text) -> list[str]` of words, in order.

    Built from a name in the table; a refused or unknown name is a ValueError
    (formats/tokenizer_vocab.py checks names first and reports them to the user)."""

    def __init__(self, name: str):
        reason = refusal(name)
        if reason is not None:
            raise ValueError(f"pre-tokenizer {name!r}: {reason}")
        self.name = name
        self.type = NAMES[name].type
        steps = [translate(rx) for rx in TYPES[self.type]]
        self._steps = [(None if p == DIGIT_GROUPS else regex.compile(p), fold, p in _TOTAL)
                       for p, fold in steps]

    def split(self, text: str) -> list[str]:
        if len(self._steps) == 1 and self._steps[0][2]:
            return self._steps[0][0].findall(text)
        frags = [text]
        for rx, fold, _ in self._steps:
            frags = _digit_groups(frags) if rx is None else _resplit(frags, rx, fold)
        return frags


def _cut(frag: str, cuts, out: list[str]) -> None:
    """Append the non-empty pieces of frag between successive cut positions (ascending)."""
    pos = 0
    for cut in cuts:
        if cut > pos:
            out.append(frag[pos:cut])
            pos = cut
    if pos < len(frag):
        out.append(frag[pos:])


def _resplit(frags: list[str], rx, fold: bool) -> list[str]:
    """Each fragment becomes its matches and the gaps between them."""
    out: list[str] = []
    for frag in frags:
        probe = frag.translate(FOLD_WS) if fold else frag
        _cut(frag, [i for m in rx.finditer(probe) for i in m.span()], out)
    return out


_NUMBER_RUN = regex.compile(r"\p{N}+")


def _digit_groups(frags: list[str]) -> list[str]:
    """llama.cpp's digit splitter (afmoe, tiny_aya): a run of n numbers is cut after its
    first n % 3, then every 3. The text before a run stays on its first group
    ("ab1234" -> "ab1", "234"), as llama.cpp emits it; later regexes cut it off."""
    out: list[str] = []
    for frag in frags:
        _cut(frag, [cut for m in _NUMBER_RUN.finditer(frag) for cut in _group_ends(*m.span())], out)
    return out


def _group_ends(start: int, end: int) -> range:
    """Where a run of numbers [start, end) is cut: after n % 3, then every 3 (n % 3 == 0:
    the first group is 3)."""
    return range(start + ((end - start) % 3 or 3), end + 1, 3)
