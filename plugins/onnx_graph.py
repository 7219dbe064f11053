"""The decoder as an ONNX graph, built once from a GGUF file.

Design note. The graph is the same forward pass as the reference backend
(ember.plugins.reference), written in ONNX ops so that ONNX Runtime and any of
its execution providers can run it. What stays outside the graph, on purpose:

- the token embedding lookup: the runner dequantizes the few rows it needs
  straight from the read-only map, so the graph never holds a float copy of
  token_embd (n_vocab x n_embd floats);
- the rope tables and the causal mask: the runner slices them for the
  positions it runs (tiny inputs), so the graph has no position logic;
- the KV cache: the runner owns one float32 buffer per layer, allocated once
  for n_ctx; the graph takes the cached rows as `past_k.i`/`past_v.i`
  (n_past, n_kv, hd) and returns only the new rows `new_k.i`/`new_v.i`
  (T, n_kv, hd), which the runner writes into its buffer. Decode is one
  session run per token; prefill is one run over the whole prompt.

Weights map onto ONNX Runtime's MatMulNBits (com.microsoft) where the GGML
block format is exactly an affine code per block: y = A @ ((code - zp) *
scale)^T, codes packed low-nibble-first along K, default zp = 2^(bits-1).

    Q4_0  bits=4 block 32, scale d, default zp 8            (x = (q - 8) d)
    Q4_1  bits=4 block 32, scale d, default zp 8, + offset m + 8d   (x = q d + m)
    Q8_0  bits=8 block 32, scale d, codes q + 128, default zp 128
    Q4_K  bits=4 block 32, scale d*sc_j, default zp 8, + offset 8 d*sc_j - dmin*m_j
    Q6_K  bits=8 block 16, scale d*sc_j, codes q + 96, default zp 128

GGML packs a 32-element block's nibbles as (element j, element j + 16) in
byte j (Q4_K: two sub-blocks share 32 bytes, low and high nibbles); ORT
wants (element 2i, element 2i + 1) in byte i, so the codes are repacked at
build time, never dequantized. A per-block offset (a "min") is added as
blocksum(x) @ offsets^T beside the op (see matmul_nbits). Q5_x and Q5_K
(5-bit codes) and IQ4_NL / IQ4_XS (a non-linear code book) are not mapped. Every other type is dequantized
once to float32 (a Gemm with transB, so the rows keep the file's layout) and
counted as such in the memory plan.

Graph inputs:  x (T, d), cos/sin (T, rope_dim/2), mask (T, S), rows (R,),
               past_k.i / past_v.i (P, n_kv, hd) for each layer; S = P + T
Graph outputs: logits (R, n_vocab), new_k.i / new_v.i (T, n_kv, hd)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ember.formats.model_config import ModelConfig, UnsupportedModel

BUILDER_VERSION = 6      # bump when the graph changes: it is part of the cache key
OPSET = 17


# ---------------------------------------------------------------------------
# Weights: GGML blocks -> MatMulNBits operands, or float32
# ---------------------------------------------------------------------------

@dataclass
class NBits:
    """MatMulNBits operands of one (N, K) weight."""

    bits: int
    block: int                  # elements per scale (32, or 16 for Q6_K's sub-blocks)
    packed: np.ndarray          # (N, K/block, block*bits/8) uint8
    scales: np.ndarray          # (N * K/block,) float32
    offsets: np.ndarray | None = None  # (N, K/block) float32 added per block, or None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.packed.nbytes + self.scales.nbytes + extra

    @property
    def kind(self) -> tuple:
        """Weights of one kind can share one MatMulNBits (stacked along N)."""
        return (self.bits, self.block, self.offsets is None)


def _centered(scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """x = q*scale + offset, q in 0..15, rewritten as (q - 8)*scale + (offset + 8*scale).

    The same numbers, but the codes are centred like Q4_0's: with int8 activations
    (accuracy_level 4) the rounding error of each activation is multiplied by the
    code, and uncentred codes made it 5x worse (Q4_1: KL vs llama.cpp 2e-3, not 4e-4).
    """
    return (offset + np.float32(8) * scale).astype(np.float32)


def _blocks(t, elems: int, type_size: int) -> np.ndarray:
    n, k = t.shape
    return np.asarray(t.data).reshape(n, k // elems, type_size)  # (N, K/elems, type_size)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 field at byte `at` of every block -> (N, K/elems) float32."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _pack4(codes: np.ndarray) -> np.ndarray:
    """(..., 32) 4-bit codes in element order -> (..., 16) ORT bytes (elem 2i | elem 2i+1 << 4)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _ggml_nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) GGML bytes (elem j | elem j+16 << 4) -> (..., 32) codes in element order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(t) -> NBits:                         # d f16 | 16 bytes of nibbles
    b = _blocks(t, 32, 18)
    return NBits(4, 32, _pack4(_ggml_nibbles(b[..., 2:])), _f16(b, 0).reshape(-1), None)


def _q4_1(t) -> NBits:                         # d f16 | m f16 | 16 bytes of nibbles
    b = _blocks(t, 32, 20)
    d = _f16(b, 0)
    return NBits(4, 32, _pack4(_ggml_nibbles(b[..., 4:])), d.reshape(-1), _centered(d, _f16(b, 2)))


def _q8_0(t) -> NBits:                         # d f16 | 32 int8
    b = _blocks(t, 32, 34)
    codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return NBits(8, 32, codes, _f16(b, 0).reshape(-1), None)


def _k4_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes (..., 12) -> 6-bit scales, mins (..., 8) (ggml get_scale_min_k4)."""
    lo, hi = s[..., 0:4], s[..., 4:8]
    sc = np.concatenate([lo & 63, (s[..., 8:12] & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (s[..., 8:12] >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(t) -> NBits:
    """d f16 | dmin f16 | scales 12 | qs 128: eight 32-element sub-blocks,
    x = d*sc_j * q - dmin*m_j; qs byte l of 64-chunk c holds sub-block 2c (low
    nibble) and 2c+1 (high nibble) at element l."""
    b = _blocks(t, 256, 144)
    sc, mn = _k4_scales_mins(b[..., 4:16])                      # (N, K/256, 8)
    scale, offset = _f16(b, 0)[..., None] * sc, -_f16(b, 2)[..., None] * mn
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)               # (N, K/256, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3)              # (N, K/256, 4, 2, 32)
    packed = _pack4(codes.reshape(b.shape[0], -1, 32))          # (N, K/32, 16)
    return NBits(4, 32, packed, scale.reshape(-1), _centered(scale, offset).reshape(b.shape[0], -1))


def _q6_k(t) -> NBits:
    """ql 128 | qh 64 | scales 16 int8 | d f16: per 128-element half, element l,
    l+32, l+64, l+96 take ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high as
    their low 4 bits and bit pairs 0, 2, 4, 6 of qh[l] as the top 2; x = d*sc*(q - 32)
    with one scale per 16 elements -> 8-bit codes q + 96 against the default zp 128."""
    b = _blocks(t, 256, 210)
    ql = b[..., 0:128].reshape(*b.shape[:2], 2, 2, 32)          # (N, K/256, half, 2, 32)
    qh = b[..., 128:192].reshape(*b.shape[:2], 2, 1, 32)        # (N, K/256, half, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=3)          # (.., half, 4, 32): quarters
    top = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    codes = (low | (top << 4)) + np.uint8(96)                   # q in 0..63 -> 96..159
    scale = _f16(b, 208)[..., None] * b[..., 192:208].view(np.int8)  # (N, K/256, 16)
    return NBits(8, 16, codes.reshape(b.shape[0], -1, 16), scale.reshape(-1), None)


# GGML type -> (encoder, elements per super-block that K must divide)
ENCODERS = {"Q4_0": (_q4_0, 32), "Q4_1": (_q4_1, 32), "Q8_0": (_q8_0, 32),
            "Q4_K": (_q4_k, 256), "Q6_K": (_q6_k, 256)}
NBITS_TYPES = tuple(ENCODERS)


def _stack(qs: list[NBits]) -> NBits:
    """Weights of one kind stacked along N (rows)."""
    if len(qs) == 1:
        return qs[0]
    offsets = None if qs[0].offsets is None else np.concatenate([q.offsets for q in qs])
    return NBits(qs[0].bits, qs[0].block, np.concatenate([q.packed for q in qs]),
                 np.concatenate([q.scales for q in qs]), offsets)


def encode_nbits(t) -> NBits | None:
    """MatMulNBits operands for a matrix of a mapped type, or None when it must be dequantized."""
    enc = ENCODERS.get(t.type)
    if enc is None or len(t.shape) != 2 or t.shape[1] % enc[1]:
        return None
    return enc[0](t)


def dense(t) -> np.ndarray:
    """Any readable type -> float32 (N, K), the file's row layout."""
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def encoded_bytes(entry) -> int:
    """Bytes a ModelConfig TensorEntry takes in the graph (for the memory plan)."""
    n_el = int(np.prod(entry.shape))
    enc = ENCODERS.get(entry.type)
    if enc is None or len(entry.shape) != 2 or entry.shape[1] % enc[1]:
        return 4 * n_el
    bits, block = {"Q8_0": (8, 32), "Q6_K": (8, 16)}.get(entry.type, (4, 32))
    out = n_el * bits // 8 + (n_el // block) * 4                  # codes + scales
    if entry.type in ("Q4_1", "Q4_K"):                             # offsets
        out += (n_el // block) * 4
    return out


# ---------------------------------------------------------------------------
# A tiny graph-building helper
# ---------------------------------------------------------------------------

class _ExternalWeights:
    """Streams initializers into one file as they are made, so building never holds
    more than one weight in memory; offsets are page-aligned (mappable)."""

    ALIGN = 4096

    def __init__(self, path: str):
        self.location = os.path.basename(path)
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        pad = -self.f.tell() % self.ALIGN
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(memoryview(array).cast("B"))
        t = onnx.TensorProto(name=name, dims=array.shape,
                             data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
            t.external_data.add(key=k, value=str(v))
        return t

    def close(self) -> None:
        self.f.close()


class _Graph:
    SMALL = 1024   # initializers under this many bytes stay inside the .onnx

    def __init__(self, weights: _ExternalWeights | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weights = weights
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        self._n += 1
        outs = [name] if name else [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if self.weights is not None and array.nbytes >= self.SMALL:
            self.inits.append(self.weights.tensor(name, array))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        key = (np.dtype(dtype).str, tuple(np.ravel(values).tolist()), np.ndim(values))
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", np.array(values, dtype))
        return self._consts[key]


def matmul_nbits(g: "_Graph", x: str, tag: str, q: NBits, k: int, n: int, acc: int) -> str:
    """x (T, k) @ ((code - zp) * scale + offset)^T -> (T, n)

    Offsets (Q4_1's m, Q4_K's -dmin*m) are not folded into float zero points:
    ORT's CPU kernel runs those ~100x slower (measured 228 vs 2.3 ms, 5632x2048).
    Instead the codes keep the default zero point and the offsets add
    blocksum(x) @ offsets^T, a (T, k/32) x (k/32, n) product: exact, and 1/16 of
    the weight's bytes.
    """
    ins = [x, g.init(tag + ".q", q.packed), g.init(tag + ".scales", q.scales)]
    y = g.op("MatMulNBits", *ins, domain="com.microsoft", K=k, N=n, bits=q.bits,
             block_size=q.block, accuracy_level=acc)
    if q.offsets is None:
        return y
    blocks = g.op("Reshape", x, g.const([0, k // q.block, q.block]))    # (T, k/b, b)
    sums = g.op("ReduceSum", blocks, g.const([-1]), keepdims=0)          # (T, k/b)
    return g.op("Add", y, g.op("Gemm", sums, g.init(tag + ".offsets", q.offsets), transB=1))


def matmul_model(q: NBits, k: int, n: int, accuracy_level: int = 4) -> onnx.ModelProto:
    """One encoded weight as a standalone model A (M, k) -> Y (M, n): the exact op
    sequence the decoder uses, for tests and micro-benchmarks."""
    g = _Graph()
    g.op("Identity", matmul_nbits(g, "A", "w", q, k, n, accuracy_level), name="Y")
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(g.nodes, "matmul", [helper.make_tensor_value_info("A", f32, ["M", k])],
                              [helper.make_tensor_value_info("Y", f32, ["M", n])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)])


# ---------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------

class _Builder:
    def __init__(self, gguf, c: ModelConfig, accuracy_level: int,
                 weights: _ExternalWeights | None, progress=None):
        self.f, self.c, self.acc = gguf, c, accuracy_level
        self.g = _Graph(weights)
        self.progress = progress or (lambda: None)     # called once per layer built

    def tensor(self, name: str, shape: tuple[int, ...]):
        t = self.f.tensors.get(name)
        if t is None:
            raise UnsupportedModel(f"tensor {name!r} is missing")
        if tuple(t.shape) != shape:
            raise UnsupportedModel(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t

    def vector(self, name: str, n: int) -> str:
        return self.g.init(name, dense(self.tensor(name, (n,))))

    def linear(self, x: str, name: str, n: int, k: int) -> str:
        """x (T, k) @ W^T for W = tensor `name` (n, k) -> (T, n)"""
        return self.linear_fused(x, [name], [n], k)[0]

    def linear_fused(self, x: str, names: list[str], ns: list[int], k: int) -> list[str]:
        """x (T, k) @ W_i^T for several (n_i, k) weights of one input -> [(T, n_i)].

        Weights of the same encoding are stacked along N into one operator (q|k|v,
        gate|up): one op instead of three keeps all threads busy on the narrow k/v
        projections of GQA models. Mixed encodings fall back to one op each.
        """
        ts = [self.tensor(nm, (n, k)) for nm, n in zip(names, ns)]
        qs = [encode_nbits(t) for t in ts]
        kinds = {None if q is None else q.kind for q in qs}
        if len(kinds) > 1:
            return [self.linear_fused(x, [nm], [n], k)[0] for nm, n in zip(names, ns)]
        tag = names[0] if len(names) == 1 else "+".join(names)
        if qs[0] is None:     # dequantized once; Gemm transB keeps the (n, k) rows as stored
            w = np.concatenate([dense(t) for t in ts]) if len(ts) > 1 else dense(ts[0])
            y = self.g.op("Gemm", x, self.g.init(tag, w), transB=1)
        else:
            y = matmul_nbits(self.g, x, tag, _stack(qs), k, sum(ns), self.acc)
        if len(ns) == 1:
            return [y]
        return self.g.op("Split", y, self.g.const(ns), axis=-1, outputs=len(ns))

    def rmsnorm(self, x: str, w: str) -> str:
        """x (..., n) / sqrt(mean(x^2) + eps) * w (n,)"""
        g = self.g
        ms = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
        r = g.op("Sqrt", g.op("Add", ms, g.const(self.c.rms_eps, np.float32)))
        return g.op("Mul", g.op("Div", x, r), w)

    def rope(self, x: str, cos: str, sin: str) -> str:
        """Rotate the first rope_dim dims of each head; x (T, heads, hd), cos/sin (T, 1, rd/2)."""
        g, c = self.g, self.c
        rd, hd = c.rope_dim, c.head_dim
        rot, rest = (x, None) if rd == hd else g.op(
            "Split", x, g.const([rd, hd - rd]), axis=-1, outputs=2)
        if c.rope_style == "neox":   # pairs (x_i, x_{i + rd/2})
            a, b = g.op("Split", rot, g.const([rd // 2, rd // 2]), axis=-1, outputs=2)
            cc, ss = cos, sin
        else:                        # "norm": interleaved pairs (x_2i, x_2i+1)
            pairs = g.op("Reshape", rot, g.const([0, 0, rd // 2, 2]))   # (T, heads, rd/2, 2)
            a, b = g.op("Split", pairs, g.const([1, 1]), axis=-1, outputs=2)
            cc, ss = (g.op("Unsqueeze", t, g.const([-1])) for t in (cos, sin))
        ra = g.op("Sub", g.op("Mul", a, cc), g.op("Mul", b, ss))
        rb = g.op("Add", g.op("Mul", a, ss), g.op("Mul", b, cc))
        out = g.op("Concat", ra, rb, axis=-1)
        if c.rope_style != "neox":
            out = g.op("Reshape", out, g.const([0, 0, rd]))
        return out if rest is None else g.op("Concat", out, rest, axis=-1)

    def attention(self, q: str, k: str, v: str, mask: str) -> str:
        """Causal GQA: q (T, H, hd), k/v (S, n_kv, hd), mask (T, S) -> (T, H*hd)

        Query head h reads kv head h // (H / n_kv), as in llama.cpp: the query
        heads are viewed as (n_kv, group) and the kv heads broadcast over group.
        """
        g, c = self.g, self.c
        grp = c.n_head // c.n_head_kv
        qg = g.op("Transpose", g.op("Reshape", q, g.const([-1, c.n_head_kv, grp, c.head_dim])),
                  perm=[1, 2, 0, 3])                                   # (n_kv, grp, T, hd)
        kt = g.op("Unsqueeze", g.op("Transpose", k, perm=[1, 2, 0]), g.const([1]))  # (n_kv,1,hd,S)
        vt = g.op("Unsqueeze", g.op("Transpose", v, perm=[1, 0, 2]), g.const([1]))  # (n_kv,1,S,hd)
        scale = g.const(1.0 / np.sqrt(c.head_dim), np.float32)
        s = g.op("Add", g.op("Mul", g.op("MatMul", qg, kt), scale), mask)  # (n_kv, grp, T, S)
        o = g.op("MatMul", g.op("Softmax", s, axis=-1), vt)                # (n_kv, grp, T, hd)
        o = g.op("Transpose", o, perm=[2, 0, 1, 3])                        # (T, n_kv, grp, hd)
        return g.op("Reshape", o, g.const([-1, c.n_head * c.head_dim]))

    def qkv(self, p: str, h: str):
        """-> q (T, H*hd), k and v (T, n_kv*hd), biases added"""
        g, c = self.g, self.c
        d, qd, kvd = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        if c.fused_qkv:
            fused = self.linear(h, p + "attn_qkv.weight", qd + 2 * kvd, d)
            q, k, v = g.op("Split", fused, g.const([qd, kvd, kvd]), axis=-1, outputs=3)
        else:
            q, k, v = self.linear_fused(h, [p + "attn_q.weight", p + "attn_k.weight",
                                               p + "attn_v.weight"], [qd, kvd, kvd], d)
        out = []
        for x, part, n in ((q, "q", qd), (k, "k", kvd), (v, "v", kvd)):
            bias = f"{p}attn_{part}.bias"
            out.append(g.op("Add", x, self.vector(bias, n)) if bias in self.f.tensors else x)
        if c.qkv_bias and f"{p}attn_q.bias" not in self.f.tensors:
            raise UnsupportedModel(f"{c.arch} needs tensor {p}attn_q.bias")
        return out

    def attn_block(self, i: int, x: str, cos: str, sin: str, mask: str) -> str:
        g, c, p = self.g, self.c, f"blk.{i}."
        h = self.rmsnorm(x, self.vector(p + "attn_norm.weight", c.n_embd))
        q, k, v = self.qkv(p, h)
        heads = lambda t, n: g.op("Reshape", t, g.const([-1, n, c.head_dim]))  # noqa: E731
        q, k, v = heads(q, c.n_head), heads(k, c.n_head_kv), heads(v, c.n_head_kv)
        if c.qk_norm == "head":
            q = self.rmsnorm(q, self.vector(p + "attn_q_norm.weight", c.head_dim))
            k = self.rmsnorm(k, self.vector(p + "attn_k_norm.weight", c.head_dim))
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        g.op("Identity", k, name=f"new_k.{i}")
        g.op("Identity", v, name=f"new_v.{i}")
        kk = g.op("Concat", f"past_k.{i}", k, axis=0)                      # (S, n_kv, hd)
        vv = g.op("Concat", f"past_v.{i}", v, axis=0)
        o = self.attention(q, kk, vv, mask)
        return self.linear(o, p + "attn_output.weight", c.n_embd, c.n_head * c.head_dim)

    def ffn_block(self, i: int, x: str) -> str:
        g, c, p = self.g, self.c, f"blk.{i}."
        h = self.rmsnorm(x, self.vector(p + "ffn_norm.weight", c.n_embd))
        if c.fused_gate_up:   # ffn_up holds gate | up (llama.cpp's swiglu: silu on the first half)
            gu = self.linear(h, p + "ffn_up.weight", 2 * c.n_ff, c.n_embd)
            gate, up = g.op("Split", gu, g.const([c.n_ff, c.n_ff]), axis=-1, outputs=2)
        else:
            gate, up = self.linear_fused(h, [p + "ffn_gate.weight", p + "ffn_up.weight"],
                                         [c.n_ff, c.n_ff], c.n_embd)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)   # silu(gate) * up
        return self.linear(act, p + "ffn_down.weight", c.n_embd, c.n_ff)

    def build(self) -> onnx.ModelProto:
        g, c = self.g, self.c
        cos = g.op("Unsqueeze", "cos", g.const([1]))                       # (T, 1, rd/2)
        sin = g.op("Unsqueeze", "sin", g.const([1]))
        x = "x"
        for i in range(c.n_layer):
            x = g.op("Add", x, self.attn_block(i, x, cos, sin, "mask"))
            x = g.op("Add", x, self.ffn_block(i, x))
            self.progress()
        h = self.rmsnorm(g.op("Gather", x, "rows", axis=0),
                         self.vector("output_norm.weight", c.n_embd))
        out = "token_embd.weight" if c.tied_embeddings else "output.weight"
        g.op("Identity", self.linear(h, out, c.n_vocab, c.n_embd), name="logits")
        return self._model()

    def _model(self) -> onnx.ModelProto:
        c, f32 = self.c, TensorProto.FLOAT
        kv = ["P", c.n_head_kv, c.head_dim]
        inputs = [helper.make_tensor_value_info("x", f32, ["T", c.n_embd]),
                  helper.make_tensor_value_info("cos", f32, ["T", c.rope_dim // 2]),
                  helper.make_tensor_value_info("sin", f32, ["T", c.rope_dim // 2]),
                  helper.make_tensor_value_info("mask", f32, ["T", "S"]),
                  helper.make_tensor_value_info("rows", TensorProto.INT64, ["R"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["R", c.n_vocab])]
        for i in range(c.n_layer):
            inputs += [helper.make_tensor_value_info(f"past_{n}.{i}", f32, kv) for n in "kv"]
            outputs += [helper.make_tensor_value_info(f"new_{n}.{i}", f32,
                                                      ["T", c.n_head_kv, c.head_dim]) for n in "kv"]
        graph = helper.make_graph(self.g.nodes, f"ember-{c.arch}", inputs, outputs, self.g.inits)
        return helper.make_model(graph, producer_name="ember",
                                 opset_imports=[helper.make_opsetid("", OPSET),
                                                helper.make_opsetid("com.microsoft", 1)])


def build_model(gguf, config: ModelConfig, accuracy_level: int = 4,
                weights_path: str | None = None, progress=None) -> onnx.ModelProto:
    """The decoder of `gguf` as an ONNX model.

    With `weights_path`, every initializer of 1 KiB or more is streamed into that
    file as it is built (external data, page-aligned) and the model proto stays
    small; without it, weights are inline (small test models).
    """
    if config.rope_dim % 2 or config.rope_dim > config.head_dim:
        raise UnsupportedModel(f"rope dimension {config.rope_dim} does not fit head_dim "
                               f"{config.head_dim}")
    # rope_freqs.weight (per-pair frequency factors), when present, is folded
    # into the runner's cos/sin tables, so the graph needs nothing for it.
    weights = None if weights_path is None else _ExternalWeights(weights_path)
    try:
        return _Builder(gguf, config, accuracy_level, weights, progress).build()
    finally:
        if weights is not None:
            weights.close()
