"""The rope cos/sin table every backend uses, so the scaling math exists once.

Pairing (norm / neox) is the consumer's business; this module computes the
angles: base frequencies, per-pair divisors (rope_freqs or LongRoPE's
factors), linear and YaRN scaling and the magnitude factor, as ggml's
rope_yarn and llama.cpp's context set them up. Computed once per load for
every cache position, never per token.
"""
from __future__ import annotations

import math

import numpy as np

from ember.formats.gguf import GGUFFile
from ember.formats.model_config import ModelConfig, UnsupportedModel


# ---------------------------------------------------------------------------
# Rope: the one cos/sin table every backend uses
# ---------------------------------------------------------------------------

def _yarn_corr_dims(c: ModelConfig, base: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the pair range where YaRN ramps from extrapolation
    (fast-rotating pairs, kept) to interpolation (slow pairs, scaled)."""
    def corr_dim(n_rot: float) -> float:
        return c.rope_dim * math.log(c.n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    start = math.floor(corr_dim(c.yarn_beta_fast))
    end = math.ceil(corr_dim(c.yarn_beta_slow))
    return max(0.0, start), min(c.rope_dim - 1.0, end)


def _rope_magnitude(c: ModelConfig, freq_scale: float) -> float:
    """What cos and sin are multiplied by, as llama.cpp's context and ggml's rope_yarn
    split it: the context's yarn_attn_factor (get_mscale(s, 1) [/ get_mscale(s, log_mul)],
    divided by 1 + 0.1 ln s, times rope.scaling.attn_factor), then, in ggml, times
    1 + 0.1 ln(1 / freq_scale) of the layer. Net on a global layer: (1 + 0.1 ln s) * attn_factor."""
    mag = c.rope_attn_factor
    if c.yarn_ext_factor != 0.0:
        s = 1.0 / c.rope_freq_scale
        def get_mscale(m: float) -> float:
            return 1.0 if s <= 1.0 else 0.1 * m * math.log(s) + 1.0
        ctx = get_mscale(1.0) / get_mscale(c.yarn_log_mul) if c.yarn_log_mul else get_mscale(1.0)
        mag *= ctx / (1.0 + 0.1 * math.log(s)) * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    return mag


def rope_cos_sin(c: ModelConfig, n_ctx: int, factors: np.ndarray | None = None,
                 swa: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 (n_ctx, rope_dim // 2) for positions 0..n_ctx-1, scaling included.

    Pair i of a head rotates by theta = pos * base^(-2i/rope_dim) / factors[i]
    (factors: rope_freqs or LongRoPE's, see ModelConfig.rope_factors_tensor),
    then linear / YaRN scaling as ggml's rope_yarn; cos and sin carry the
    magnitude factor. `swa` selects the local layers' base (gemma3).
    Computed in float64 so that long positions keep full float32 accuracy.
    """
    local = swa and c.rope_base_swa > 0
    base = c.rope_base_swa if local else c.rope_base
    freq_scale = 1.0 if local else c.rope_freq_scale   # llama.cpp: freq_scale_swa is 1 (gemma3)
    i = np.arange(c.rope_dim // 2, dtype=np.float64)
    inv_freq = base ** (-2.0 * i / c.rope_dim)                        # (rope_dim/2,)
    if factors is not None:
        inv_freq = inv_freq / np.asarray(factors, dtype=np.float64).reshape(-1)
    extrap = np.arange(n_ctx, dtype=np.float64)[:, None] * inv_freq[None, :]  # (n_ctx, rope_dim/2)
    theta = freq_scale * extrap
    if c.yarn_ext_factor != 0.0:
        lo, hi = _yarn_corr_dims(c, base)
        ramp = 1.0 - np.clip((i - lo) / max(0.001, hi - lo), 0.0, 1.0)   # rope_yarn_ramp(i0 = 2i)
        mix = ramp * c.yarn_ext_factor
        theta = theta * (1.0 - mix) + extrap * mix
    mag = _rope_magnitude(c, freq_scale)
    return (np.cos(theta) * mag).astype(np.float32), (np.sin(theta) * mag).astype(np.float32)


def rope_factors(c: ModelConfig, gguf: GGUFFile, n_ctx: int) -> np.ndarray | None:
    """The frequency divisors (rope_dim // 2,) float32 rope uses at this n_ctx, or None."""
    name = c.rope_factors_tensor(n_ctx)
    if name is None:
        return None
    t = gguf.tensors.get(name)
    if t is None:
        raise UnsupportedModel(f"tensor {name!r} is missing")
    v = np.asarray(t.numpy(), dtype=np.float32).reshape(-1)
    if v.shape != (c.rope_dim // 2,):
        raise UnsupportedModel(f"tensor {name!r} has {v.size} values, expected rope_dim/2 = "
                               f"{c.rope_dim // 2}")
    return v
