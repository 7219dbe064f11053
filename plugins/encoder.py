"""The encoders (bert, nomic-bert), written once: each backend brings its products.

Design. Both are post-norm and bidirectional, as llama.cpp's
src/models/bert.cpp computes them:

    x = layernorm(token_embd[tokens] + token_types[0] [+ position_embd[0..T)])  (T, d)
    per layer:
        q, k, v = x @ Wq [+ bq], ...  (or one fused attn_qkv: q | k | v rows)  (T, heads, hd)
        q, k = rope(q, k)                                    (nomic-bert: neox, no learned positions)
        x = layernorm(x + softmax(q k^T / sqrt(hd)) v @ Wo [+ bo])         (no mask: both ways)
        bert:       x = layernorm(x + gelu(x @ Wup [+ bup]) @ Wdown [+ bdown])  (ggml's tanh gelu)
        nomic-bert: x = layernorm(x + (silu(x @ Wgate) * (x @ Wup)) @ Wdown)
    -> hidden states (T, d); pooling and normalisation are the engine's (Model.embed)

Biases are used where the file has them (llama.cpp loads them as optional;
nomic-bert's FFN ignores any). llama.cpp gives every token type 0 ("sentence
A"), so token_types' row 0 is added to every position. The recipe lives here once; a backend supplies two
factories over GGUF tensors: `dense(t)` -> x (T, in) -> x @ t.T (T, out), and
`rows(t)` -> ids (T,) -> t[ids] (T, d). The reference backend passes float32
copies and numpy; the cpu backend passes views of the read-only map and the C
kernels (kernels/quant_ops.py), so its weights are never copied. Attention,
rope and the activations are the reference backend's numpy functions, handed
in as `ops` (the reference module itself: this module imports no backend, so
the reference backend can build its runner from here); they are O(T^2 d)
next to the O(T d^2) products.

An encoder keeps no cache: each text is encoded whole, from nothing, so
n_past stays 0 and prefill/decode (logits) raise ModelKindError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ember.formats.model_config import ModelConfig, UnsupportedModel
from ember.kernels.rope import rope_cos_sin
from ember.plugins.features import require_features
from ember.plugins.types import CacheBookkeeping, ContextOverflow, ModelKindError

Dense = Callable[[np.ndarray], np.ndarray]      # x (T, in) -> (T, out), bias not included
Rows = Callable[[np.ndarray], np.ndarray]       # ids (T,) -> (T, d)


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

def _tensor(gguf, name: str, shape: tuple[int, ...]):
    t = gguf.tensors.get(name)
    if t is None:
        raise UnsupportedModel(f"tensor {name!r} is missing")
    if tuple(t.shape) != shape:
        raise UnsupportedModel(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _vector(gguf, name: str, n: int) -> np.ndarray:
    """A bias or norm (n,) as float32: small, so a copy is fine."""
    return np.ascontiguousarray(_tensor(gguf, name, (n,)).numpy(), dtype=np.float32).reshape(n)


@dataclass
class Linear:
    """x @ W.T (+ b): the backend's product, then the bias if the file has one."""

    product: Dense
    bias: np.ndarray | None                        # (out,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.product(x)
        return y if self.bias is None else y + self.bias


@dataclass
class Layer:
    qkv: list[Linear]                              # [q, k, v], or [fused q | k | v]
    o: Linear
    attn_norm: tuple[np.ndarray, np.ndarray]       # LayerNorm weight, bias (d,)
    up: Linear
    gate: Linear | None                            # nomic-bert's SwiGLU gate
    down: Linear
    out_norm: tuple[np.ndarray, np.ndarray]


@dataclass
class Weights:
    token_rows: Rows                               # token_embd (n_vocab, d)
    position_rows: Rows | None                     # bert: position_embd (n_ctx_train, d)
    type0: np.ndarray | None                       # token_types row 0 (d,), if the file has them
    embd_norm: tuple[np.ndarray, np.ndarray]
    layers: list[Layer]


def load_weights(gguf, c: ModelConfig, dense: Callable, rows: Callable) -> Weights:
    """Check every tensor's presence and shape (numpy order), then wrap it with the
    backend's factories: dense(tensor) -> Dense, rows(tensor) -> Rows."""
    d, q_dim = c.n_embd, c.n_head * c.head_dim
    kv_dim = c.n_head_kv * c.head_dim
    gated = c.encoder_ffn == "swiglu"

    def linear(name: str, out: int, inp: int, bias: bool = True) -> Linear:
        b = name + ".bias"
        return Linear(dense(_tensor(gguf, name + ".weight", (out, inp))),
                      _vector(gguf, b, out) if bias and b in gguf.tensors else None)

    def norm(name: str) -> tuple[np.ndarray, np.ndarray]:
        return _vector(gguf, name + ".weight", d), _vector(gguf, name + ".bias", d)

    def layer(i: int) -> Layer:
        p = f"blk.{i}."
        qkv = ([linear(p + "attn_qkv", q_dim + 2 * kv_dim, d)] if p + "attn_qkv.weight" in gguf.tensors
               else [linear(p + "attn_q", q_dim, d), linear(p + "attn_k", kv_dim, d),
                     linear(p + "attn_v", kv_dim, d)])
        return Layer(qkv=qkv, o=linear(p + "attn_output", d, q_dim),
                     attn_norm=norm(p + "attn_output_norm"),
                     up=linear(p + "ffn_up", c.n_ff, d, bias=not gated),
                     gate=linear(p + "ffn_gate", c.n_ff, d, bias=False) if gated else None,
                     down=linear(p + "ffn_down", d, c.n_ff, bias=not gated),
                     out_norm=norm(p + "layer_output_norm"))

    types = gguf.tensors.get("token_types.weight")
    learned = c.encoder_positions == "learned"
    return Weights(
        token_rows=rows(_tensor(gguf, "token_embd.weight", (c.n_vocab, d))),
        position_rows=rows(_tensor(gguf, "position_embd.weight", (c.n_ctx_train, d))) if learned else None,
        type0=None if types is None else rows(types)(np.zeros(1, np.int64))[0],
        embd_norm=norm("token_embd_norm"),
        layers=[layer(i) for i in range(c.n_layer)])


def scratch_bytes(c: ModelConfig, n_ctx: int, attn_chunk: int) -> int:
    """Activations of one text of n_ctx tokens (x, q, k, v, attention out, ffn hidden, a
    LayerNorm's float64 copy) and one chunk of attention_chunk query rows' scores."""
    q_dim = c.n_head * c.head_dim
    acts = n_ctx * (4 * c.n_embd + 4 * q_dim + c.n_ff) * 4 + n_ctx * c.n_embd * 8 * 2
    return acts + c.n_head * min(attn_chunk, n_ctx) * n_ctx * 4 * 2


# ---------------------------------------------------------------------------
# The forward pass
# ---------------------------------------------------------------------------

def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b over the last axis; mean and variance in float64
    (bert's eps is 1e-12: the variance itself must not lose digits)."""
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(axis=-1, keepdims=True)
    var = np.mean(np.square(centred), axis=-1, keepdims=True)
    return (centred / np.sqrt(var + eps)).astype(np.float32) * w + b


def encode(c: ModelConfig, w: Weights, ids: np.ndarray, ops,
           rope_table: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """ids (T,) -> hidden states float32 (T, n_embd); T <= n_ctx_train (checked by the runner).
    ops: attention, rope, gelu, silu (plugins/reference.py); rope_table: (cos, sin)
    (n_ctx, rope_dim/2) when the positions are rotary (nomic-bert)."""
    T = ids.size
    pos = np.arange(T)
    x = w.token_rows(ids)                                        # (T, d)
    if w.position_rows is not None:
        x = x + w.position_rows(pos)
    if w.type0 is not None:
        x = x + w.type0
    x = layernorm(x, *w.embd_norm, c.rms_eps)
    for L in w.layers:
        q, k, v = _qkv(c, L, x)
        if rope_table is not None:
            cos, sin = rope_table[0][:T], rope_table[1][:T]
            q = ops.rope(q, cos, sin, c.rope_dim, c.rope_style)
            k = ops.rope(k, cos, sin, c.rope_dim, c.rope_style)
        o = ops.attention(q, k, v, pos, pos, 1.0 / np.sqrt(c.head_dim), causal=False)  # (T, q_dim)
        x = layernorm(x + L.o(o), *L.attn_norm, c.rms_eps)
        h = ops.silu(L.gate(x)) * L.up(x) if L.gate is not None else ops.gelu(L.up(x))  # (T, n_ff)
        x = layernorm(x + L.down(h), *L.out_norm, c.rms_eps)
    return np.ascontiguousarray(x, dtype=np.float32)


def _qkv(c: ModelConfig, L: Layer, x: np.ndarray):
    """-> q (T, n_head, hd), k and v (T, n_head_kv, hd)"""
    T, q_dim, kv_dim = x.shape[0], c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    if len(L.qkv) == 1:
        y = L.qkv[0](x)                                          # (T, q_dim + 2 kv_dim)
        q, k, v = y[:, :q_dim], y[:, q_dim:q_dim + kv_dim], y[:, q_dim + kv_dim:]
    else:
        q, k, v = (f(x) for f in L.qkv)
    return (q.reshape(T, c.n_head, c.head_dim), k.reshape(T, c.n_head_kv, c.head_dim),
            v.reshape(T, c.n_head_kv, c.head_dim))


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------

class EncoderRunner(CacheBookkeeping):
    """ember.plugins.types.Runner for an encoder: `encode` only; it keeps no cache."""

    def __init__(self, gguf, config: ModelConfig, n_ctx: int, backend: str, implemented,
                 dense: Callable, rows: Callable, ops, on_close: Callable[[], None] | None = None):
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        require_features(config, backend, implemented)
        self.c = config
        self.n_ctx = min(n_ctx, config.n_ctx_train)   # learned positions exist only that far
        self.n_vocab, self.n_past = config.n_vocab, 0
        self.w: Weights | None = load_weights(gguf, config, dense, rows)
        self.rope = (rope_cos_sin(config, self.n_ctx) if config.encoder_positions == "rope"
                     else None)                       # (cos, sin) (n_ctx, rope_dim/2)
        self._gguf = gguf                             # keeps the map (and views into it) alive
        self._on_close = on_close                     # the backend's own release (threads)
        self.ops = ops                                # attention, rope, gelu, silu

    def encode(self, tokens: Sequence[int]) -> np.ndarray:
        if self.w is None:
            raise ValueError("runner is closed")
        ids = np.asarray(tokens)
        if ids.ndim == 1 and ids.size > self.n_ctx:
            raise ContextOverflow(f"{ids.size} tokens do not fit the encoder's {self.n_ctx} positions")
        ids = self.checked_tokens(ids, np.int64)
        return encode(self.c, self.w, ids, self.ops, self.rope)   # n_past stays 0

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        raise ModelKindError(f"{self.c.arch} is an embedding model: it has no logits; use encode()")

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def close(self) -> None:
        self.w = self._gguf = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
