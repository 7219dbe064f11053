"""ModelConfig: the decoder's switches read from real files, and refusals that name the key."""
from __future__ import annotations

import numpy as np
import pytest

from ember.formats import gguf
from ember.plugins.arch import UnsupportedModel, config_from_gguf
from tests.conftest import conformance_path

# file -> (arch, rope_style, qkv_bias, qk_norm, fused_qkv, fused_gate_up, tied, rope_base)
EXPECTED = {
    "stories260K.gguf": ("llama", "norm", False, "none", False, False, False, 10000.0),
    "s512-qwen2-F32.gguf": ("qwen2", "neox", True, "none", False, False, False, 1e6),
    "s512-qwen3-F32.gguf": ("qwen3", "neox", False, "head", False, False, False, 1e6),
    "v32k-phi3-Q8_0.gguf": ("phi3", "neox", False, "none", True, True, False, 10000.0),
    "v32k-llama-Q8_0.gguf": ("llama", "norm", False, "none", False, False, True, 10000.0),
    "v128k-llama3-Q8_0.gguf": ("llama", "norm", False, "none", False, False, True, 5e5),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_switches_from_real_files(name):
    with gguf.open(conformance_path("models", name)) as f:
        c = config_from_gguf(f)
    got = (c.arch, c.rope_style, c.qkv_bias, c.qk_norm, c.fused_qkv, c.fused_gate_up,
           c.tied_embeddings, c.rope_base)
    assert got == EXPECTED[name]
    assert c.n_head % c.n_head_kv == 0 and c.rope_dim <= c.head_dim


def test_stories260k_hyper_parameters():
    with gguf.open(conformance_path("models", "stories260K.gguf")) as f:
        c = config_from_gguf(f)
    assert (c.n_vocab, c.n_embd, c.n_layer, c.n_head, c.n_head_kv, c.head_dim, c.n_ff,
            c.n_ctx_train, c.rope_dim) == (512, 64, 5, 8, 4, 8, 172, 2048, 8)
    assert c.rms_eps == pytest.approx(1e-5)
    assert c.kv_cache_bytes(100, 4) == 2 * 5 * 100 * 4 * 8 * 4
    assert c.weights_bytes == sum(t.nbytes for t in c.tensors.values())


def _variant(tmp_path, change: dict, drop_keys=(), drop_tensors=()):
    src = gguf.open(conformance_path("models", "stories260K.gguf"))
    md = {k: v for k, v in src.metadata.items() if k not in drop_keys}
    md.update(change)
    types = {k: t for k, t in src.metadata_types.items() if k in md and k not in change}
    tensors = {n: t for n, t in src.tensors.items() if n not in drop_tensors}
    path = tmp_path / "variant.gguf"
    gguf.write(path, md, tensors, types=types)
    src.close()
    return gguf.open(path)


@pytest.mark.parametrize("change,drop,match", [
    ({"general.architecture": "falcon"}, (), "'falcon' is not supported"),
    ({}, ("general.architecture",), "None is not supported"),
    ({"llama.attention.head_count_kv": 3}, (), "not a multiple"),
    ({"llama.attention.head_count": 0}, (), "head_count is 0"),
    ({"llama.embedding_length": "64"}, (), "embedding_length"),
    ({"llama.rope.freq_base": -1.0}, (), "freq_base"),
    ({}, ("llama.block_count",), "block_count"),
    ({"llama.rope.scaling.type": "su"}, (), "'su' is not supported"),
    ({"llama.rope.scaling.type": "longrope"}, (), "rope_factors_long.weight"),
    ({"llama.rope.dimension_count": 9}, (), "dimension_count 9 must be even"),
    ({"llama.rope.scaling.factor": "2"}, (), "scaling factor"),
])
def test_refusals_name_the_problem(tmp_path, change, drop, match):
    f = _variant(tmp_path, change, drop_keys=drop)
    with pytest.raises(UnsupportedModel, match=match):
        config_from_gguf(f)
    f.close()


def test_missing_token_embd(tmp_path):
    f = _variant(tmp_path, {}, drop_tensors=("token_embd.weight",))
    with pytest.raises(UnsupportedModel, match="token_embd.weight"):
        config_from_gguf(f)
    f.close()


def test_defaults_when_optional_keys_are_absent(tmp_path):
    f = _variant(tmp_path, {}, drop_keys=("llama.attention.head_count_kv",
                                          "llama.rope.dimension_count",
                                          "llama.attention.layer_norm_rms_epsilon"))
    c = config_from_gguf(f)
    assert (c.n_head_kv, c.rope_dim, c.rope_base, c.rms_eps) == (c.n_head, c.head_dim, 10000.0,
                                                                 1e-5)
    f.close()


def test_linear_rope_scaling_and_rope_freqs(tmp_path):
    f = _variant(tmp_path, {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert config_from_gguf(f).rope_freq_scale == 0.25
    f.close()
    with gguf.open(conformance_path("models", "stories260K.gguf")) as f:
        c = config_from_gguf(f)
    assert c.rope_freq_scale == 1.0 and not c.rope_freqs


def test_long_rope_needs_both_factor_tensors(tmp_path):
    src = gguf.open(conformance_path("models", "stories260K.gguf"))
    tensors = dict(src.tensors, **{"rope_factors_long.weight": np.ones(4, np.float32)})
    gguf.write(tmp_path / "lr.gguf", src.metadata, tensors, types=src.metadata_types)
    src.close()
    with gguf.open(tmp_path / "lr.gguf") as f, pytest.raises(UnsupportedModel,
                                                             match="rope_factors_short"):
        config_from_gguf(f)
