"""The wire protocol's decoder: limits, bombs, schemas, round trips (no sockets needed)."""
from __future__ import annotations

import math
import pickle
import time

import msgpack
import numpy as np
import pytest

from ember.formats import protocol
from ember.formats.protocol import Limits, ProtocolError

L = Limits()


def frame(**header) -> bytes:
    return msgpack.packb({"v": 1, "id": 1, **header}, use_bin_type=True)


def refused(frames, code: str, limits: Limits = L) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        protocol.decode_request(frames, limits)
    assert e.value.code == code, e.value.message
    return e.value


# ---------------------------------------------------------------------------
# Pre-scan: bombs cost nothing
# ---------------------------------------------------------------------------

BOMBS = {
    "array32 declaring 2^32-1 elements": b"\xdd\xff\xff\xff\xff",
    "map32 declaring 2^32-1 pairs": b"\xdf\xff\xff\xff\xff",
    "str32 declaring 4 GiB": b"\x81\xa1p\xdb\xff\xff\xff\xff",
    "bin32 declaring 4 GiB": b"\x81\xa1p\xc6\xff\xff\xff\xff",
    "10 KB of nested array headers": b"\x81\xa1p" + b"\x91" * 10_000 + b"\xc0",
    "100,000-deep nesting": b"\x81\xa1p" + b"\x91" * 100_000 + b"\xc0",
    "100,000-deep map nesting": b"\x81\xa1p" + b"\x81\xa1k" * 100_000 + b"\xc0",
    "array16 of 65535 in 3 bytes": b"\x81\xa1p\xdc\xff\xff",
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_allocation_bombs_refused_fast(name):
    t = time.perf_counter()
    with pytest.raises(ProtocolError) as e:
        protocol.decode_request([BOMBS[name]], L)
    # a bomb honoured costs seconds and gigabytes; refused, it is microseconds
    assert time.perf_counter() - t < 0.5, f"{name} took too long to refuse"
    assert e.value.code in ("too_large", "bad_request") and e.value.message


def test_scan_counts_depth_from_the_root():
    ok = msgpack.packb({"a": [[1]]})             # depth 3
    protocol.scan(ok, L)
    deep = msgpack.packb({"a": [[[[1]]]]})        # depth 5
    with pytest.raises(ProtocolError, match="nesting"):
        protocol.scan(deep, L)


def test_scan_object_budget():
    many = msgpack.packb({"a": list(range(1000)), "b": list(range(1000))})
    protocol.scan(many, L)
    with pytest.raises(ProtocolError) as e:
        protocol.scan(many, Limits(max_objects=1500))
    assert e.value.code == "too_large"


def test_scan_truncated_and_trailing():
    good = frame(op="ping")
    refused([good[:-1]], "bad_request")
    refused([good + b"\x00"], "bad_request")


@pytest.mark.parametrize("payload", [
    pickle.dumps({"v": 1, "op": "ping", "id": 1}),
    pickle.dumps({"v": 1, "op": "ping", "id": 1}, protocol=0),
    b'{"v": 1, "op": "ping", "id": 1}',
    b"",
    b"\xc1",
    msgpack.packb([1, "ping", 1]),
    msgpack.packb("ping"),
])
def test_non_maps_and_pickle_are_refused(payload):
    refused([payload], "bad_request")


def test_ext_types_refused():
    ts = msgpack.packb({"v": 1, "op": "ping", "id": 1, "t": msgpack.Timestamp(1, 0)},
                       datetime=False)
    e = refused([ts], "bad_request")
    assert "ext" in e.message


def test_invalid_utf8_is_bad_request():
    raw = frame(op="ping").replace(b"\xa4ping", b"\xa4p\xffng")
    refused([raw], "bad_request")


# ---------------------------------------------------------------------------
# Envelope: version, op, id, frames
# ---------------------------------------------------------------------------

def test_ping_decodes():
    req = protocol.decode_request([frame(op="ping")], L)
    assert (req.op, req.id, req.v, req.fields) == ("ping", 1, 1, {})


def test_unknown_op_and_version():
    refused([frame(op="rm -rf")], "bad_request")
    e = refused([msgpack.packb({"v": 99, "op": "ping", "id": "x"})], "unsupported_version")
    assert e.id == "x"
    # hello negotiates instead of refusing on v
    req = protocol.decode_request([msgpack.packb({"v": 99, "op": "hello", "id": 2,
                                                  "versions": [99, 1]})], L)
    assert protocol.negotiate(req.fields["versions"]) == 1
    assert protocol.negotiate([7, 8]) is None


@pytest.mark.parametrize("rid", [None, True, -1, 1 << 63, "", "x" * 65, 1.5, [1], {"a": 1}])
def test_bad_ids(rid):
    raw = msgpack.packb({"v": 1, "op": "ping", "id": rid})
    e = refused([raw], "bad_request")
    assert e.id is None


@pytest.mark.parametrize("v", [None, "1", 1.0, True])
def test_bad_version_types(v):
    refused([msgpack.packb({"v": v, "op": "ping", "id": 1})], "bad_request")


def test_unknown_fields_refused():
    e = refused([frame(op="ping", extra=1)], "bad_request")
    assert "extra" in e.message


def test_too_many_frames():
    refused([frame(op="ping")] + [b""] * 4, "too_large")


def test_frames_must_match_names():
    refused([frame(op="generate", frames=["tokens"])], "bad_request")
    refused([frame(op="generate", prompt="x"), b"\0\0\0\0"], "bad_request")
    refused([frame(op="ping", frames=["tokens"]), b"\0\0\0\0"], "bad_request")


def test_tokens_frame_round_trip_and_checks():
    ids = np.array([1, 2, 511], dtype=np.int32)
    req = protocol.decode_request([frame(op="generate", frames=["tokens"]),
                                   protocol.encode_tokens(ids)], L)
    assert req.arrays["tokens"].tolist() == [1, 2, 511]
    refused([frame(op="generate", frames=["tokens"]), b"\0\0\0"], "bad_request")
    refused([frame(op="detokenize", frames=["tokens"]),
             protocol.encode_tokens([-5])], "bad_request")
    refused([frame(op="detokenize", frames=["tokens"]), b"\0" * 4 * (L.max_prompt_tokens + 1)],
            "too_large")


def test_oversized_header_is_too_large():
    small = Limits(max_frame_bytes=100)
    refused([frame(op="tokenize", text="x" * 200)], "too_large", small)


# ---------------------------------------------------------------------------
# Fields: types and ranges
# ---------------------------------------------------------------------------

BAD_GENERATE = [
    {"prompt": 5}, {"prompt": b"bytes"}, {"prompt": None},
    {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "max_tokens": -1},
    {"prompt": "x", "max_tokens": 1 << 40}, {"prompt": "x", "max_tokens": 3.0},
    {"prompt": "x", "max_tokens": True},
    {"prompt": "x", "temperature": math.nan}, {"prompt": "x", "temperature": math.inf},
    {"prompt": "x", "temperature": -0.1}, {"prompt": "x", "temperature": "hot"},
    {"prompt": "x", "top_p": 0.0}, {"prompt": "x", "top_p": 1.5},
    {"prompt": "x", "top_k": -1}, {"prompt": "x", "seed": -1}, {"prompt": "x", "seed": 1.5},
    {"prompt": "x", "stream": 1}, {"prompt": "x", "priority": 10 ** 6},
    {"prompt": "x", "deadline_ms": -1}, {"prompt": "x", "deadline": math.nan},
    {"prompt": "x", "stop": [""]}, {"prompt": "x", "stop": [1]}, {"prompt": "x", "stop": ["a"] * 9},
    {"prompt": "x", "stop_tokens": [-1]}, {"prompt": "x", "logprobs": 1},
    {"prompt": "x", "top_logprobs": 21},
    {"messages": []}, {"messages": [{"role": "user"}]},
    {"messages": [{"role": "god", "content": "x"}]},
    {"messages": [{"role": "user", "content": "x", "extra": 1}]},
    {"messages": "hi"},
    {}, {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
]


@pytest.mark.parametrize("fields", BAD_GENERATE, ids=[str(f)[:60] for f in BAD_GENERATE])
def test_generate_bad_fields(fields):
    refused([frame(op="generate", **fields)], "bad_request")


def test_generate_good_fields_pass_through():
    f = dict(prompt="Once", max_tokens=5, temperature=0.0, top_k=40, top_p=0.9, min_p=0.05,
             repeat_penalty=1.1, seed=(1 << 64) - 1, stop=["\n"], stream=False, priority=-3,
             deadline_ms=100, logprobs=True, top_logprobs=3)
    req = protocol.decode_request([frame(op="generate", **f)], L)
    assert req.fields == {**f, "stop": ["\n"]}
    assert isinstance(req.fields["temperature"], float)


def test_prompt_cap_is_too_large():
    small = Limits(max_prompt_bytes=10)
    refused([frame(op="generate", prompt="é" * 6)], "too_large", small)   # 12 bytes
    protocol.decode_request([frame(op="generate", prompt="é" * 5)], small)
    refused([frame(op="generate", messages=[{"role": "user", "content": "x" * 6}] * 2)],
            "too_large", small)


def test_max_tokens_cap_follows_limits():
    refused([frame(op="generate", prompt="x", max_tokens=9)], "bad_request", Limits(max_tokens=8))


def test_required_fields():
    refused([frame(op="cancel")], "bad_request")
    refused([frame(op="tokenize")], "bad_request")
    refused([frame(op="detokenize")], "bad_request")


def test_reply_helpers_round_trip():
    msg = protocol.reply("done", 7, stop="eos", frames=["tokens"])
    header, arrays = protocol.unpack_reply([protocol.pack(msg), protocol.encode_tokens([3, 4])])
    assert header["stop"] == "eos" and arrays["tokens"].tolist() == [3, 4]
    err = protocol.error("busy", "queue full", 7)
    assert protocol.unpack_reply([protocol.pack(err)])[0]["code"] == "busy"
    with pytest.raises(AssertionError):
        protocol.error("not_a_code", "x")


def test_embed_fields():
    req = protocol.decode_request([frame(op="embed", input="one", normalize=False, priority=2)], L)
    assert req.fields == {"input": ["one"], "normalize": False, "priority": 2}  # a str is one text
    assert protocol.decode_request([frame(op="embed", input=["a", ""])], L).fields["input"] == ["a", ""]
    for bad in ([], ["a", 3], {"a": 1}, None, [["x"]]):
        refused([frame(op="embed", input=bad)], "bad_request")
    refused([frame(op="embed")], "bad_request")                                  # input required
    refused([frame(op="embed", input="x", normalize=1)], "bad_request")         # bool, not int
    refused([frame(op="embed", input="x", max_tokens=3)], "bad_request")        # not an embed field
    small = Limits(max_prompt_bytes=10)
    refused([frame(op="embed", input=["é" * 3, "é" * 3])], "too_large", small)  # 12 bytes in all
    protocol.decode_request([frame(op="embed", input=["é" * 3, "é" * 2])], small)


def test_embed_reply_carries_float32_rows():
    v = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    msg = protocol.reply("embed", 1, n=2, dim=3, frames=["embeddings"])
    header, arrays = protocol.unpack_reply([protocol.pack(msg), protocol.encode_vectors(v)])
    assert arrays["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(arrays["embeddings"].reshape(header["n"], header["dim"]), v)
    with pytest.raises(ProtocolError, match="not a whole number of float32"):
        protocol.unpack_reply([protocol.pack(msg), b"\0" * 7])


def test_every_schema_field_is_documented():
    doc = (protocol_doc_path()).read_text()
    for op, schema in protocol.SCHEMAS.items():
        assert f"`{op}`" in doc, op
        for name in schema:
            assert f"`{name}`" in doc, f"{op}.{name} missing from docs/protocol.md"
    for code in protocol.ERROR_CODES:
        assert f"`{code}`" in doc, code


def protocol_doc_path():
    from pathlib import Path
    return Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
