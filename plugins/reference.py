"""The `reference` backend: one llama-family decoder in plain numpy.

Design: this backend is about being right, not fast. Every faster backend
is tested against it, and it is itself tested against llama.cpp's logits
(../shared/conformance). It dequantizes every weight matrix once at load
into float32 (F32 tensors stay zero-copy views of the read-only map) and
computes in float32, with the two numerically delicate reductions — the
RMSNorm mean of squares and the attention softmax — done with the max
subtracted / in float64 so that long rows do not lose precision.

The forward pass is written once; llama, qwen2, qwen3 and phi3 differ only
in the switches of ModelConfig (ember.plugins.arch):

    x = token_embd[tokens]                               (T, n_embd)
    per layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h @ Wq, Wk, Wv   (+ biases: qwen2)     (fused attn_qkv: phi3)
        q, k = rmsnorm per head     (qwen3)
        q, k = rope(q, k, positions)  (pairs: llama; halves: neox)
        K, V cache[positions] = k, v
        x += softmax(q K^T / sqrt(head_dim) + causal mask) V @ Wo
        h = rmsnorm(x) * ffn_norm
        x += (silu(h @ Wgate) * (h @ Wup)) @ Wdown      (fused gate|up: phi3)
    logits = rmsnorm(x) * output_norm @ output (token_embd when tied)

Facts taken from llama.cpp: GQA maps query head h to kv head h // (n_head /
n_head_kv); rope angle theta_i = pos * base^(-2i / rope_dim), optionally
divided by the per-pair `rope_freqs.weight` factors; phi3's fused ffn_up
holds the gate in its first half (ggml_swiglu applies silu to the first
half); the KQ scale is 1/sqrt(head_dim).

The KV cache is allocated once for n_ctx at load. A prompt is prefilled in
one batch (attention is computed in query chunks so scratch stays bounded);
running past n_ctx raises ContextOverflow before anything is written.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ember.plugins.arch import ModelConfig, UnsupportedModel, require_features, rope_cos_sin, rope_factors
from ember.plugins.hookspecs import hookimpl
from ember.plugins.types import BackendSpec, CacheBookkeeping, MemoryPlan, Probe
from ember.plugins.types import TokenOutOfRange  # noqa: F401 - re-exported

NAME = "reference"
# ModelConfig features (arch.FEATURES) this decoder computes; the rest are refused at load.
IMPLEMENTED = frozenset({"yarn", "longrope"})
ATTN_CHUNK = 256  # query rows per attention block: bounds the (heads, rows, n_ctx) scores


# ---------------------------------------------------------------------------
# Plugin hooks
# ---------------------------------------------------------------------------

@hookimpl
def ember_backends():
    return [BackendSpec(NAME, priority=10,
                        description="numpy float32 decoder; the correctness oracle, slow")]


@hookimpl
def ember_probe(backend):
    if backend != NAME:
        return None
    return Probe(True, f"numpy {np.__version__} runs anywhere")


@hookimpl
def ember_plan(backend, config, n_ctx, options):
    if backend != NAME:
        return None
    return plan(config, n_ctx)


@hookimpl
def ember_load(backend, gguf, config, n_ctx, threads, options):
    if backend != NAME:
        return None
    return ReferenceRunner(gguf, config, n_ctx)


# ---------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------

def plan(config: ModelConfig, n_ctx: int) -> MemoryPlan:
    """Float copies of every non-F32 tensor + the mapped F32 ones, a float32 KV cache,
    and the activations of one prefill batch of up to n_ctx tokens."""
    mapped = sum(t.nbytes for t in config.tensors.values() if t.type == "F32")
    copies = sum(4 * int(np.prod(t.shape)) for t in config.tensors.values() if t.type != "F32")
    rows = n_ctx
    acts = rows * (4 * config.n_embd + 3 * config.n_ff + 3 * config.n_head * config.head_dim) * 4
    scores = config.n_head * min(ATTN_CHUNK, n_ctx) * n_ctx * 4
    return MemoryPlan(
        weights=mapped + copies,
        kv_cache=config.kv_cache_bytes(n_ctx, bytes_per_value=4),
        scratch=acts + scores + config.n_vocab * 4,
        notes=[f"{copies} bytes are float32 copies of quantized/half tensors; "
               f"{mapped} bytes are F32 tensors read from the map",
               "all_logits=True adds len(tokens) * n_vocab * 4 bytes for the result"],
    )


# ---------------------------------------------------------------------------
# Weights: dequantized once at load
# ---------------------------------------------------------------------------

def _f32(gguf, name: str) -> np.ndarray:
    t = gguf.tensors[name]
    if t.type == "F32":  # zero-copy: a read-only float view of the map
        return np.frombuffer(t.data, dtype=np.float32).reshape(t.shape)
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def _need(gguf, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in gguf.tensors:
        raise UnsupportedModel(f"tensor {name!r} is missing")
    w = _f32(gguf, name)
    if w.shape != shape:
        raise UnsupportedModel(f"tensor {name!r} has shape {w.shape}, expected {shape}")
    return w


def _maybe(gguf, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    return _need(gguf, name, shape) if name in gguf.tensors else None


class _Layer:
    """One block's weights, float32, numpy (out, in) order."""

    def __init__(self, gguf, c: ModelConfig, i: int):
        p = f"blk.{i}."
        d, q_dim, kv_dim = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self.attn_norm = _need(gguf, p + "attn_norm.weight", (d,))   # (d,)
        if c.fused_qkv:                                               # (q_dim + 2 kv_dim, d)
            self.wqkv = _need(gguf, p + "attn_qkv.weight", (q_dim + 2 * kv_dim, d))
        else:
            self.wq = _need(gguf, p + "attn_q.weight", (q_dim, d))
            self.wk = _need(gguf, p + "attn_k.weight", (kv_dim, d))
            self.wv = _need(gguf, p + "attn_v.weight", (kv_dim, d))
        self.bq = _maybe(gguf, p + "attn_q.bias", (q_dim,))
        self.bk = _maybe(gguf, p + "attn_k.bias", (kv_dim,))
        self.bv = _maybe(gguf, p + "attn_v.bias", (kv_dim,))
        if c.qkv_bias and self.bq is None:
            raise UnsupportedModel(f"{c.arch} needs tensor {p}attn_q.bias")
        if c.qk_norm == "head":
            self.q_norm = _need(gguf, p + "attn_q_norm.weight", (c.head_dim,))
            self.k_norm = _need(gguf, p + "attn_k_norm.weight", (c.head_dim,))
        self.wo = _need(gguf, p + "attn_output.weight", (d, q_dim))
        self.ffn_norm = _need(gguf, p + "ffn_norm.weight", (d,))
        if c.fused_gate_up:                                           # (2 n_ff, d): gate | up
            self.w_gate_up = _need(gguf, p + "ffn_up.weight", (2 * c.n_ff, d))
        else:
            self.w_gate = _need(gguf, p + "ffn_gate.weight", (c.n_ff, d))
            self.w_up = _need(gguf, p + "ffn_up.weight", (c.n_ff, d))
        self.w_down = _need(gguf, p + "ffn_down.weight", (d, c.n_ff))


class Weights:
    def __init__(self, gguf, c: ModelConfig):
        self.token_embd = _need(gguf, "token_embd.weight", (c.n_vocab, c.n_embd))
        self.output_norm = _need(gguf, "output_norm.weight", (c.n_embd,))
        self.output = (self.token_embd if c.tied_embeddings
                       else _need(gguf, "output.weight", (c.n_vocab, c.n_embd)))
        self.layers = [_Layer(gguf, c, i) for i in range(c.n_layer)]


# ---------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (..., n) * w (n,) / rms(x); the mean of squares in float64 (long rows)."""
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)).astype(np.float32) * w


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, dim: int, style: str) -> np.ndarray:
    """Rotate the first `dim` dims of each head. x (T, heads, head_dim); cos/sin (T, dim/2)."""
    out = x.copy()
    if style == "neox":   # pairs (x_i, x_{i + dim/2})
        a, b = x[..., : dim // 2], x[..., dim // 2: dim]
    else:                 # "norm": interleaved pairs (x_2i, x_2i+1)
        a, b = x[..., 0:dim:2], x[..., 1:dim:2]
    c, s = cos[:, None, :], sin[:, None, :]
    ra, rb = a * c - b * s, a * s + b * c
    if style == "neox":
        out[..., : dim // 2], out[..., dim // 2: dim] = ra, rb
    else:
        out[..., 0:dim:2], out[..., 1:dim:2] = ra, rb
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Subtracting the row max keeps exp in range; -inf (masked) entries become exactly 0."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int) -> np.ndarray:
    """Causal GQA attention of T new queries at positions p0.. over S = p0 + T cached keys.

    q (T, n_head, hd); k, v (S, n_kv, hd) -> (T, n_head * hd)
    """
    T, n_head, hd = q.shape
    n_kv = k.shape[1]
    g = n_head // n_kv
    qg = q.reshape(T, n_kv, g, hd).transpose(1, 2, 0, 3)        # (n_kv, g, T, hd)
    kt = k.transpose(1, 2, 0)                                    # (n_kv, hd, S)
    vt = v.transpose(1, 0, 2)                                    # (n_kv, S, hd)
    out = np.empty((n_kv, g, T, hd), dtype=np.float32)
    scale = np.float32(1.0 / np.sqrt(hd))
    for r0 in range(0, T, ATTN_CHUNK):
        r1 = min(T, r0 + ATTN_CHUNK)
        s = (qg[:, :, r0:r1] @ kt[:, None]) * scale              # (n_kv, g, rows, S)
        s = s[..., : p0 + r1]                                    # later keys are all masked
        qpos = p0 + np.arange(r0, r1)[:, None]
        s = np.where(np.arange(p0 + r1)[None, :] > qpos, -np.inf, s)
        out[:, :, r0:r1] = softmax(s) @ vt[:, None, : p0 + r1]
    return out.transpose(2, 0, 1, 3).reshape(T, n_head * hd)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


# ---------------------------------------------------------------------------
# The runner: KV cache + forward pass
# ---------------------------------------------------------------------------

class ReferenceRunner(CacheBookkeeping):
    """ember.plugins.types.Runner over the numpy decoder."""

    def __init__(self, gguf, config: ModelConfig, n_ctx: int):
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        require_features(config, NAME, IMPLEMENTED)
        self.c = config
        self.n_ctx = n_ctx
        self.n_vocab = config.n_vocab
        self.n_past = 0
        self.w = Weights(gguf, config)
        shape = (config.n_layer, n_ctx, config.n_head_kv, config.head_dim)
        self.k_cache = np.zeros(shape, dtype=np.float32)         # (layer, n_ctx, n_kv, hd)
        self.v_cache = np.zeros(shape, dtype=np.float32)
        self.cos, self.sin = rope_cos_sin(config, n_ctx, rope_factors(config, gguf, n_ctx))
        self._gguf = gguf  # keeps the map (and the F32 views into it) alive

    # -- the Runner protocol --------------------------------------------------

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self._check(tokens)
        x = self._forward(ids, self.n_past)
        self.n_past += len(ids)
        return self._logits(x if all_logits else x[-1:])[slice(None) if all_logits else -1]

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def close(self) -> None:
        self.w = None
        self.k_cache = self.v_cache = None
        self._gguf = None

    # -- internals ------------------------------------------------------------

    def _check(self, tokens: Sequence[int]) -> np.ndarray:
        if self.w is None:
            raise ValueError("runner is closed")
        return self.checked_tokens(tokens, np.int64)

    def _forward(self, ids: np.ndarray, p0: int) -> np.ndarray:
        """Run the blocks over ids at positions p0..; fills the cache. -> (T, n_embd)"""
        x = self.w.token_embd[ids].astype(np.float32)           # (T, d)
        for li, L in enumerate(self.w.layers):
            x = x + self._attn_block(li, L, x, p0)
            x = x + self._ffn_block(L, x)
        return x

    def _attn_block(self, li: int, L: _Layer, x: np.ndarray, p0: int) -> np.ndarray:
        c, T = self.c, x.shape[0]
        q, k, v = self._qkv(L, rmsnorm(x, L.attn_norm, c.rms_eps))
        if c.qk_norm == "head":
            q, k = rmsnorm(q, L.q_norm, c.rms_eps), rmsnorm(k, L.k_norm, c.rms_eps)
        cos, sin = self.cos[p0:p0 + T], self.sin[p0:p0 + T]
        q = rope(q, cos, sin, c.rope_dim, c.rope_style)
        k = rope(k, cos, sin, c.rope_dim, c.rope_style)
        self.k_cache[li, p0:p0 + T] = k
        self.v_cache[li, p0:p0 + T] = v
        o = attention(q, self.k_cache[li, :p0 + T], self.v_cache[li, :p0 + T], p0)
        return o @ L.wo.T

    def _qkv(self, L: _Layer, h: np.ndarray):
        """-> q (T, n_head, hd), k and v (T, n_kv, hd)"""
        c, T = self.c, h.shape[0]
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        if c.fused_qkv:
            qkv = h @ L.wqkv.T                                    # (T, q_dim + 2 kv_dim)
            q, k, v = qkv[:, :q_dim], qkv[:, q_dim:q_dim + kv_dim], qkv[:, q_dim + kv_dim:]
        else:
            q, k, v = h @ L.wq.T, h @ L.wk.T, h @ L.wv.T
        if L.bq is not None:
            q = q + L.bq
        if L.bk is not None:
            k = k + L.bk
        if L.bv is not None:
            v = v + L.bv
        return (q.reshape(T, c.n_head, c.head_dim), k.reshape(T, c.n_head_kv, c.head_dim),
                v.reshape(T, c.n_head_kv, c.head_dim))

    def _ffn_block(self, L: _Layer, x: np.ndarray) -> np.ndarray:
        h = rmsnorm(x, L.ffn_norm, self.c.rms_eps)
        if self.c.fused_gate_up:
            gu = h @ L.w_gate_up.T                                # (T, 2 n_ff): gate | up
            gate, up = gu[:, : self.c.n_ff], gu[:, self.c.n_ff:]
        else:
            gate, up = h @ L.w_gate.T, h @ L.w_up.T               # (T, n_ff)
        return (silu(gate) * up) @ L.w_down.T

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """x (T, d) -> float32 logits (T, n_vocab)"""
        h = rmsnorm(x, self.w.output_norm, self.c.rms_eps)
        return np.ascontiguousarray(h @ self.w.output.T, dtype=np.float32)
