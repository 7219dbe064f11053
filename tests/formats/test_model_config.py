"""ModelConfig: the decoder's switches read from real files, and refusals that name the key."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from ember.formats import gguf
from ember.plugins import reference
from ember.formats.model_config import ModelConfig, UnsupportedModel, config_from_gguf
from ember.kernels.rope import rope_cos_sin, rope_factors
from ember.plugins.features import features
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


# ---------------------------------------------------------------------------
# The architectures beyond llama (../shared/conformance/arch)
# ---------------------------------------------------------------------------

# arch fixture -> the switches that make it what it is (values from arch/README.md)
ARCH_EXPECTED = {
    "gemma2": dict(act="gelu", post_norms=True, embd_scale=128 ** 0.5, attn_softcap=5.0,
                   final_softcap=6.0, sliding_window=32, swa_layers=(True, False)),
    "gemma3": dict(act="gelu", post_norms=True, qk_norm="head", head_dim=48, sliding_window=16,
                   swa_layers=(True,) * 5 + (False,), rope_base=1e6, rope_base_swa=1e4),
    "smollm3": dict(rope_style="norm", rope_layers=(True, True, True, False), rope_base=5e4),
    "granite": dict(embd_scale=1.5, residual_scale=0.5, attn_scale=0.25,
                    logit_scale=pytest.approx(0.4)),
    "olmo2": dict(pre_norms=False, post_norms=True, qk_norm="full", tied_embeddings=False),
    "lfm2": dict(qk_norm="head", n_head_kv=2, layer_kinds=("conv", "attn", "conv", "attn"),
                 conv_l_cache=3, output_norm="token_embd_norm.weight"),
    "phi3": dict(rope_scaling="longrope", rope_dim=24, head_dim=32, n_ctx_orig=512,
                 rope_attn_factor=pytest.approx(1.1547005)),
    "qwen2": dict(rope_scaling="yarn", rope_freq_scale=0.25, n_ctx_orig=256, yarn_ext_factor=1.0,
                  yarn_beta_fast=32.0, yarn_beta_slow=1.0),
}


def _arch_config(arch: str):
    with gguf.open(conformance_path("arch", "models", f"s512-{arch}-F32.gguf")) as f:
        return config_from_gguf(f)


@pytest.mark.parametrize("arch", ARCH_EXPECTED)
def test_arch_switches_from_the_fixtures(arch):
    c = _arch_config(arch)
    got = {k: getattr(c, k) for k in ARCH_EXPECTED[arch]}
    assert got == ARCH_EXPECTED[arch]
    # everything not listed keeps llama's behaviour
    assert (c.logit_scale, c.residual_scale) == (ARCH_EXPECTED[arch].get("logit_scale", 1.0),
                                                 ARCH_EXPECTED[arch].get("residual_scale", 1.0))


FIXTURES = {"bert": "bge-bert-F32.gguf"}   # arch -> its file, where not s512-ARCH-F32.gguf


def test_bert_is_an_encoder_with_the_files_pooling_and_no_cache():
    with gguf.open(conformance_path("arch", "models", FIXTURES["bert"])) as f:
        c = config_from_gguf(f)
    assert (c.arch, c.encoder, c.pooling, c.n_embd, c.n_layer, c.n_head, c.n_ff, c.n_ctx_train) == \
        ("bert", True, "cls", 32, 2, 2, 128, 512)
    assert c.rms_eps == pytest.approx(1e-12)          # the LayerNorm eps
    assert c.kv_cache_bytes(512) == 0                 # an encoder reads each text whole, once
    assert features(c) == ["encoder"]


def _arch_variant(tmp_path, arch: str, change=None, drop_keys=(), drop_tensors=(), add=None):
    src = gguf.open(conformance_path("arch", "models", FIXTURES.get(arch, f"s512-{arch}-F32.gguf")))
    change = change or {}
    md = {k: v for k, v in src.metadata.items() if k not in drop_keys}
    md.update(change)
    types = {k: t for k, t in src.metadata_types.items() if k in md and k not in change}
    tensors = {n: t for n, t in src.tensors.items() if n not in drop_tensors}
    tensors.update(add or {})
    path = tmp_path / f"{arch}-variant.gguf"
    gguf.write(path, md, tensors, types=types)
    src.close()
    return path


@pytest.mark.parametrize("arch,change,drop,match", [
    ("gemma2", {}, ("gemma2.attention.sliding_window",), "'gemma2.attention.sliding_window' is missing"),
    ("gemma2", {"gemma2.attention.sliding_window": -4}, (), "sliding_window' is -4"),
    ("gemma2", {"gemma2.attention.sliding_window": 0,
                "gemma2.attention.sliding_window_pattern": [True, False]}, (),
     "'gemma2.attention.sliding_window_pattern' marks sliding-window layers but"),
    ("gemma3", {"gemma3.attention.sliding_window_pattern": [True, False, True]}, (),
     "'gemma3.attention.sliding_window_pattern' has 3 entries for 6 layers"),
    ("gemma3", {"gemma3.attention.sliding_window_pattern": -1}, (), "pattern' is -1"),
    ("lfm2", {"lfm2.attention.head_count_kv": [0, 2, 0]}, (), "has 3 entries for 4 layers"),
    ("lfm2", {"lfm2.attention.head_count_kv": [0, 2, 0, 4]}, (), "must all be equal"),
    ("lfm2", {"lfm2.attention.head_count_kv": [0.0, 2.5, 0.0, 2.5]}, (), "must hold integers"),
    ("lfm2", {}, ("lfm2.shortconv.l_cache",), "'lfm2.shortconv.l_cache' is missing"),
    ("smollm3", {"smollm3.attention.head_count_kv": [0, 1, 1, 1]}, (), "lfm2 feature"),
    ("qwen2", {"qwen2.rope.scaling.yarn_beta_fast": "32"}, (), "yarn_beta_fast"),
    ("phi3", {"phi3.rope.scaling.attn_factor": -1.0}, (), "attn_factor is -1.0"),
    ("bert", {"bert.pooling_type": 0}, (), r"bert.pooling_type is 0: .* 0 \(none\)"),
    ("bert", {"bert.pooling_type": 4}, (), "bert.pooling_type is 4"),
    ("bert", {}, ("bert.pooling_type",), "bert.pooling_type is 0"),
    ("bert", {"bert.attention.causal": True}, (), "bert.attention.causal is true"),
    ("bert", {}, ("bert.attention.layer_norm_epsilon",), "'bert.attention.layer_norm_epsilon' is missing"),
])
def test_inconsistent_windows_and_patterns_are_refused_by_key(tmp_path, arch, change, drop, match):
    with gguf.open(_arch_variant(tmp_path, arch, change, drop_keys=drop)) as f:
        with pytest.raises(UnsupportedModel, match=match):
            config_from_gguf(f)


@pytest.mark.parametrize("arch,tensor", [
    ("gemma2", "blk.1.post_ffw_norm.weight"),
    ("gemma3", "blk.4.attn_k_norm.weight"),
    ("olmo2", "blk.0.attn_q_norm.weight"),
    ("lfm2", "blk.2.shortconv.conv.weight"),
    ("lfm2", "token_embd_norm.weight"),
    ("phi3", "rope_factors_short.weight"),
    ("bert", "position_embd.weight"),
    ("bert", "token_embd_norm.bias"),
    ("bert", "blk.1.layer_output_norm.bias"),
])
def test_a_missing_architecture_tensor_is_refused_at_load_by_name(tmp_path, arch, tensor):
    from ember.daemon import engine
    path = _arch_variant(tmp_path, arch, drop_tensors=(tensor,))
    with pytest.raises(UnsupportedModel, match=re.escape(repr(tensor))):
        engine.load(path, backend="reference", n_ctx=64)


def test_rope_factor_tensors_of_the_wrong_size_are_refused(tmp_path):
    path = _arch_variant(tmp_path, "phi3", add={"rope_factors_long.weight": np.ones(10, np.float32)})
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        assert rope_factors(c, f, 512) is not None                 # short factors: fine
        with pytest.raises(UnsupportedModel, match="'rope_factors_long.weight' has 10 values"):
            rope_factors(c, f, 1024)


# ---------------------------------------------------------------------------
# rope_cos_sin: the one rope table
# ---------------------------------------------------------------------------

def test_rope_plain_table_is_pos_times_base_power():
    c = _arch_config("smollm3")
    cos, sin = rope_cos_sin(c, 50)
    i = np.arange(c.rope_dim // 2)
    theta = np.arange(50)[:, None] * c.rope_base ** (-2.0 * i / c.rope_dim)
    assert cos.shape == (50, c.rope_dim // 2) and cos.dtype == np.float32
    assert np.allclose(cos, np.cos(theta), atol=1e-6) and np.allclose(sin, np.sin(theta), atol=1e-6)


def test_longrope_picks_the_factors_by_n_ctx_and_scales_by_the_attn_factor():
    c = _arch_config("phi3")
    assert c.rope_factors_tensor(512) == "rope_factors_short.weight"   # n_ctx <= original
    assert c.rope_factors_tensor(513) == "rope_factors_long.weight"
    with gguf.open(conformance_path("arch", "models", "s512-phi3-F32.gguf")) as f:
        long = rope_factors(c, f, 1024)
        cos, sin = rope_cos_sin(c, 1024, long)
    assert np.allclose(cos ** 2 + sin ** 2, c.rope_attn_factor ** 2, rtol=1e-5)
    i = np.arange(12)
    theta = 700 * 1e4 ** (-2.0 * i / 24) / long
    assert np.allclose(cos[700] / c.rope_attn_factor, np.cos(theta), atol=1e-5)


def test_yarn_keeps_fast_pairs_interpolates_slow_ones_and_scales_magnitude():
    c = _arch_config("qwen2")
    cos, sin = rope_cos_sin(c, 1024)
    mscale = 1 + 0.1 * np.log(4.0)
    assert np.allclose(cos ** 2 + sin ** 2, mscale ** 2, rtol=1e-5)
    # ggml's correction dims for n_ctx_orig 256, base 1e4, 32 dims: floor(0.42) = 0 and
    # ceil(6.44) = 7. Pair 0 keeps its angle (extrapolation), pairs >= 7 are interpolated
    # (x freq_scale 0.25), and pairs between mix the two along a linear ramp.
    i = np.arange(16)
    extrap = 300 * 1e4 ** (-2.0 * i / 32)
    mix = 1 - np.clip(i / 7, 0, 1)
    want = 0.25 * extrap * (1 - mix) + extrap * mix
    ang = np.arctan2(sin[300], cos[300])
    wrap = lambda a: np.angle(np.exp(1j * a))  # noqa: E731
    assert np.allclose(ang, wrap(want), atol=1e-4)
    assert ang[0] == pytest.approx(wrap(extrap[0]), abs=1e-4)
    assert np.allclose(ang[7:], wrap(0.25 * extrap[7:]), atol=1e-4)


def test_sliding_window_layers_use_their_own_rope_base():
    c = _arch_config("gemma3")
    cos_l, _ = rope_cos_sin(c, 64, swa=True)
    cos_g, _ = rope_cos_sin(c, 64)
    assert np.array_equal(cos_l, rope_cos_sin(replace(c, rope_base=1e4), 64)[0])
    assert np.array_equal(cos_g, rope_cos_sin(replace(c, rope_base_swa=0.0), 64, swa=True)[0])


# ---------------------------------------------------------------------------
# The memory plan counts windows and conv states
# ---------------------------------------------------------------------------

def gemma3_1b_shape() -> ModelConfig:
    """Gemma 3 1B's attention shape: 26 layers, 1 kv head of 256, window 512, 5 local : 1 global."""
    return ModelConfig(arch="gemma3", n_vocab=262144, n_embd=1152, n_layer=26, n_head=4,
                       n_head_kv=1, head_dim=256, n_ff=6912, n_ctx_train=32768, rms_eps=1e-6,
                       rope_base=1e6, rope_dim=256, rope_style="neox", sliding_window=512,
                       swa_layers=tuple(il % 6 < 5 for il in range(26)), rope_base_swa=1e4)


def test_sliding_window_kv_saved_at_8192_for_a_gemma3_shape():
    c = gemma3_1b_shape()
    assert sum(c.swa_layers) == 22                     # layers 5, 11, 17, 23 are global
    full = 2 * 26 * 8192 * 256 * 2                     # f16 K and V, every layer whole
    windowed = 2 * (4 * 8192 + 22 * 512) * 256 * 2
    assert c.kv_cache_bytes(8192) == windowed == 45_088_768          # 43 MiB
    assert c.kv_saved_bytes(8192) == full - windowed == 173_015_040  # 165 MiB saved
    assert c.kv_cache_bytes(256) == 2 * 26 * 256 * 256 * 2           # windows larger than n_ctx
    note = reference.plan(c, 8192).notes[-1]
    assert "keep 512 of 8192 positions" in note and str(c.kv_saved_bytes(8192, 4)) in note


def test_lfm2_plan_counts_the_conv_state_and_only_attention_layers():
    c = _arch_config("lfm2")
    assert c.kv_cache_bytes(100, 4) == 2 * 2 * 100 * 2 * 32 * 4      # 2 attention layers
    assert c.conv_state_bytes(4) == 2 * 2 * 128 * 4                  # 2 conv layers, l_cache - 1
    assert reference.plan(c, 100).kv_cache == c.kv_cache_bytes(100, 4) + c.conv_state_bytes(4)
