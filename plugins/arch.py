"""Model hyper-parameters from GGUF metadata: the switches of the one decoder.

llama, qwen2, qwen3 and phi3 are the same transformer with a few switches:
biases on q/k/v (qwen2), per-head RMSNorm of q and k before rope (qwen3), a
fused qkv projection and a fused gate+up projection (phi3), and the rope
pairing — interleaved pairs (llama) or NEOX halves (qwen2, qwen3, phi3).
Every backend builds its forward pass from a ModelConfig; none reads the
metadata itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ember.formats.errors import UserError
from ember.formats.gguf import GGUFFile


class UnsupportedModel(UserError):
    """The file's architecture or hyper-parameters are outside what ember runs."""


# architecture -> switches that differ from plain llama
ARCH_SWITCHES: dict[str, dict] = {
    "llama": dict(rope_style="norm"),
    "qwen2": dict(rope_style="neox", qkv_bias=True),
    "qwen3": dict(rope_style="neox", qk_norm=True),
    "phi3": dict(rope_style="neox", fused_qkv=True, fused_gate_up=True),
}


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
    n_head_kv: int
    head_dim: int            # per-head width of q and k (and v)
    n_ff: int                # feed-forward hidden width
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dim: int            # leading dims of each head that rope rotates
    rope_style: str          # "norm": interleaved pairs (x0,x1); "neox": halves (x_i, x_{i+d/2})
    qkv_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    tied_embeddings: bool = False  # no output.weight: logits use token_embd.weight
    # Linear rope scaling (llama.cpp's freq_scale = 1 / rope.scaling.factor): the angle is
    # freq_scale * pos * base^(-2i/rope_dim). 1.0 for almost every file; yarn / longrope
    # are refused at load (see ROPE_SCALING_TYPES).
    rope_freq_scale: float = 1.0
    rope_freqs: bool = False       # rope_freqs.weight present: per-pair frequency divisors
    tensors: dict[str, TensorEntry] = field(default_factory=dict, repr=False)

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """K and V for every layer: (2, n_layer, n_ctx, n_head_kv * head_dim)."""
        return 2 * self.n_layer * n_ctx * self.n_head_kv * self.head_dim * bytes_per_value


# rope.scaling.type values ember computes exactly; llama.cpp's default is "linear"
ROPE_SCALING_TYPES = ("none", "linear")


def _rope_freq_scale(md: dict, p: str, tensors) -> float:
    """Linear scaling only; anything that would silently change the angles is refused."""
    kind = md.get(p + "rope.scaling.type", "linear")
    if kind not in ROPE_SCALING_TYPES:
        raise UnsupportedModel(f"rope scaling type {kind!r} is not supported "
                               f"(supported: {', '.join(ROPE_SCALING_TYPES)})")
    factors = [n for n in tensors if "rope_factors" in n]
    if factors:
        raise UnsupportedModel(f"long-context rope factors ({factors[0]!r}) are not supported")
    factor = md.get(p + "rope.scaling.factor", md.get(p + "rope.scale_linear", 0.0))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
        raise UnsupportedModel(f"rope scaling factor {factor!r} must be a number >= 0")
    return 1.0 if kind == "none" or factor in (0, 1) else 1.0 / float(factor)


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


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """Read and check the hyper-parameters; raises UnsupportedModel naming what is wrong."""
    md = f.metadata
    arch = md.get("general.architecture")
    if arch not in ARCH_SWITCHES:
        raise UnsupportedModel(f"architecture {arch!r} is not supported "
                               f"(supported: {', '.join(ARCH_SWITCHES)})")
    p = f"{arch}."
    n_embd = _positive("embedding_length", _get(md, p + "embedding_length", int))
    n_head = _positive("head_count", _get(md, p + "attention.head_count", int))
    n_head_kv = _positive("head_count_kv", _get(md, p + "attention.head_count_kv", int, n_head))
    if n_head % n_head_kv:
        raise UnsupportedModel(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    head_dim = _positive("key_length", _get(md, p + "attention.key_length", int, n_embd // n_head))
    if "token_embd.weight" not in f.tensors:
        raise UnsupportedModel("tensor 'token_embd.weight' is missing")
    n_vocab = f.tensors["token_embd.weight"].shape[0]
    return ModelConfig(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=_positive("block_count", _get(md, p + "block_count", int)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=_positive("feed_forward_length", _get(md, p + "feed_forward_length", int)),
        n_ctx_train=_positive("context_length", _get(md, p + "context_length", int, 2048)),
        rms_eps=_positive("layer_norm_rms_epsilon",
                          _get(md, p + "attention.layer_norm_rms_epsilon", float, 1e-5)),
        rope_base=_positive("rope.freq_base", _get(md, p + "rope.freq_base", float, 10000.0)),
        rope_dim=_positive("rope.dimension_count", _get(md, p + "rope.dimension_count", int, head_dim)),
        tied_embeddings="output.weight" not in f.tensors,
        rope_freq_scale=_rope_freq_scale(md, p, f.tensors),
        rope_freqs="rope_freqs.weight" in f.tensors,
        tensors={n: TensorEntry(n, t.type, t.shape, t.nbytes) for n, t in f.tensors.items()},
        **{"rope_style": "norm", **ARCH_SWITCHES[arch]},
    )
