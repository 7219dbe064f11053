"""The emberd wire protocol: every message type, its fields and its limits, in one place.

A message is a ZeroMQ multipart message. Frame 0 is one msgpack map, the
header: `v` (protocol version), `op` (what to do or what happened), `id` (the
client's request id, echoed on every reply) and the op's fields. Arrays of
token ids do not travel inside msgpack element by element: the header names
them in `frames` and each follows as one raw frame of little-endian int32.
Nothing here ever unpickles; msgpack ext types are refused.

Embedding vectors come back the same way: the `embed` reply's `embeddings`
frame is little-endian float32 (n, dim), row-major (FRAME_DTYPES).

Nothing on the wire is trusted. Bytes reach msgpack only after a bounded
pre-scan (`scan`) has walked the object headers without allocating: msgpack's
Unpacker limits lengths but not nesting depth, and it trusts a declared array
length enough to preallocate it. The scan checks depth, every declared length
against both its limit and the bytes actually left, and the total object
count, so a 5-byte "2^32-element array" or 100,000 nested headers cost
microseconds. Then `msgpack.unpackb` runs with explicit limits anyway, and
each op's schema checks every field's type and range (bool is not an int, NaN
is not a float, unknown fields are refused). Any failure is a ProtocolError
carrying one code from ERROR_CODES; the server answers it and keeps serving.

The human-readable spec is docs/protocol.md; this module is its executable form.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np

# ---------------------------------------------------------------------------
# Versions, ops, codes
# ---------------------------------------------------------------------------

VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"

# request ops a client may send
REQUEST_OPS = ("hello", "generate", "cancel", "tokenize", "detokenize", "status",
               "models", "health", "ping", "load", "embed")
# reply ops the server sends besides the request op's own name
EVENT_OPS = ("start", "token", "done", "error")

ERROR_CODES = ("bad_request", "unsupported_version", "too_large", "busy", "context_overflow",
               "cancelled", "deadline_exceeded", "unauthorized", "not_loaded", "model_changed",
               "internal")
STOP_REASONS = ("eos", "stop", "length", "cancelled", "deadline", "error")


class ProtocolError(Exception):
    """A message the server refuses: `code` is one of ERROR_CODES, `id` echoes the request."""

    def __init__(self, code: str, message: str, id: Any = None):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code, self.message, self.id = code, message, id


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Every bound the server enforces; sent to clients in the `hello` reply."""

    max_frame_bytes: int = 1 << 20      # ZMQ_MAXMSGSIZE: a bigger frame drops the connection
    max_frames: int = 4                 # header + up to 3 array frames
    max_str_bytes: int = 256 << 10      # any one msgpack string
    max_bin_bytes: int = 1024           # any one msgpack bin (no field uses bin today)
    max_array_len: int = 1024
    max_map_len: int = 32
    max_depth: int = 4                  # root map = 1; chat messages reach 3
    max_objects: int = 4096             # msgpack objects in one header
    max_prompt_bytes: int = 256 << 10   # prompt, or the sum of chat contents
    max_prompt_tokens: int = 65536      # a tokens frame / detokenize input
    max_tokens: int = 4096              # cap on generate.max_tokens
    max_messages: int = 256             # chat turns
    max_stop: int = 8                   # stop strings per request
    max_stop_bytes: int = 256
    max_id_bytes: int = 64
    max_queue: int = 16                 # waiting generate requests; more -> busy

    def to_wire(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# Bounded pre-scan of msgpack bytes
# ---------------------------------------------------------------------------

# first byte -> (kind, fixed extra bytes): kinds "scalar", "str", "bin", "array", "map"
# with the length in the next `extra` big-endian bytes; fix* types carry it in the byte.
_LEN_TYPES = {
    0xc4: ("bin", 1), 0xc5: ("bin", 2), 0xc6: ("bin", 4),
    0xd9: ("str", 1), 0xda: ("str", 2), 0xdb: ("str", 4),
    0xdc: ("array", 2), 0xdd: ("array", 4), 0xde: ("map", 2), 0xdf: ("map", 4),
}
_SCALAR_SIZES = {0xc0: 1, 0xc2: 1, 0xc3: 1, 0xca: 5, 0xcb: 9, 0xcc: 2, 0xcd: 3, 0xce: 5,
                 0xcf: 9, 0xd0: 2, 0xd1: 3, 0xd2: 5, 0xd3: 9}
_EXT_TYPES = frozenset(range(0xc7, 0xca)) | frozenset(range(0xd4, 0xd9))


def _head(buf: bytes, pos: int) -> tuple[str, int, int]:
    """(kind, length or size, header bytes) of the object starting at buf[pos]."""
    b = buf[pos]
    if b <= 0x7f or b >= 0xe0:
        return "scalar", 1, 1
    if b <= 0x8f:
        return "map", b & 0x0f, 1
    if b <= 0x9f:
        return "array", b & 0x0f, 1
    if b <= 0xbf:
        return "str", b & 0x1f, 1
    if b in _SCALAR_SIZES:
        return "scalar", _SCALAR_SIZES[b], 1
    if b in _LEN_TYPES:
        kind, extra = _LEN_TYPES[b]
        if pos + 1 + extra > len(buf):
            raise ProtocolError("bad_request", "truncated msgpack")
        return kind, int.from_bytes(buf[pos + 1:pos + 1 + extra], "big"), 1 + extra
    if b in _EXT_TYPES:
        raise ProtocolError("bad_request", "msgpack ext types are not accepted")
    raise ProtocolError("bad_request", f"invalid msgpack byte 0x{b:02x}")


def _check_len(kind: str, n: int, left: int, limits: Limits) -> None:
    cap = {"str": limits.max_str_bytes, "bin": limits.max_bin_bytes,
           "array": limits.max_array_len, "map": limits.max_map_len}[kind]
    if n > cap:
        raise ProtocolError("too_large", f"msgpack {kind} of length {n} exceeds limit {cap}")
    # every element of a container is at least one byte, so a count larger than
    # the bytes left is a lie told to make the unpacker preallocate
    need = n * 2 if kind == "map" else n
    if need > left:
        raise ProtocolError("bad_request", f"msgpack {kind} declares {n} entries, only {left} bytes left")


def scan(buf: bytes, limits: Limits) -> None:
    """Walk msgpack object headers without allocating; raise ProtocolError on any excess.

    Checks: exactly one root object and no trailing bytes, nesting <= max_depth,
    every declared length within its limit and within the remaining bytes,
    at most max_objects objects in all.
    """
    pos, objects, pending = 0, 0, [1]   # pending: objects still to read per open container
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= len(buf):
            raise ProtocolError("bad_request", "truncated msgpack")
        objects += 1
        if objects > limits.max_objects:
            raise ProtocolError("too_large", f"more than {limits.max_objects} msgpack objects")
        kind, n, head = _head(buf, pos)
        pos += head
        if kind == "scalar":
            pos += n - 1
        elif kind in ("str", "bin"):
            _check_len(kind, n, len(buf) - pos, limits)
            pos += n
        else:
            if len(pending) >= limits.max_depth:
                raise ProtocolError("too_large", f"msgpack nesting deeper than {limits.max_depth}")
            _check_len(kind, n, len(buf) - pos, limits)
            pending.append(2 * n if kind == "map" else n)
    if pos != len(buf):
        raise ProtocolError("bad_request", f"{len(buf) - pos} trailing bytes after the msgpack map")


# ---------------------------------------------------------------------------
# Decoding a request
# ---------------------------------------------------------------------------

@dataclass
class Request:
    """One validated request: op, id, version, checked fields, named array frames."""

    op: str
    id: Any
    v: int
    fields: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)   # frame name -> int32 array (n,)


def unpack_header(frame: bytes, limits: Limits) -> dict:
    """Bytes of frame 0 -> the header map, within limits, or ProtocolError."""
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError("too_large", f"header of {len(frame)} bytes exceeds {limits.max_frame_bytes}")
    if not frame:
        raise ProtocolError("bad_request", "empty header frame")
    if frame[0] & 0xf0 != 0x80 and frame[0] not in (0xde, 0xdf):
        raise ProtocolError("bad_request", "header must be a msgpack map (is this pickle or JSON?)")
    scan(frame, limits)
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True,
                              max_str_len=limits.max_str_bytes, max_bin_len=limits.max_bin_bytes,
                              max_array_len=limits.max_array_len, max_map_len=limits.max_map_len,
                              max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError("bad_request", f"undecodable msgpack: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ProtocolError("bad_request", "header must be a map with string keys")
    return obj


def decode_request(frames: list[bytes], limits: Limits) -> Request:
    """A client's multipart message (without the ROUTER identity) -> a validated Request."""
    if not frames:
        raise ProtocolError("bad_request", "empty message")
    if len(frames) > limits.max_frames:
        raise ProtocolError("too_large", f"{len(frames)} frames exceed limit {limits.max_frames}")
    header = unpack_header(frames[0], limits)
    rid = header.get("id")
    rid = rid if _valid_id(rid, limits) else None
    try:
        return _decode(header, frames[1:], rid, limits)
    except ProtocolError as e:
        e.id = rid
        raise


def _decode(header: dict, extra: list[bytes], rid: Any, limits: Limits) -> Request:
    v = header.get("v")
    op = header.get("op")
    if not isinstance(op, str) or op not in SCHEMAS:
        raise ProtocolError("bad_request", f"unknown op {op!r}; known: {', '.join(REQUEST_OPS)}")
    if type(v) is not int:
        raise ProtocolError("bad_request", "field 'v' (protocol version) must be an integer")
    if op != "hello" and v not in SUPPORTED_VERSIONS:
        raise ProtocolError("unsupported_version",
                            f"protocol version {v} not supported; supported: {list(SUPPORTED_VERSIONS)}")
    if rid is None:
        raise ProtocolError("bad_request", f"field 'id' must be a string of 1-{limits.max_id_bytes} "
                                           "bytes or an integer in [0, 2^63)")
    body = {k: val for k, val in header.items() if k not in ("v", "op", "id", "frames")}
    fields = _check_fields(op, body, limits)
    arrays = _decode_frames(op, header.get("frames"), extra, limits)
    _check_cross(op, fields, arrays)
    return Request(op=op, id=rid, v=v, fields=fields, arrays=arrays)


def _valid_id(rid: Any, limits: Limits) -> bool:
    if type(rid) is int:
        return 0 <= rid < 1 << 63
    return isinstance(rid, str) and 0 < len(rid.encode()) <= limits.max_id_bytes


def decode_tokens(frame: bytes, limits: Limits) -> np.ndarray:
    """A raw little-endian int32 frame -> token ids (n,) int32; counts and signs checked."""
    if len(frame) % 4:
        raise ProtocolError("bad_request", f"tokens frame of {len(frame)} bytes is not a whole number of int32")
    if len(frame) // 4 > limits.max_prompt_tokens:
        raise ProtocolError("too_large", f"{len(frame) // 4} tokens exceed limit {limits.max_prompt_tokens}")
    ids = np.frombuffer(frame, dtype="<i4")   # (n,)
    if ids.size and int(ids.min()) < 0:
        raise ProtocolError("bad_request", "token ids must be non-negative")
    return ids.astype(np.int32, copy=False)


def encode_tokens(ids) -> bytes:
    """Token ids -> one raw little-endian int32 frame."""
    return np.asarray(ids, dtype="<i4").tobytes()


def encode_vectors(vectors) -> bytes:
    """Embeddings (n, dim) -> one raw little-endian float32 frame, row-major."""
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def _decode_frames(op: str, names: Any, extra: list[bytes], limits: Limits) -> dict:
    names = [] if names is None else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError("bad_request", "field 'frames' must be a list of frame names")
    if len(names) != len(extra):
        raise ProtocolError("bad_request", f"'frames' names {len(names)} frames but {len(extra)} follow")
    allowed = FRAMES.get(op, ())
    arrays = {}
    for name, frame in zip(names, extra):
        if name not in allowed or name in arrays:
            raise ProtocolError("bad_request", f"op {op!r} takes no frame {name!r} (allowed: {list(allowed)})")
        arrays[name] = decode_tokens(frame, limits)
    return arrays


# ---------------------------------------------------------------------------
# Field checkers: each returns the checked value or raises bad_request
# ---------------------------------------------------------------------------

def _bad(name: str, why: str) -> ProtocolError:
    return ProtocolError("bad_request", f"field '{name}' {why}")


def integer(lo: int, hi: int) -> Callable:
    def check(name, x, limits):
        if type(x) is not int:   # bool is an int subclass; it is not a count
            raise _bad(name, f"must be an integer, got {type(x).__name__}")
        if not lo <= x <= hi:
            raise _bad(name, f"must be in [{lo}, {hi}], got {x}")
        return x
    return check


def number(lo: float, hi: float) -> Callable:
    def check(name, x, limits):
        if type(x) not in (int, float):
            raise _bad(name, f"must be a number, got {type(x).__name__}")
        if not math.isfinite(x) or not lo <= x <= hi:
            raise _bad(name, f"must be a finite number in [{lo}, {hi}], got {x}")
        return float(x)
    return check


def boolean(name, x, limits):
    if type(x) is not bool:
        raise _bad(name, f"must be true or false, got {type(x).__name__}")
    return x


def text(cap_attr: str, allow_empty: bool = True) -> Callable:
    def check(name, x, limits):
        if not isinstance(x, str):
            raise _bad(name, f"must be a string, got {type(x).__name__}")
        cap = getattr(limits, cap_attr)
        n = len(x.encode("utf-8", "surrogatepass"))
        if n > cap:
            raise ProtocolError("too_large", f"field '{name}' has {n} bytes, limit {cap}")
        if not allow_empty and not x:
            raise _bad(name, "must not be empty")
        return x
    return check


def request_id(name, x, limits):
    if not _valid_id(x, limits):
        raise _bad(name, f"must be a request id (string of 1-{limits.max_id_bytes} bytes or integer)")
    return x


def versions(name, x, limits):
    if not isinstance(x, list) or not 0 < len(x) <= 16 or any(type(v) is not int for v in x):
        raise _bad(name, "must be a list of 1-16 integers")
    return x


def stop_strings(name, x, limits):
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, list) or len(x) > limits.max_stop:
        raise _bad(name, f"must be a string or a list of at most {limits.max_stop} strings")
    check = text("max_stop_bytes", allow_empty=False)
    return [check(f"{name}[{i}]", s, limits) for i, s in enumerate(x)]


ROLES = ("system", "user", "assistant", "tool")


def chat_messages(name, x, limits):
    if not isinstance(x, list) or not 0 < len(x) <= limits.max_messages:
        raise _bad(name, f"must be a list of 1-{limits.max_messages} messages")
    out, total = [], 0
    for i, m in enumerate(x):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise _bad(f"{name}[{i}]", "must be a map with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise _bad(f"{name}[{i}].role", f"must be one of {list(ROLES)}")
        content = text("max_prompt_bytes")(f"{name}[{i}].content", m["content"], limits)
        total += len(content.encode("utf-8", "surrogatepass"))
        out.append({"role": m["role"], "content": content})
    if total > limits.max_prompt_bytes:
        raise ProtocolError("too_large", f"chat contents total {total} bytes, limit {limits.max_prompt_bytes}")
    return out


def max_tokens(name, x, limits):
    return integer(1, limits.max_tokens)(name, x, limits)


def embed_input(name, x, limits):
    """One text or a list of 1..max_array_len texts; all together within max_prompt_bytes."""
    texts = [x] if isinstance(x, str) else x
    if not isinstance(texts, list) or not texts:
        raise _bad(name, f"must be a string or a list of 1-{limits.max_array_len} strings")
    check = text("max_prompt_bytes")
    total = sum(len(check(f"{name}[{i}]", t, limits).encode("utf-8", "surrogatepass"))
                for i, t in enumerate(texts))
    if total > limits.max_prompt_bytes:
        raise ProtocolError("too_large", f"field '{name}' has {total} bytes of text, limit "
                                         f"{limits.max_prompt_bytes}")
    return texts


# ---------------------------------------------------------------------------
# Schemas: op -> {field: checker}; every other field is refused
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """The values a numeric sampling parameter may take: [lo, hi], or (lo, hi] if lo_open."""
    kind: type            # int or float
    lo: float
    hi: float
    lo_open: bool = False


# The one table of sampling ranges. The wire (SAMPLING below) and the engine
# (daemon/sampling.py SamplingParams.parse, for apps that embed it) both read
# it, so the two can never disagree on what a request may ask for.
SAMPLING_RANGES: dict[str, Range] = {
    "temperature": Range(float, 0.0, 100.0),
    "top_k": Range(int, 0, 1 << 24),
    "top_p": Range(float, 0.0, 1.0, lo_open=True),      # 0 would keep no token
    "min_p": Range(float, 0.0, 1.0),
    "repeat_penalty": Range(float, 0.0, 10.0, lo_open=True),  # it divides logits
    "frequency_penalty": Range(float, -2.0, 2.0),
    "presence_penalty": Range(float, -2.0, 2.0),
    "penalty_last_n": Range(int, -1, 1 << 24),          # -1: the whole history
    "seed": Range(int, 0, (1 << 64) - 1),
    "top_logprobs": Range(int, 0, 20),
}
MAX_STOP_TOKENS = 64
STOP_TOKEN_ID = Range(int, 0, (1 << 31) - 1)            # an int32 id; the vocabulary is the model's


def in_range(r: Range) -> Callable:
    """The wire checker of one SAMPLING_RANGES row."""
    if r.kind is int:
        return integer(r.lo, r.hi)
    inner = number(r.lo, r.hi)

    def check(name, x, limits):
        x = inner(name, x, limits)
        if r.lo_open and x == r.lo:
            raise _bad(name, f"must be in ({r.lo}, {r.hi}], got {x}")
        return x
    return check


def token_ids(name, x, limits):
    if not isinstance(x, list) or len(x) > MAX_STOP_TOKENS:
        raise _bad(name, f"must be a list of at most {MAX_STOP_TOKENS} token ids")
    check = in_range(STOP_TOKEN_ID)
    return [check(f"{name}[{i}]", t, limits) for i, t in enumerate(x)]


# Sampling parameters pass through to the engine (daemon/sampling.py) under the same names.
SAMPLING: dict[str, Callable] = {
    **{name: in_range(r) for name, r in SAMPLING_RANGES.items()},
    "stop": stop_strings,
    "stop_tokens": token_ids,
    "ignore_eos": boolean,
    "logprobs": boolean,
}

GENERATE: dict[str, Callable] = {
    "prompt": text("max_prompt_bytes"),
    "messages": chat_messages,
    "stream": boolean,
    "max_tokens": max_tokens,
    "priority": integer(-1000, 1000),
    "deadline_ms": integer(0, 7 * 86_400_000),       # relative to the server's receipt
    "deadline": number(0.0, 1e11),                   # absolute, Unix seconds
    **SAMPLING,
}

SCHEMAS: dict[str, dict[str, Callable]] = {
    "hello": {"versions": versions, "client": text("max_id_bytes")},
    "generate": GENERATE,
    "cancel": {"target": request_id},
    "tokenize": {"text": text("max_prompt_bytes"), "add_special": boolean},
    "detokenize": {},
    "status": {},
    "models": {},
    "health": {"timeout_ms": integer(1, 60_000)},
    "ping": {},
    "load": {"model": text("max_prompt_bytes", allow_empty=False)},
    "embed": {"input": embed_input, "normalize": boolean, "priority": GENERATE["priority"],
              "deadline_ms": GENERATE["deadline_ms"], "deadline": GENERATE["deadline"]},
}
REQUIRED: dict[str, tuple[str, ...]] = {"cancel": ("target",), "tokenize": ("text",),
                                        "load": ("model",), "embed": ("input",)}
FRAMES: dict[str, tuple[str, ...]] = {"generate": ("tokens",), "detokenize": ("tokens",)}
# reply frames by name -> numpy dtype; every other frame is token ids ("<i4")
FRAME_DTYPES: dict[str, str] = {"embeddings": "<f4"}


def _check_fields(op: str, body: dict, limits: Limits) -> dict:
    schema = SCHEMAS[op]
    for name in body:
        if name not in schema:
            raise ProtocolError("bad_request", f"op {op!r} has no field {name!r}")
    for name in REQUIRED.get(op, ()):
        if name not in body:
            raise _bad(name, f"is required for op {op!r}")
    return {name: schema[name](name, x, limits) for name, x in body.items()}


def _check_cross(op: str, fields: dict, arrays: dict) -> None:
    if op == "generate":
        given = [k for k in ("prompt", "messages") if k in fields] + list(arrays)
        if len(given) != 1:
            raise ProtocolError("bad_request", "generate takes exactly one of 'prompt', 'messages' "
                                               f"or a 'tokens' frame (got {given or 'none'})")
    if op == "detokenize" and "tokens" not in arrays:
        raise ProtocolError("bad_request", "detokenize needs a 'tokens' frame")


# ---------------------------------------------------------------------------
# Encoding replies
# ---------------------------------------------------------------------------

def pack(msg: dict) -> bytes:
    """One header map -> msgpack bytes (floats as float64, strings as str)."""
    return msgpack.packb(msg, use_bin_type=True)


def reply(op: str, rid: Any, **fields) -> dict:
    return {"v": VERSION, "op": op, "id": rid, **fields}


def error(code: str, message: str, rid: Any = None) -> dict:
    assert code in ERROR_CODES, code
    return reply("error", rid, code=code, message=message)


def negotiate(client_versions: list[int]) -> int | None:
    """Highest version both sides speak, or None."""
    common = set(client_versions) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None


# what a client accepts from a server: roomier than requests, still bounded
CLIENT_LIMITS = Limits(max_frame_bytes=64 << 20, max_array_len=1 << 16, max_map_len=256,
                       max_depth=8, max_objects=1 << 20, max_str_bytes=16 << 20)


def unpack_reply(frames: list[bytes], limits: Limits | None = None) -> tuple[dict, dict]:
    """Client side: a reply's frames -> (header, {frame name: array (n,)}), int32 token ids
    or the FRAME_DTYPES type (embeddings: float32; the caller reshapes to (n, dim)).

    Clients trust the server less than fully too: the same bounded scan applies.
    """
    limits = limits or CLIENT_LIMITS
    header = unpack_header(frames[0], limits)
    names = header.get("frames") or []
    if len(names) != len(frames) - 1:
        raise ProtocolError("bad_request", "reply frame count does not match its 'frames'")
    out = {}
    for n, f in zip(names, frames[1:]):
        dtype = np.dtype(FRAME_DTYPES.get(n, "<i4"))
        if len(f) % dtype.itemsize:
            raise ProtocolError("bad_request", f"reply frame {n!r} of {len(f)} bytes is not a "
                                               f"whole number of {dtype.name}")
        out[n] = np.frombuffer(f, dtype=dtype)
    return header, out

