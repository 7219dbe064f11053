"""The `reference` backend: one llama-family decoder in plain numpy.

Design: this backend is about being right, not fast. Every faster backend
is tested against it, and it is itself tested against llama.cpp's logits
(../shared/conformance). It dequantizes every weight matrix once at load
into float32 (F32 tensors stay zero-copy views of the read-only map) and
computes in float32, with the two numerically delicate reductions — the
RMSNorm mean of squares and the attention softmax — done with the max
subtracted / in float64 so that long rows do not lose precision.

The forward pass is written once; every architecture differs only in the
switches of ModelConfig (ember.formats.model_config):

    x = token_embd[tokens] * embd_scale                  (T, n_embd)
    per layer:
        h = rmsnorm(x) * attn_norm                       (not olmo2: no pre-norms)
        attention layer:
            q, k, v = h @ Wq, Wk, Wv   (+ biases: qwen2)  (fused attn_qkv: phi3)
            q, k = rmsnorm per head (qwen3, gemma3, lfm2) or over all of q / k (olmo2)
            q, k = rope(q, k, positions)  (pairs: llama; halves: neox; none: smollm3 every 4th)
            K, V cache[positions] = k, v  (a ring of the window on sliding-window layers)
            o = softmax(softcap(q K^T * kq_scale) + causal [+ window] mask) V @ Wo
        short-convolution layer (lfm2):
            b, c, xx = h @ W_in; o = (c * conv(b * xx, last l_cache inputs)) @ W_out
        x += rmsnorm(o) * post_attention_norm (gemma2/3, olmo2)  * residual_scale (granite)
        h = rmsnorm(x) * ffn_norm
        x += post-norm / scale of (act(h @ Wgate) * (h @ Wup)) @ Wdown   (silu or tanh-gelu)
    logits = softcap(rmsnorm(x) * output_norm @ output / logit_scale)  (output: token_embd when tied)

Facts taken from llama.cpp: GQA maps query head h to kv head h // (n_head /
n_head_kv); phi3's fused ffn_up holds the gate in its first half (ggml_swiglu
applies silu to the first half); the KQ scale is 1/sqrt(head_dim) unless the
file says otherwise; the attention soft-cap applies after the KQ scale; a
sliding-window position p sees p' with p - p' < window; lfm2's conv kernel
(ggml ne {l_cache, n_embd}) puts its last tap on the current token. The rope
tables (every scaling) come from rope.rope_cos_sin.

The encoder (bert, ModelConfig.encoder) is plugins/encoder.py's recipe, run
here on float32 copies of its weights (the numpy ops below are shared).

The KV cache is allocated once for n_ctx at load; a sliding-window layer keeps
only its window (position p in row p % window), an lfm2 conv layer only its
last l_cache - 1 inputs. A prompt is prefilled in one batch (attention is
computed in query chunks so scratch stays bounded); running past n_ctx raises
ContextOverflow before anything is written.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ember.formats.model_config import ModelConfig, UnsupportedModel
from ember.kernels.rope import rope_cos_sin, rope_factors
from ember.plugins.encoder import EncoderRunner
from ember.plugins.features import FEATURES, require_features
from ember.plugins.hookspecs import hookimpl
from ember.plugins.types import BackendSpec, CacheBookkeeping, MemoryPlan, Probe
from ember.plugins.types import TokenOutOfRange, CacheTooShort  # noqa: F401 - re-exported

NAME = "reference"
# ModelConfig features (features.FEATURES) this decoder computes; the rest are refused at load.
IMPLEMENTED = frozenset(FEATURES)
ATTN_CHUNK = 256  # query rows per attention block: bounds the (heads, rows, n_ctx) scores


# ---------------------------------------------------------------------------
# Plugin hooks
# ---------------------------------------------------------------------------

@hookimpl
def ember_backends():
    return [BackendSpec(NAME, priority=10,
                        description="numpy float32 decoder; the correctness oracle, slow",
                        features=IMPLEMENTED)]


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
    if config.encoder:
        return encoder_runner(gguf, config, n_ctx)
    return ReferenceRunner(gguf, config, n_ctx)


# ---------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------

def plan(config: ModelConfig, n_ctx: int) -> MemoryPlan:
    """Float copies of every non-F32 tensor + the mapped F32 ones, a float32 KV cache
    (sliding-window layers: the window; lfm2 conv layers: their conv state), and the
    activations of one prefill batch of up to n_ctx tokens."""
    mapped = sum(t.nbytes for t in config.tensors.values() if t.type == "F32")
    copies = sum(4 * int(np.prod(t.shape)) for t in config.tensors.values() if t.type != "F32")
    rows = n_ctx
    conv = 3 * config.n_embd if "conv" in config.layer_kinds else 0          # lfm2's b | c | x
    acts = rows * (4 * config.n_embd + 3 * config.n_ff + 3 * config.n_head * config.head_dim + conv) * 4
    scores = config.n_head * min(ATTN_CHUNK, n_ctx) * n_ctx * 4
    saved = config.kv_saved_bytes(n_ctx, bytes_per_value=4)
    window = ([f"sliding-window layers keep {config.sliding_window} of {n_ctx} positions: "
               f"the KV cache is {saved} bytes smaller than with full layers"] if saved else [])
    return MemoryPlan(
        weights=mapped + copies,
        kv_cache=config.kv_cache_bytes(n_ctx, bytes_per_value=4) + config.conv_state_bytes(4),
        scratch=acts + scores + config.n_vocab * 4,
        notes=[f"{copies} bytes are float32 copies of quantized/half tensors; "
               f"{mapped} bytes are F32 tensors read from the map",
               "all_logits=True adds len(tokens) * n_vocab * 4 bytes for the result", *window],
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
    """One block's weights, float32, numpy (out, in) order; None where the config has no such part."""

    def __init__(self, gguf, c: ModelConfig, i: int):
        p = f"blk.{i}."
        d = c.n_embd
        opt = lambda name, shape, on: _need(gguf, p + name, shape) if on else None  # noqa: E731
        self.attn_norm = opt("attn_norm.weight", (d,), c.pre_norms)                 # (d,)
        self.ffn_norm = opt("ffn_norm.weight", (d,), c.pre_norms)
        self.post_attn_norm = opt("post_attention_norm.weight", (d,), c.post_norms)
        self.post_ffw_norm = opt("post_ffw_norm.weight", (d,), c.post_norms)
        if c.layer_kind(i) == "conv":
            self._conv(gguf, c, p)
        else:
            self._attention(gguf, c, p)
        if c.fused_gate_up:                                           # (2 n_ff, d): gate | up
            self.w_gate_up = _need(gguf, p + "ffn_up.weight", (2 * c.n_ff, d))
        else:
            self.w_gate = _need(gguf, p + "ffn_gate.weight", (c.n_ff, d))
            self.w_up = _need(gguf, p + "ffn_up.weight", (c.n_ff, d))
        self.w_down = _need(gguf, p + "ffn_down.weight", (d, c.n_ff))

    def _attention(self, gguf, c: ModelConfig, p: str):
        d, q_dim, kv_dim = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
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
        if c.qk_norm != "none":   # per head: (hd,); full (olmo2): (q_dim,) and (kv_dim,)
            full = c.qk_norm == "full"
            self.q_norm = _need(gguf, p + "attn_q_norm.weight", (q_dim if full else c.head_dim,))
            self.k_norm = _need(gguf, p + "attn_k_norm.weight", (kv_dim if full else c.head_dim,))
        self.wo = _need(gguf, p + "attn_output.weight", (d, q_dim))

    def _conv(self, gguf, c: ModelConfig, p: str):
        d = c.n_embd
        self.in_proj = _need(gguf, p + "shortconv.in_proj.weight", (3 * d, d))   # rows: b | c | x
        self.conv = _need(gguf, p + "shortconv.conv.weight", (d, c.conv_l_cache))  # (d, taps)
        self.out_proj = _need(gguf, p + "shortconv.out_proj.weight", (d, d))


class Weights:
    def __init__(self, gguf, c: ModelConfig):
        self.token_embd = _need(gguf, "token_embd.weight", (c.n_vocab, c.n_embd))
        self.output_norm = _need(gguf, c.output_norm, (c.n_embd,))
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


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap): gemma2's bound on attention scores and logits; 0 = off."""
    return x if cap == 0.0 else np.float32(cap) * np.tanh(x / np.float32(cap))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, qpos: np.ndarray, kpos: np.ndarray,
              scale: float, window: int = 0, cap: float = 0.0, causal: bool = True) -> np.ndarray:
    """Causal GQA attention of T queries over S keys, by position.

    q (T, n_head, hd) at qpos (T,); k, v (S, n_kv, hd) at kpos (S,), ascending.
    A query sees the keys with kpos <= qpos (and qpos - kpos < window if window);
    with causal=False (encoders) it sees every key.
    -> (T, n_head * hd)
    """
    T, n_head, hd = q.shape
    n_kv = k.shape[1]
    g = n_head // n_kv
    qg = q.reshape(T, n_kv, g, hd).transpose(1, 2, 0, 3)        # (n_kv, g, T, hd)
    kt = k.transpose(1, 2, 0)                                    # (n_kv, hd, S)
    vt = v.transpose(1, 0, 2)                                    # (n_kv, S, hd)
    out = np.empty((n_kv, g, T, hd), dtype=np.float32)
    for r0 in range(0, T, ATTN_CHUNK):
        r1 = min(T, r0 + ATTN_CHUNK)
        s_end = (int(np.searchsorted(kpos, qpos[r1 - 1], side="right"))  # later keys: all masked
                 if causal else len(kpos))
        s = softcap((qg[:, :, r0:r1] @ kt[:, None, :, :s_end]) * np.float32(scale), cap)
        qp, kp = qpos[r0:r1, None], kpos[None, :s_end]           # (rows, 1), (1, S')
        masked = ((kp > qp) if causal else False) | ((qp - kp >= window) if window else False)
        s = np.where(masked, -np.inf, s)                         # (n_kv, g, rows, S')
        out[:, :, r0:r1] = softmax(s) @ vt[:, None, :s_end]
    return out.transpose(2, 0, 1, 3).reshape(T, n_head * hd)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    """ggml_gelu: the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))."""
    k = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(k * x * (np.float32(1.0) + np.float32(0.044715) * x * x)))


ACTIVATIONS = {"silu": silu, "gelu": gelu}


def short_conv(bx: np.ndarray, state: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lfm2's causal depthwise convolution (ggml_ssm_conv).

    bx (T, d) new inputs; state (L-1, d) the previous inputs (zeros before position 0);
    kernel (d, L), tap L-1 on the current token. -> y (T, d), the new state (L-1, d).
    """
    L, T = kernel.shape[1], bx.shape[0]
    seq = np.concatenate([state, bx])                            # (L-1+T, d)
    y = np.zeros_like(bx)
    for tap in range(L):
        y += seq[tap:tap + T] * kernel[:, tap]
    return y, seq[T:]


# ---------------------------------------------------------------------------
# The runner: KV cache + forward pass
# ---------------------------------------------------------------------------

class ReferenceRunner(CacheBookkeeping):
    """ember.plugins.types.Runner over the numpy decoder."""

    def __init__(self, gguf, config: ModelConfig, n_ctx: int):
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        require_features(config, NAME, IMPLEMENTED)
        c = self.c = config
        self.n_ctx = n_ctx
        self.n_vocab = config.n_vocab
        self.n_past = 0
        self.w = Weights(gguf, config)
        # per layer: K and V (rows, n_kv, hd), rows = n_ctx, the window (a ring) or 0 (conv)
        shapes = [(c.kv_rows(il, n_ctx), c.n_head_kv, c.head_dim) for il in range(c.n_layer)]
        self.k_cache = [np.zeros(s, dtype=np.float32) for s in shapes]
        self.v_cache = [np.zeros(s, dtype=np.float32) for s in shapes]
        # lfm2 conv layers: the last l_cache - 1 inputs b*x (l_cache - 1, d)
        self.conv_state = [np.zeros((c.conv_l_cache - 1, c.n_embd), np.float32)
                           if c.layer_kind(il) == "conv" else None for il in range(c.n_layer)]
        factors = rope_factors(config, gguf, n_ctx)
        self.cos, self.sin = rope_cos_sin(config, n_ctx, factors)
        self.cos_swa, self.sin_swa = (rope_cos_sin(config, n_ctx, factors, swa=True)
                                      if c.rope_base_swa else (self.cos, self.sin))
        self._gguf = gguf  # keeps the map (and the F32 views into it) alive

    # -- the Runner protocol --------------------------------------------------

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self._check(tokens)
        x = self._forward(ids, self.n_past)
        self.n_past += len(ids)
        return self._logits(x if all_logits else x[-1:])[slice(None) if all_logits else -1]

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def truncate(self, n_past: int) -> None:
        """Rings and conv states hold only the latest positions: going back further than
        they can rebuild is refused (reset() and prefill again instead)."""
        if isinstance(n_past, (int, np.integer)) and 0 < n_past < self.n_past:
            c = self.c
            if "conv" in c.layer_kinds:
                raise CacheTooShort(f"truncate({n_past}): {c.arch}'s convolution layers keep "
                                          "only their latest inputs; reset() and prefill again")
            # a ring of R rows holds positions n_past - R ..; the next query at position
            # n_past' needs the R - 1 before it
            ring = min((len(k) for il, k in enumerate(self.k_cache) if c.is_swa(il)), default=0)
            if ring and max(0, n_past - ring + 1) < self.n_past - ring:
                raise CacheTooShort(f"truncate({n_past}): the sliding-window layers keep "
                                          f"only the last {ring} positions of {self.n_past}; "
                                          "reset() and prefill again")
        super().truncate(n_past)

    def close(self) -> None:
        self.w = None
        self.k_cache = self.v_cache = self.conv_state = None
        self._gguf = None

    # -- internals ------------------------------------------------------------

    def _check(self, tokens: Sequence[int]) -> np.ndarray:
        if self.w is None:
            raise ValueError("runner is closed")
        return self.checked_tokens(tokens, np.int64)

    def _forward(self, ids: np.ndarray, p0: int) -> np.ndarray:
        """Run the blocks over ids at positions p0..; fills the caches. -> (T, n_embd)"""
        c = self.c
        x = self.w.token_embd[ids].astype(np.float32)           # (T, d)
        if c.embd_scale != 1.0:
            x = x * np.float32(c.embd_scale)
        for li, L in enumerate(self.w.layers):
            h = self._pre_norm(x, L.attn_norm)
            h = self._conv_block(li, L, h, p0) if c.layer_kind(li) == "conv" else \
                self._attn_block(li, L, h, p0)
            x = x + self._to_residual(h, L.post_attn_norm)
            x = x + self._to_residual(self._ffn_block(L, self._pre_norm(x, L.ffn_norm)),
                                      L.post_ffw_norm)
        return x

    def _pre_norm(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        return x if w is None else rmsnorm(x, w, self.c.rms_eps)

    def _to_residual(self, h: np.ndarray, post_norm: np.ndarray | None) -> np.ndarray:
        """A block's output as added to the stream: post-norm (gemma, olmo2), residual scale (granite)."""
        if post_norm is not None:
            h = rmsnorm(h, post_norm, self.c.rms_eps)
        return h if self.c.residual_scale == 1.0 else h * np.float32(self.c.residual_scale)

    def _attn_block(self, li: int, L: _Layer, h: np.ndarray, p0: int) -> np.ndarray:
        c, T = self.c, h.shape[0]
        q, k, v = self._qkv(L, h)
        if c.qk_norm == "head":
            q, k = rmsnorm(q, L.q_norm, c.rms_eps), rmsnorm(k, L.k_norm, c.rms_eps)
        if c.uses_rope(li):
            swa = c.is_swa(li)
            cos = (self.cos_swa if swa else self.cos)[p0:p0 + T]
            sin = (self.sin_swa if swa else self.sin)[p0:p0 + T]
            q = rope(q, cos, sin, c.rope_dim, c.rope_style)
            k = rope(k, cos, sin, c.rope_dim, c.rope_style)
        keys, values, kpos = self._cache(li, k, v, p0)
        scale = c.attn_scale or 1.0 / np.sqrt(c.head_dim)
        window = c.sliding_window if c.is_swa(li) else 0
        o = attention(q, keys, values, np.arange(p0, p0 + T), kpos, scale, window, c.attn_softcap)
        return o @ L.wo.T

    def _cache(self, li: int, k: np.ndarray, v: np.ndarray, p0: int):
        """Store the new k, v (T, n_kv, hd) at positions p0..; -> the keys, values and their
        positions (S,) the new queries may see."""
        kc, vc, T = self.k_cache[li], self.v_cache[li], k.shape[0]
        R = kc.shape[0]
        if R == self.n_ctx:                                      # whole context: row = position
            kc[p0:p0 + T], vc[p0:p0 + T] = k, v
            return kc[:p0 + T], vc[:p0 + T], np.arange(p0 + T)
        # a ring of R rows: row = position % R. Gather the older positions the window
        # still needs before the new ones overwrite them.
        old = np.arange(max(0, p0 - R + 1), p0)
        keys = np.concatenate([kc[old % R], k])
        values = np.concatenate([vc[old % R], v])
        new = np.arange(max(p0, p0 + T - R), p0 + T)             # the last R new positions
        kc[new % R], vc[new % R] = k[new - p0], v[new - p0]
        return keys, values, np.concatenate([old, np.arange(p0, p0 + T)])

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
        if c.qk_norm == "full":                                   # olmo2: over the whole projection
            q, k = rmsnorm(q, L.q_norm, c.rms_eps), rmsnorm(k, L.k_norm, c.rms_eps)
        return (q.reshape(T, c.n_head, c.head_dim), k.reshape(T, c.n_head_kv, c.head_dim),
                v.reshape(T, c.n_head_kv, c.head_dim))

    def _conv_block(self, li: int, L: _Layer, h: np.ndarray, p0: int) -> np.ndarray:
        """lfm2: y = c * conv(b * x) over the current and l_cache - 1 previous tokens."""
        d = self.c.n_embd
        bcx = h @ L.in_proj.T                                     # (T, 3d): b | c | x
        b, cg, xx = bcx[:, :d], bcx[:, d:2 * d], bcx[:, 2 * d:]
        state = self.conv_state[li] if p0 > 0 else np.zeros_like(self.conv_state[li])
        y, self.conv_state[li] = short_conv(b * xx, state, L.conv)
        return (cg * y) @ L.out_proj.T

    def _ffn_block(self, L: _Layer, h: np.ndarray) -> np.ndarray:
        if self.c.fused_gate_up:
            gu = h @ L.w_gate_up.T                                # (T, 2 n_ff): gate | up
            gate, up = gu[:, : self.c.n_ff], gu[:, self.c.n_ff:]
        else:
            gate, up = h @ L.w_gate.T, h @ L.w_up.T               # (T, n_ff)
        return (ACTIVATIONS[self.c.act](gate) * up) @ L.w_down.T

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """x (T, d) -> float32 logits (T, n_vocab)"""
        c = self.c
        logits = rmsnorm(x, self.w.output_norm, c.rms_eps) @ self.w.output.T
        if c.logit_scale != 1.0:
            logits = logits / np.float32(c.logit_scale)
        return np.ascontiguousarray(softcap(logits, c.final_softcap), dtype=np.float32)



# ---------------------------------------------------------------------------
# The encoder (bert): plugins/encoder.py's recipe on float32 copies and numpy
# ---------------------------------------------------------------------------

def _float_matrix(t) -> np.ndarray:
    """A GGUF tensor as float32 (rows, n): F32 a view of the map, anything else dequantized."""
    if t.type == "F32":
        return np.frombuffer(t.data, dtype=np.float32).reshape(t.shape)
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def _dense(t):
    w = _float_matrix(t)                                          # (out, in)
    return lambda x: x @ w.T


def _rows(t):
    w = _float_matrix(t)                                          # (n, d)
    return lambda ids: w[ids]


def encoder_runner(gguf, config: ModelConfig, n_ctx: int):
    import sys
    return EncoderRunner(gguf, config, n_ctx, NAME, IMPLEMENTED, _dense, _rows, ops=sys.modules[__name__])
