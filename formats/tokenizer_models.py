"""The three merge/match algorithms behind ember's tokenizers, one class each.

Each class turns one piece of plain text (special tokens already cut out by
formats/tokenizer.py) into token ids, exactly as llama.cpp's matching session
does (src/llama-vocab.cpp):

* `SpmModel`   SentencePiece BPE: code points merged pairwise, highest
               vocabulary score first (ties: leftmost), unmatched pieces as
               <0xXX> byte tokens. Used by `llama` vocabularies.
* `BpeModel`   byte-level BPE: pre-tokenized words, byte-encoded, merged by
               rank (ties: leftmost). Also gemma4, which is BPE over raw
               UTF-8 with SentencePiece-style <0xXX> byte fallback.
* `WpmModel`   WordPiece: BERT normalisation, then greedy longest match.

Speed without changing results. Both merge loops are a linked list of symbols
plus a heap of candidate pairs (O(n log n), never quadratic). Where
formats/_tokenize.pyx is built, the same loop runs in C over token ids (for
byte-level BPE whose merges all yield tokens, and for SentencePiece); the
Python loops below stay the reference the tests compare it with, and the
fallback. Either way they run on short, cached pieces:
* a BPE word is cached by its text (natural text repeats words);
* an SPM text is cut before a U+2581 ("▁", an escaped space) wherever no
  vocabulary token (SPM) or merge result (gemma4) holds the character
  before it followed by ▁. A merged symbol is always such a token or merge
  result, so no symbol and no candidate pair can straddle the cut: the
  pieces merge independently and give the very same ids, and each piece
  ("▁word") is cached like a BPE word.
* a long piece (CJK runs, long identifiers, text without spaces) is cut
  further between two symbols x|y when no token (SPM) or merge junction
  (BPE: the last char of a merge's left part followed by the first of its
  right part) is "xy": every merged symbol's adjacent-character pairs are
  junctions of the merges that built it, so again nothing can straddle.
"""
from __future__ import annotations

import heapq
import unicodedata

import numpy as np
import regex

from ember.formats.tokenizer_pretok import WS, PreTokenizer

SPACE_ESC = "\u2581"   # SentencePiece's visible space "▁"
CACHE_LIMIT = 1 << 17  # cached words per tokenizer before the cache is cleared
LONG_PIECE = 24        # pieces longer than this are cut at non-junctions before merging
MAX_SPM_PAIRS = 1 << 20  # token splits above which SentencePiece stays on the Python loop

# ---------------------------------------------------------------------------
# GPT-2 byte <-> unicode mapping
# ---------------------------------------------------------------------------


def _byte_to_unicode() -> list[str]:
    """Printable bytes stand for themselves; the other 68 move to U+0100 upwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


BYTE_TO_UNICODE = _byte_to_unicode()                       # (256,) byte -> 1-char str
UNICODE_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}
# latin-1 decoding maps byte b to chr(b); this table then maps chr(b) to its stand-in.
_BYTE_ENCODE = str.maketrans({chr(b): c for b, c in enumerate(BYTE_TO_UNICODE)})


def byte_encode(word: str) -> str:
    return word.encode("utf-8").decode("latin-1").translate(_BYTE_ENCODE)


try:  # the compiled merge loop (formats/_tokenize.pyx); the Python one is the reference
    from ember.formats import _tokenize
except ImportError:  # not built: every path below still works, only slower
    _tokenize = None


def compiled_merger(token_to_id: dict[str, int], merge_ids):
    """(PairTable, byte -> token id (256,) int32) when byte-level BPE can merge over ids in C:
    the extension is built, every merge result is a token (merge_ids), every byte too."""
    if _tokenize is None or merge_ids is None:
        return None
    byte_tok = [token_to_id.get(c) for c in BYTE_TO_UNICODE]
    if None in byte_tok:
        return None
    return _tokenize.PairTable(*merge_ids), np.array(byte_tok, dtype=np.int32)


def compiled_spm(tokens: list[str], token_to_id: dict[str, int], scores: list[float]):
    """(PairTable, char -> symbol id, extra chars) so SentencePiece merges run in C.

    Symbols are tokens or single characters, so a pair can merge exactly when some
    token splits into those two: one table entry per such split, ranked by the
    token's score (dense: equal scores share a rank, the loop then takes the leftmost).
    Characters that are no token get ids from n_vocab up."""
    if _tokenize is None:
        return None
    n = len(tokens)
    extra: dict[str, int] = {}
    left, right, merged = [], [], []
    t2i = token_to_id
    for tid, t in enumerate(tokens):
        for j in range(1, len(t)):
            a, b = t[:j], t[j:]
            ia, ib = t2i.get(a), t2i.get(b)
            if ia is None:
                if j != 1:
                    continue
                ia = extra.setdefault(a, n + len(extra))
            if ib is None:
                if j != len(t) - 1:
                    continue
                ib = extra.setdefault(b, n + len(extra))
            left.append(ia)
            right.append(ib)
            merged.append(tid)
    if len(left) > MAX_SPM_PAIRS:
        return None   # 32 bytes of table per pair: keep big vocabularies on the Python loop
    # dense rank of -score: the best score is rank 0
    _, rank_of = np.unique(-np.asarray(scores, dtype=np.float32), return_inverse=True)
    merged_a = np.array(merged, dtype=np.int32)
    table = _tokenize.PairTable(np.array(left, dtype=np.int32), np.array(right, dtype=np.int32),
                                merged_a, rank_of.astype(np.int32)[merged_a])
    char_ids = {t: i for t, i in t2i.items() if len(t) == 1} | extra
    return table, char_ids, list(extra)


# ---------------------------------------------------------------------------
# Shared: safe cut points before "▁" and a bounded word cache
# ---------------------------------------------------------------------------

def space_splitter(chars_before_space: set[str]):
    """A compiled regex cutting before every ▁ not preceded by one of `chars_before_space`."""
    if chars_before_space:
        cls = "".join(regex.escape(c) for c in sorted(chars_before_space))
        return regex.compile(f"(?<![{cls}])(?={SPACE_ESC})")
    return regex.compile(f"(?={SPACE_ESC})")


class _WordCache(dict):
    def put(self, key, ids):
        if len(self) >= CACHE_LIMIT:
            self.clear()
        self[key] = ids
        return ids


def cut_at_non_junctions(piece: str, junctions: set[str]) -> list[str]:
    """Cut between every two characters whose pair no merged symbol can contain."""
    out, start = [], 0
    for i in range(1, len(piece)):
        if piece[i - 1:i + 1] not in junctions:
            out.append(piece[start:i])
            start = i
    out.append(piece[start:])
    return out


def token_pairs(tokens: list[str]) -> set[str]:
    """Every adjacent-character pair inside any token (numpy over one joined string)."""
    joined = "\x00".join(tokens)
    if joined.count("\x00") != len(tokens) - 1:   # a token holds NUL itself: plain loop
        return {t[i:i + 2] for t in tokens for i in range(len(t) - 1)}
    cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)  # (n_chars,)
    codes = (cps[:-1] << np.uint64(21)) | cps[1:]   # code points fit in 21 bits
    inside = (cps[:-1] != 0) & (cps[1:] != 0)       # pairs not touching a separator
    return {chr(c >> 21) + chr(c & 0x1FFFFF) for c in np.unique(codes[inside]).tolist()}


# ---------------------------------------------------------------------------
# SentencePiece (llama)
# ---------------------------------------------------------------------------

class SpmModel:
    def __init__(self, token_to_id: dict[str, int], scores: list[float],
                 byte_ids: list[int | None], splitter, unk_id: int | None = None, compiled=None):
        self.token_to_id = token_to_id
        self.scores = scores          # (n_vocab,) float32 values as Python floats
        self.byte_ids = byte_ids      # (256,) byte -> id of <0xXX> (or the 1-byte token), None
        self.unk_id = unk_id
        self.compiled = compiled      # (PairTable, char -> id, extra chars) or None
        self.n_vocab = len(scores)
        self.splitter = splitter
        self.cache = _WordCache()
        self.pairs = token_pairs(list(token_to_id))   # junction candidates for long pieces
        self.piece_cache = _WordCache()

    def encode(self, text: str, out: list[int]) -> None:
        """text: already space-escaped (' ' -> '▁', prefix added by the caller)."""
        cache = self.cache
        for piece in self.splitter.split(text):
            ids = cache.get(piece)
            if ids is None:
                ids = cache.put(piece, self._encode_piece(piece))
            out.extend(ids)

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        if self.compiled is not None:
            return self._merge_compiled(piece)
        if len(piece) <= LONG_PIECE:
            return self._merge(piece)
        ids: list[int] = []
        cache = self.piece_cache
        for part in cut_at_non_junctions(piece, self.pairs):
            got = cache.get(part)
            if got is None:
                got = cache.put(part, self._merge(part))
            ids.extend(got)
        return tuple(ids)

    def _merge_compiled(self, piece: str) -> tuple[int, ...]:
        table, char_ids, extra = self.compiled
        get, n = char_ids.get, self.n_vocab
        # a character with no id at all travels as -2 - code point (never in the table)
        start = np.array([get(c, -2 - ord(c)) for c in piece], dtype=np.int32)
        ids: list[int] = []
        for i in table.merge(start):
            if 0 <= i < n:
                ids.append(i)
            else:
                ids.extend(self._bytes_of(extra[i - n] if i >= n else chr(-2 - i)))
        return tuple(ids)

    def _merge(self, piece: str) -> tuple[int, ...]:
        ids: list[int] = []
        for sym in spm_merge(piece, self.token_to_id, self.scores):
            tid = self.token_to_id.get(sym)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._bytes_of(sym))
        return tuple(ids)

    def _bytes_of(self, sym: str) -> list[int]:
        # llama.cpp throws here when a byte has no token; a daemon must not, so such
        # a byte becomes <unk> (dropped if there is none). Byte-fallback vocabularies,
        # every one we know, never get here.
        ids = [self.byte_ids[b] for b in sym.encode("utf-8")]
        if None in ids:
            ids = [self.unk_id if i is None else i for i in ids]
        return [i for i in ids if i is not None]


def spm_merge(text: str, token_to_id: dict[str, int], scores: list[float]) -> list[str]:
    """Symbols left after merging pairs by best score (ties: leftmost), in order."""
    n = len(text)
    if n < 2:
        return [text] if n else []
    get, push, pop = token_to_id.get, heapq.heappush, heapq.heappop
    sym = list(text)                      # (n,) symbol text; "" once merged away
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        tid = get(text[i:i + 2])
        if tid is not None:
            heap.append((-scores[tid], i, i + 1, 2))
    heapq.heapify(heap)
    while heap:
        _, left, right, size = pop(heap)
        a, b = sym[left], sym[right]
        # stale: one side was merged away, or grew since the pair was queued
        if not a or not b or len(a) + len(b) != size:
            continue
        ab = sym[left] = a + b
        sym[right] = ""
        r2 = nxt[right]
        nxt[left] = r2
        if r2 >= 0:
            prv[r2] = left
            t = ab + sym[r2]
            tid = get(t)
            if tid is not None:
                push(heap, (-scores[tid], left, r2, len(t)))
        l0 = prv[left]
        if l0 >= 0:
            t = sym[l0] + ab
            tid = get(t)
            if tid is not None:
                push(heap, (-scores[tid], l0, left, len(t)))
    out, i = [], 0
    while i != -1:
        out.append(sym[i])
        i = nxt[i]
    return out


# ---------------------------------------------------------------------------
# Byte-level BPE (gpt2) and SentencePiece-style BPE (gemma4)
# ---------------------------------------------------------------------------

class BpeModel:
    def __init__(self, token_to_id: dict[str, int], ranks: dict[str, int], pre: PreTokenizer,
                 *, byte_level: bool, ignore_merges: bool, newline_words: bool,
                 byte_ids: list[int | None], junctions: set[str], splitter=None, compiled=None):
        self.token_to_id = token_to_id
        self.ranks = ranks                # "left right" -> rank (first occurrence wins)
        self.pre = pre
        self.byte_level = byte_level      # GPT-2 byte encoding (False: raw UTF-8, gemma4)
        self.ignore_merges = ignore_merges
        self.newline_words = newline_words  # gemma4: a run of newlines is one token if it exists
        self.byte_ids = byte_ids          # (256,) fallback id per byte, None where absent
        self.splitter = splitter          # gemma4: cut lines before "▁" (see module note)
        self.junctions = junctions        # {left[-1] + right[0]} over all merges
        self.compiled = compiled          # (PairTable, byte -> id) or None: see compiled_merger
        self.cache = _WordCache()
        self.piece_cache = _WordCache()   # merged pieces of long words (already encoded text)

    def encode(self, text: str, out: list[int]) -> None:
        cache, word_ids = self.cache, self._word_ids
        for word in self._words(text):
            ids = cache.get(word)
            if ids is None:
                ids = cache.put(word, word_ids(word))
            out.extend(ids)

    def _words(self, text: str) -> list[str]:
        words = self.pre.split(text)
        if self.splitter is None:
            return words
        return [p for w in words for p in (self.splitter.split(w) if w[0] != "\n" else (w,)) if p]

    def _word_ids(self, word: str) -> tuple[int, ...]:
        if self.compiled is not None:
            return self._word_ids_compiled(word)
        sym = byte_encode(word) if self.byte_level else word
        tid = self.token_to_id.get(sym)
        if tid is not None and (self.ignore_merges or (self.newline_words and sym[0] == "\n")):
            return (tid,)
        if len(sym) <= LONG_PIECE:
            return self._merge(sym)
        ids: list[int] = []
        cache = self.piece_cache
        for part in cut_at_non_junctions(sym, self.junctions):
            got = cache.get(part)
            if got is None:
                got = cache.put(part, self._merge(part))
            ids.extend(got)
        return tuple(ids)

    def _word_ids_compiled(self, word: str) -> tuple[int, ...]:
        """The same ids as the Python path, with every symbol a token id from the start."""
        if self.ignore_merges:
            tid = self.token_to_id.get(byte_encode(word))
            if tid is not None:
                return (tid,)
        table, byte_tok = self.compiled
        return tuple(table.merge(byte_tok[np.frombuffer(word.encode("utf-8"), dtype=np.uint8)]))

    def _merge(self, sym: str) -> tuple[int, ...]:
        ids: list[int] = []
        for s in bpe_merge(sym, self.ranks):
            tid = self.token_to_id.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._fallback(s))
        return tuple(ids)

    def _fallback(self, s: str) -> list[int]:
        # llama.cpp looks each UTF-8 byte up alone and silently drops misses:
        # byte-level vocabularies find only ASCII bytes this way.
        return [i for i in (self.byte_ids[b] for b in s.encode("utf-8")) if i is not None]


def bpe_merge(word: str, ranks: dict[str, int]) -> list[str]:
    """Symbols left after merging pairs by lowest rank (ties: leftmost), in order."""
    n = len(word)
    if n < 2:
        return [word] if n else []
    get, push, pop = ranks.get, heapq.heappush, heapq.heappop
    sym = list(word)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r = get(word[i] + " " + word[i + 1])
        if r is not None:
            heap.append((r, i, i + 1, word[i:i + 2]))
    heapq.heapify(heap)
    while heap:
        _, left, right, text = pop(heap)
        a, b = sym[left], sym[right]
        if not a or not b or a + b != text:
            continue  # outdated pair
        sym[left], sym[right] = text, ""
        r2 = nxt[right]
        nxt[left] = r2
        if r2 >= 0:
            prv[r2] = left
            c = sym[r2]
            r = get(text + " " + c)
            if r is not None:
                push(heap, (r, left, r2, text + c))
        l0 = prv[left]
        if l0 >= 0:
            c = sym[l0]
            r = get(c + " " + text)
            if r is not None:
                push(heap, (r, l0, left, c + text))
    out, i = [], 0
    while i != -1:
        out.append(sym[i])
        i = nxt[i]
    return out


# ---------------------------------------------------------------------------
# WordPiece (bert)
# ---------------------------------------------------------------------------

_IS_WS = regex.compile(f"[{WS}]")
_IS_CONTROL = regex.compile(r"\p{C}")
_IS_ACCENT = regex.compile(r"\p{M}")
_IS_PUNCT = regex.compile(r"\p{P}")
_IS_SYMBOL = regex.compile(r"\p{S}")

# kinds of code point for WordPiece's normaliser
_SKIP, _BREAK, _ALONE, _PART = range(4)


def _is_chinese(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
            or 0x2B920 <= cp <= 0x2CEAF  # sic: HF's range, as llama.cpp copies it
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WpmModel:
    def __init__(self, token_to_id: dict[str, int], unk_id: int | None, max_token_chars: int,
                 *, lowercase: bool, strip_accents: bool):
        self.token_to_id = token_to_id
        self.unk_id = unk_id
        self.max_len = max_token_chars
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self._kinds: dict[str, tuple[int, str]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        for word in self._words(text):
            ids = self._match(SPACE_ESC + word)
            if ids:
                out.extend(ids)
            elif self.unk_id is not None:
                out.append(self.unk_id)

    def _match(self, word: str) -> list[int]:
        """Greedy longest match from the left; any unmatched spot discards the word."""
        ids, i, n = [], 0, len(word)
        while i < n:
            for j in range(min(n, i + self.max_len), i, -1):
                tid = self.token_to_id.get(word[i:j])
                if tid is not None:
                    ids.append(tid)
                    i = j
                    break
            else:
                return []
        return ids

    def _words(self, text: str) -> list[str]:
        words, cur = [], []
        for ch in text:
            kind, s = self._kind(ch)
            if kind == _SKIP:
                continue
            if kind == _PART:
                cur.append(s)
                continue
            if cur:
                words.append("".join(cur))
                cur = []
            if kind == _ALONE:
                words.append(s)
        if cur:
            words.append("".join(cur))
        return words

    def _kind(self, ch: str) -> tuple[int, str]:
        k = self._kinds.get(ch)
        if k is None:
            k = self._kinds[ch] = self._classify(ch)
        return k

    def _classify(self, ch: str) -> tuple[int, str]:
        if self.strip_accents:
            # llama.cpp keeps only the first code point of each NFD decomposition
            ch = unicodedata.normalize("NFD", ch)[0]
        cp = ord(ch)
        if _IS_WS.match(ch):
            return _BREAK, ""
        if cp == 0 or cp == 0xFFFD or _IS_CONTROL.match(ch):
            return _SKIP, ""
        if self.strip_accents and _IS_ACCENT.match(ch):
            return _SKIP, ""
        s = ch.lower()[0] if self.lowercase else ch
        if _IS_PUNCT.match(ch) or (cp < 0x7F and _IS_SYMBOL.match(ch)) or _is_chinese(cp):
            return _ALONE, s
        return _PART, s
