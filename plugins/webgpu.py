"""The `webgpu` backend: the decoder on any GPU wgpu reaches — Metal, Vulkan, D3D12.

Design: the kernels are WGSL (kernels/wgsl, assembled by
ember.kernels.wgsl_source) run through wgpu-native (the `wgpu` package).
One source serves Metal on macOS, Vulkan on Linux (a Raspberry Pi 5's V3D,
Intel/AMD integrated GPUs, NVIDIA, Jetson) and D3D12 on Windows, because
the shaders use core WGSL only and naga translates them; CI runs them on
lavapipe (Mesa's Vulkan driver on the CPU).

Weights are uploaded once at load, one storage buffer per tensor (or per
row range of it, where a tensor exceeds the adapter's largest storage
binding): Q4_0 and Q8_0 are split into quants and float32 scales so every
block starts on a word, Q6_K super-blocks are padded from 210 to 212 bytes,
Q4_K and Q5_K stay as in the file; F16 stays half, F32 and BF16 become
float32, and every other type is dequantized to half at load (types ember
cannot dequantize are refused by name). The float32 KV cache (n_ctx rows
in every attention layer: sliding-window layers mask older keys instead of
keeping a ring), lfm2's convolution states, the activations and the logits
are allocated once for n_ctx and max_batch.

A forward pass is a list of dispatches built by pure functions of the
model's Layout (no GPU needed, so CI tests them). Every architecture of
ember.formats.model_config runs; its switches are kernel parameters:

    embed (* embd_scale) -> per layer:
      attention: RMSNorm + q|k|v matvec; rope_kv: bias, q/k RMS norm (per
        head, or over the whole projection: olmo2), rope (none on smollm3's
        every 4th layer; gemma3's local base on its window layers), K and V
        into the cache; attention (online softmax over tiles of 64 keys,
        soft-cap, sliding window); o matvec
      or short convolution (lfm2): RMSNorm + in-projection, shortconv, out-projection
      -> x += (post-norm: add_norm) block output * residual_scale
      RMSNorm + gate|up matvec, SwiGLU or GeGLU, down matvec -> x += as above
    -> RMSNorm + output matvec (/ logit_scale, soft-cap) -> copy of the
    logits into a mappable buffer.

The RMSNorms are folded into the matvec that follows them (each workgroup
sums the squares of its tokens' x, then scales its dot products), and
q|k|v and gate|up are stacked at upload into one matrix where their kinds
match: a llama layer is 6 dispatches.

The matvec kernel multiplies each unpacked 32-weight unit by one token
(decode) or eight (prefill), so prefill reads the weights once per eight
tokens. WebGPU has no reusable compute command buffers (render bundles are
render-only), so what is recorded once per token count is everything else:
the pipelines, every dispatch's bind group and uniforms, and the grid. The
position and tokens live in a storage buffer; a decode step writes 8 bytes
there, replays the prepared dispatch list into one compute pass, and maps
the logits back.

Features: the adapter's `shader-f16` and `subgroup` support are detected and
shown by `ember backends`; the kernels themselves use only the portable
path (workgroup-memory reductions, f32 arithmetic), which every adapter
runs, so no Metal-only or Vulkan-only feature enters the shared source.

Options: ``max_batch`` (tokens per prefill chunk, default 512),
``max_binding`` (bytes of the largest storage binding, default the
adapter's: smaller values split more tensors by rows; for tests),
``submit_every`` (dispatches a command buffer; default 0: one a pass).
"""
from __future__ import annotations

import math
import os
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

from ember.formats import quant_blocks
from ember.formats.model_config import ModelConfig, UnsupportedModel
from ember.kernels import wgsl_source
from ember.kernels.rope import rope_cos_sin, rope_factors
from ember.plugins.features import FEATURES, require_features
from ember.plugins.hookspecs import hookimpl
from ember.plugins.types import (BackendError, BackendSpec, CacheBookkeeping, CacheTooShort, ContextOverflow,
                                MemoryPlan, Probe)
from ember.plugins.types import TokenOutOfRange

NAME = "webgpu"
# Below cpu (50): on the integrated GPUs this targets, and on lavapipe, the GPU is not (yet)
# measured faster than the CPU kernels, so `--backend auto` keeps the CPU; ask for webgpu by name.
PRIORITY = 40
DEFAULT_MAX_BATCH = 512
WG = 64                       # threads a workgroup, every kernel
MAX_GROUPS = 65535            # workgroups a grid dimension (WebGPU's guaranteed minimum)
TB_PREFILL = 8                # tokens a matvec thread multiplies per unpacked unit (prefill)
SUBMIT_EVERY = 0              # dispatches a command buffer (0: one for the whole pass)
RUNTIME_BYTES = 200 << 20     # host: wgpu-native + the driver, measured ~150 MB on lavapipe
# GGUF type -> kernel kind; every other type is dequantized to f16 at load
NATIVE = {"Q4_0": "q4_0", "Q8_0": "q8_0", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k",
          "F16": "f16", "F32": "f32", "BF16": "f32"}
# kind -> (weights a super-block, words of W per super-block, entries of D per super-block)
KIND_BLOCKS = {"q4_0": (32, 4, 1), "q8_0": (32, 8, 1), "q4_k": (256, 36, 0), "q5_k": (256, 44, 0),
               "q6_k": (256, 53, 0), "f16": (32, 16, 0), "f32": (32, 32, 0)}
# ModelConfig features (features.FEATURES) this decoder computes: all the decoder's (the bert
# encoder is not written). The rope tables come from kernels.rope.rope_cos_sin, so every rope
# scaling is computed.
IMPLEMENTED = frozenset(FEATURES) - {"encoder"}
CONV_TAPS_MAX = 16            # lfm2's kernel length the shortconv kernel holds (the models: 3)
FEATURES_USED = ("shader-f16", "subgroup")   # detected and shown; the kernels run without them


# ---------------------------------------------------------------------------
# Plugin hooks
# ---------------------------------------------------------------------------

@hookimpl
def ember_backends():
    return [BackendSpec(NAME, priority=PRIORITY,
                        description="WGSL kernels through wgpu: Metal (macOS), Vulkan (Linux), D3D12 "
                                    "(Windows); one source, validated by naga for every target",
                        features=IMPLEMENTED)]


@hookimpl
def ember_probe(backend):
    if backend != NAME:
        return None
    return probe()


@hookimpl
def ember_plan(backend, config, n_ctx, options):
    if backend != NAME:
        return None
    return plan(config, n_ctx, options or {})


@hookimpl
def ember_load(backend, gguf, config, n_ctx, threads, options):
    if backend != NAME:
        return None
    return WebGPURunner(gguf, config, n_ctx, options or {})


# ---------------------------------------------------------------------------
# Probe: the adapter, its backend API and features
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Adapter:
    name: str
    api: str                 # "Vulkan", "Metal", "D3D12", ...
    kind: str                # "DiscreteGPU", "IntegratedGPU", "CPU", ...
    features: tuple[str, ...]
    max_binding: int         # largest storage buffer binding, bytes
    max_buffer: int


# Lines native libraries print while wgpu enumerates adapters that say nothing about ember:
# on a headless Linux machine the Vulkan loader's Wayland probe (libwayland-client) reports
# that there is no session, even though compute needs none.
HARMLESS_STDERR = ("XDG_RUNTIME_DIR is invalid or not set",)


@contextmanager
def _stderr_filtered(harmless: tuple[str, ...] = HARMLESS_STDERR):
    """Run the body with file descriptor 2 captured, then pass on every line but the harmless
    ones (the libraries write to the descriptor, past Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not any(h in line for h in harmless):
                    sys.stderr.write(line)


@lru_cache(maxsize=1)
def _gpu():
    """(wgpu module, adapter, device): one device per process, with the adapter's largest
    buffer and binding limits (WebGPU's defaults are 128 / 256 MiB)."""
    import wgpu
    with _stderr_filtered():
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    if adapter is None:
        raise BackendError("wgpu found no adapter (no Vulkan / Metal / D3D12 driver)")
    lim = adapter.limits
    want = {k: lim[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                "max-storage-buffers-per-shader-stage") if k in lim}
    device = adapter.request_device_sync(label="ember", required_limits=want)
    return wgpu, adapter, device


def adapter_info() -> Adapter:
    """The adapter ember would use; raises when wgpu or a driver is missing."""
    _, adapter, device = _gpu()
    info, lim = adapter.info, device.limits
    used = tuple(f for f in FEATURES_USED if f in adapter.features)
    return Adapter(str(info.get("device") or info.get("description") or "unknown adapter"),
                   str(info.get("backend_type", "?")), str(info.get("adapter_type", "?")), used,
                   int(lim["max-storage-buffer-binding-size"]), int(lim["max-buffer-size"]))


def probe() -> Probe:
    """wgpu importable and an adapter present; names it, its API and features. Never raises."""
    try:
        import wgpu  # noqa: F401
    except Exception as e:  # noqa: BLE001 - absent or broken wgpu is "not available"
        return Probe(False, f"wgpu is not importable ({type(e).__name__}: {e}); install ember[webgpu]")
    try:
        a = adapter_info()
    except Exception as e:  # noqa: BLE001 - no driver / no adapter is "not available"
        return Probe(False, f"no usable WebGPU adapter: {type(e).__name__}: {e}")
    feats = ", ".join(f"{f} {'yes' if f in a.features else 'no'}" for f in FEATURES_USED)
    soft = "; a CPU (software) adapter: correct but slow" if a.kind == "CPU" else ""
    return Probe(True, f"{a.api}: {a.name} ({a.kind}); features {feats} (the kernels use the "
                       f"portable path); largest storage binding {a.max_binding >> 20} MiB{soft}",
                 isa=a.api, devices=[a.name])


# ---------------------------------------------------------------------------
# Weights on the device: kinds, sizes and pieces (no GPU needed)
# ---------------------------------------------------------------------------

def kind_of(ggml_type: str) -> str:
    """The kernel kind a GGUF type runs as on the device."""
    return NATIVE.get(ggml_type, "f16")


def pad32(n: int) -> int:
    return -(-n // 32) * 32


def row_words(kind: str, cols: int) -> int:
    """32-bit words of W a row of `cols` weights takes (float rows padded to 32 weights)."""
    per, words, _ = KIND_BLOCKS[kind]
    return pad32(cols) // per * words


def row_blocks(kind: str, cols: int) -> int:
    """Entries of D (the split-out scales of Q4_0 / Q8_0) a row takes."""
    per, _, d = KIND_BLOCKS[kind]
    return cols // per * d


@dataclass(frozen=True)
class Piece:
    """Rows [row0, row0 + rows) of a matrix, in buffers `buf` (and `buf#d` for scales)."""
    buf: str
    row0: int
    rows: int


@dataclass(frozen=True)
class Mat:
    """A matrix as the dispatches see it: one tensor, or several of one kind and width stacked
    by rows at upload (q|k|v, gate|up: one dispatch where there would be three or two)."""
    tensor: str                      # its buffers' name
    kind: str
    rows: int
    cols: int
    pieces: tuple[Piece, ...]
    parts: tuple[str, ...] = ()      # the GGUF tensors stacked, in row order (() = tensor itself)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.parts or (self.tensor,)

    @property
    def units(self) -> int:
        return pad32(self.cols) // 32

    @property
    def has_d(self) -> bool:
        return KIND_BLOCKS[self.kind][2] > 0


def pieces(name: str, kind: str, rows: int, cols: int, max_binding: int) -> tuple[Piece, ...]:
    """Row ranges of a matrix whose buffers each fit one storage binding."""
    per_row = 4 * max(row_words(kind, cols), row_blocks(kind, cols))
    n = max(1, max_binding // per_row)
    if n >= rows:
        return (Piece(name, 0, rows),)
    return tuple(Piece(f"{name}@{r0}", r0, min(n, rows - r0)) for r0 in range(0, rows, n))


def device_bytes(t) -> int:
    """Bytes of one tensor (arch.TensorEntry) once uploaded in its device layout."""
    if len(t.shape) == 1:
        return 4 * int(np.prod(t.shape))
    rows, cols = t.shape
    k = kind_of(t.type)
    return 4 * rows * (row_words(k, cols) + row_blocks(k, cols))


# ---------------------------------------------------------------------------
# The layout: dimensions, matrices and buffers of one loaded model
# ---------------------------------------------------------------------------

@dataclass
class Layout:
    c: ModelConfig
    n_ctx: int
    max_batch: int
    max_binding: int
    mats: dict = field(default_factory=dict)        # role -> [Mat, ...] ("token_embd": a Mat), e.g. "3.qkv"
    vecs: dict = field(default_factory=dict)        # role -> buffer name or None

    @property
    def q_dim(self): return self.c.n_head * self.c.head_dim

    @property
    def kv_dim(self): return self.c.n_head_kv * self.c.head_dim

    @property
    def qkv_dim(self): return self.q_dim + 2 * self.kv_dim

    @property
    def ld_x(self): return pad32(self.c.n_embd)      # x and xn rows: matvec reads 32 at a time

    @property
    def ld_h(self): return pad32(self.c.n_ff)

    def buffers(self) -> dict[str, int]:
        """Activation buffers, name -> bytes (weights and KV cache excluded)."""
        c, B = self.c, self.max_batch
        conv = "conv" in c.layer_kinds
        return {"x": 4 * B * self.ld_x, "blk": 4 * B * self.ld_x, "qkv": 4 * B * self.qkv_dim,
                "q": 4 * B * self.q_dim, "bcx": 4 * B * 3 * c.n_embd if conv else 16,
                "convy": 4 * B * self.ld_x if conv else 16,
                "att": 4 * B * pad32(self.q_dim), "ffn": 4 * B * 2 * c.n_ff, "h": 4 * B * self.ld_h,
                "logits": 4 * B * c.n_vocab, "io": 4 * (1 + B), "none": 16}

    @property
    def widest_input(self) -> int:
        """Floats of the widest matvec input row: the "ones" stand-in norm weight covers it."""
        return max(self.ld_x, self.ld_h, pad32(self.q_dim))

    def kv_bytes(self) -> int:
        """float32 K and V, n_ctx rows in every attention layer (sliding-window layers mask the
        older keys rather than keep a ring: simpler kernels, at the cost of the memory a ring
        saves), and the last l_cache - 1 inputs of every lfm2 convolution layer."""
        n_attn = sum(self.c.layer_kind(i) == "attn" for i in range(self.c.n_layer))
        return 2 * n_attn * self.n_ctx * self.kv_dim * 4 + self.c.conv_state_bytes(4)


def _check_supported(c: ModelConfig) -> None:
    require_features(c, NAME, IMPLEMENTED)
    if "conv" in c.layer_kinds and not 1 <= c.conv_l_cache <= CONV_TAPS_MAX:
        raise UnsupportedModel(f"{NAME}: shortconv.l_cache {c.conv_l_cache} is outside the kernel's "
                               f"1..{CONV_TAPS_MAX}")
    if c.head_dim > wgsl_source.HD_MAX:
        raise UnsupportedModel(f"{NAME}: head_dim {c.head_dim} is above the kernels' {wgsl_source.HD_MAX}")


def _mat(c: ModelConfig, name: str, max_binding: int) -> Mat:
    if name not in c.tensors:
        raise UnsupportedModel(f"tensor {name!r} is missing")
    t = c.tensors[name]
    if len(t.shape) != 2:
        raise UnsupportedModel(f"tensor {name!r} has shape {t.shape}, expected a matrix")
    rows, cols = t.shape
    kind = kind_of(t.type)
    return Mat(name, kind, rows, cols, pieces(name, kind, rows, cols, max_binding))


def _stacked(c: ModelConfig, names: list[str], stack: str, max_binding: int) -> list[Mat]:
    """The matrices `names` (sharing an input, outputs adjacent), as runs of one kind and width
    stacked into one matrix each (buffers named `stack`, `stack#1`, ...)."""
    runs: list[list[Mat]] = []
    for m in (_mat(c, n, max_binding) for n in names):
        if runs and (runs[-1][0].kind, runs[-1][0].cols) == (m.kind, m.cols):
            runs[-1].append(m)
        else:
            runs.append([m])
    out = []
    for k, run in enumerate(runs):
        if len(run) == 1:
            out.append(run[0])
            continue
        name, rows = stack + (f"#{k}" if k else ""), sum(m.rows for m in run)
        out.append(Mat(name, run[0].kind, rows, run[0].cols,
                       pieces(name, run[0].kind, rows, run[0].cols, max_binding), tuple(m.tensor for m in run)))
    return out


def layout(c: ModelConfig, n_ctx: int, max_batch: int = DEFAULT_MAX_BATCH,
           max_binding: int = 128 << 20) -> Layout:
    """Every matrix and vector the dispatches use, by role."""
    _check_supported(c)
    kv_row = 4 * c.n_head_kv * c.head_dim
    if n_ctx * kv_row > max_binding:
        raise BackendError(f"{NAME}: a layer's KV cache at n_ctx {n_ctx} is {n_ctx * kv_row} bytes, over "
                           f"the adapter's largest storage binding ({max_binding}); use n_ctx <= "
                           f"{max_binding // kv_row}")
    # every activation buffer is one binding: the widest (logits, usually) bounds the batch
    widest = 4 * max(c.n_vocab, 2 * c.n_ff, 3 * c.n_embd, (c.n_head + 2 * c.n_head_kv) * c.head_dim)
    lay = Layout(c, n_ctx, max(1, min(max_batch, n_ctx, max_binding // widest)), max_binding)
    m, v = lay.mats, lay.vecs
    mat = lambda name: _mat(c, name, max_binding)  # noqa: E731
    m["token_embd"] = mat("token_embd.weight")
    m["output"] = [mat("token_embd.weight" if c.tied_embeddings else "output.weight")]
    v["output_norm"] = c.output_norm
    for i in range(c.n_layer):
        p = f"blk.{i}."
        # each role a list of matrices whose outputs are adjacent columns
        if c.layer_kind(i) == "conv":   # lfm2: in-projection (b | c | x), kernel (d, L), out-projection
            m[f"{i}.in_proj"] = [mat(p + "shortconv.in_proj.weight")]
            m[f"{i}.o"] = [mat(p + "shortconv.out_proj.weight")]
            v[f"{i}.conv"] = p + "shortconv.conv.weight"
        elif c.fused_qkv:
            m[f"{i}.qkv"] = [mat(p + "attn_qkv.weight")]
        else:
            m[f"{i}.qkv"] = _stacked(c, [p + f"attn_{r}.weight" for r in "qkv"], p + "qkv", max_binding)
        if c.layer_kind(i) == "attn":
            m[f"{i}.o"] = [mat(p + "attn_output.weight")]
        if c.fused_gate_up:   # phi3: ffn_up holds gate (rows 0..F) | up (rows F..2F)
            m[f"{i}.gate_up"] = [mat(p + "ffn_up.weight")]
        else:
            m[f"{i}.gate_up"] = _stacked(c, [p + "ffn_gate.weight", p + "ffn_up.weight"], p + "gate_up",
                                         max_binding)
        m[f"{i}.down"] = [mat(p + "ffn_down.weight")]
        pre, post, qk = c.pre_norms, c.post_norms, c.qk_norm != "none" and c.layer_kind(i) == "attn"
        v[f"{i}.attn_norm"] = p + "attn_norm.weight" if pre else None
        v[f"{i}.ffn_norm"] = p + "ffn_norm.weight" if pre else None
        v[f"{i}.post_attn_norm"] = p + "post_attention_norm.weight" if post else None
        v[f"{i}.post_ffw_norm"] = p + "post_ffw_norm.weight" if post else None
        v[f"{i}.bias"] = p + "bqkv" if p + "attn_q.bias" in c.tensors else None
        v[f"{i}.q_norm"] = p + "attn_q_norm.weight" if qk else None
        v[f"{i}.k_norm"] = p + "attn_k_norm.weight" if qk else None
    return lay


# ---------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------

def device_plan(c: ModelConfig, n_ctx: int, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, int]:
    """Device bytes by part: weights (device layout), kv_cache (f32), scratch."""
    lay = layout(c, n_ctx, max_batch)
    weights = sum(device_bytes(t) for t in c.tensors.values())
    return {"weights": weights, "kv_cache": lay.kv_bytes(),
            "scratch": sum(lay.buffers().values()) + 4 * n_ctx * c.rope_dim * (2 if c.rope_base_swa else 1)}


def plan(c: ModelConfig, n_ctx: int, options: dict) -> MemoryPlan:
    """Everything lives on the device; the host keeps the runtime and the logits read-back."""
    batch = max(1, min(int(options.get("max_batch", DEFAULT_MAX_BATCH)), n_ctx))
    dev = device_plan(c, n_ctx, batch)
    converted = sorted({t.type for t in c.tensors.values() if len(t.shape) == 2 and t.type not in NATIVE})
    notes = [f"device: weights {dev['weights']} + KV cache {dev['kv_cache']} (f32) + scratch "
             f"{dev['scratch']} bytes (prefill chunks of {batch} tokens)",
             "the mapped file is read once at load to upload the weights"]
    if converted:
        notes.append(f"{', '.join(converted)} matrices are dequantized to f16 at load")
    return MemoryPlan(weights=0, kv_cache=0, scratch=4 * batch * c.n_vocab, runtime=RUNTIME_BYTES,
                      device=sum(dev.values()), notes=notes)


# ---------------------------------------------------------------------------
# Dispatches: what a forward pass runs (pure data, no GPU needed)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Dispatch:
    module: str                    # a key of wgsl_source.all_modules()
    entry: str
    bindings: tuple                # ((binding, buffer name), ...)
    params: bytes                  # the uniform block, packed
    grid: tuple[int, int, int]
    uniform_binding: int


def _pack(*values) -> bytes:
    """A WGSL uniform struct of u32 / f32 scalars, in order (floats are Python floats)."""
    return b"".join(struct.pack("<f" if isinstance(v, float) else "<I", v) for v in values)


def _grid(n: int, per: int) -> int:
    return max(1, -(-n // per))


def _group(units: int) -> int:
    """Threads a row: the power of two covering the units, at most a workgroup."""
    return min(WG, 1 << max(0, (units - 1).bit_length()))


@dataclass(frozen=True)
class Norm:
    """An RMSNorm folded into a matvec: x = RMSNorm(X[:, :n]) * weight."""
    weight: str
    n: int
    eps: float


def matvec(mats: list[Mat], x: str, ldx: int, y: str, ldy: int, y_off: int, T: int, acc: bool = False,
           x_off: int = 0, norm: Norm | None = None, scale: float = 1.0,
           softcap: float = 0.0) -> list[Dispatch]:
    """y[t, y_off + r] (+)= scale * W[r] . x[t] (soft-capped if softcap) for every row of the
    matrices, whose outputs are adjacent columns from y_off on (one dispatch a piece); x is
    RMSNorm(X) * weight with a norm."""
    out = []
    for m in mats:
        out += _matvec_one(m, x, ldx, y, ldy, y_off, T, acc, x_off, norm, scale, softcap)
        y_off += m.rows
    return out


def _matvec_one(m: Mat, x: str, ldx: int, y: str, ldy: int, y_off: int, T: int, acc: bool,
                x_off: int, norm: Norm | None, scale: float, softcap: float) -> list[Dispatch]:
    tb = 1 if T == 1 else TB_PREFILL
    g = _group(m.units)
    out = []
    for p in m.pieces:
        binds = ((0, p.buf),) + (((1, p.buf + "#d"),) if m.has_d else ()) + \
            ((2, x), (3, y), (6, norm.weight if norm else "ones"))
        params = _pack(p.rows, m.units, row_words(m.kind, m.cols), row_blocks(m.kind, m.cols),
                       ldx, x_off, ldy, y_off + p.row0, T, g, int(acc), p.row0,
                       int(norm is not None), norm.n if norm else 0, float(norm.eps if norm else 0.0),
                       float(scale), float(softcap))
        grid = (min(MAX_GROUPS, _grid(p.rows, WG // g)), _grid(T, tb), 1)
        out.append(Dispatch(f"mv{tb}_{m.kind}", "matvec", binds, params, grid, 4))
    return out


def embed(lay: Layout, T: int) -> list[Dispatch]:
    """x[t] = token_embd[token t] * embd_scale (one dispatch a piece of the table)."""
    m = lay.mats["token_embd"]
    return [Dispatch(f"mv1_{m.kind}", "embed",
                     ((0, p.buf),) + (((1, p.buf + "#d"),) if m.has_d else ()) + ((3, "x"), (5, "io")),
                     _pack(p.rows, m.units, row_words(m.kind, m.cols), row_blocks(m.kind, m.cols),
                           0, 0, lay.ld_x, 0, T, 1, 0, p.row0, 0, 0, 0.0, float(lay.c.embd_scale), 0.0),
                     (_grid(m.units, WG), T, 1), 4) for p in m.pieces]


def _norm(lay: Layout, weight: str | None) -> Norm | None:
    return Norm(weight, lay.c.n_embd, float(lay.c.rms_eps)) if weight else None


def _to_residual(lay: Layout, mats: list[Mat], x: str, ldx: int, T: int, post_norm: str | None) -> list[Dispatch]:
    """x_stream += block output W . x, through the post-norm where there is one (gemma, olmo2),
    times the residual scale (granite)."""
    scale = float(lay.c.residual_scale)
    if post_norm is None:
        return matvec(mats, x, ldx, "x", lay.ld_x, 0, T, acc=True, scale=scale)
    return matvec(mats, x, ldx, "blk", lay.ld_x, 0, T) + [
        Dispatch("add_norm", "add_norm", ((0, "x"), (1, "blk"), (2, post_norm)),
                 _pack(lay.c.n_embd, lay.ld_x, lay.ld_x, float(lay.c.rms_eps), scale), (T, 1, 1), 3)]


def _attention_block(lay: Layout, i: int, T: int) -> list[Dispatch]:
    c, v = lay.c, lay.vecs
    steps = matvec(lay.mats[f"{i}.qkv"], "x", lay.ld_x, "qkv", lay.qkv_dim, 0, T,
                   norm=_norm(lay, v[f"{i}.attn_norm"]))
    kc, vc = f"kc{i}", f"vc{i}"
    opt = lambda role: v[role] or "none"  # noqa: E731 - a stand-in binding when absent
    swa = c.is_swa(i)
    cs = "cs_swa" if swa and c.rope_base_swa else "cs"
    qk_norm = {"none": 0, "head": 1, "full": 2}[c.qk_norm]
    steps.append(Dispatch("rope_kv", "rope_kv",
                          ((0, "qkv"), (1, cs), (2, kc), (3, vc), (4, "io"), (5, opt(f"{i}.bias")),
                           (6, opt(f"{i}.q_norm")), (7, opt(f"{i}.k_norm")), (9, "q")),
                          _pack(c.n_head, c.n_head_kv, c.head_dim, c.rope_dim if c.uses_rope(i) else 0,
                                int(c.rope_style == "neox"), lay.qkv_dim, lay.kv_dim,
                                int(v[f"{i}.bias"] is not None), qk_norm, float(c.rms_eps)),
                          (c.n_head + 2 * c.n_head_kv, T, 1), 8))
    scale = float(c.attn_scale or 1.0 / math.sqrt(c.head_dim))
    steps.append(Dispatch("attention", "attention",
                          ((0, "q"), (1, kc), (2, vc), (3, "io"), (4, "att")),
                          _pack(c.n_head, c.n_head_kv, c.head_dim, lay.q_dim, lay.kv_dim,
                                pad32(lay.q_dim), scale, float(c.attn_softcap),
                                c.sliding_window if swa else 0), (c.n_head, T, 1), 5))
    return steps + _to_residual(lay, lay.mats[f"{i}.o"], "att", pad32(lay.q_dim), T, v[f"{i}.post_attn_norm"])


def _conv_block(lay: Layout, i: int, T: int) -> list[Dispatch]:
    """lfm2: b | c | x = in_proj(norm(x)); y = c * conv(b * x) over the layer's last inputs;
    x += out_proj(y)."""
    c, d = lay.c, lay.c.n_embd
    steps = matvec(lay.mats[f"{i}.in_proj"], "x", lay.ld_x, "bcx", 3 * d, 0, T,
                   norm=_norm(lay, lay.vecs[f"{i}.attn_norm"]))
    steps.append(Dispatch("shortconv", "shortconv",
                          ((0, "bcx"), (1, lay.vecs[f"{i}.conv"]), (2, f"conv{i}"), (3, "convy"), (4, "io")),
                          _pack(d, c.conv_l_cache, 3 * d, lay.ld_x, T), (_grid(d, WG), 1, 1), 5))
    return steps + _to_residual(lay, lay.mats[f"{i}.o"], "convy", lay.ld_x, T, lay.vecs[f"{i}.post_attn_norm"])


def _ffn_block(lay: Layout, i: int, T: int) -> list[Dispatch]:
    F = lay.c.n_ff
    steps = matvec(lay.mats[f"{i}.gate_up"], "x", lay.ld_x, "ffn", 2 * F, 0, T,
                   norm=_norm(lay, lay.vecs[f"{i}.ffn_norm"]))
    steps.append(Dispatch("swiglu", "swiglu", ((0, "ffn"), (1, "h")),
                          _pack(F, 2 * F, lay.ld_h, int(lay.c.act == "gelu")), (_grid(F, WG), T, 1), 2))
    return steps + _to_residual(lay, lay.mats[f"{i}.down"], "h", lay.ld_h, T, lay.vecs[f"{i}.post_ffw_norm"])


def _logits(lay: Layout, T: int, all_logits: bool) -> list[Dispatch]:
    """The final norm and output matrix (/ logit_scale, soft-capped: granite, gemma2)."""
    c, norm = lay.c, _norm(lay, lay.vecs["output_norm"])
    post = dict(norm=norm, scale=1.0 / c.logit_scale, softcap=float(c.final_softcap))
    if all_logits:
        return matvec(lay.mats["output"], "x", lay.ld_x, "logits", c.n_vocab, 0, T, **post)
    return matvec(lay.mats["output"], "x", lay.ld_x, "logits", c.n_vocab, 0, 1, x_off=(T - 1) * lay.ld_x, **post)


def forward_steps(lay: Layout, T: int, all_logits: bool = False) -> list[Dispatch]:
    """The whole pass for T tokens at positions io[0].. (tokens in io[1..])."""
    if not 1 <= T <= lay.max_batch:
        raise ValueError(f"T={T} must be in [1, {lay.max_batch}]")
    steps = embed(lay, T)
    for i in range(lay.c.n_layer):
        mixer = _conv_block if lay.c.layer_kind(i) == "conv" else _attention_block
        steps += mixer(lay, i, T) + _ffn_block(lay, i, T)
    return steps + _logits(lay, T, all_logits)


# ---------------------------------------------------------------------------
# Host layouts: a GGUF tensor as the words the kernels read
# ---------------------------------------------------------------------------

def _padded_rows(a: np.ndarray, cols: int) -> np.ndarray:
    """(rows, cols) -> (rows, pad32(cols)) with zero columns: the kernels read 32 at a time."""
    if a.shape[1] == pad32(cols):
        return np.ascontiguousarray(a)
    out = np.zeros((a.shape[0], pad32(cols)), a.dtype)
    out[:, :cols] = a
    return out


def host_layout(t) -> tuple[np.ndarray, np.ndarray | None]:
    """(W rows, D rows or None): a GGUF tensor in its device layout, one row a row."""
    rows, cols = t.shape
    raw = np.frombuffer(t.data, dtype=np.uint8)
    k = kind_of(t.type)
    if k in ("q4_0", "q8_0"):    # split so that every block's quants start on a word
        blk = raw.reshape(rows, -1, 18 if k == "q4_0" else 34)
        return (np.ascontiguousarray(blk[:, :, 2:]).reshape(rows, -1),
                blk[:, :, :2].copy().view(np.float16).astype(np.float32).reshape(rows, -1))
    if k in ("q4_k", "q5_k"):
        return raw.reshape(rows, -1), None
    if k == "q6_k":              # 210-byte super-blocks padded to 212: each starts on a word
        padded = np.zeros((rows, cols // 256, 212), np.uint8)
        padded[:, :, :210] = raw.reshape(rows, -1, 210)
        return padded.reshape(rows, -1), None
    try:
        values = t.numpy()
    except quant_blocks.QuantError as e:
        raise BackendError(f"{NAME}: tensor {t.name!r} has type {t.type}, which ember cannot "
                           f"dequantize ({e}); requantize the model to Q4_0, Q8_0 or a K-quant") from e
    return _padded_rows(np.asarray(values, np.float16 if k == "f16" else np.float32).reshape(rows, cols),
                        cols), None


def _fused_bias(gguf, prefix: str, c: ModelConfig) -> np.ndarray:
    """q|k|v biases as one float32 vector (a missing one is zeros)."""
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    parts = []
    for r, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
        t = gguf.tensors.get(f"{prefix}attn_{r}.bias")
        parts.append(np.zeros(n, np.float32) if t is None else np.asarray(t.numpy(), np.float32).reshape(n))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------

class WebGPURunner(CacheBookkeeping):
    """ember.plugins.types.Runner on one WebGPU adapter."""

    def __init__(self, gguf, config: ModelConfig, n_ctx: int, options: dict | None = None):
        options = options or {}
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        self.wgpu, _, self.device = _gpu()
        self.adapter = adapter_info()
        self.n_ctx, self.n_vocab, self.n_past = n_ctx, config.n_vocab, 0
        binding = min(int(options.get("max_binding", self.adapter.max_binding)), self.adapter.max_binding)
        self.lay = layout(config, n_ctx, int(options.get("max_batch", DEFAULT_MAX_BATCH)), binding)
        self.submit_every = int(options.get("submit_every", SUBMIT_EVERY))
        self.bufs: dict[str, object] = {}
        self._pipelines: dict[tuple[str, str], object] = {}
        self._plans: dict[tuple[int, bool], list] = {}
        self._upload(gguf, config)
        self._alloc(config)

    # -- buffers --------------------------------------------------------------

    def _put(self, name: str, host: np.ndarray) -> None:
        data = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        size = max(16, -(-data.size // 16) * 16)     # vec4 bindings need whole 16 bytes
        if size != data.size:
            data = np.concatenate([data, np.zeros(size - data.size, np.uint8)])
        self.bufs[name] = self.device.create_buffer_with_data(data=data, usage=self.wgpu.BufferUsage.STORAGE)

    def _upload(self, gguf, c: ModelConfig) -> None:
        """Every tensor the dispatches read, once, in the kernels' layout (pieces by rows)."""
        done = set()
        for role, mats in self.lay.mats.items():
            for m in ([mats] if role == "token_embd" else mats):
                if m.tensor not in done:
                    done.add(m.tensor)
                    self._upload_mat(gguf, m)
        for role, name in self.lay.vecs.items():
            if name is None or name in self.bufs:
                continue
            if name.endswith(".bqkv"):
                self._put(name, _fused_bias(gguf, name.removesuffix("bqkv"), c))
            else:   # padded to whole units: a folded norm's weight is read 32 floats at a time
                w = np.asarray(gguf.tensors[name].numpy(), np.float32).reshape(1, -1)
                self._put(name, _padded_rows(w, w.shape[1]))
        self._put("ones", np.ones(self.lay.widest_input, np.float32))
        cos, sin = rope_cos_sin(c, self.n_ctx, rope_factors(c, gguf, self.n_ctx))
        self._put("cs", np.stack([cos, sin], axis=-1).astype(np.float32))   # (n_ctx, rope_dim/2, 2)
        if c.rope_base_swa:      # gemma3: the sliding-window layers' own base
            cos, sin = rope_cos_sin(c, self.n_ctx, rope_factors(c, gguf, self.n_ctx), swa=True)
            self._put("cs_swa", np.stack([cos, sin], axis=-1).astype(np.float32))

    def _upload_mat(self, gguf, m: Mat) -> None:
        """One matrix (its parts stacked by rows), a buffer per piece (and per piece of scales)."""
        layouts = [host_layout(gguf.tensors[n]) for n in m.sources]
        w = layouts[0][0] if len(layouts) == 1 else np.concatenate([a for a, _ in layouts])
        d = layouts[0][1] if len(layouts) == 1 or layouts[0][1] is None else \
            np.concatenate([b for _, b in layouts])
        for p in m.pieces:
            self._put(p.buf, w[p.row0:p.row0 + p.rows])
            if d is not None:
                self._put(p.buf + "#d", d[p.row0:p.row0 + p.rows])

    def _alloc(self, c: ModelConfig) -> None:
        U = self.wgpu.BufferUsage
        for name, nbytes in self.lay.buffers().items():
            self.bufs[name] = self.device.create_buffer(size=max(16, -(-nbytes // 16) * 16),
                                                        usage=U.STORAGE | U.COPY_SRC | U.COPY_DST)
        kv = max(16, self.n_ctx * self.lay.kv_dim * 4)   # per layer: (n_ctx, kv_dim) float32
        conv = max(16, (c.conv_l_cache - 1) * c.n_embd * 4)  # per lfm2 conv layer: (L - 1, d)
        for i in range(c.n_layer):
            if c.layer_kind(i) == "conv":
                self.bufs[f"conv{i}"] = self.device.create_buffer(size=conv, usage=U.STORAGE)
                continue
            for cache in ("kc", "vc"):
                self.bufs[f"{cache}{i}"] = self.device.create_buffer(size=kv, usage=U.STORAGE)
        self.readback = self.device.create_buffer(size=self.bufs["logits"].size,
                                                  usage=U.MAP_READ | U.COPY_DST)

    # -- preparing and running dispatches -------------------------------------

    def _pipeline(self, module: str, entry: str):
        key = (module, entry)
        if key not in self._pipelines:
            mods = wgsl_source.all_modules()
            shader = self.device.create_shader_module(label=module, code=mods[module])
            self._pipelines[key] = self.device.create_compute_pipeline(
                label=f"{module}.{entry}", layout="auto", compute={"module": shader, "entry_point": entry})
        return self._pipelines[key]

    def _prepare(self, steps: list[Dispatch]) -> list:
        """Dispatches as (pipeline, bind group, grid): every uniform block packed into one
        buffer (each at an aligned offset), every bind group created once."""
        align = max(256, int(self.device.limits.get("min-uniform-buffer-offset-alignment", 256)))
        blob = bytearray()
        offsets = []
        for s in steps:
            offsets.append(len(blob))
            blob += s.params
            blob += bytes(-len(blob) % align)
        ubuf = self.device.create_buffer_with_data(data=bytes(blob), usage=self.wgpu.BufferUsage.UNIFORM)
        prepared = []
        for s, off in zip(steps, offsets):
            pipe = self._pipeline(s.module, s.entry)
            entries = [{"binding": b, "resource": {"buffer": self.bufs[name], "offset": 0,
                                                   "size": self.bufs[name].size}} for b, name in s.bindings]
            entries.append({"binding": s.uniform_binding,
                            "resource": {"buffer": ubuf, "offset": off, "size": -(-len(s.params) // 16) * 16}})
            group = self.device.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=entries)
            prepared.append((pipe, group, s.grid))
        return prepared

    def _forward(self, T: int, all_logits: bool) -> list:
        key = (T, all_logits)
        if key not in self._plans:
            if len(self._plans) >= 8:     # a daemon sees many prompt lengths: keep the last 8
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = self._prepare(forward_steps(self.lay, T, all_logits))
        return self._plans[key]

    def _run(self, plan: list, io: np.ndarray, n_logits: int) -> np.ndarray:
        """Write io, replay the prepared dispatches in one compute pass, read n_logits rows back."""
        self.device.queue.write_buffer(self.bufs["io"], 0, io)
        return self._submit(plan, "logits", 4 * n_logits * self.n_vocab).reshape(n_logits, self.n_vocab)

    def _submit(self, plan: list, out: str, nbytes: int) -> np.ndarray:
        """Encode the plan's dispatches and submit them (a command buffer every submit_every
        dispatches, so the GPU starts on the first while the host encodes the rest), then copy
        `out` into the mappable buffer and read it."""
        step = self.submit_every or len(plan)
        for k in range(0, len(plan), step):
            enc = self.device.create_command_encoder()
            cp = enc.begin_compute_pass()
            for pipe, group, grid in plan[k:k + step]:
                cp.set_pipeline(pipe)
                cp.set_bind_group(0, group)
                cp.dispatch_workgroups(*grid)
            cp.end()
            if k + step >= len(plan):
                enc.copy_buffer_to_buffer(self.bufs[out], 0, self.readback, 0, nbytes)
            self.device.queue.submit([enc.finish()])
        self.readback.map_sync(self.wgpu.MapMode.READ, 0, nbytes)
        try:
            return np.frombuffer(self.readback.read_mapped(0, nbytes), np.float32).copy()
        finally:
            self.readback.unmap()

    def execute(self, steps: list[Dispatch], inputs: dict[str, np.ndarray], out: str,
                shape: tuple[int, ...]) -> np.ndarray:
        """Run dispatches on this runner's buffers: `inputs` (buffer -> float32 rows) written
        first (a name the runner lacks is a buffer for this call only), then `out`'s leading
        float32 values read back as `shape`. The tests check one kernel at a time with it; the
        cache and n_past are not touched unless `steps` do."""
        extra = [name for name in inputs if name not in self.bufs]
        for name in extra:
            self._put(name, np.asarray(inputs[name], np.float32))
        try:
            for name, a in inputs.items():
                if name not in extra:
                    self.device.queue.write_buffer(self.bufs[name], 0, np.ascontiguousarray(a, np.float32))
            n = int(np.prod(shape))
            return self._submit(self._prepare(steps), out, 4 * n).reshape(shape)
        finally:
            for name in extra:
                self.bufs.pop(name).destroy()

    # -- the Runner protocol --------------------------------------------------

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self._check(tokens)
        B, out = self.lay.max_batch, []
        for c0 in range(0, ids.size, B):
            chunk = ids[c0:c0 + B]
            last = c0 + chunk.size == ids.size
            io = np.concatenate([[self.n_past + c0], chunk]).astype(np.uint32)
            rows = chunk.size if all_logits else 1
            logits = self._run(self._forward(int(chunk.size), all_logits), io, rows)
            if all_logits or last:
                out.append(logits)
        self.n_past += ids.size
        return np.concatenate(out) if all_logits else out[-1][0]

    def decode(self, token: int) -> np.ndarray:
        if self.lay is None:
            raise ValueError("runner is closed")
        if not 0 <= token < self.n_vocab:
            raise TokenOutOfRange(f"token id {token} is outside the vocabulary [0, {self.n_vocab})")
        if self.n_past + 1 > self.n_ctx:
            raise ContextOverflow(f"1 token after {self.n_past} cached would need "
                                  f"{self.n_past + 1} positions; n_ctx is {self.n_ctx}")
        logits = self._run(self._forward(1, False), np.array([self.n_past, token], np.uint32), 1)
        self.n_past += 1
        return logits[0]

    def truncate(self, n_past: int) -> None:
        """lfm2's convolution layers keep only their latest inputs: going back is refused
        (reset() and prefill again instead), as the reference backend does."""
        if isinstance(n_past, (int, np.integer)) and 0 < n_past < self.n_past and \
                "conv" in self.lay.c.layer_kinds:
            raise CacheTooShort(f"truncate({n_past}): {self.lay.c.arch}'s convolution layers keep only "
                                "their latest inputs; reset() and prefill again")
        super().truncate(n_past)

    def close(self) -> None:
        if self.lay is None:
            return
        self._plans.clear()
        for b in self.bufs.values():
            b.destroy()
        self.bufs.clear()
        self.readback.destroy()
        self.lay = None

    def _check(self, tokens: Sequence[int]) -> np.ndarray:
        if self.lay is None:
            raise ValueError("runner is closed")
        return self.checked_tokens(tokens, np.uint32)
