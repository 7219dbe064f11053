"""`ember quantize`: llama.cpp's own quantized files are the oracle, byte for byte."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ember.daemon import cli
from ember.daemon.commands.quantize import llama_order
from ember.formats import gguf
from ember.formats.gguf import TensorData
from tests.conftest import conformance_path
from tests.daemon.terminal import run_on_tty

# ember's target type -> the conformance file llama.cpp's quantizer made from s512-llama-F32
PURE = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
        "Q4_K": "Q4_K_S", "Q6_K": "Q6_K", "F16": "F16", "BF16": "BF16"}


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
    assert cli.main(["quantize", str(model("s512-llama-F32.gguf")), str(out), qtype]) == 0
    ref = model(f"s512-llama-{PURE[qtype]}.gguf")
    with gguf.open(out) as got, gguf.open(ref) as want:
        bad = [n for n, t in want.tensors.items()
               if (got.tensors[n].type, bytes(got.tensors[n].data)) != (t.type, bytes(t.data))]
        assert not bad, f"{len(bad)} tensors differ, first {bad[0]}"
        for t in got.tensors.values():       # norms and other 1-D tensors stay F32
            assert t.type == ("F32" if len(t.shape) == 1 else qtype), t.name
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
        assert {t.type for t in f.tensors.values()} == {"Q4_0", "F32"}
        assert f.metadata["general.file_type"] == 2
        assert list(f.tensors) == list(s.tensors)


@pytest.mark.parametrize("args, words", [
    (["s512-llama-F32.gguf", "Q9_9"], "unknown quant type 'Q9_9'"),
    (["s512-llama-F32.gguf", "IQ2_XXS"], "unknown quant type"),
    (["s512-llama-F32.gguf", "I8"], "cannot quantize to I8"),
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
    gguf.write(src, {}, {"q81.weight": TensorData("Q8_1", (1, 32), bytes(36))})
    assert cli.main(["quantize", str(src), str(tmp_path / "o2.gguf"), "Q4_0", "--allow-requantize"]) == 2
    err = capsys.readouterr().err
    assert "cannot read Q8_1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2.gguf").exists()
