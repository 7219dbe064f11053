"""Tokenizers built from a GGUF file's `tokenizer.*` metadata alone, matching llama.cpp.

Stable surface (the engine calls these):

    tok = Tokenizer.from_gguf(path_or_GGUFFile)
    tok.encode(text, add_special=False, parse_special=False) -> list[int]
    tok.decode(ids) -> str
    dec = tok.stream_decoder(); dec.feed(id) -> str; dec.flush() -> str
    tok.n_vocab, bos_id, eos_id, eot_id, pad_id, add_bos, add_eos,
    tok.is_eog(id), tok.token_to_piece(id) -> bytes

Data flow of `encode`, the same as llama.cpp's `llama_vocab::impl::tokenize`:

    text -> special-token partition -> [raw text | token id, ...]
         -> per raw fragment: SPM / BPE / WPM model (formats/tokenizer_models.py)
         -> ids, with BOS/EOS added when asked and the vocabulary says so

The partition cuts user-defined tokens out of the text always, and control
tokens only when `parse_special=True`, so plain user text can never smuggle
in a control token such as <|im_end|>.

Loading (formats/tokenizer_vocab.py) validates every array, id and byte token
before anything is built; a hostile or broken vocabulary is a TokenizerError
naming the key and the problem, never an IndexError.

Decoding joins token pieces as *bytes* (a byte-level token may hold half a
UTF-8 character) and decodes once; the stream decoder holds incomplete UTF-8
sequences until they complete, so it never emits a broken character.
Unlike llama.cpp's `detokenize` we never apply `clean_spaces` (it rewrites
" ," to ","): the engine needs decode to be the exact concatenation of what
the stream decoder emitted.
"""
from __future__ import annotations

import codecs
import operator
import os
from typing import Iterable

from ember.formats import gguf
from ember.formats.tokenizer_models import SPACE_ESC, UNICODE_TO_BYTE
from ember.formats.tokenizer_vocab import (ATTR_BYTE, ATTR_CONTROL, ATTR_LSTRIP, ATTR_NORMAL,
                                           ATTR_RSTRIP, ATTR_UNKNOWN, ATTR_USER_DEFINED,
                                           TokenizerError, Vocab, load_vocab)

__all__ = ["Tokenizer", "TokenizerError", "StreamDecoder"]

_C_SPACE = " \t\n\v\f\r"   # C isspace(): what llama.cpp's lstrip/rstrip remove


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary. Thread-safe for concurrent use."""

    # -- construction -------------------------------------------------------

    def __init__(self, vocab: Vocab):
        self._v = vocab
        self._model = vocab.build_model()
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})  # [special]
        self.n_vocab = len(vocab.tokens)
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self.eot_id = vocab.eot_id
        self.pad_id = vocab.pad_id
        self.unk_id = vocab.unk_id
        self.sep_id = vocab.sep_id
        self.add_bos = vocab.add_bos
        self.add_eos = vocab.add_eos
        self.model_name = vocab.model
        self.pre_name = vocab.pre
        self.eog_ids = frozenset(vocab.eog_ids)

    @classmethod
    def from_gguf(cls, source: "str | os.PathLike | gguf.GGUFFile") -> "Tokenizer":
        """Build from a path or an open GGUFFile (which stays open and unchanged)."""
        if isinstance(source, gguf.GGUFFile):
            return cls(load_vocab(source.metadata, source.metadata_types, source.path))
        with gguf.open(source) as f:
            return cls(load_vocab(f.metadata, f.metadata_types, f.path))

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model_name!r}, pre={self.pre_name!r}, "
                f"n_vocab={self.n_vocab})")

    # -- encode -------------------------------------------------------------

    def encode(self, text: str, add_special: bool = False, parse_special: bool = False,
               space_prefix: bool = True) -> list[int]:
        """Token ids of text. space_prefix=False tokenizes text as the continuation of
        earlier text: SentencePiece vocabularies then add no leading space."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode: text must be str, not {type(text).__name__}")
        text = _scrub_surrogates(text)
        frags = self._partition(text, parse_special) if text else []
        kind = self._v.kind
        if kind == "spm":
            return self._encode_spm(frags, add_special, space_prefix)
        out: list[int] = []
        if add_special and (self.add_bos or kind == "wpm"):
            out.append(self._need(self.bos_id, "BOS"))
        encode_raw = self._model.encode
        escape = self._v.escape_whitespaces
        for f in frags:
            if type(f) is int:
                out.append(f)
            else:
                encode_raw(f.replace(" ", SPACE_ESC) if escape else f, out)
        if add_special and kind == "wpm":
            out.append(self._need(self.sep_id, "SEP"))
        elif add_special and self.add_eos:
            out.append(self._need(self.eos_id, "EOS"))
        return out

    def _encode_spm(self, frags: list, add_special: bool, space_prefix: bool) -> list[int]:
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._need(self.bos_id, "BOS"))
        prev_special = True   # the first fragment gets the leading space too
        prefix = self._v.add_space_prefix and space_prefix
        for f in frags:
            if type(f) is int:
                out.append(f)
                prev_special = True
                continue
            if prefix and prev_special:
                f = " " + f
            self._model.encode(f.replace(" ", SPACE_ESC), out)
            prev_special = False
        if add_special and self.add_eos:
            out.append(self._need(self.eos_id, "EOS"))
        return out

    def _need(self, tid: int | None, what: str) -> int:
        if tid is None:
            raise TokenizerError(f"encode: the vocabulary asks for a {what} token but defines none")
        return tid

    def _partition(self, text: str, parse_special: bool) -> list:
        """[str | int]: special tokens cut out, longest first, like tokenizer_st_partition."""
        frags: list = [text]
        present = None
        for stext, sid, attr in self._v.special_cache:
            if not parse_special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            if present is None:
                present = set(text)  # cheap first-character filter for long lists
            if stext[0] not in present or stext not in text:
                continue
            frags = _cut(frags, stext, sid, attr)
        return frags

    # -- decode -------------------------------------------------------------

    def token_to_piece(self, tid: int, special: bool = False) -> bytes:
        """The bytes this token stands for (b"" for control tokens unless `special`)."""
        cache = self._pieces[bool(special)]
        p = cache.get(tid)
        if p is None:  # an unknown id is validated here, so the cache holds only good ones
            tid = self._check_id(tid)
            p = cache[tid] = self._piece(tid, special)
        return p

    def decode(self, ids: Iterable[int], special: bool = False, strip_space_prefix: bool = True) -> str:
        """Text of `ids`. Like llama.cpp, one leading space is dropped when the vocabulary
        adds one while encoding and the first token is text (`strip_space_prefix`)."""
        ids = list(ids)
        data = b"".join(self.token_to_piece(i, special) for i in ids)
        if strip_space_prefix and self._strips_first(ids, special) and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, special: bool = False, strip_space_prefix: bool = False) -> "StreamDecoder":
        """An incremental decoder. Generation continues a prompt, so by default no
        leading space is stripped; pass strip_space_prefix=True to match decode()."""
        return StreamDecoder(self, special, strip_space_prefix)

    def is_eog(self, tid: int) -> bool:
        """End of generation: EOS, EOT and the control tokens llama.cpp stops on."""
        return tid in self.eog_ids

    def is_control(self, tid: int) -> bool:
        return bool(self._v.attrs[self._check_id(tid)] & ATTR_CONTROL)

    def token_text(self, tid: int) -> str:
        """The vocabulary entry as stored (e.g. 'Ġhello', '▁hello', '<0x0A>')."""
        return self._v.tokens[self._check_id(tid)]

    def _strips_first(self, ids: list[int], special: bool) -> bool:
        # llama.cpp's detokenize passes lstrip=1 to the first token's piece only
        return self._v.add_space_prefix and bool(ids)

    def _check_id(self, tid: int) -> int:
        if type(tid) is not int:
            try:
                tid = operator.index(tid)   # numpy integers; not str or float
            except TypeError:
                raise TokenizerError(f"token id {tid!r} is not an integer") from None
        if not 0 <= tid < self.n_vocab:
            raise TokenizerError(f"token id {tid} out of range 0..{self.n_vocab - 1}")
        return tid

    def _piece(self, tid: int, special: bool) -> bytes:
        """llama.cpp's token_to_piece, per vocabulary kind and token attribute."""
        v = self._v
        attr, text = v.attrs[tid], v.tokens[tid]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL) and not special:
            return b""
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if v.kind == "bpe" and not v.escape_whitespaces:
                return _byte_decode(text)
            return text.replace(SPACE_ESC, " ").encode("utf-8")
        if attr & ATTR_BYTE:
            return bytes([v.byte_value(tid)])
        return b""


class StreamDecoder:
    """Feed ids one at a time; get text that never ends inside a UTF-8 sequence."""

    def __init__(self, tok: Tokenizer, special: bool, strip_space_prefix: bool):
        self._tok = tok
        self._special = special
        self._strip = strip_space_prefix
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tid: int) -> str:
        piece = self._tok.token_to_piece(tid, self._special)
        if self._first:
            self._first = False
            if self._strip and self._tok._strips_first([tid], self._special) and piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is held back (an unfinished sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _cut(frags: list, stext: str, sid: int, attr: int) -> list:
    """Every raw fragment split around each occurrence of one special token."""
    out: list = []
    for f in frags:
        if type(f) is int or stext not in f:
            out.append(f)
            continue
        pos, n = 0, len(stext)
        while (m := f.find(stext, pos)) >= 0:
            left = f[pos:m]
            if attr & ATTR_LSTRIP:
                left = left.rstrip(_C_SPACE)
            if left:
                out.append(left)
            out.append(sid)
            pos = m + n
            if attr & ATTR_RSTRIP:
                while pos < len(f) and f[pos] in _C_SPACE:
                    pos += 1
        if pos < len(f):
            out.append(f[pos:])
    return out


def _byte_decode(text: str) -> bytes:
    """GPT-2 byte-level token -> bytes; unknown characters as llama.cpp renders them."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError:
        out = bytearray()
        for c in text:
            b = UNICODE_TO_BYTE.get(c)
            if b is not None:
                out.append(b)
            else:
                out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
        return bytes(out)


def _scrub_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8; llama.cpp reads invalid input as U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
