"""formats/gguf.py against hostile files: GGUFError and nothing else, in bounded time and memory.

Every file is made here: a small valid file from ember's own writer, then
byte surgery at fields located by unique markers. All cases are opened in ONE
subprocess whose address space is capped (RLIMIT_AS) a little above what it
uses after importing numpy and ember, so an allocation sized by a hostile
count would die with MemoryError — which the test counts as a failure. The
subprocess first proves the cap binds by failing to allocate past it.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ember.formats import gguf
from ember.formats.gguf import ARRAY, INT32, STRING, UINT8, UINT32, TensorData

HEADROOM_MB = 256          # address space allowed above the subprocess's baseline
CASE_SECONDS = 2.0         # per hostile file, generous for a shared 2-core machine
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")

# ---------------------------------------------------------------------------
# The small valid file and where its fields are
# ---------------------------------------------------------------------------

METADATA = {
    "general.architecture": "llama",
    "k.u32": 7,
    "k.str": "hello",
    "k.arr_u8": [1, 2, 3],
    "k.arr_str": ["ab", "c"],
    "k.nested": [[1], [2, 3]],
}
TYPES = {"k.u32": UINT32, "k.arr_u8": (ARRAY, UINT8), "k.arr_str": (ARRAY, STRING),
         "k.nested": (ARRAY, ((ARRAY, INT32), (ARRAY, INT32)))}
# Q8_0 first (34 bytes, padded to 64), then F32 (2, 8) = 64 bytes: the file
# ends exactly at the end of tensor data, so every truncation cuts real bytes.
TENSORS = {
    "tensor.aaaa": TensorData("Q8_0", (1, 32), bytes(range(34))),
    "tensor.bbbb": np.arange(16, dtype=np.float32).reshape(2, 8),
}


def valid_file(alignment: int | None = None) -> bytes:
    md, types = dict(METADATA), dict(TYPES)
    if alignment is not None:
        md["general.alignment"], types["general.alignment"] = alignment, UINT32
    return gguf.encode(md, TENSORS, types=types)


VALID = valid_file()


def key_at(data: bytes, key: str) -> int:
    """Offset of a metadata key's u64 length field."""
    return data.index(U64.pack(len(key)) + key.encode())


def value_at(data: bytes, key: str) -> int:
    """Offset of the value that follows a key's u32 value type."""
    return key_at(data, key) + 8 + len(key) + 4


def info_at(data: bytes, name: str) -> dict[str, int]:
    """Offsets of a tensor info's fields (both test tensors have 2 dims)."""
    at = data.index(U64.pack(len(name)) + name.encode())
    n_dims = at + 8 + len(name)
    return {"name": at, "n_dims": n_dims, "dim0": n_dims + 4, "dim1": n_dims + 12,
            "type": n_dims + 20, "offset": n_dims + 24}


def patch(data: bytes, at: int, raw: bytes) -> bytes:
    return data[:at] + raw + data[at + len(raw):]


def splice(data: bytes, start: int, end: int, raw: bytes) -> bytes:
    return data[:start] + raw + data[end:]


def set_u64(data, at, v):
    return patch(data, at, U64.pack(v))


def set_u32(data, at, v):
    return patch(data, at, U32.pack(v))


# ---------------------------------------------------------------------------
# The hostile cases
# ---------------------------------------------------------------------------

def count_cases() -> dict[str, bytes]:
    d, out = VALID, {}
    fields = {
        "tensor count": 8, "metadata count": 16,
        "key length": key_at(d, "k.str"),
        "string length": value_at(d, "k.str"),
        "u8 array length": value_at(d, "k.arr_u8") + 4,
        "string array length": value_at(d, "k.arr_str") + 4,
        "string array item length": value_at(d, "k.arr_str") + 12,
        "nested array length": value_at(d, "k.nested") + 4,
        "inner array length": value_at(d, "k.nested") + 16,
        "tensor name length": info_at(d, "tensor.aaaa")["name"],
    }
    for field, at in fields.items():
        for v in (2**63, 2**64 - 1):
            out[f"{field} = {v:#x}"] = set_u64(d, at, v)
    out["string longer than the file"] = set_u64(d, value_at(d, "k.str"), len(d) + 1)
    out["tensor count one too many"] = set_u64(d, 8, 3)
    out["metadata count one too many"] = set_u64(d, 16, len(METADATA) + 1)
    return out


def nesting_case(depth: int) -> bytes:
    """k.nested replaced by `depth` arrays, each holding one array, innermost empty u8."""
    d = VALID
    start, end = value_at(d, "k.nested"), info_at(d, "tensor.aaaa")["name"]  # last kv
    value = (U32.pack(ARRAY) + U64.pack(1)) * (depth - 1) + U32.pack(UINT8) + U64.pack(0)
    return splice(d, start, end, value)


def wide_nesting_case(n: int) -> bytes:
    """k.nested replaced by one array of n empty u8 arrays."""
    d = VALID
    start, end = value_at(d, "k.nested"), info_at(d, "tensor.aaaa")["name"]
    return splice(d, start, end, U32.pack(ARRAY) + U64.pack(n) + (U32.pack(UINT8) + U64.pack(0)) * n)


def type_cases() -> dict[str, bytes]:
    d, out = VALID, {}
    for v in (13, 99, 2**32 - 1):
        out[f"unknown value type {v}"] = set_u32(d, value_at(d, "k.u32") - 4, v)
        out[f"unknown array element type {v}"] = set_u32(d, value_at(d, "k.arr_u8"), v)
    for v in (4, 99, 2**32 - 1):        # 4 was Q4_2, removed from ggml
        out[f"unknown tensor type {v}"] = set_u32(d, info_at(d, "tensor.aaaa")["type"], v)
    out["unsupported tensor type IQ2_XXS"] = set_u32(d, info_at(d, "tensor.aaaa")["type"], 16)
    out["row not a multiple of the block"] = set_u64(d, info_at(d, "tensor.aaaa")["dim0"], 33)
    return out


def identity_cases() -> dict[str, bytes]:
    d, out = VALID, {}
    out["duplicate key"] = d.replace(b"k.u32", b"k.str", 1)
    out["duplicate tensor name"] = d.replace(b"tensor.bbbb", b"tensor.aaaa", 1)
    out["invalid UTF-8 key"] = d.replace(b"k.u32", b"k.\xff32", 1)
    out["invalid UTF-8 string value"] = d.replace(b"hello", b"hel\xc3(", 1)
    out["invalid UTF-8 in a string array"] = d.replace(U64.pack(2) + b"ab", U64.pack(2) + b"\xed\xa0", 1)
    out["invalid UTF-8 tensor name"] = d.replace(b"tensor.aaaa", b"tensor.\x80aaa", 1)
    at = info_at(d, "tensor.aaaa")["name"]
    name = b"n" * (1 << 20)
    out["1 MiB tensor name"] = splice(d, at, at + 8 + len("tensor.aaaa"), U64.pack(len(name)) + name)
    return out


def alignment_cases() -> dict[str, bytes]:
    d = valid_file(alignment=32)
    at = value_at(d, "general.alignment")
    out = {f"alignment {v}": set_u32(d, at, v) for v in (0, 13, 2**31, 3, 2**32 - 1)}
    out["alignment typed INT32"] = set_u32(d, at - 4, INT32)
    return out


def dims_cases() -> dict[str, bytes]:
    d, out = VALID, {}
    a = info_at(d, "tensor.aaaa")
    for v in (0, 5, 2**32 - 1):
        out[f"n_dims {v}"] = set_u32(d, a["n_dims"], v)
    out["dim zero"] = set_u64(d, a["dim1"], 0)
    out["dim -1 (as int64)"] = set_u64(d, a["dim1"], 2**64 - 1)
    out["dim -2^63 (as int64)"] = set_u64(d, a["dim1"], 2**63)
    out["dims overflow their product"] = set_u64(set_u64(d, a["dim0"], 2**32), a["dim1"], 2**32)
    out["dims product just past 2^62"] = set_u64(set_u64(d, a["dim0"], 2**31), a["dim1"], 2**31 + 1)
    return out


def offset_cases() -> dict[str, bytes]:
    d, out = VALID, {}
    b = info_at(d, "tensor.bbbb")["offset"]
    out["offset unaligned"] = set_u64(d, b, 65)
    out["offset past the end"] = set_u64(d, b, len(d))
    out["offset 2^64-1"] = set_u64(d, b, 2**64 - 1)
    out["offset 2^63 (aligned)"] = set_u64(d, b, 2**63)
    out["offset overlapping"] = set_u64(d, b, 32)        # aligned, inside tensor.aaaa's 34 bytes
    out["data one byte short"] = d[:-1]
    out["tensor grown one row past the end"] = set_u64(d, info_at(d, "tensor.bbbb")["dim1"], 3)
    return out


def header_cases() -> dict[str, bytes]:
    d, out = VALID, {}
    for v in (0, 1, 4, 2**32 - 1):
        out[f"version {v}"] = set_u32(d, 4, v)
    # a big-endian writer stores every number big-endian, starting with the version
    big = struct.pack(">I", 3) + struct.pack(">Q", 2) + struct.pack(">Q", len(METADATA))
    out["big-endian file"] = patch(d, 4, big)
    out["bad magic"] = patch(d, 0, b"GGML")
    out["empty file"] = b""
    return out


def all_cases() -> dict[str, bytes]:
    cases = {}
    for make in (count_cases, type_cases, identity_cases, alignment_cases, dims_cases,
                 offset_cases, header_cases):
        cases.update(make())
    cases["arrays nested 5000 deep"] = nesting_case(5000)
    cases[f"arrays nested {gguf.MAX_ARRAY_DEPTH + 1} deep"] = nesting_case(gguf.MAX_ARRAY_DEPTH + 1)
    cases["too many arrays in an array"] = wide_nesting_case(gguf.MAX_NESTED_ITEMS + 1)
    return cases


# ---------------------------------------------------------------------------
# The capped subprocess
# ---------------------------------------------------------------------------

RUNNER = textwrap.dedent("""
    import json, os, resource, sys, time
    from ember.formats import gguf

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    cap = vm_bytes() + int(sys.argv[2]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        bytearray(2 * int(sys.argv[2]) * 2**20)
        capped = False
    except MemoryError:
        capped = True

    def attempt(path):
        t = time.perf_counter()
        try:
            with gguf.open(path) as f:
                outcome = ("ok", f"{len(f.metadata)} keys, {len(f.tensors)} tensors", None)
        except gguf.GGUFError as e:
            outcome = ("GGUFError", str(e), e.offset)
        except BaseException as e:
            outcome = (type(e).__name__, repr(e)[:300], None)
        return [*outcome, time.perf_counter() - t]

    jobs = json.load(open(sys.argv[1]))
    results = {name: attempt(path) for name, path in jobs["cases"].items()}
    valid, trunc_dir = jobs["valid"], jobs["trunc_dir"]
    raw = open(valid, "rb").read()
    truncated = {}
    for n in range(len(raw)):
        p = os.path.join(trunc_dir, "t.gguf")
        with open(p, "wb") as f:
            f.write(raw[:n])
        truncated[n] = attempt(p)
    json.dump({"capped": capped, "valid": attempt(valid), "cases": results,
               "truncated": truncated}, sys.stdout)
""")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    cases = {}
    for i, (name, data) in enumerate(all_cases().items()):
        p = d / f"case{i}.gguf"
        p.write_bytes(data)
        cases[name] = str(p)
    (d / "valid.gguf").write_bytes(VALID)
    (d / "trunc").mkdir()
    jobs = {"cases": cases, "valid": str(d / "valid.gguf"), "trunc_dir": str(d / "trunc")}
    (d / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(d / "jobs.json"), str(HEADROOM_MB)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_address_space_cap_binds(outcomes):
    assert outcomes["capped"], "RLIMIT_AS did not stop a 2x-headroom allocation: the bound is unproven"


def test_the_valid_file_opens_under_the_cap(outcomes):
    kind, msg, _, _ = outcomes["valid"]
    assert kind == "ok", msg
    assert len(VALID) % 32 == 0 and len(VALID) < 1024  # small, and no trailing pad to truncate


@pytest.mark.parametrize("name", list(all_cases()))
def test_hostile_file_raises_gguferror(outcomes, name):
    kind, msg, offset, seconds = outcomes["cases"][name]
    assert kind == "GGUFError", f"{name}: {kind}: {msg}"
    assert f"at byte {offset}" in msg, msg        # names the byte offset...
    assert msg.split(" at byte")[0], msg          # ...and the field before it
    assert seconds < CASE_SECONDS, f"{name} took {seconds:.2f}s"


def test_valid_file_truncated_at_every_offset(outcomes):
    truncated = outcomes["truncated"]
    assert len(truncated) == len(VALID)
    bad = {n: r for n, r in truncated.items() if r[0] != "GGUFError" or "at byte" not in r[1]}
    assert not bad, f"{len(bad)} truncations misbehaved, e.g. {next(iter(bad.items()))}"
    assert max(r[3] for r in truncated.values()) < CASE_SECONDS


# ---------------------------------------------------------------------------
# Messages a user reads
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("big-endian file", ["version at byte 4", "big-endian"]),
    ("version 1", ["version at byte 4", "version 1 is not supported"]),
    ("duplicate key", ["'k.str'", "duplicate key"]),
    ("duplicate tensor name", ["'tensor.aaaa'", "duplicate tensor name"]),
    ("alignment 13", ["general.alignment", "power of two"]),
    ("n_dims 5", ["n_dims", "outside 1..4"]),
    ("offset overlapping", ["overlaps tensor 'tensor.aaaa'"]),
    ("offset unaligned", ["offset", "not aligned"]),
    ("invalid UTF-8 key", ["metadata key 1", "invalid UTF-8"]),
    ("1 MiB tensor name", ["tensor 0 name", "limit of 63 bytes"]),
    ("arrays nested 5000 deep", ["'k.nested'", "nested deeper than 4"]),
    ("unknown tensor type 99", ["'tensor.aaaa' type", "unknown tensor type 99"]),
    ("string longer than the file", ["'k.str'", "remain in the file"]),
    ("too many arrays in an array", ["'k.nested' array length", "exceed the limit of 65536"]),
])
def test_messages_name_the_field(outcomes, name, words):
    msg = outcomes["cases"][name][1]
    for w in words:
        assert w in msg, msg


def test_random_byte_flips_never_escape(tmp_path):
    """Beyond the named cases: 400 random corruptions either open or raise GGUFError."""
    rng = np.random.default_rng(1)
    p = tmp_path / "f.gguf"
    kinds = {"ok": 0, "GGUFError": 0}
    for _ in range(400):
        data = bytearray(VALID)
        for at in rng.integers(0, len(data), rng.integers(1, 4)):
            data[at] = rng.integers(0, 256)
        p.write_bytes(bytes(data))
        try:
            with gguf.open(p):
                kinds["ok"] += 1
        except gguf.GGUFError:
            kinds["GGUFError"] += 1
    assert kinds["GGUFError"] > 50 and sum(kinds.values()) == 400


# ---------------------------------------------------------------------------
# Bools: the spec allows the bytes 0 and 1 only
# ---------------------------------------------------------------------------

BOOLS = gguf.encode({"b.one": True, "b.many": [False, True, False]},
                    types={"b.one": gguf.BOOL, "b.many": (ARRAY, gguf.BOOL)})


@pytest.mark.parametrize("byte", [2, 0x80, 0xFF])
@pytest.mark.parametrize("key, index", [("b.one", None), ("b.many", 0), ("b.many", 2)])
def test_bool_byte_other_than_0_or_1_is_refused_at_its_offset(tmp_path, key, index, byte):
    at = value_at(BOOLS, key) + (0 if index is None else 4 + 8 + index)  # arrays: etype, count
    p = tmp_path / "b.gguf"
    p.write_bytes(patch(BOOLS, at, bytes([byte])))
    with pytest.raises(gguf.GGUFError) as e:
        gguf.open(p)
    assert e.value.offset == at
    where = f"{key!r}" if index is None else f"{key!r}[{index}]"
    assert f"metadata {where} at byte {at}: bool byte {byte} is neither 0 nor 1" in str(e.value)


def test_bool_bytes_0_and_1_read_as_bools(tmp_path):
    p = tmp_path / "b.gguf"
    p.write_bytes(BOOLS)
    with gguf.open(p) as f:
        assert f.metadata["b.one"] is True and f.metadata["b.many"].tolist() == [False, True, False]
