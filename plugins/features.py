"""Model features a backend may not implement, with one refusal message each.

Every backend runs the plain llama/qwen/phi3 decoder; the switches beyond it
(soft-caps, sliding windows, conv layers, YaRN, ...) are named here once, and
a backend lists the ones it computes. `require_features` refuses the rest at
load with the same sentence whichever backend refuses.
"""
from __future__ import annotations

import math

from ember.formats.model_config import ModelConfig, UnsupportedModel


# ---------------------------------------------------------------------------
# Features a backend may not implement: one refusal message per feature
# ---------------------------------------------------------------------------

# feature -> what the refusal calls it ("onnx: gemma2 attention soft-capping is not implemented")
FEATURES: dict[str, str] = {
    "gelu": "GELU-gated feed-forward",
    "post_norms": "post-attention / post-feed-forward norms",
    "no_pre_norms": "blocks without pre-norms",
    "qk_norm_full": "full-width q/k norm",
    "embd_scale": "embedding scale",
    "residual_scale": "residual scale",
    "attn_scale": "custom attention (KQ) scale",
    "attn_softcap": "attention soft-capping",
    "final_softcap": "final logit soft-capping",
    "logit_scale": "logit scale",
    "sliding_window": "sliding-window attention",
    "rope_base_swa": "separate rope base on sliding-window layers",
    "no_rope_layers": "layers without rope",
    "shortconv": "short-convolution layers",
    "yarn": "YaRN rope scaling",
    "longrope": "LongRoPE rope scaling",
    "encoder": "bidirectional encoder (embeddings)",
}


def features(c: ModelConfig) -> list[str]:
    """The FEATURES this model uses, beyond the llama/qwen/phi3 decoder every backend runs."""
    uses = {
        "gelu": c.act == "gelu",
        "post_norms": c.post_norms,
        "no_pre_norms": not c.pre_norms,
        "qk_norm_full": c.qk_norm == "full",
        "embd_scale": c.embd_scale != 1.0,
        "residual_scale": c.residual_scale != 1.0,
        "attn_scale": c.attn_scale not in (0.0, 1.0 / math.sqrt(c.head_dim)),
        "attn_softcap": c.attn_softcap != 0.0,
        "final_softcap": c.final_softcap != 0.0,
        "logit_scale": c.logit_scale != 1.0,
        "sliding_window": any(c.swa_layers),
        "rope_base_swa": any(c.swa_layers) and c.rope_base_swa not in (0.0, c.rope_base),
        "no_rope_layers": not all(c.rope_layers or (True,)),
        "shortconv": "conv" in c.layer_kinds,
        "yarn": c.rope_scaling == "yarn",
        "longrope": c.rope_scaling == "longrope" or c.rope_attn_factor != 1.0,
        "encoder": c.encoder,
    }
    return [f for f in FEATURES if uses[f]]


def require_features(c: ModelConfig, backend: str, implemented) -> None:
    """Refuse at load, naming the first feature of the model the backend lacks."""
    for f in features(c):
        if f not in implemented:
            raise UnsupportedModel(f"{backend}: {c.arch} {FEATURES[f]} is not implemented")
