"""`ember quantize`: llama.cpp's own quantized files are the oracle, byte for byte."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from ember.daemon import cli
from ember.daemon.commands.quantize import llama_order
from ember.formats import gguf
from ember.formats.gguf import TensorData
from tests.conftest import REQUIRE_ORACLES, absent, conformance_path
from tests.daemon.terminal import run_on_tty

# type name -> (the pure conformance file llama.cpp's quantizer made from s512-llama-F32,
# the ggml type of its matrices)
PURE = {"Q8_0": ("Q8_0", "Q8_0"), "Q4_0": ("Q4_0", "Q4_0"), "Q4_1": ("Q4_1", "Q4_1"),
        "Q5_0": ("Q5_0", "Q5_0"), "Q5_1": ("Q5_1", "Q5_1"), "F16": ("F16", "F16"),
        "BF16": ("BF16", "BF16"), "Q2_K": ("Q2_K", "Q2_K"), "Q3_K_S": ("Q3_K_S", "Q3_K"),
        "Q4_K_S": ("Q4_K_S", "Q4_K"), "Q5_K_S": ("Q5_K_S", "Q5_K"), "Q6_K": ("Q6_K", "Q6_K"),
        "IQ4_NL": ("IQ4_NL", "IQ4_NL")}


def model(name):
    return conformance_path("models", name)


def run_ember(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ember.daemon.cli", *args],
                          capture_output=True, text=True, timeout=120, **kw)


def test_q8_0_via_the_cli_matches_llama_cpp(tmp_path):
    out = tmp_path / "q8.gguf"
    proc = run_ember("quantize", str(model("s512-llama-F32.gguf")), str(out), "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""                     # no progress bar when stderr is not a terminal
    assert "16 of 21 tensors converted" in proc.stdout
    ref = model("s512-llama-Q8_0.gguf")
    with gguf.open(out) as got, gguf.open(ref) as want:
        assert list(got.tensors) == list(want.tensors)
        for name, t in want.tensors.items():
            g = got.tensors[name]
            assert (g.type, g.shape) == (t.type, t.shape), name
            assert bytes(g.data) == bytes(t.data), name
        assert got.metadata == want.metadata and got.metadata_types == want.metadata_types
    assert out.read_bytes() == ref.read_bytes()  # the whole file, header included


@pytest.mark.parametrize("qtype", [t for t in PURE if t != "Q8_0"])
def test_every_pure_type_matches_llama_cpp(tmp_path, qtype):
    out = tmp_path / f"{qtype}.gguf"
    assert cli.main(["quantize", str(model("s512-llama-F32.gguf")), str(out), qtype, "--pure"]) == 0
    ref_name, mtype = PURE[qtype]
    ref = model(f"s512-llama-{ref_name}.gguf")
    with gguf.open(out) as got, gguf.open(ref) as want:
        bad = [n for n, t in want.tensors.items()
               if (got.tensors[n].type, bytes(got.tensors[n].data)) != (t.type, bytes(t.data))]
        assert not bad, f"{len(bad)} tensors differ, first {bad[0]}"
        for t in got.tensors.values():       # norms and other 1-D tensors stay F32
            assert t.type == ("F32" if len(t.shape) == 1 else mtype), t.name
    assert out.read_bytes() == ref.read_bytes()


def test_rows_that_do_not_fit_fall_back_like_llama_cpp(tmp_path, capsys):
    """stories260K's ffn_down rows are 172 wide: llama.cpp writes them as F16."""
    out = tmp_path / "s.gguf"
    assert cli.main(["quantize", str(model("stories260K.gguf")), str(out), "q8_0"]) == 0
    with gguf.open(out) as f:
        assert f.tensors["blk.0.ffn_down.weight"].type == "F16"
        assert f.tensors["blk.0.ffn_up.weight"].type == "Q8_0"
    assert out.read_bytes() == model("stories260K-Q8_0.gguf").read_bytes()


def test_requantizing_needs_a_flag(tmp_path, capsys):
    src, out = model("s512-llama-Q8_0.gguf"), tmp_path / "r.gguf"
    assert cli.main(["quantize", str(src), str(out), "Q4_0"]) == 2
    assert "already Q8_0" in capsys.readouterr().err and not out.exists()
    assert cli.main(["quantize", str(src), str(out), "Q4_0", "--allow-requantize"]) == 0
    with gguf.open(out) as f, gguf.open(src) as s:
        # llama.cpp's Q4_0 is a mix too: the output matrix gets Q6_K
        assert {t.type for t in f.tensors.values()} == {"Q4_0", "Q6_K", "F32"}
        assert f.tensors["output.weight"].type == "Q6_K"
        assert f.metadata["general.file_type"] == 2
        assert list(f.tensors) == list(s.tensors)


@pytest.mark.parametrize("args, words", [
    (["s512-llama-F32.gguf", "Q9_9"], "unknown quant type 'Q9_9'; valid types: F32, F16, BF16, Q4_0"),
    (["s512-llama-F32.gguf", "IQ2_XXS"], "unknown quant type"),
    (["s512-llama-F32.gguf", "I8"], "Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS, Q3_K, Q4_K, Q5_K"),
    (["/nonexistent.gguf", "Q8_0"], "No such file"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, words):
    src = args[0] if args[0].startswith("/") else str(model(args[0]))
    out = tmp_path / "o.gguf"
    proc = run_ember("quantize", src, str(out), args[1])
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_corrupt_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(model("s512-llama-F32.gguf").read_bytes()[:100_000])
    proc = run_ember("quantize", str(bad), str(tmp_path / "o.gguf"), "Q8_0")
    assert proc.returncode == 2 and "runs past the end of the file" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.gguf").exists()


def test_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = tmp_path / "m.gguf"
    src.write_bytes(model("stories260K.gguf").read_bytes())
    assert cli.main(["quantize", str(src), str(src), "Q8_0"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert src.read_bytes() == model("stories260K.gguf").read_bytes()


def test_progress_bar_on_a_terminal_unless_quiet(tmp_path):
    cmd = [sys.executable, "-m", "ember.daemon.cli", "quantize", str(model("stories260K.gguf"))]
    rc, shown, _ = run_on_tty(cmd + [str(tmp_path / "o.gguf"), "Q8_0"], stderr=True)
    assert rc == 0
    text = shown.decode()
    assert "0/48" in text and "100%" in text and " 48/48 " in text and "tensor/s" in text
    rc, shown, _ = run_on_tty(cmd + [str(tmp_path / "q.gguf"), "Q8_0", "--quiet"], stderr=True)
    assert rc == 0 and shown == b""


def test_output_is_read_only_and_can_be_replaced(tmp_path):
    out = tmp_path / "o.gguf"
    for _ in range(2):          # the second run replaces the read-only first result
        proc = run_ember("quantize", str(model("stories260K.gguf")), str(out), "Q8_0")
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_mode & 0o777 == 0o444


def test_llama_order():
    names = ["blk.10.a", "blk.2.b", "output.weight", "blk.2.a", "token_embd.weight", "rope_freqs"]
    assert llama_order(names) == ["output.weight", "rope_freqs", "token_embd.weight",
                                  "blk.2.a", "blk.2.b", "blk.10.a"]


def test_integer_tensors_are_copied_and_unreadable_types_refused(tmp_path, capsys):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    ids = np.arange(64, dtype=np.int32).reshape(2, 32)
    w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    gguf.write(src, {"general.architecture": "llama"}, {"ids.weight": ids, "w.weight": w})
    assert cli.main(["quantize", str(src), str(out), "Q8_0"]) == 0
    with gguf.open(out) as f:
        assert f.tensors["ids.weight"].type == "I32"
        assert bytes(f.tensors["ids.weight"].data) == ids.tobytes()
        assert f.tensors["w.weight"].type == "Q8_0"
    capsys.readouterr()
    gguf.write(src, {}, {"q81.weight": TensorData("Q8_1", (2, 32), bytes(72))})
    assert cli.main(["quantize", str(src), str(tmp_path / "o2.gguf"), "Q4_0", "--allow-requantize"]) == 2
    err = capsys.readouterr().err
    assert "cannot read Q8_1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2.gguf").exists()


# ---------------------------------------------------------------------------
# The mixes against a live llama.cpp: llama_model_quantize in the oracle venv
# ---------------------------------------------------------------------------

LLAMA_PYTHON = os.environ.get("EMBER_LLAMA_PYTHON", "/work/llamaenv/bin/python")
# llama-quantize's name -> llama_ftype (llama.h)
MIXES = {"Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
         "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}
QUANTIZE = """
import sys, llama_cpp as L
p = L.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), 1
sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def llama_quantize(src, out, ftype: int) -> None:
    if not os.path.exists(LLAMA_PYTHON):
        absent(f"llama-cpp-python interpreter not found at {LLAMA_PYTHON} (set EMBER_LLAMA_PYTHON)",
               REQUIRE_ORACLES)
    r = subprocess.run([LLAMA_PYTHON, "-c", QUANTIZE, str(src), str(out), str(ftype)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A 16-layer GQA-4 llama with tied embeddings (no output.weight), random F32
    weights and stories260K's vocabulary: enough layers for every use_more_bits /
    n_layer/8 / n_layer/16 rule of the mixes, and the tied-embedding rule."""
    path = tmp_path_factory.mktemp("deep") / "deep-F32.gguf"
    src = gguf.open(model("s512-llama-F32.gguf"))      # its metadata arrays are views: keep it open
    md, types = dict(src.metadata), dict(src.metadata_types)
    n_layer, n_embd, n_ff, kv = 16, 256, 256, 64
    md.update({"llama.block_count": n_layer, "llama.feed_forward_length": n_ff,
               "llama.attention.head_count_kv": 2, "general.name": "deep"})
    rng = np.random.default_rng(7)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t = {"token_embd.weight": w(512, n_embd), "output_norm.weight": np.ones(n_embd, np.float32)}
    for i in range(n_layer):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": np.ones(n_embd, np.float32),
                  p + "attn_q.weight": w(n_embd, n_embd), p + "attn_k.weight": w(kv, n_embd),
                  p + "attn_v.weight": w(kv, n_embd), p + "attn_output.weight": w(n_embd, n_embd),
                  p + "ffn_norm.weight": np.ones(n_embd, np.float32),
                  p + "ffn_gate.weight": w(n_ff, n_embd), p + "ffn_up.weight": w(n_ff, n_embd),
                  p + "ffn_down.weight": w(n_embd, n_ff)})
    gguf.write(path, md, t, types=types, version=3)
    src.close()
    return path


@pytest.mark.parametrize("source, mix", [(s, m) for s in ("deep", "stories260K") for m in MIXES]
                         + [("s512-qwen2-F32", m) for m in ("Q2_K", "Q3_K_M", "IQ4_XS")])
def test_mix_is_byte_identical_to_llama_quantize(tmp_path, request, source, mix):
    """The deep model exercises the per-layer rules, stories260K (a real model, rows
    of 64 and 172) the output rule and the row fallbacks, qwen2 biases and GQA 2."""
    src = request.getfixturevalue("deep_model") if source == "deep" else model(f"{source}.gguf")
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    llama_quantize(src, theirs, MIXES[mix])
    assert cli.main(["quantize", str(src), str(ours), mix.lower(), "--quiet"]) == 0
    if sha256(ours) != sha256(theirs):
        with gguf.open(ours) as got, gguf.open(theirs) as want:
            bad = [(n, got.tensors[n].type, t.type) for n, t in want.tensors.items()
                   if (got.tensors[n].type, bytes(got.tensors[n].data)) != (t.type, bytes(t.data))]
            pytest.fail(f"{mix} on {source}: {len(bad)} tensors differ (name, ours, llama.cpp): {bad[:5]}")
    assert ours.stat().st_mode & 0o777 == 0o444


def test_mixes_give_layers_more_bits_where_llama_cpp_does(deep_model, tmp_path):
    """Names the rules the byte test covers, so a regression says which one broke."""
    out = tmp_path / "m.gguf"
    assert cli.main(["quantize", str(deep_model), str(out), "Q4_K_M", "-q"]) == 0
    with gguf.open(out) as f:
        types = {n: t.type for n, t in f.tensors.items()}
    assert types["token_embd.weight"] == "Q6_K"            # tied: quantized like the output
    more = [i for i in range(16) if i < 2 or i >= 14 or (i - 2) % 3 == 2]     # use_more_bits
    assert [i for i in range(16) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more
    assert [i for i in range(16) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"] == more
    assert {types[f"blk.{i}.{r}.weight"] for i in range(16)
            for r in ("attn_q", "attn_k", "attn_output", "ffn_up", "ffn_gate")} == {"Q4_K"}
    assert types["output_norm.weight"] == "F32"


def test_aliases_and_case_follow_llama_quantize(deep_model, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert cli.main(["quantize", str(deep_model), str(a), "q4_k", "-q"]) == 0      # alias of Q4_K_M
    assert cli.main(["quantize", str(deep_model), str(b), "Q4_K_M", "-q"]) == 0
    assert a.read_bytes() == b.read_bytes()
    with gguf.open(a) as f:
        assert f.metadata["general.file_type"] == 15
