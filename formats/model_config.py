"""Model hyper-parameters from GGUF metadata: the switches of the one decoder.

Every supported architecture is the same pre-norm transformer with switches,
read here once so that no backend reads the metadata itself:

- projections: biases on q/k/v (qwen2), fused qkv and gate|up (phi3);
- norms: per-head RMS of q and k before rope (qwen3, gemma3, lfm2) or over
  the whole q and k projections (olmo2); no pre-norms (olmo2); post-norms on
  each block's output before the residual add (gemma2/3, olmo2);
- multipliers: embedding scale (gemma: sqrt(n_embd); granite), residual
  scale, KQ scale, logit scale (granite); soft-caps (gemma2);
- the FFN activation: silu (SwiGLU) or ggml's tanh GELU (GeGLU, gemma);
- per layer: sliding-window or global attention (gemma2/3), rope or none
  (smollm3), attention or short convolution (lfm2);
- rope: pairing (interleaved "norm" or "neox" halves), partial rotary,
  rope_freqs factors, and scaling — linear, YaRN, LongRoPE.

`bert` and `nomic-bert` are the encoders: bidirectional attention,
post-LayerNorm blocks, token type 0 added to the token embeddings; bert has
learned absolute positions and a GELU FFN with biases, nomic-bert rotates q
and k (neox) and has a SwiGLU FFN without biases. They make sentence
embeddings (hidden states pooled as the file's `pooling_type` says), not
logits; backends that lack them refuse the `encoder` feature by name.

This is the model description, not a backend: it lives next to the GGUF
reader it interprets, so kernels and plugins both read it from below. The
rope table built from these fields is kernels/rope.py; which fields a
backend may refuse is plugins/features.py. Facts come from llama.cpp
(src/llama-model.cpp, src/models/*.cpp, ggml's rope_yarn), the oracle the
conformance data was recorded with.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ember.formats.errors import UserError
from ember.formats.gguf import GGUFFile


class UnsupportedModel(UserError):
    """The file's architecture or hyper-parameters are outside what ember runs."""


# architecture -> switches that differ from plain llama (metadata-driven ones are read below)
ARCH_SWITCHES: dict[str, dict] = {
    "llama": dict(rope_style="norm"),
    "qwen2": dict(rope_style="neox", qkv_bias=True),
    "qwen3": dict(rope_style="neox", qk_norm="head"),
    "phi3": dict(rope_style="neox", fused_qkv=True, fused_gate_up=True),
    "gemma2": dict(rope_style="neox", act="gelu", post_norms=True),
    "gemma3": dict(rope_style="neox", act="gelu", post_norms=True, qk_norm="head"),
    "smollm3": dict(rope_style="norm"),
    "granite": dict(rope_style="norm"),
    "olmo2": dict(rope_style="neox", pre_norms=False, post_norms=True, qk_norm="full"),
    "lfm2": dict(rope_style="neox", qk_norm="head", output_norm="token_embd_norm.weight"),
    "bert": dict(encoder=True),
    "nomic-bert": dict(encoder=True, rope_style="neox", encoder_positions="rope", encoder_ffn="swiglu"),
}

# bert.pooling_type (llama.cpp's enum llama_pooling_type) -> what Model.embed does with the
# hidden states (T, n_embd). 0 (none: per-token vectors) and 4 (rank: a classifier head) make
# no sentence embedding and are refused.
POOLING_TYPES = {1: "mean", 2: "cls", 3: "last"}

# sliding-window attention as llama.cpp wires it: (default layer pattern, window key required).
# With pattern n, layer il is local when il % n < n - 1 (llama_hparams::set_swa_pattern).
# Other architectures ignore a sliding_window key, as llama.cpp does (phi3 has one, unused).
SWA_ARCHS: dict[str, tuple[int, bool]] = {"gemma2": (2, True), "gemma3": (6, False)}

LAYER_KINDS = ("attn", "conv")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type: str                # GGML type name
    shape: tuple[int, ...]   # numpy order
    nbytes: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int              # model width (dim)
    n_layer: int
    n_head: int
    n_head_kv: int           # of the attention layers (lfm2's conv layers have none)
    head_dim: int            # per-head width of q and k (and v)
    n_ff: int                # feed-forward hidden width
    n_ctx_train: int
    rms_eps: float           # the norms' eps: RMSNorm (decoders), LayerNorm (encoders)
    rope_base: float
    rope_dim: int            # leading dims of each head that rope rotates
    rope_style: str          # "norm": interleaved pairs (x0,x1); "neox": halves (x_i, x_{i+d/2})
    qkv_bias: bool = False
    qk_norm: str = "none"    # "head": RMS per head (qwen3, gemma3, lfm2); "full": over all of q / k (olmo2)
    fused_qkv: bool = False
    fused_gate_up: bool = False
    tied_embeddings: bool = False  # no output.weight: logits use token_embd.weight
    output_norm: str = "output_norm.weight"  # the final norm's tensor (lfm2: token_embd_norm.weight)
    # -- block switches --
    act: str = "silu"             # gated FFN: act(gate) * up; "gelu" is ggml_gelu (tanh approximation)
    pre_norms: bool = True        # attn_norm / ffn_norm before each block (olmo2: none)
    post_norms: bool = False      # post_attention_norm / post_ffw_norm on the block output, before the add
    embd_scale: float = 1.0       # token embeddings *= (gemma: sqrt(n_embd); granite: embedding_scale)
    residual_scale: float = 1.0   # block outputs *= before each residual add (granite)
    attn_scale: float = 0.0       # KQ scale; 0 -> 1/sqrt(head_dim)
    attn_softcap: float = 0.0     # 0 = off; scores s -> c * tanh(s / c), after the KQ scale
    final_softcap: float = 0.0    # 0 = off; logits l -> c * tanh(l / c)
    logit_scale: float = 1.0      # logits /= logit_scale (granite)
    # -- per-layer switches (length n_layer) --
    sliding_window: int = 0       # position p attends to p' with p - p' < sliding_window
    swa_layers: tuple[bool, ...] = ()   # True = sliding-window layer; () = none
    rope_layers: tuple[bool, ...] = ()  # False = no rope in that layer (smollm3); () = all rope
    layer_kinds: tuple[str, ...] = ()   # "attn" | "conv" (lfm2 short convolution); () = all attn
    conv_l_cache: int = 0         # lfm2: conv kernel length (current token + l_cache - 1 previous)
    # -- rope scaling (all consumed by rope_cos_sin) --
    # Linear: llama.cpp's freq_scale = 1 / rope.scaling.factor: angle = freq_scale * pos * base^(-2i/rope_dim).
    rope_freq_scale: float = 1.0
    rope_freqs: bool = False       # rope_freqs.weight present: per-pair frequency divisors
    rope_scaling: str = "none"     # "none" | "linear" | "yarn" | "longrope"
    rope_base_swa: float = 0.0     # rope base of the sliding-window layers (gemma3); 0 -> rope_base
    rope_attn_factor: float = 1.0  # cos and sin are multiplied by it (LongRoPE's attention factor)
    n_ctx_orig: int = 0            # rope.scaling.original_context_length (yarn corr dims, longrope choice)
    yarn_ext_factor: float = 0.0   # 1 for yarn: mix of interpolated and extrapolated angles
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_log_mul: float = 0.0      # rope.scaling.yarn_log_multiplier (mscale_all_dims)
    # -- encoders (bert): embeddings instead of logits --
    encoder: bool = False          # bidirectional, post-LayerNorm blocks (plugins/encoder.py)
    pooling: str = "none"          # "mean" | "cls" | "last": hidden states (T, d) -> one (d,) vector
    encoder_positions: str = "learned"  # bert: position_embd rows; "rope": q, k rotated (nomic-bert)
    encoder_ffn: str = "gelu"      # bert: gelu(up x + b) -> down; "swiglu": silu(gate x) * up x -> down
    tensors: dict[str, TensorEntry] = field(default_factory=dict, repr=False)

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # -- per layer ------------------------------------------------------------

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

    def uses_rope(self, il: int) -> bool:
        return not self.rope_layers or self.rope_layers[il]

    def layer_kind(self, il: int) -> str:
        return self.layer_kinds[il] if self.layer_kinds else "attn"

    def kv_rows(self, il: int, n_ctx: int) -> int:
        """Cache rows layer il keeps: n_ctx, only the window (a ring), or none (conv)."""
        if self.layer_kind(il) != "attn" or self.encoder:   # an encoder sees each text whole, once
            return 0
        return min(n_ctx, self.sliding_window) if self.is_swa(il) else n_ctx

    # -- memory ---------------------------------------------------------------

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """K and V of every attention layer: 2 * rows(layer) * n_head_kv * head_dim values,
        where a sliding-window layer holds only its window."""
        rows = sum(self.kv_rows(il, n_ctx) for il in range(self.n_layer))
        return 2 * rows * self.n_head_kv * self.head_dim * bytes_per_value

    def kv_saved_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """What keeping only the window on sliding-window layers saves against full layers."""
        full = 2 * sum(n_ctx for il in range(self.n_layer) if self.layer_kind(il) == "attn")
        return full * self.n_head_kv * self.head_dim * bytes_per_value - \
            self.kv_cache_bytes(n_ctx, bytes_per_value)

    def conv_state_bytes(self, bytes_per_value: int = 4) -> int:
        """lfm2: each conv layer keeps the last conv_l_cache - 1 inputs (n_embd wide)."""
        n_conv = sum(self.layer_kind(il) == "conv" for il in range(self.n_layer))
        return n_conv * max(0, self.conv_l_cache - 1) * self.n_embd * bytes_per_value

    def rope_factors_tensor(self, n_ctx: int) -> str | None:
        """The per-pair frequency divisors rope uses at this n_ctx, by tensor name.

        LongRoPE picks the long factors for the whole context when n_ctx exceeds the
        original training context (llama_model::get_rope_factors), else the short ones."""
        if self.rope_freqs:
            return "rope_freqs.weight"
        if self.rope_scaling == "longrope":
            long = n_ctx > self.n_ctx_orig
            return "rope_factors_long.weight" if long else "rope_factors_short.weight"
        return None


# ---------------------------------------------------------------------------
# Reading the metadata
# ---------------------------------------------------------------------------

# rope.scaling.type values ember computes; llama.cpp's default is "linear"
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


def _rope_scaling(md: dict, p: str, tensors, n_ctx_train: int) -> dict:
    """rope_scaling, rope_freq_scale, n_ctx_orig, yarn_* and rope_attn_factor fields."""
    kind = md.get(p + "rope.scaling.type", "linear")
    if kind not in ROPE_SCALING_TYPES:
        raise UnsupportedModel(f"rope scaling type {kind!r} is not supported "
                               f"(supported: {', '.join(ROPE_SCALING_TYPES)})")
    factor = md.get(p + "rope.scaling.factor", md.get(p + "rope.scale_linear", 0.0))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
        raise UnsupportedModel(f"rope scaling factor {factor!r} must be a number >= 0")
    long_short = [n for n in ("rope_factors_long.weight", "rope_factors_short.weight") if n in tensors]
    if long_short and kind not in ("linear", "longrope"):
        raise UnsupportedModel(f"tensor {long_short[0]!r} (LongRoPE) with rope scaling type {kind!r}")
    if kind == "longrope" or long_short:
        for n in ("rope_factors_long.weight", "rope_factors_short.weight"):
            if n not in tensors:
                raise UnsupportedModel(f"LongRoPE needs tensor {n!r}, which is missing")
        kind = "longrope"
    out = dict(
        rope_scaling="none" if kind == "linear" and factor in (0, 1) else kind,
        rope_freq_scale=1.0 if kind in ("none", "longrope") or factor in (0, 1) else 1.0 / float(factor),
        n_ctx_orig=_positive("rope.scaling.original_context_length",
                             _get(md, p + "rope.scaling.original_context_length", int, n_ctx_train)),
        rope_attn_factor=_positive("rope.scaling.attn_factor",
                                   _get(md, p + "rope.scaling.attn_factor", float, 1.0)),
    )
    if kind == "yarn":
        out.update(
            yarn_ext_factor=_get(md, p + "rope.scaling.yarn_ext_factor", float, 1.0),
            yarn_beta_fast=_get(md, p + "rope.scaling.yarn_beta_fast", float, 32.0),
            yarn_beta_slow=_get(md, p + "rope.scaling.yarn_beta_slow", float, 1.0),
            yarn_log_mul=_get(md, p + "rope.scaling.yarn_log_multiplier", float, 0.0),
        )
    return out


def _get(md: dict, key: str, kind: type, default=None):
    v = md.get(key, default)
    if v is None:
        raise UnsupportedModel(f"metadata {key!r} is missing")
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise UnsupportedModel(f"metadata {key!r} is {type(v).__name__}, expected {kind.__name__}")
    return v


def _positive(name: str, v):
    if v <= 0:
        raise UnsupportedModel(f"{name} is {v}, must be positive")
    return v


def _is_array(v) -> bool:
    """A metadata array: gguf hands them out as lazy sequence views of the map."""
    return isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, (str, bytes))


def _head_count_kv(md: dict, p: str, arch: str, n_layer: int, n_head: int):
    """-> (n_head_kv, layer_kinds). lfm2 stores a per-layer array where 0 marks a conv layer."""
    key = p + "attention.head_count_kv"
    v = md.get(key, n_head)
    if not _is_array(v):
        return _positive("head_count_kv", _get(md, key, int, n_head)), ()
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v):
        raise UnsupportedModel(f"metadata {key!r} must hold integers, got {list(v)[:8]}")
    v = [int(x) for x in v]
    if len(v) != n_layer:
        raise UnsupportedModel(f"metadata {key!r} has {len(v)} entries for {n_layer} layers")
    heads = sorted(set(x for x in v if x != 0))
    if len(heads) != 1 or min(v) < 0:
        raise UnsupportedModel(f"metadata {key!r} = {v}: per-layer kv head counts must all be "
                               f"equal (0 marks a convolution layer in lfm2)")
    if 0 in v and arch != "lfm2":
        raise UnsupportedModel(f"metadata {key!r} = {v}: layers without attention are an lfm2 feature")
    kinds = tuple("conv" if x == 0 else "attn" for x in v)
    return heads[0], kinds if "conv" in kinds else ()


def _sliding_window(md: dict, p: str, arch: str, n_layer: int) -> dict:
    """sliding_window and swa_layers; refuses a window / pattern that do not fit together."""
    if arch not in SWA_ARCHS:
        return {}
    pattern, required = SWA_ARCHS[arch]
    wkey, pkey = p + "attention.sliding_window", p + "attention.sliding_window_pattern"
    window = _get(md, wkey, int, None if required else 0)
    if window < 0:
        raise UnsupportedModel(f"metadata {wkey!r} is {window}, must be >= 0")
    given = md.get(pkey)
    if _is_array(given):
        layers = tuple(bool(x) for x in given)
        if len(layers) != n_layer:
            raise UnsupportedModel(f"metadata {pkey!r} has {len(layers)} entries for {n_layer} layers")
    else:
        if given is not None:
            pattern = _get(md, pkey, int)
            if pattern < 0:
                raise UnsupportedModel(f"metadata {pkey!r} is {pattern}, must be >= 0")
        layers = tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))
    if window == 0:
        if given is not None and any(layers):
            raise UnsupportedModel(f"metadata {pkey!r} marks sliding-window layers but {wkey!r} is 0")
        return {}
    return dict(sliding_window=window, swa_layers=layers) if any(layers) else {}


def _arch_values(md: dict, p: str, arch: str, n_embd: int, n_layer: int, n_head: int) -> dict:
    """The multipliers, soft-caps and per-layer switches that come from metadata."""
    v: dict = {}
    if arch in ("gemma2", "gemma3"):
        v["embd_scale"] = math.sqrt(n_embd)
        # llama.cpp: the 27B models scale Q by 1/sqrt(n_embd / n_head) (query_pre_attn_scalar)
        if (arch, n_layer) in (("gemma2", 46), ("gemma3", 62)):
            v["attn_scale"] = 1.0 / math.sqrt(n_embd / n_head)
    if arch == "gemma2":
        v["attn_softcap"] = _get(md, p + "attn_logit_softcapping", float, 50.0)
        v["final_softcap"] = _get(md, p + "final_logit_softcapping", float, 30.0)
    if arch == "gemma3":
        v["rope_base_swa"] = _positive("rope.freq_base_swa",
                                       _get(md, p + "rope.freq_base_swa", float, 10000.0))
    if arch == "granite":
        v["embd_scale"] = _get(md, p + "embedding_scale", float, 1.0)
        v["residual_scale"] = _get(md, p + "residual_scale", float, 1.0)
        v["logit_scale"] = _positive("logit_scale", _get(md, p + "logit_scale", float, 1.0))
    if p + "attention.scale" in md:
        v["attn_scale"] = _positive("attention.scale", _get(md, p + "attention.scale", float))
    if arch == "smollm3":   # hard-coded in llama.cpp (n_no_rope_layer_step = 4); no metadata key
        v["rope_layers"] = tuple((il + 1) % 4 != 0 for il in range(n_layer))
    if arch == "lfm2":
        v["conv_l_cache"] = _positive("shortconv.l_cache", _get(md, p + "shortconv.l_cache", int))
    if ARCH_SWITCHES[arch].get("encoder"):
        v.update(_encoder_values(md, p))
    return v


def _encoder_values(md: dict, p: str) -> dict:
    """bert: pooling and the LayerNorm eps; a causal or unpooled file is refused by key."""
    if md.get(p + "attention.causal", False):
        raise UnsupportedModel(f"metadata {p}attention.causal is true: ember runs bert as a "
                               "bidirectional encoder only")
    kind = _get(md, p + "pooling_type", int, 0)
    if kind not in POOLING_TYPES:
        raise UnsupportedModel(
            f"metadata {p}pooling_type is {kind}: ember makes one vector per text, with pooling "
            f"{', '.join(f'{k} ({v})' for k, v in POOLING_TYPES.items())}; 0 (none) and 4 (rank) "
            "are not supported")
    return dict(pooling=POOLING_TYPES[kind],
                rms_eps=_positive("layer_norm_epsilon",
                                  _get(md, p + "attention.layer_norm_epsilon", float)))


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """Read and check the hyper-parameters; raises UnsupportedModel naming what is wrong."""
    md = f.metadata
    arch = md.get("general.architecture")
    if arch not in ARCH_SWITCHES:
        raise UnsupportedModel(f"architecture {arch!r} is not supported "
                               f"(supported: {', '.join(ARCH_SWITCHES)})")
    p = f"{arch}."
    n_embd = _positive("embedding_length", _get(md, p + "embedding_length", int))
    n_layer = _positive("block_count", _get(md, p + "block_count", int))
    n_head = _positive("head_count", _get(md, p + "attention.head_count", int))
    n_head_kv, layer_kinds = _head_count_kv(md, p, arch, n_layer, n_head)
    if n_head % n_head_kv:
        raise UnsupportedModel(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    head_dim = _positive("key_length", _get(md, p + "attention.key_length", int, n_embd // n_head))
    if "token_embd.weight" not in f.tensors:
        raise UnsupportedModel("tensor 'token_embd.weight' is missing")
    n_vocab = f.tensors["token_embd.weight"].shape[0]
    n_ctx_train = _positive("context_length", _get(md, p + "context_length", int, 2048))
    rope_dim = _positive("rope.dimension_count", _get(md, p + "rope.dimension_count", int, head_dim))
    if rope_dim % 2 or rope_dim > head_dim:
        raise UnsupportedModel(f"rope.dimension_count {rope_dim} must be even and <= head_dim {head_dim}")
    switches = {"rope_style": "norm", **ARCH_SWITCHES[arch]}
    values = _arch_values(md, p, arch, n_embd, n_layer, n_head)
    if layer_kinds:
        switches["layer_kinds"] = layer_kinds
    return ModelConfig(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=_positive("feed_forward_length", _get(md, p + "feed_forward_length", int)),
        n_ctx_train=n_ctx_train,
        rms_eps=values.pop("rms_eps", None) or _positive(
            "layer_norm_rms_epsilon", _get(md, p + "attention.layer_norm_rms_epsilon", float, 1e-5)),
        rope_base=_positive("rope.freq_base", _get(md, p + "rope.freq_base", float, 10000.0)),
        rope_dim=rope_dim,
        tied_embeddings="output.weight" not in f.tensors,
        rope_freqs="rope_freqs.weight" in f.tensors,
        tensors={n: TensorEntry(n, t.type, t.shape, t.nbytes) for n, t in f.tensors.items()},
        **_rope_scaling(md, p, f.tensors, n_ctx_train),
        **_sliding_window(md, p, arch, n_layer),
        **values,
        **switches,
    )
