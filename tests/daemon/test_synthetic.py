"""Synthetic random-weight models: llama.cpp's quant mix, a valid vocabulary, loadable files."""
from __future__ import annotations

import numpy as np
import pytest

from ember.daemon import synthetic
from ember.formats import gguf
from ember.formats.model_config import config_from_gguf

TINY = synthetic.SHAPES["tinyllama-1.1b"]
QWEN = synthetic.SHAPES["qwen2-0.5b"]


def _types(shape_name: str, quant: str) -> dict[str, str]:
    s = synthetic.SHAPES[shape_name]
    return {n: synthetic.tensor_type(quant, n, layer, s, shape[1])
            for n, shape, layer in synthetic.tensor_shapes(s) if len(shape) == 2}


def test_q4_k_m_follows_llama_cpp_rules_on_tinyllama():
    t = _types("tinyllama-1.1b", "Q4_K_M")
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    # use_more_bits(i, 22): i < 2, i >= 19, or (i - 2) % 3 == 2
    more = [i for i in range(22) if i < 2 or i >= 19 or (i - 2) % 3 == 2]
    assert more == [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]
    for i in range(22):
        want = "Q6_K" if i in more else "Q4_K"
        assert t[f"blk.{i}.ffn_down.weight"] == want and t[f"blk.{i}.attn_v.weight"] == want
        assert t[f"blk.{i}.attn_q.weight"] == t[f"blk.{i}.ffn_up.weight"] == "Q4_K"


def test_q4_k_m_falls_back_where_rows_are_not_256_wide():
    t = _types("qwen2-0.5b", "Q4_K_M")            # n_embd 896 = 3.5 * 256
    assert t["token_embd.weight"] == "Q8_0"        # tied output: Q6_K -> Q8_0
    assert "output.weight" not in t
    assert t["blk.3.attn_q.weight"] == "Q5_0"      # Q4_K -> Q5_0
    assert t["blk.0.attn_v.weight"] == "Q8_0"      # Q6_K -> Q8_0
    assert t["blk.0.ffn_down.weight"] == "Q6_K"    # 4864 = 19 * 256 keeps the K-quant


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0"])
def test_pure_mixes_use_one_type(quant):
    assert set(_types("tinyllama-1.1b", quant).values()) == {quant}


def test_vocab_is_a_valid_spm_vocabulary():
    tokens, scores, types = synthetic.spm_vocab(32000)
    assert len(tokens) == len(set(tokens)) == 32000 == len(scores) == len(types)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    assert types.dtype == np.int32 and scores.dtype == np.float32
    assert np.all(np.diff(scores[259:]) < 0)


@pytest.mark.parametrize("quant", synthetic.QUANTS)
def test_written_model_opens_with_the_right_shape(tmp_path, quant):
    path = synthetic.write_model("llama-tiny", quant, tmp_path / "m.gguf")
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        s = synthetic.SHAPES["llama-tiny"]
        assert (c.arch, c.n_embd, c.n_layer, c.n_head, c.n_head_kv, c.n_ff, c.n_vocab) == \
               (s.arch, s.n_embd, s.n_layer, s.n_head, s.n_head_kv, s.n_ff, s.n_vocab)
        assert f.metadata["tokenizer.ggml.model"] == "llama"
        w = f.tensors["blk.1.ffn_gate.weight"].numpy()
        assert 0.01 < float(w.std()) < 0.03          # N(0, 0.02) survived quantization


def test_writing_shows_progress_on_a_terminal_only(tmp_path):
    import subprocess
    import sys

    from tests.daemon.terminal import run_on_tty
    cmd = [sys.executable, "-m", "ember.daemon.synthetic", "llama-tiny", "Q8_0", str(tmp_path / "a.gguf")]
    rc, shown, _ = run_on_tty(cmd, stderr=True)
    n = len(synthetic.tensor_shapes(synthetic.get_shape("llama-tiny")))
    assert rc == 0 and b"a.gguf: 100%" in shown and f"{n}/{n}".encode() in shown
    cmd[-1] = str(tmp_path / "b.gguf")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_unknown_names_are_typed():
    with pytest.raises(synthetic.SyntheticError, match="shape"):
        synthetic.cached_model("gpt-17", "Q4_0")
    with pytest.raises(synthetic.SyntheticError, match="quant"):
        synthetic.cached_model("tinyllama-1.1b", "Q2_X")


def test_gemma3_1b_and_lfm2_1_2b_shapes_are_the_real_ones():
    g = {n: shape for n, shape, _ in synthetic.tensor_shapes(synthetic.SHAPES["gemma3-1b"])}
    assert g["blk.0.attn_q.weight"] == (1024, 1152) and g["blk.0.attn_k.weight"] == (256, 1152)
    assert g["blk.25.post_ffw_norm.weight"] == (1152,) and "output.weight" not in g
    lf = {n: shape for n, shape, _ in synthetic.tensor_shapes(synthetic.SHAPES["lfm2-1.2b"])}
    assert lf["blk.0.shortconv.in_proj.weight"] == (6144, 2048) and "blk.0.attn_q.weight" not in lf
    assert lf["blk.2.attn_k.weight"] == (512, 2048) and lf["token_embd_norm.weight"] == (2048,)
    t = _types("gemma3-1b", "Q4_K_M")                  # 1152 = 4.5 * 256: K-quants fall back
    assert t["blk.3.attn_q.weight"] == "Q5_0" and t["blk.3.ffn_down.weight"] == "Q4_K"


@pytest.mark.parametrize("shape_name", ["gemma3-tiny", "lfm2-tiny"])
def test_new_architectures_write_and_run_on_cpu(tmp_path, shape_name):
    from ember.plugins import cpu
    path = synthetic.write_model(shape_name, "Q8_0", tmp_path / "m.gguf")
    s = synthetic.SHAPES[shape_name]
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        assert (c.arch, c.n_layer, c.head_dim) == (s.arch, s.n_layer, s.hd)
        if s.arch == "gemma3":   # llama.cpp's default pattern: 5 local layers, then 1 global
            assert c.swa_layers == (True,) * 5 + (False,) and c.sliding_window == s.sliding_window
        else:
            assert c.layer_kinds == tuple("attn" if i in s.attn_layers else "conv" for i in range(s.n_layer))
            assert f.tensors["blk.0.shortconv.conv.weight"].type == "F32"
        r = cpu.CpuRunner(f, c, 128, 2)
        logits = r.prefill(list(range(1, 80)), all_logits=True)
        assert np.all(np.isfinite(logits)) and 0.05 < float(logits.std()) < 10
        r.close()
