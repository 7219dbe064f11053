"""`ember inspect`: the report against the file it describes; bad files are one line and exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ember.daemon import cli
from ember.formats import gguf, quant_blocks
from ember.formats.gguf import TensorData
from tests.conftest import conformance_models, conformance_path


def inspect_json(capsys, path) -> dict:
    assert cli.main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", conformance_models() or ["(none)"])
def test_json_report_matches_the_file(capsys, name):
    path = conformance_path("models", name)
    doc = inspect_json(capsys, path)
    assert doc["verdict"]["runs"] and doc["verdict"]["reasons"] == []  # ember runs them all
    with gguf.open(path) as f:
        md = f.metadata
        assert doc["architecture"] == md["general.architecture"]
        assert doc["gguf_version"] == f.version and doc["file_bytes"] == path.stat().st_size
        assert [t["name"] for t in doc["tensors"]] == list(f.tensors)
        for row in doc["tensors"]:
            t = f.tensors[row["name"]]
            assert (row["type"], tuple(row["shape"]), row["bytes"]) == (t.type, t.shape, t.nbytes)
        assert doc["tensor_bytes"] == sum(t.nbytes for t in f.tensors.values())
        assert doc["tensor_bytes"] <= doc["file_bytes"]
        mix = {}
        for t in f.tensors.values():
            mix.setdefault(t.type, [0, 0])
            mix[t.type][0] += 1
            mix[t.type][1] += t.nbytes
        assert {k: [v["tensors"], v["bytes"]] for k, v in doc["quant_mix"].items()} == mix
        tok = doc["tokenizer"]
        assert tok["vocab_size"] == len(md["tokenizer.ggml.tokens"])
        assert tok["model"] == md["tokenizer.ggml.model"]
        assert tok["pre"] == md.get("tokenizer.ggml.pre")
        assert tok["bos_id"] == md.get("tokenizer.ggml.bos_token_id")
        assert tok["eos_id"] == md.get("tokenizer.ggml.eos_token_id")
        arch = md["general.architecture"]
        hp = doc["hyperparameters"]
        assert hp["n_layer"] == md[f"{arch}.block_count"]
        assert hp["n_embd"] == md[f"{arch}.embedding_length"]
        assert hp["n_vocab"] == f.tensors["token_embd.weight"].shape[0]
        assert hp["tied_embeddings"] == ("output.weight" not in f.tensors)


def test_text_report_of_a_mixed_model(capsys):
    path = conformance_path("models", "s512-llama-Q4_K_M.gguf")
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture  llama" in out
    assert "n_layer          2" in out and "n_head_kv        4" in out
    assert "model llama, pre None, vocab 512" in out and "bos 1, eos 2" in out
    for line in ("blk.1.ffn_down.weight     Q6_K  256x768  161280",
                 "output_norm.weight        F32       256    1024"):
        assert line in out
    mix = out.split("quant mix")[1]
    assert "Q4_K       13 tensors" in mix and "Q6_K        3 tensors" in mix and "F32         5" in mix


def test_unsupported_architecture_shows_raw_metadata(tmp_path, capsys):
    path = tmp_path / "gpt2.gguf"
    md = {"general.architecture": "gpt2", "gpt2.block_count": 3, "gpt2.context_length": 1024,
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "c"],
          "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2,
          "long.array": list(range(100))}
    gguf.write(path, md, {"token_embd.weight": np.zeros((3, 4), np.float32),
                          "blk.0.w": TensorData("Q8_0", (2, 32), bytes(68))})
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture 'gpt2' is not supported" in out
    assert "gpt2.block_count" in out and "gpt2.context_length" in out
    assert "[100 x UINT32]" in out
    assert "model gpt2, pre None, vocab 3" in out and "bos 0, eos 2" in out
    doc = inspect_json(capsys, path)
    assert doc["hyperparameters"] is None and doc["metadata"]["gpt2.block_count"] == 3
    assert doc["quant_mix"] == {"Q8_0": {"tensors": 1, "bytes": 68}, "F32": {"tensors": 1, "bytes": 48}}


def run_ember(*args):
    return subprocess.run([sys.executable, "-m", "ember.daemon.cli", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("damage", ["truncated", "bad magic", "huge count", "text file",
                                    "missing", "directory"])
def test_bad_file_is_one_line_and_exit_2(tmp_path, damage):
    good = conformance_path("models", "stories260K.gguf").read_bytes()
    path = tmp_path / "m.gguf"
    if damage == "truncated":
        path.write_bytes(good[:5000])
    elif damage == "bad magic":
        path.write_bytes(b"GGML" + good[4:])
    elif damage == "huge count":
        path.write_bytes(good[:8] + (2**64 - 1).to_bytes(8, "little") + good[16:])
    elif damage == "text file":
        path.write_text("hello, I am not a model\n" * 10)
    elif damage == "directory":
        path.mkdir()
    for extra in ([], ["--json"]):
        proc = run_ember("inspect", str(path), *extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("ember inspect: ")
        if damage not in ("missing", "directory"):
            assert str(path) in lines[0] and "at byte" in lines[0]


def tiny_llama(tmp_path):
    """A small but complete llama file, so corruption reaches every part of the report."""
    md = {"general.architecture": "llama", "general.name": "tiny", "llama.block_count": 1,
          "llama.embedding_length": 32, "llama.feed_forward_length": 64,
          "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
          "llama.context_length": 128, "llama.rope.freq_base": 10000.0,
          "llama.attention.layer_norm_rms_epsilon": 1e-5,
          "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"],
          "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0], "tokenizer.ggml.token_type": [2, 3, 3, 1],
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    types = {"llama.rope.freq_base": gguf.FLOAT32, "llama.attention.layer_norm_rms_epsilon": gguf.FLOAT32,
             "tokenizer.ggml.token_type": (gguf.ARRAY, gguf.INT32)}
    z = np.zeros
    tensors = {"token_embd.weight": z((4, 32), np.float32), "output_norm.weight": z(32, np.float32),
               "blk.0.attn_q.weight": TensorData("Q8_0", (32, 32), bytes(32 * 34))}
    path = tmp_path / "tiny.gguf"
    gguf.write(path, md, tensors, types=types)
    return path


def test_random_corruption_never_escapes_as_a_traceback(tmp_path, capsys):
    """Byte flips in the header region: inspect reports (exit 0) or refuses (exit 2), nothing else."""
    good = tiny_llama(tmp_path).read_bytes()
    with gguf.open(tmp_path / "tiny.gguf") as f:
        header = f.data_offset
    rng = np.random.default_rng(7)
    bad = tmp_path / "bad.gguf"
    codes = []
    for i in range(300):
        data = bytearray(good)
        for at in rng.integers(0, header, rng.integers(1, 3)):
            data[at] = rng.integers(0, 256)
        bad.write_bytes(bytes(data))
        codes.append(cli.main(["inspect", str(bad)] + (["--json"] if i % 2 else [])))
        out, err = capsys.readouterr()
        assert (codes[-1], bool(out)) in ((0, True), (2, False)), err
        assert codes[-1] == 0 or len(err.strip().splitlines()) == 1
    assert codes.count(2) > 30 and codes.count(0) > 30


def test_nested_metadata_is_summarized(tmp_path, capsys):
    path = tmp_path / "n.gguf"
    gguf.write(path, {"general.architecture": "x", "nest": [[1, 2], list(range(20))]})
    doc = inspect_json(capsys, path)
    assert doc["metadata"]["nest"] == [[1, 2], "[20 x UINT32]"]
    assert doc["unsupported"] and doc["tokenizer"]["vocab_size"] is None


# ---------------------------------------------------------------------------
# The verdict: can ember run the file, and if not, every reason why
# ---------------------------------------------------------------------------

def rewritten(tmp_path, name: str, **changes) -> Path:
    """A copy of a conformance model with some metadata changed (None: key removed)."""
    path = tmp_path / f"changed-{name}"
    with gguf.open(conformance_path("models", name)) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        for k, v in changes.items():
            md.pop(k, None), types.pop(k, None)
            if v is not None:
                md[k] = v
        gguf.write(path, md, f.tensors, types=types)
    return path


def test_a_file_ember_runs_says_so(capsys):
    path = conformance_path("models", "v151k-qwen2-Q8_0.gguf")
    assert inspect_json(capsys, path)["verdict"] == {"runs": True, "reasons": [], "notes": []}
    assert cli.main(["inspect", str(path)]) == 0
    assert "verdict       ember can run this file\n\n" in capsys.readouterr().out


def test_chat_template_notes(tmp_path, capsys):
    """Not reasons to refuse (plain prompts work), but said: the ChatML fallback, a broken template."""
    path = conformance_path("models", "stories260K.gguf")
    assert inspect_json(capsys, path)["verdict"]["notes"] == [
        "no tokenizer.chat_template: chat messages are rendered as ChatML (<|im_start|>role ... <|im_end|>)"]
    broken = rewritten(tmp_path, "v151k-qwen2-Q8_0.gguf", **{"tokenizer.chat_template": "{% for %}"})
    verdict = inspect_json(capsys, broken)["verdict"]
    assert verdict["runs"] is True and len(verdict["notes"]) == 1
    assert verdict["notes"][0].startswith("chat requests will fail, plain prompts work: "
                                          "chat template does not compile")
    assert cli.main(["inspect", str(broken)]) == 0
    assert "verdict       ember can run this file\n  note: chat requests will fail" in \
        capsys.readouterr().out


def test_unknown_pre_tokenizer_is_named(tmp_path, capsys):
    path = rewritten(tmp_path, "v151k-qwen2-Q8_0.gguf", **{"tokenizer.ggml.pre": "klingon-v9"})
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "verdict       ember cannot run this file:\n" in out
    assert "  tokenizer: unknown pre-tokenizer 'klingon-v9' (tokenizer.ggml.pre)" in out
    doc = inspect_json(capsys, path)
    assert doc["verdict"]["runs"] is False and doc["hyperparameters"] is not None
    [reason] = doc["verdict"]["reasons"]
    assert reason["part"] == "tokenizer" and "'klingon-v9'" in reason["reason"]


def test_refused_pre_tokenizer_says_why(tmp_path, capsys):
    path = rewritten(tmp_path, "v151k-qwen2-Q8_0.gguf", **{"tokenizer.ggml.pre": "kimi-k2"})
    [reason] = inspect_json(capsys, path)["verdict"]["reasons"]
    assert reason["reason"].startswith("pre-tokenizer 'kimi-k2' (tokenizer.ggml.pre) is not "
                                       "supported: llama.cpp splits it with a hand-written splitter")


def test_every_reason_is_listed(tmp_path, capsys):
    """Architecture (or rope scaling), tokenizer and tensor type are each checked on their own."""
    path = tmp_path / "many.gguf"
    uncomputable = sorted(t for t in quant_blocks.BLOCKS if not quant_blocks.can_compute(t))
    assert uncomputable, "every readable type has a codec now: pick another refusal"
    tname = uncomputable[0]
    elems, nbytes = quant_blocks.BLOCKS[tname]
    md = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 32,
          "llama.feed_forward_length": 64, "llama.attention.head_count": 4,
          "llama.rope.scaling.type": "klingon-rope",
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "klingon-v9",
          "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"]}
    gguf.write(path, md, {"token_embd.weight": np.zeros((2, 32), np.float32),
                          "blk.0.odd.weight": TensorData(tname, (2, elems), bytes(2 * nbytes))})
    verdict = inspect_json(capsys, path)["verdict"]
    parts = {r["part"]: r["reason"] for r in verdict["reasons"]}
    assert verdict["runs"] is False and list(parts) == ["model", "tokenizer", "tensor type"]
    assert "'klingon-rope'" in parts["model"]
    assert "'klingon-v9'" in parts["tokenizer"]
    assert parts["tensor type"] == f"tensor type {tname} is not supported (1 tensors, e.g. 'blk.0.odd.weight')"
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(f"  {p}: {r}" in out for p, r in parts.items())


def test_unsupported_architecture_is_the_verdict(tmp_path, capsys):
    path = rewritten(tmp_path, "v151k-qwen2-Q8_0.gguf", **{"general.architecture": "mamba9"})
    verdict = inspect_json(capsys, path)["verdict"]
    assert verdict["runs"] is False
    assert verdict["reasons"][0]["part"] == "model" and "'mamba9'" in verdict["reasons"][0]["reason"]


def test_a_new_architecture_fixture_runs(capsys):
    path = conformance_path("arch", "models", "s512-gemma3-Q8_0.gguf")
    verdict = inspect_json(capsys, path)["verdict"]
    assert verdict["runs"] and verdict["reasons"] == []


def test_an_embedding_model_runs_and_says_it_makes_vectors(capsys):
    doc = inspect_json(capsys, conformance_path("arch", "models", "bge-bert-F32.gguf"))
    verdict = doc["verdict"]
    assert verdict["runs"] and verdict["reasons"] == []
    assert verdict["notes"] == ["an embedding model (pooling cls): it makes vectors (`embed` op, "
                                "POST /v1/embeddings, Model.embed), not text"]
