"""The `cuda` backend: the decoder on an NVIDIA GPU (or an AMD one, through CuPy's ROCm build).

Design: the kernels are CUDA C in kernels/cuda/ember_cuda.cu, compiled at
load by NVRTC (hipRTC on ROCm) through CuPy's RawModule; kernels/cuda_source
adds the per-platform macros (warp width 32 or 64). Weights are uploaded once
at load, repacked for aligned 16-byte loads (Q4_0/Q8_0 split into quants and
scales, Q6_K padded to 224 bytes); types without kernels are dequantized to
f16 at load, when the device has room. The f16 KV cache, every activation
buffer and a bounded weight scratch are allocated once, so a forward pass
allocates nothing on the device. On an integrated GPU (Jetson: device memory
is the host's RAM) the mapped file's pages are released after the upload,
so the weights are not resident twice.

A forward pass is a list of steps (kernel launches, copies, GEMMs) built by
pure functions of the model's Layout (no GPU needed, so CI tests them):

    decode (one token): copy (pos, token) in -> embed -> per layer:
        rmsnorm + q|k|v matvec, rope + KV write + split attention (flash-
        decoding; one launch, or two with fuse_rope off), merge of the splits
        + o matvec (+= x), rmsnorm + gate|up matvec + SwiGLU, down matvec
        (+= x) -> rmsnorm + output matvec -> copy logits out. The matvec
        kernels stage x in shared memory and normalize it (or merge the
        attention splits into it) on the way: 5 (or 6) launches a layer.
    prefill (T > MATVEC_MAX_T tokens): the same blocks, but each projection
        dequantizes its matrix (in row chunks) into the scratch and multiplies
        with cuBLAS/hipBLAS: f16 x f16 -> f32 for quantized weights, f32 for
        float ones (matrices sharing an input, like q|k|v, in one GEMM when
        they fit the scratch together). Attention: on CUDA, a flash-style
        kernel on the tensor cores (wmma: 64 queries a block, K/V tiles of 64
        keys in shared memory, online softmax); elsewhere, or for heads not a
        multiple of 16 wide, a warp per query row.

Decode on CUDA can also run as one cooperative launch of decode_persistent
per token (``persistent=1``): the grid is as many blocks as the GPU holds at
once, walks a table of stages (embed, per layer q|k|v, rope + attention, o,
gate|up + SwiGLU, down, then the output matrix) and passes a grid barrier
between stages; with ``l2_prefetch`` every block asks the copy engine at the
start of a stage to prefetch into L2 the weight rows it multiplies in the
next. Measured on an H200 (bench/results/cuda-h200.md) it is 16-22% slower
than the graph below (~1.37 ms a token against ~1.21: each of its 112 stages
costs 5-20 us of dependent latency, the barrier included), so the graph
stays the default and the persistent kernel its opt-in alternative, held to
the graph's logits (KL <= 1e-6) by the GPU test. ROCm (the kernel's barrier
and prefetch are PTX) and models with float matrices always use the graph.

Decode's steps are captured once as a CUDA graph and replayed per token:
the position and token live in a pinned host buffer that the graph's first
node copies to the device, so the host work per token is two integer
stores, one graph launch and a synchronize. Prefill's launches are turned
into ready argument tuples once per chunk length, so a chunk's ~500 launches
cost the host little more than CuPy's own launch call.

On Hopper and later, decode's kernels are launched with programmatic
dependent launch (cuLaunchKernelEx through ctypes): each may start while the
one before it finishes, issue its weight loads, and wait (griddepcontrol)
only before it touches the previous kernels' outputs, which hides part of
the gap between the graph's ~114 nodes.

Measured on an H100 (bench/results/cuda-h100.md): the tensor-core attention
made pp512 1.7-1.9x llama.cpp's; decode is latency-bound (~11 us a graph
node against ~1 us of bandwidth for a 2048x2048 Q4_0 matrix). Programmatic
launch alone was 10% slower there; with the prefetching matvecs and the
fused attention the three were 9% faster on Q4_0, hence all on by default.

Options: ``max_batch`` (tokens per prefill chunk, default 512), ``device``
(GPU ordinal, default 0), ``flash`` (tensor-core prefill attention where
it compiles, default on), ``prefetch`` (decode matvecs that put their first
rows' loads in flight before staging x, default on), ``fuse_rope`` (decode's
rope and KV write inside the attention kernel, default on), ``pdl``
(programmatic dependent launch for decode where the GPU has it, default on),
``persistent`` (decode as one persistent kernel on CUDA, default off),
``p_per_sm`` (its blocks per multiprocessor, at most; default P_PER_SM),
``p_flags`` (its barrier / prefetch variants, P_FLAGS), ``l2_prefetch`` (its
next-stage L2 prefetch, default off: 6-10% slower with it on the H200),
``dp4a`` (decode, graph or persistent: the Q4_0 / Q8_0 / Q4_K matvecs
quantize their input to int8 blocks of 32, as llama.cpp's MMVQ, and multiply
with dp4a; default off until measured faster on a GPU).
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ember.kernels import cuda_source
from ember.formats.model_config import ModelConfig, UnsupportedModel
from ember.kernels.rope import rope_cos_sin, rope_factors
from ember.plugins.features import require_features
from ember.plugins.hookspecs import hookimpl
from ember.plugins.types import BackendError, BackendSpec, CacheBookkeeping, ContextOverflow, MemoryPlan, Probe
from ember.plugins.types import TokenOutOfRange  # noqa: F401 - re-exported

NAME = "cuda"
PRIORITY = 80
DEFAULT_MAX_BATCH = 512
MATVEC_MAX_T = 4                 # up to this many tokens, projections use the matvec kernels
W_SCRATCH_BYTES = 32 << 20       # dequantized weight rows for one prefill GEMM chunk
MIN_CHUNK, MAX_SPLITS = 256, 64  # decode attention: keys per split (a tile per warp), splits
FA_Q, FA_K, FA_WARPS = 64, 64, 4  # flash prefill attention: queries a block, keys a tile, warps
FA_HD_MAX = 128                  # widest head it takes (shared memory grows with it)
PF_BLOCKS = 2                    # blocks an SM holds of a _pf matvec (its register cap)
PLANS_KEPT = 8                   # prefill: prepared launch lists kept, by chunk length
P_PER_SM = 1                     # persistent decode: blocks a multiprocessor runs (its launch bounds allow 1)
P_FLAGS = 0                      # persistent decode: PF_* flags (1 poll backoff, 2 classic barrier, 4 line
                                 # prefetch, PF_I8 int8 x and dp4a in the matvec stages, 16 L1
                                 # prefetch of the next stage's first rows before each barrier)
PF_I8 = 8                        # the kernel's PF_I8: set by the dp4a option
PF_L1 = 16                       # the kernel's PF_L1: the next stage's first rows into L1 before each barrier
RUNTIME_BYTES = 400 << 20        # host: CUDA context + CuPy + NVRTC, measured ~300 MB
# GGUF type -> kernel type; anything else is dequantized to f16 at load
NATIVE = {"Q4_0": "q4_0", "Q8_0": "q8_0", "Q4_K": "q4_k", "Q6_K": "q6_k",
          "F16": "f16", "F32": "f32", "BF16": "f32"}
QUANT_KINDS = ("q4_0", "q8_0", "q4_k", "q6_k")   # f16 GEMM; float kinds use f32 GEMM
I8_KINDS = ("q4_0", "q8_0", "q4_k")                # matvec_i8_<kind>: int8 x, dp4a (a Q::dot8 each)
XQ_BYTES = 48                                      # the kernels' struct XQ: 32 int8 of x, d, d * sum


# ---------------------------------------------------------------------------
# Plugin hooks
# ---------------------------------------------------------------------------

@hookimpl
def ember_backends():
    return [BackendSpec(NAME, priority=PRIORITY,
                        description="GPU kernels (CUDA via NVRTC, or ROCm/HIP) through CuPy; decode as "
                                    "one CUDA graph per token (~5 launches a layer); persistent=1: one "
                                    "persistent kernel per token instead (CUDA only; ROCm/HIP and "
                                    "float matrices keep the graph)",
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
    return CudaRunner(gguf, config, n_ctx, options or {})


# ---------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------

def probe() -> Probe:
    """CuPy importable and a device present; names the platform (CUDA or HIP). Never raises."""
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - absent or broken CuPy is "not available"
        return Probe(False, f"CuPy is not importable ({type(e).__name__}: {e}); "
                            f"install ember[cuda]")
    try:
        rt = cupy.cuda.runtime
        n = rt.getDeviceCount()
        if n < 1:
            return Probe(False, "CuPy found no GPU")
        props = rt.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        platform = "HIP" if rt.is_hip else "CUDA"
        ver = rt.runtimeGetVersion()
        mem = int(props["totalGlobalMem"])
    except Exception as e:  # noqa: BLE001 - no driver / no device is "not available"
        return Probe(False, f"no usable GPU: {type(e).__name__}: {e}")
    return Probe(True, f"{platform} runtime {ver}: {name}, {mem / 2**30:.1f} GiB, warp "
                       f"{props.get('warpSize', 32)}; {decode_note(platform)}", isa=platform,
                 devices=[name], memory_bytes=mem)


def decode_note(platform: str) -> str:
    """How decode runs on this platform, for `ember backends`."""
    if platform == "HIP":
        return "decode: a graph of launches (the persistent decode kernel is CUDA-only)"
    return "decode: a CUDA graph of launches (option persistent=1: one persistent kernel a token)"


# ---------------------------------------------------------------------------
# Weights on the device: kinds and sizes (no GPU needed)
# ---------------------------------------------------------------------------

def kind_of(ggml_type: str) -> str:
    """The kernel type a GGUF type runs as on the device."""
    return NATIVE.get(ggml_type, "f16")


def device_bytes(t) -> int:
    """Bytes of one tensor (model_config.TensorEntry) once uploaded in its device layout."""
    n = int(np.prod(t.shape))
    if len(t.shape) == 1:
        return 4 * n                        # norms and biases: float32
    k = kind_of(t.type)
    if k == "q6_k":
        return t.nbytes // 210 * 224        # padded super-blocks
    if k in QUANT_KINDS:
        return t.nbytes                     # repacked, same bytes
    return n * (4 if k == "f32" else 2)


@dataclass(frozen=True)
class Mat:
    """A weight matrix as the steps see it: rows [row0, row0 + rows) of a tensor."""
    tensor: str
    kind: str
    rows: int
    cols: int
    row0: int = 0

    def w(self) -> "Buf":
        return Buf(self.tensor, self.row0 * _row_bytes(self.kind, self.cols))

    def d(self) -> "Buf | None":
        if self.kind not in ("q4_0", "q8_0"):
            return None
        return Buf(self.tensor + "#d", self.row0 * (self.cols // 32) * 2)


def _row_bytes(kind: str, cols: int) -> int:
    per = {"q4_0": (32, 16), "q8_0": (32, 32), "q4_k": (256, 144), "q6_k": (256, 224),
           "f16": (1, 2), "f32": (1, 4)}[kind]
    return cols // per[0] * per[1]


# ---------------------------------------------------------------------------
# The layout: dimensions, matrices and buffers of one loaded model
# ---------------------------------------------------------------------------

@dataclass
class Layout:
    c: ModelConfig
    n_ctx: int
    max_batch: int
    warp: int = 32
    n_sm: int = 132                                 # multiprocessors: sizes rows per warp
    flash: bool = False                             # prefill attention on the tensor cores
    prefetch: bool = False                          # decode matvecs: the _pf kernels
    fuse_rope: bool = False                         # decode: rope + KV write inside attention
    persistent: bool = False                        # decode: one persistent kernel per token
    p_grid: int = 0                                 # its blocks (all resident at once)
    pf_cap: int = 0                                 # L2 prefetch bytes a block asks for per stage
    p_flags: int = 0                                # the kernel's PF_* flags (barrier, prefetch kind)
    int8: bool = False                              # decode matvecs: x as int8, dp4a (I8_KINDS)
    mats: dict = field(default_factory=dict)        # role -> Mat, e.g. "3.q", "output"
    vecs: dict = field(default_factory=dict)        # role -> tensor name or None

    @property
    def q_dim(self): return self.c.n_head * self.c.head_dim

    @property
    def kv_dim(self): return self.c.n_head_kv * self.c.head_dim

    @property
    def qkv_dim(self): return self.q_dim + 2 * self.kv_dim

    @property
    def nwarps(self): return cuda_source.BLOCK_WARPS[self.warp]

    @property
    def block(self): return self.warp * self.nwarps

    @property
    def chunk(self):
        """Keys per decode attention split: at least MIN_CHUNK, at most MAX_SPLITS splits."""
        return max(MIN_CHUNK, -(-self.n_ctx // MAX_SPLITS))

    @property
    def n_split(self): return -(-self.n_ctx // self.chunk)

    def buffers(self) -> dict[str, int]:
        """Device scratch buffers, name -> bytes (weights and KV cache excluded)."""
        c, B = self.c, self.max_batch
        wide = max(c.n_embd, self.q_dim, 2 * c.n_ff)
        part = c.n_head * self.n_split * (c.head_dim + 2)      # decode's attention splits
        return {"x": 4 * B * c.n_embd, "xn": 4 * B * c.n_embd, "qkv": 4 * B * self.qkv_dim,
                "att": 4 * B * self.q_dim, "ffn": 4 * B * 2 * c.n_ff, "xh": 2 * B * wide,
                "part": 4 * part, "wscr": self.wscr_bytes(), "logits": 4 * B * c.n_vocab,
                "io": 4 * (1 + B), "cs": 4 * self.n_ctx * c.rope_dim,
                "ptab": P_STAGE_BYTES * self.n_stages, "bar": 256, "trace": 8 * (self.n_stages + 1)}

    @property
    def n_stages(self):
        """Stages of the persistent decode: embed, 5 a layer, output."""
        return 2 + 5 * self.c.n_layer

    def wscr_bytes(self) -> int:
        """The GEMM weight scratch: W_SCRATCH_BYTES, or less when the largest matrix fits."""
        full = max(m.rows * m.cols * (2 if m.kind in QUANT_KINDS else 4) for m in self.mats.values())
        return min(W_SCRATCH_BYTES, full)

    def kv_bytes(self) -> int:
        return self.c.kv_cache_bytes(self.n_ctx, bytes_per_value=2)


# ModelConfig features (features.FEATURES) the GPU decoder computes; the rest are refused at load.
# The rope tables come from rope.rope_cos_sin, so every rope scaling is computed.
IMPLEMENTED = frozenset({"yarn", "longrope"})


def _check_supported(c: ModelConfig) -> None:
    require_features(c, NAME, IMPLEMENTED)
    if c.head_dim > cuda_source.HD_MAX:
        raise UnsupportedModel(f"head_dim {c.head_dim} is above the GPU kernels' {cuda_source.HD_MAX}")
    if c.rope_dim > c.head_dim or c.rope_dim % 2:
        raise UnsupportedModel(f"rope dimension {c.rope_dim} does not fit head_dim {c.head_dim}")


def _mat(c: ModelConfig, name: str, rows: int | None = None, row0: int = 0) -> Mat:
    if name not in c.tensors:
        raise UnsupportedModel(f"tensor {name!r} is missing")
    t = c.tensors[name]
    if len(t.shape) != 2:
        raise UnsupportedModel(f"tensor {name!r} has shape {t.shape}, expected a matrix")
    return Mat(name, kind_of(t.type), rows if rows is not None else t.shape[0], t.shape[1], row0)


def _opt(c: ModelConfig, name: str) -> str | None:
    return name if name in c.tensors else None


def layout(c: ModelConfig, n_ctx: int, max_batch: int = DEFAULT_MAX_BATCH, warp: int = 32,
           n_sm: int = 132, flash: bool = False, prefetch: bool = False, fuse_rope: bool = False,
           p_grid: int = 0, pf_cap: int = 0) -> Layout:
    """Every matrix and vector the steps use, by role. flash: the tensor-core prefill
    attention where the head width allows it; prefetch: the _pf decode matvecs; fuse_rope:
    decode's rope and KV write done by the attention kernel; p_grid > 0: decode as one
    persistent kernel of that many blocks, where the model allows it (persistent_refusal)."""
    _check_supported(c)
    flash = flash and c.head_dim % 16 == 0 and c.head_dim <= FA_HD_MAX
    lay = Layout(c, n_ctx, max(1, min(max_batch, n_ctx)), warp, n_sm, flash, prefetch, fuse_rope,
                 False, p_grid, pf_cap)
    m, v, F = lay.mats, lay.vecs, c.n_ff
    m["token_embd"] = _mat(c, "token_embd.weight")
    m["output"] = _mat(c, "token_embd.weight" if c.tied_embeddings else "output.weight")
    v["output_norm"] = "output_norm.weight"
    for i in range(c.n_layer):
        p = f"blk.{i}."
        if c.fused_qkv:
            m[f"{i}.qkv"] = _mat(c, p + "attn_qkv.weight")
        else:
            for r in "qkv":
                m[f"{i}.{r}"] = _mat(c, p + f"attn_{r}.weight")
        m[f"{i}.o"] = _mat(c, p + "attn_output.weight")
        if c.fused_gate_up:   # phi3: ffn_up holds gate (rows 0..F) | up (rows F..2F)
            m[f"{i}.gate"] = _mat(c, p + "ffn_up.weight", F, 0)
            m[f"{i}.up"] = _mat(c, p + "ffn_up.weight", F, F)
        else:
            m[f"{i}.gate"], m[f"{i}.up"] = _mat(c, p + "ffn_gate.weight"), _mat(c, p + "ffn_up.weight")
        m[f"{i}.down"] = _mat(c, p + "ffn_down.weight")
        v[f"{i}.attn_norm"], v[f"{i}.ffn_norm"] = p + "attn_norm.weight", p + "ffn_norm.weight"
        v[f"{i}.bias"] = p + "bqkv" if _opt(c, p + "attn_q.bias") else None
        v[f"{i}.q_norm"] = _opt(c, p + "attn_q_norm.weight") if c.qk_norm == "head" else None
        v[f"{i}.k_norm"] = _opt(c, p + "attn_k_norm.weight") if c.qk_norm == "head" else None
    lay.persistent = p_grid > 0 and persistent_refusal(lay) is None
    return lay


def persistent_refusal(lay: Layout) -> str | None:
    """Why decode cannot run as the persistent kernel for this model (None: it can): its
    matvec stages multiply the quantized kinds only."""
    plain = sorted({m.kind for r, m in lay.mats.items() if r != "token_embd" and m.kind not in QUANT_KINDS})
    if plain:
        return f"{', '.join(plain)} matrices (the persistent decode multiplies quantized kinds only)"
    return None


# ---------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------

def device_plan(c: ModelConfig, n_ctx: int, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, int]:
    """Device bytes by part: weights (device layout), kv_cache, scratch."""
    lay = layout(c, n_ctx, max_batch)
    weights = sum(device_bytes(t) for t in c.tensors.values())
    return {"weights": weights, "kv_cache": lay.kv_bytes(), "scratch": sum(lay.buffers().values())}


def plan(c: ModelConfig, n_ctx: int, options: dict) -> MemoryPlan:
    """Everything lives on the device; the host keeps the runtime and two pinned buffers."""
    batch = max(1, min(int(options.get("max_batch", DEFAULT_MAX_BATCH)), n_ctx))
    dev = device_plan(c, n_ctx, batch)
    converted = sorted({t.type for t in c.tensors.values()
                        if len(t.shape) == 2 and t.type not in NATIVE})
    notes = [f"device: weights {dev['weights']} + KV cache {dev['kv_cache']} (f16) + scratch "
             f"{dev['scratch']} bytes (prefill chunks of {batch} tokens)",
             "the mapped file is read once at load to upload the weights"]
    if converted:
        notes.append(f"{', '.join(converted)} matrices are dequantized to f16 at load")
    return MemoryPlan(weights=0, kv_cache=0, scratch=4 * (1 + batch) + 4 * c.n_vocab,
                      runtime=RUNTIME_BYTES, device=sum(dev.values()), notes=notes)


# ---------------------------------------------------------------------------
# Steps: what a forward pass launches (pure data, no GPU needed)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Buf:
    """A device address: a named buffer (or weight tensor) plus a byte offset."""
    name: str
    offset: int = 0

    def at(self, nbytes: int) -> "Buf":
        return Buf(self.name, self.offset + nbytes)


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple          # Buf | None (pointers), int (C int), float (C float), np.int64
    smem: int = 0        # dynamic shared memory bytes
    coop: bool = False   # cooperative launch: every block resident at once (grid barriers)


@dataclass(frozen=True)
class Copy:
    dst: Buf
    src: Buf
    nbytes: int
    kind: str            # "h2d" | "d2h"; host buffers are the pinned "io_h" and "logits_h"


@dataclass(frozen=True)
class Gemm:
    """C (n, ldc; f32) (+)= A (m rows of k; a_type) . B (n rows of k; b_type), row-major."""
    m: int
    n: int
    k: int
    a: Buf
    b: Buf
    ldb: int
    c: Buf
    ldc: int
    half: bool           # f16 operands (quantized weights) or f32
    beta: float


def _grid(n: int, per: int) -> int:
    return max(1, -(-n // per))


def _rows_per_warp(lay: Layout, rows: int, kind: str) -> int:
    """1 to 4 rows per warp: fewer blocks each staging x, while >= 2 blocks per SM remain.
    The _pf kernels (PF_BLOCKS resident a SM) get enough rows a warp for one wave."""
    if _prefetching(lay, kind):
        return max(1, min(4, -(-rows // (lay.nwarps * PF_BLOCKS * lay.n_sm))))
    return max(1, min(4, rows // (lay.nwarps * 2 * lay.n_sm)))


def _prefetching(lay: Layout, kind: str) -> bool:
    return lay.prefetch and kind in QUANT_KINDS or _int8(lay, kind)


def _int8(lay: Layout, kind: str) -> bool:
    return lay.int8 and kind in I8_KINDS


def _mv_kernel(lay: Layout, stem: str, kind: str) -> str:
    """matvec_<kind> / matvec_swiglu_<kind>, their _pf variants, or the int8 ones (_i8_,
    which prefetch as _pf does)."""
    if _int8(lay, kind):
        return f"{stem}_i8_{kind}"
    return f"{stem}_pf_{kind}" if _prefetching(lay, kind) else f"{stem}_{kind}"


def _mv_smem(lay: Layout, kind: str, cols: int, merge: bool = False) -> int:
    """A matvec's dynamic shared memory: the staged x (padded for the quantized kinds) with
    the split merge's weights past it, then for the int8 kernels x's int8 copy at the
    kernels' xq_offset."""
    merge_floats = _merge_bytes(lay) // 4 if merge else 0
    if merge:
        xs = 4 * (_xpad(cols) + merge_floats)
    else:
        xs = _xs_bytes(kind, cols)
    if not _int8(lay, kind):
        return xs
    return 4 * _xq_offset(cols, merge_floats) + cols // 32 * XQ_BYTES


def _xq_offset(cols: int, merge_floats: int) -> int:
    """The kernels' xq_offset: floats before the int8 copy, 16-byte aligned."""
    return (_xpad(cols) + merge_floats + 3) & ~3


def fa_smem_bytes(hd: int) -> int:
    """Dynamic shared memory of attention_flash: Q, K, V tiles (half, rows hd + 8 wide) and
    per warp S (16 x FA_K + 4, f32), P (16 x FA_K + 8, half), O (16 x hd + 4, f32)."""
    return 2 * (FA_Q + 2 * FA_K) * (hd + 8) + FA_WARPS * 16 * (4 * (FA_K + 4) + 2 * (FA_K + 8) + 4 * (hd + 4))


def _xs_bytes(kind: str, cols: int) -> int:
    """The block's shared copy of x: padded by 4 floats per 32 for the quantized kinds."""
    return 4 * (cols + cols // 32 * 4) if kind in QUANT_KINDS else 4 * cols


def _matvec(lay: Layout, group: list[Mat], x: Buf, ldx: int, y: Buf, ldy: int, T: int, acc: bool,
            norm: str | None, merge: bool = False):
    ws = [(g.w(), g.d(), g.rows) for g in group] + [(None, None, 0)] * (3 - len(group))
    rows, k = sum(g.rows for g in group), group[0]
    rpw = _rows_per_warp(lay, rows, k.kind)
    part = (Buf("part"), lay.n_split, lay.c.head_dim) if merge else (None, 0, 1)
    args = tuple(a for w in ws for a in w) + (x, y, k.cols, ldx, ldy, int(acc), _vec(norm),
                                              float(lay.c.rms_eps), rpw) + part
    smem = _mv_smem(lay, k.kind, k.cols, merge)
    return Launch(_mv_kernel(lay, "matvec", k.kind), (_grid(rows, lay.nwarps * rpw), T, 1), (lay.block, 1, 1),
                  args, smem)


def _xpad(cols: int) -> int:
    """The kernels' xpad(cols): floats of a padded shared copy of cols columns."""
    return cols + cols // 32 * 4


def _merge_bytes(lay: Layout) -> int:
    """Shared scratch of a split merge (stage_x with part): a weight per head and split."""
    return 4 * lay.c.n_head * lay.n_split


def _vec(name: str | None) -> Buf | None:
    return Buf(name) if name else None


def _runs(mats: list[Mat]) -> list[list[Mat]]:
    """Consecutive matrices of one kind (their outputs are adjacent), at most 3 per launch."""
    out: list[list[Mat]] = []
    for m in mats:
        if out and out[-1][0].kind == m.kind and len(out[-1]) < 3:
            out[-1].append(m)
        else:
            out.append([m])
    return out


def _gemm_rows(lay: Layout, m: Mat) -> int:
    """Rows of m dequantized per GEMM chunk (the scratch bounds it)."""
    per = m.cols * (2 if m.kind in QUANT_KINDS else 4)
    return max(1, min(m.rows, W_SCRATCH_BYTES // per))


def _unit(kind: str) -> int:
    """Weights a thread of the dequantize kernel decodes (the kind's unit)."""
    return {"q4_0": 32, "q8_0": 32, "q4_k": 64, "q6_k": 64}.get(kind, 1)


def _dequant(lay: Layout, m: Mat, r0: int, n: int, out_half: Buf | None, out_f32: Buf | None,
             rows: Buf | None = None) -> Launch:
    """dequant_<kind>: n rows of m from r0 (or the rows listed in `rows`) into f16 or f32."""
    units = n * (m.cols // _unit(m.kind))
    return Launch(f"dequant_{m.kind}", (_grid(units, lay.block), 1, 1), (lay.block, 1, 1),
                  (m.w(), m.d(), rows, r0, n, m.cols, out_half, out_f32))


def _gemm(lay: Layout, m: Mat, xb: Buf, ldx: int, y: Buf, ldy: int, T: int, acc: bool) -> list:
    """Dequantize m in row chunks into the scratch, multiply each chunk with cuBLAS."""
    half = m.kind in QUANT_KINDS
    steps, step_rows = [], _gemm_rows(lay, m)
    for r0 in range(0, m.rows, step_rows):
        n = min(step_rows, m.rows - r0)
        if m.kind == "f32":     # float32 rows are the operand already
            a = Buf(m.tensor, (m.row0 + r0) * m.cols * 4)
        else:
            a = Buf("wscr")
            steps.append(_dequant(lay, m, r0, n, a if half else None, None if half else a))
        steps.append(Gemm(n, T, m.cols, a, xb, ldx, y.at(4 * r0), ldy, half, 1.0 if acc else 0.0))
    return steps


def project(lay: Layout, mats: list[Mat], x: Buf, ldx: int, y: Buf, ldy: int, T: int, acc: bool = False,
            norm: str | None = None):
    """y[:, cols of each matrix in turn] (+)= rmsnorm(x) @ W^T for the matrices sharing input x
    (norm: the RMSNorm weight, or None for x as it is)."""
    steps, col = [], 0
    if T <= MATVEC_MAX_T:     # the matvec kernels normalize x while staging it
        for run in _runs(mats):
            steps.append(_matvec(lay, run, x, ldx, y.at(4 * col), ldy, T, acc, norm))
            col += sum(m.rows for m in run)
        return steps
    if norm:
        steps.append(Launch("rmsnorm", (T, 1, 1), (lay.block, 1, 1),
                            (x, Buf(norm), Buf("xn").at(x.offset), lay.c.n_embd, ldx,
                             float(lay.c.rms_eps))))
        x = Buf("xn").at(x.offset)
    if any(m.kind in QUANT_KINDS for m in mats):
        steps.append(Launch("to_half", (_grid(T * ldx, lay.block), 1, 1), (lay.block, 1, 1),
                            (x, Buf("xh"), np.int64(T * ldx))))
    for group in _stacked(lay, mats):
        xb = Buf("xh") if group[0].kind in QUANT_KINDS else x
        if len(group) == 1:
            steps += _gemm(lay, group[0], xb, ldx, y.at(4 * col), ldy, T, acc)
        else:
            steps += _gemm_stacked(lay, group, xb, ldx, y.at(4 * col), ldy, T, acc)
        col += sum(m.rows for m in group)
    return steps


def _stacked(lay: Layout, mats: list[Mat]) -> list[list[Mat]]:
    """Consecutive quantized matrices (outputs adjacent) whose f16 copies fit the scratch
    together, so they share one GEMM: q|k|v is one 2560-row product, not three with two of
    256 rows (small GEMMs leave most of the GPU idle)."""
    out: list[list[Mat]] = []
    for m in mats:
        cur = out[-1] if out else None
        if cur and m.kind in QUANT_KINDS and cur[0].kind in QUANT_KINDS and m.cols == cur[0].cols \
                and 2 * m.cols * (sum(g.rows for g in cur) + m.rows) <= lay.wscr_bytes():
            cur.append(m)
        else:
            out.append([m])
    return out


def _gemm_stacked(lay: Layout, group: list[Mat], xb: Buf, ldx: int, y: Buf, ldy: int, T: int,
                  acc: bool) -> list:
    """Dequantize each matrix of the group below the last in the scratch, then one GEMM."""
    steps, r, cols = [], 0, group[0].cols
    for m in group:
        steps.append(_dequant(lay, m, 0, m.rows, Buf("wscr", 2 * r * cols), None))
        r += m.rows
    return steps + [Gemm(r, T, cols, Buf("wscr"), xb, ldx, y, ldy, True, 1.0 if acc else 0.0)]


def _attention_block(lay: Layout, i: int, T: int) -> list:
    c, v = lay.c, lay.vecs
    qkv_mats = [lay.mats[f"{i}.qkv"]] if c.fused_qkv else [lay.mats[f"{i}.{r}"] for r in "qkv"]
    kv_off = 2 * i * lay.n_ctx * lay.kv_dim
    scale = float(1.0 / math.sqrt(c.head_dim))
    vec = lambda role: Buf(v[role]) if v[role] else None  # noqa: E731
    steps = project(lay, qkv_mats, Buf("x"), c.n_embd, Buf("qkv"), lay.qkv_dim, T, norm=v[f"{i}.attn_norm"])
    if T == 1 and lay.fuse_rope:   # decode: rope, KV write and the split attention in one launch
        steps.append(Launch("attention_rope", (c.n_head, 1, lay.n_split), (lay.block, 1, 1),
                            (Buf("qkv"), vec(f"{i}.bias"), vec(f"{i}.q_norm"), vec(f"{i}.k_norm"), Buf("cs"),
                             Buf("kc", kv_off), Buf("vc", kv_off), Buf("io"), Buf("part"), c.n_head, c.n_head_kv,
                             c.head_dim, c.rope_dim, int(c.rope_style == "neox"), float(c.rms_eps), lay.chunk,
                             scale)))
        steps.append(_matvec(lay, [lay.mats[f"{i}.o"]], Buf("att"), lay.q_dim, Buf("x"), c.n_embd, 1,
                             True, None, merge=True))
        return steps
    steps.append(Launch("rope_kv", (_grid(c.n_head + 2 * c.n_head_kv, lay.nwarps), T, 1), (lay.block, 1, 1),
                        (Buf("qkv"), lay.qkv_dim, vec(f"{i}.bias"), vec(f"{i}.q_norm"), vec(f"{i}.k_norm"),
                         Buf("cs"), Buf("io"), Buf("kc", kv_off), Buf("vc", kv_off),
                         c.n_head, c.n_head_kv, c.head_dim, c.rope_dim, int(c.rope_style == "neox"),
                         float(c.rms_eps))))
    if T == 1:   # decode: split the keys over blocks, then merge the splits
        steps.append(Launch("attention", (c.n_head, 1, lay.n_split), (lay.block, 1, 1),
                            (Buf("qkv"), lay.qkv_dim, Buf("kc", kv_off), Buf("vc", kv_off), Buf("io"),
                             Buf("part"), c.n_head, c.n_head_kv, c.head_dim, lay.chunk, scale)))
        # the o projection merges the splits while staging its input: no attn_reduce launch
        steps.append(_matvec(lay, [lay.mats[f"{i}.o"]], Buf("att"), lay.q_dim, Buf("x"), c.n_embd, 1,
                             True, None, merge=True))
        return steps
    args = (Buf("qkv"), lay.qkv_dim, Buf("kc", kv_off), Buf("vc", kv_off), Buf("io"),
            Buf("att"), lay.q_dim, T, c.n_head, c.n_head_kv, c.head_dim, scale)
    if lay.flash:   # prefill on the tensor cores: 64 queries a block, K/V tiles in shared memory
        steps.append(Launch("attention_flash", (c.n_head, _grid(T, FA_Q), 1), (FA_WARPS * lay.warp, 1, 1),
                            args, fa_smem_bytes(c.head_dim)))
    else:        # prefill: a warp per query row, keys a tile at a time
        steps.append(Launch("attention_rows", (c.n_head, _grid(T, lay.nwarps), 1), (lay.block, 1, 1), args))
    steps += project(lay, [lay.mats[f"{i}.o"]], Buf("att"), lay.q_dim, Buf("x"), c.n_embd, T, acc=True)
    return steps


def _ffn_block(lay: Layout, i: int, T: int) -> list:
    c, F = lay.c, lay.c.n_ff
    g, u = lay.mats[f"{i}.gate"], lay.mats[f"{i}.up"]
    norm = lay.vecs[f"{i}.ffn_norm"]
    if T <= MATVEC_MAX_T and g.kind == u.kind:   # norm, gate, up and SwiGLU in one pass
        rpw = _rows_per_warp(lay, F, g.kind)
        steps = [Launch(_mv_kernel(lay, "matvec_swiglu", g.kind), (_grid(F, lay.nwarps * rpw), T, 1), (lay.block, 1, 1),
                        (g.w(), g.d(), u.w(), u.d(), F, Buf("x"), Buf("ffn"), c.n_embd, c.n_embd, 2 * F,
                         Buf(norm), float(c.rms_eps), rpw), _mv_smem(lay, g.kind, g.cols))]
    else:
        steps = project(lay, [g, u], Buf("x"), c.n_embd, Buf("ffn"), 2 * F, T, norm=norm)
        steps.append(Launch("swiglu", (_grid(F, 256), T, 1), (256, 1, 1), (Buf("ffn"), Buf("ffn"), F, 2 * F, 2 * F)))
    steps += project(lay, [lay.mats[f"{i}.down"]], Buf("ffn"), 2 * F, Buf("x"), c.n_embd, T, acc=True)
    return steps


def _embed(lay: Layout, T: int) -> Launch:
    return _dequant(lay, lay.mats["token_embd"], 0, T, None, Buf("x"), rows=Buf("io", 4))


def _logits(lay: Layout, T: int, all_logits: bool) -> list:
    E, V, norm = lay.c.n_embd, lay.c.n_vocab, lay.vecs["output_norm"]
    if all_logits:
        return project(lay, [lay.mats["output"]], Buf("x"), E, Buf("logits"), V, T, norm=norm)
    return project(lay, [lay.mats["output"]], Buf("x", 4 * (T - 1) * E), E, Buf("logits"), V, 1, norm=norm)


def forward_steps(lay: Layout, T: int, all_logits: bool = False) -> list:
    """The whole pass for T tokens at positions io[0].. (tokens in io[1..])."""
    if not 1 <= T <= lay.max_batch:
        raise ValueError(f"T={T} must be in [1, {lay.max_batch}]")
    steps = [_embed(lay, T)]
    for i in range(lay.c.n_layer):
        steps += _attention_block(lay, i, T) + _ffn_block(lay, i, T)
    return steps + _logits(lay, T, all_logits)


def decode_steps(lay: Layout) -> list:
    """One token, graph-capturable: (pos, token) in from pinned memory, logits out to it; in
    between, the persistent kernel or forward_steps' ~5 launches a layer."""
    body = [persistent_launch(lay)] if lay.persistent else forward_steps(lay, 1)
    return ([Copy(Buf("io"), Buf("io_h"), 8, "h2d")] + body
            + [Copy(Buf("logits_h"), Buf("logits"), 4 * lay.c.n_vocab, "d2h")])


# ---------------------------------------------------------------------------
# Persistent decode: the stage table (pure data, no GPU needed)
# ---------------------------------------------------------------------------

P_EMBED, P_MATVEC, P_SWIGLU, P_ATTN = range(4)          # the kernel's P_* stage ops
PKIND = {"q4_0": 0, "q8_0": 1, "q4_k": 2, "q6_k": 3, "f16": 4, "f32": 5}   # its PK_* kinds
P_STAGE_BYTES = 160                                     # sizeof(PStage)


@dataclass(frozen=True)
class PStage:
    """One stage of decode_persistent (the kernel's struct PStage, with Bufs for addresses)."""
    op: int
    rows: int = 0
    K: int = 0
    mats: tuple = ()                 # Mat, up to 3
    x: Buf | None = None
    y: Buf | None = None
    nw: Buf | None = None
    accumulate: bool = False
    merge: bool = False
    bias: Buf | None = None
    q_norm: Buf | None = None
    k_norm: Buf | None = None
    kc: Buf | None = None
    vc: Buf | None = None


def persistent_stages(lay: Layout) -> list[PStage]:
    """decode_steps' forward pass as the persistent kernel's stages, in the same order and with
    the same buffers as forward_steps(lay, 1) with fuse_rope."""
    c, v, E, F = lay.c, lay.vecs, lay.c.n_embd, lay.c.n_ff
    vec = lambda role: Buf(v[role]) if v[role] else None  # noqa: E731
    st = [PStage(P_EMBED, 1, E, (lay.mats["token_embd"],), y=Buf("x"))]
    for i in range(c.n_layer):
        qkv = (lay.mats[f"{i}.qkv"],) if c.fused_qkv else tuple(lay.mats[f"{i}.{r}"] for r in "qkv")
        kv_off = 2 * i * lay.n_ctx * lay.kv_dim
        st += [PStage(P_MATVEC, lay.qkv_dim, E, qkv, Buf("x"), Buf("qkv"), vec(f"{i}.attn_norm")),
               PStage(P_ATTN, x=Buf("qkv"), bias=vec(f"{i}.bias"), q_norm=vec(f"{i}.q_norm"),
                      k_norm=vec(f"{i}.k_norm"), kc=Buf("kc", kv_off), vc=Buf("vc", kv_off)),
               PStage(P_MATVEC, E, lay.q_dim, (lay.mats[f"{i}.o"],), Buf("att"), Buf("x"), accumulate=True,
                      merge=True),
               PStage(P_SWIGLU, F, E, (lay.mats[f"{i}.gate"], lay.mats[f"{i}.up"]), Buf("x"), Buf("ffn"),
                      vec(f"{i}.ffn_norm")),
               PStage(P_MATVEC, E, F, (lay.mats[f"{i}.down"],), Buf("ffn"), Buf("x"), accumulate=True)]
    st.append(PStage(P_MATVEC, c.n_vocab, E, (lay.mats["output"],), Buf("x"), Buf("logits"), vec("output_norm")))
    assert len(st) == lay.n_stages
    return st


P_TABLE_SMEM = 48 << 10   # the stage table is copied to shared memory when it fits this


def persistent_smem(lay: Layout) -> tuple[int, int, int]:
    """decode_persistent's dynamic shared memory, as (bytes, xs floats, table offset in floats
    or 0): the padded x copy of its widest input with the split merge's weights past it (the
    o stage's) and x's int8 copy past those (used with PF_I8; reserved always, as the flags
    come later), then the stage table when it fits P_TABLE_SMEM (read once per token instead
    of once per stage from global memory)."""
    st = persistent_stages(lay)
    xs = max(_xq_offset(s.K, _merge_bytes(lay) // 4 if s.merge else 0) + s.K // 32 * XQ_BYTES // 4
             for s in st if s.op in (P_MATVEC, P_SWIGLU))
    xs += xs % 2                                  # the table after it 8-byte aligned
    table = P_STAGE_BYTES * len(st)
    if table > P_TABLE_SMEM:
        return 4 * xs, xs, 0
    return 4 * xs + table, xs, xs


def persistent_launch(lay: Layout, trace: bool = False) -> Launch:
    """The cooperative launch of decode_persistent over the stage table in "ptab" (trace: block
    0's clock at each stage start into "trace", for the profile)."""
    c = lay.c
    smem, _, tab = persistent_smem(lay)
    return Launch("decode_persistent", (lay.p_grid, 1, 1), (lay.block, 1, 1),
                  (Buf("ptab"), lay.n_stages, tab, Buf("bar"), Buf("io"), Buf("part"), Buf("cs"), c.n_head,
                   c.n_head_kv, c.head_dim, c.rope_dim, int(c.rope_style == "neox"), float(c.rms_eps),
                   lay.chunk, lay.n_split, float(1.0 / math.sqrt(c.head_dim)), np.int64(lay.pf_cap),
                   lay.p_flags, Buf("trace") if trace else None),
                  smem, coop=True)


# ---------------------------------------------------------------------------
# Uploading weights
# ---------------------------------------------------------------------------

def _host_layout(t) -> list[np.ndarray]:
    """A GGUF tensor as the byte arrays the kernels read: [data] or [quants, scales]."""
    raw = np.frombuffer(t.data, dtype=np.uint8)
    if len(t.shape) == 1:
        return [np.ascontiguousarray(t.numpy(), dtype=np.float32)]
    k = kind_of(t.type)
    if k in ("q4_0", "q8_0"):
        blk = raw.reshape(-1, 18 if k == "q4_0" else 34)
        return [np.ascontiguousarray(blk[:, 2:]), np.ascontiguousarray(blk[:, :2])]
    if k == "q4_k":
        return [raw]
    if k == "q6_k":   # pad 210-byte super-blocks to 224 so each starts 16-byte aligned
        padded = np.zeros((raw.size // 210, 224), dtype=np.uint8)
        padded[:, :210] = raw.reshape(-1, 210)
        return [padded]
    if t.type == "F16":
        return [raw]
    if t.type == "F32":
        return [raw]
    dtype = np.float32 if k == "f32" else np.float16   # BF16 -> f32 exactly; the rest -> f16
    return [np.ascontiguousarray(t.numpy(), dtype=dtype)]


def host_tensors(gguf, c: ModelConfig, lay: Layout) -> dict[str, np.ndarray]:
    """What the runner uploads, by buffer name: every tensor once in the kernels' layout (a
    quantized one's scales as "<name>#d"), q|k|v biases fused per layer, the rope table "cs"."""
    out = {}
    for name, t in gguf.tensors.items():
        if name.endswith(".bias") and "attn_" in name or name == "rope_freqs.weight":
            continue
        arrays = _host_layout(t)
        out[name] = arrays[0]
        if len(arrays) > 1:
            out[name + "#d"] = arrays[1]
    for i in range(c.n_layer):
        if lay.vecs[f"{i}.bias"]:
            out[f"blk.{i}.bqkv"] = _fused_bias(gguf, f"blk.{i}.", c)
    cos, sin = rope_cos_sin(c, lay.n_ctx, rope_factors(c, gguf, lay.n_ctx))
    out["cs"] = np.stack([cos, sin], axis=-1).astype(np.float32)     # (n_ctx, rope_dim/2, 2)
    return out


def launch_value(a, addr):
    """A Launch argument as the kernel takes it: a Buf (or None) as its address (addr: Buf ->
    int), a Python int or bool as int32, a float as float32, a numpy scalar as it is."""
    if a is None or isinstance(a, Buf):
        return np.uint64(addr(a))
    if isinstance(a, np.generic):
        return a
    if isinstance(a, (bool, int)):
        return np.int32(a)
    return np.float32(a)


def _fused_bias(gguf, prefix: str, c: ModelConfig) -> np.ndarray:
    """q|k|v biases as one float32 vector (a missing one is zeros)."""
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    parts = []
    for r, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
        t = gguf.tensors.get(f"{prefix}attn_{r}.bias")
        parts.append(np.zeros(n, np.float32) if t is None else np.asarray(t.numpy(), np.float32).reshape(n))
    return np.concatenate(parts)


def compile_kernels(cp, platform: str, warp: int, flash: bool = True):
    """(module, {name: kernel}, variant): with the wmma kernels when asked and they compile
    (NVRTC finds <mma.h> in the toolkit's include folder), else without them."""
    for wmma in ((True, False) if flash and platform == "cuda" else (False,)):
        v = cuda_source.variant(platform, warp, wmma)
        try:
            module = cp.RawModule(code=cuda_source.source(v),
                                  options=cuda_source.compile_options(v, _cuda_include(cp)))
            return module, {k: module.get_function(k) for k in cuda_source.kernel_names(v)}, v
        except Exception:  # noqa: BLE001 - a missing <mma.h>: retry without the wmma kernels
            if not wmma:
                raise
    raise BackendError("the GPU kernels did not compile")   # unreachable: the last try raises


class _LaunchAttr(ctypes.Structure):
    """CUlaunchAttribute: an id, 4 bytes of padding, a 64-byte value union."""
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("value", ctypes.c_int32 * 16)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h)."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("n_attrs", ctypes.c_uint)]


class _PMat(ctypes.Structure):
    """struct PMat of ember_cuda.cu."""
    _fields_ = [("w", ctypes.c_uint64), ("d", ctypes.c_uint64), ("kind", ctypes.c_int32), ("rows", ctypes.c_int32)]


class _PStage(ctypes.Structure):
    """struct PStage of ember_cuda.cu (tests/plugins/test_cuda.py checks it against offsetof)."""
    _fields_ = [("op", ctypes.c_int32), ("n_mat", ctypes.c_int32), ("rows", ctypes.c_int32), ("K", ctypes.c_int32),
                ("x", ctypes.c_uint64), ("y", ctypes.c_uint64), ("nw", ctypes.c_uint64),
                ("accumulate", ctypes.c_int32), ("merge", ctypes.c_int32), ("mat", _PMat * 3),
                ("bias", ctypes.c_uint64), ("q_norm", ctypes.c_uint64), ("k_norm", ctypes.c_uint64),
                ("kc", ctypes.c_uint64), ("vc", ctypes.c_uint64)]


def stage_table(stages: list[PStage], addr) -> bytes:
    """The stages as the kernel's PStage array; addr: Buf | None -> device address."""
    table = (_PStage * len(stages))()
    for t, s in zip(table, stages):
        t.op, t.n_mat, t.rows, t.K = s.op, len(s.mats), s.rows, s.K
        t.accumulate, t.merge = int(s.accumulate), int(s.merge)
        for name in ("x", "y", "nw", "bias", "q_norm", "k_norm", "kc", "vc"):
            setattr(t, name, addr(getattr(s, name)))
        for j, m in enumerate(s.mats):
            t.mat[j] = _PMat(addr(m.w()), addr(m.d()), PKIND[m.kind], m.rows)
    return bytes(table)


PROGRAMMATIC_STREAM_SERIALIZATION = 6     # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
COOPERATIVE = 2                           # CU_LAUNCH_ATTRIBUTE_COOPERATIVE


class ExLauncher:
    """Kernel launches with one launch attribute through the driver's cuLaunchKernelEx (CuPy's
    launch has none): programmatic dependent launch for the decode graph's kernels, or a
    cooperative launch (all blocks resident, or the launch fails) for the persistent decode.
    Each prepared launch owns its C argument values, so replaying it costs one C call."""

    def __init__(self, attr_id: int = PROGRAMMATIC_STREAM_SERIALIZATION):
        self.fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.attr = _LaunchAttr(attr_id, 0)
        self.attr.value[0] = 1

    def prepare(self, fptr: int, grid, block, smem: int, stream: int, args: tuple):
        vals = [_c_value(a) for a in args]
        params = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.addressof(v) for v in vals])
        cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem, stream,
                            ctypes.pointer(self.attr), 1)
        fn = self.fn

        def launch():
            rc = fn(ctypes.byref(cfg), fptr, params, None)
            if rc:
                raise BackendError(f"cuLaunchKernelEx failed (CUresult {rc})")
        launch.keep = (vals, params, cfg)     # the C values must outlive every replay
        return launch


def _c_value(a):
    """A prepared kernel argument (numpy scalar from CudaRunner._arg) as its C value."""
    if isinstance(a, np.uint64):
        return ctypes.c_uint64(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    return ctypes.c_float(float(a))


def _cuda_include(cp) -> str | None:
    """A CUDA include folder with <mma.h> and the crt/mma.h it includes (CuPy's own CUDA path
    can be a pip wheel's partial copy, which lacks crt/), or None where there is none."""
    import os
    try:
        roots = [cp.cuda.get_cuda_path()]
    except Exception:  # noqa: BLE001 - no toolkit known to CuPy
        roots = []
    roots += [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for root in filter(None, roots):
        inc = os.path.join(root, "include")
        if all(os.path.isfile(os.path.join(inc, *f)) for f in (("mma.h",), ("crt", "mma.h"))):
            return inc
    return None


def _resident_blocks(fptr: int, block: int, smem: int) -> int:
    """Blocks of a kernel one multiprocessor holds at once (the driver's occupancy calculator)."""
    n = ctypes.c_int(0)
    fn = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveBlocksPerMultiprocessor
    fn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    rc = fn(ctypes.byref(n), fptr, block, smem)
    if rc:
        raise BackendError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed (CUresult {rc})")
    return n.value


class _DirectReplay:
    """Stands in for the decode graph where the cooperative launch cannot be captured: the
    plan's three steps (copy in, persistent kernel, copy out) enqueued directly."""

    def __init__(self, runner: "CudaRunner"):
        self.runner = runner

    def launch(self, stream) -> None:
        self.runner._run(self.runner._decode_plan)


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------

class CudaRunner(CacheBookkeeping):
    """ember.plugins.types.Runner on one GPU."""

    def __init__(self, gguf, config: ModelConfig, n_ctx: int, options: dict | None = None):
        options = options or {}
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        import cupy
        self.cp = cupy
        self.n_ctx, self.n_vocab, self.n_past = n_ctx, config.n_vocab, 0
        self.device = cupy.cuda.Device(int(options.get("device", 0)))
        with self.device:
            self._setup(gguf, config, n_ctx, int(options.get("max_batch", DEFAULT_MAX_BATCH)),
                        bool(options.get("flash", True)), bool(options.get("prefetch", True)),
                        bool(options.get("fuse_rope", True)), bool(options.get("persistent", False)),
                        int(options.get("p_per_sm", P_PER_SM)), bool(options.get("dp4a", False)))
            if self.lay.persistent:
                self.lay.p_flags = int(options.get("p_flags", P_FLAGS)) | (PF_I8 if self.lay.int8 else 0)
                if not bool(options.get("l2_prefetch", False)):
                    self.lay.pf_cap = 0
            self.pdl = None
            if bool(options.get("pdl", True)) and not self.cp.cuda.runtime.is_hip \
                    and int(self.device.compute_capability) >= 90:
                self.pdl = ExLauncher(PROGRAMMATIC_STREAM_SERIALIZATION)

    def _setup(self, gguf, config: ModelConfig, n_ctx: int, batch: int, flash: bool, prefetch: bool,
               fuse_rope: bool, persistent: bool = True, p_per_sm: int = 1, int8: bool = False) -> None:
        cp = self.cp
        rt = cp.cuda.runtime
        props = rt.getDeviceProperties(self.device.id)
        warp = int(props.get("warpSize", 32))
        need = sum(device_plan(config, n_ctx, batch).values())
        free = rt.memGetInfo()[0]
        if need > free:
            raise BackendError(f"the model needs {need / 2**30:.2f} GiB of GPU memory "
                               f"(weights, KV cache, scratch); {free / 2**30:.2f} GiB is free")
        v = self._compile("hip" if rt.is_hip else "cuda", warp, flash)
        n_sm = int(props.get("multiProcessorCount", 132))
        self.lay = layout(config, n_ctx, batch, warp, n_sm, flash and v.wmma, prefetch, fuse_rope)
        self.lay.int8 = int8
        self._coop, self.persistent_error = None, None
        if persistent and not rt.is_hip and persistent_refusal(self.lay) is None:
            self._plan_persistent(n_sm, int(props.get("l2CacheSize", 0)), p_per_sm)
        self._raise_smem_limits()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.bufs: dict[str, object] = {}
        self._upload(gguf, config)
        if props.get("integrated"):      # Jetson: device memory is the host's RAM; no second copy
            gguf.release_pages()
        self._alloc(config)
        if self.lay.persistent:
            table = stage_table(persistent_stages(self.lay), self._addr)
            self.bufs["ptab"][:] = cp.asarray(np.frombuffer(table, np.uint8))
        self.blas = cp.cuda.device.get_cublas_handle()
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)
        self.graph = None
        self._plans: dict[tuple[int, bool], list] = {}

    def _compile(self, platform: str, warp: int, flash: bool):
        self.module, self.kernels, v = compile_kernels(self.cp, platform, warp, flash)
        return v

    def _plan_persistent(self, n_sm: int, l2_bytes: int, p_per_sm: int) -> None:
        """Decode as the persistent kernel: as many blocks as the GPU holds at once (at most
        p_per_sm a multiprocessor), each prefetching up to half the L2 over the grid per stage."""
        smem = persistent_smem(self.lay)[0]
        fn = self.kernels["decode_persistent"]
        # static + dynamic shared memory above 48 KiB needs the opt-in, whatever the dynamic part
        fn.max_dynamic_shared_size_bytes = smem
        per_sm = min(max(1, p_per_sm), _resident_blocks(fn.kernel.ptr, self.lay.block, smem))
        if per_sm < 1:
            return
        self.lay.persistent, self.lay.p_grid = True, n_sm * per_sm
        self.lay.pf_cap = l2_bytes // 2 // self.lay.p_grid
        self._coop = ExLauncher(COOPERATIVE)

    def _raise_smem_limits(self) -> None:
        """Kernels launched with more than the default 48 KiB of dynamic shared memory (x copies
        of wide matrices, the flash attention tiles) get their limit raised once."""
        need: dict[str, int] = {}
        for s in forward_steps(self.lay, 1) + forward_steps(self.lay, self.lay.max_batch):
            if isinstance(s, Launch) and s.smem > 48 << 10:
                need[s.kernel] = max(need.get(s.kernel, 0), s.smem)
        for name, nbytes in need.items():
            self.kernels[name].max_dynamic_shared_size_bytes = nbytes

    def _put(self, name: str, host: np.ndarray) -> None:
        self.bufs[name] = self.cp.asarray(np.ascontiguousarray(host).reshape(-1).view(np.uint8))

    def _upload(self, gguf, c: ModelConfig) -> None:
        for name, host in host_tensors(gguf, c, self.lay).items():
            self._put(name, host)

    def _alloc(self, c: ModelConfig) -> None:
        cp = self.cp
        for name, nbytes in self.lay.buffers().items():
            if name != "cs":
                self.bufs[name] = cp.zeros(nbytes, dtype=cp.uint8)
        kv = self.lay.kv_bytes() // 2          # k and v halves, (n_layer, n_ctx, kv_dim) f16 each
        self.bufs["kc"] = cp.zeros(kv, dtype=cp.uint8)
        self.bufs["vc"] = cp.zeros(kv, dtype=cp.uint8)
        self._pinned = [cp.cuda.alloc_pinned_memory(4 * (1 + self.lay.max_batch)),
                        cp.cuda.alloc_pinned_memory(4 * c.n_vocab)]
        self.io_h = np.frombuffer(self._pinned[0], np.int32, 1 + self.lay.max_batch)
        self.logits_h = np.frombuffer(self._pinned[1], np.float32, c.n_vocab)
        self.ptr = {n: b.data.ptr for n, b in self.bufs.items()}
        self.ptr["io_h"], self.ptr["logits_h"] = self.io_h.ctypes.data, self.logits_h.ctypes.data

    # -- executing steps ------------------------------------------------------

    def _addr(self, b: Buf | None) -> int:
        return 0 if b is None else self.ptr[b.name] + b.offset

    def _arg(self, a):
        return launch_value(a, self._addr)

    def _prepare(self, steps: list, pdl: ExLauncher | None = None) -> list:
        """Launches as (kernel, grid, block, ready argument tuple, smem), or as a ready
        programmatic-dependent launch (a callable) with pdl; the rest as they are."""
        out = []
        for s in steps:
            if not isinstance(s, Launch):
                out.append(s)
                continue
            args = tuple(self._arg(a) for a in s.args)
            if s.coop:
                out.append(self._coop.prepare(self.kernels[s.kernel].kernel.ptr, s.grid, s.block, s.smem,
                                              self.stream.ptr, args))
            elif pdl is None:
                out.append((self.kernels[s.kernel], s.grid, s.block, args, s.smem))
            else:
                out.append(pdl.prepare(self.kernels[s.kernel].kernel.ptr, s.grid, s.block, s.smem,
                                       self.stream.ptr, args))
        return out

    def _forward(self, T: int, all_logits: bool) -> list:
        """forward_steps(T), prepared once per (T, all_logits) and kept (the last PLANS_KEPT
        chunk lengths: a daemon sees many prompt lengths)."""
        key = (T, all_logits)
        if key not in self._plans:
            if len(self._plans) >= PLANS_KEPT:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = self._prepare(forward_steps(self.lay, T, all_logits))
        return self._plans[key]

    def _run(self, steps: list) -> None:
        """Enqueue steps (plain or prepared) on the runner's stream (the caller holds
        `with self.stream`)."""
        rt = self.cp.cuda.runtime
        for s in steps:
            if callable(s):
                s()
            elif isinstance(s, tuple):
                fn, grid, block, args, smem = s
                fn(grid, block, args, shared_mem=smem)
            elif isinstance(s, Launch):
                self._run(self._prepare([s]))
            elif isinstance(s, Copy):
                kind = rt.memcpyHostToDevice if s.kind == "h2d" else rt.memcpyDeviceToHost
                rt.memcpyAsync(self._addr(s.dst), self._addr(s.src), s.nbytes, kind, self.stream.ptr)
            else:
                self._gemm(s)

    def _gemm(self, g: Gemm) -> None:
        """Row-major C (n x m, ldc) = B (n x k) A^T (k x m): column-major C^T = A^T' B."""
        cublas = self.cp.cuda.cublas
        dt = 2 if g.half else 0                              # CUDA_R_16F / CUDA_R_32F
        compute = getattr(cublas, "CUBLAS_COMPUTE_32F", 68)
        beta = self._one if g.beta else self._zero
        cublas.setStream(self.blas, self.stream.ptr)
        cublas.gemmEx(self.blas, 1, 0, g.m, g.n, g.k, self._one.ctypes.data, self._addr(g.a), dt, g.k,
                      self._addr(g.b), dt, g.ldb, beta.ctypes.data, self._addr(g.c), 0, g.ldc,
                      compute, -1)

    # -- the Runner protocol --------------------------------------------------

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self._check(tokens)
        B, out = self.lay.max_batch, []
        with self.device, self.stream:
            for c0 in range(0, ids.size, B):
                self.stream.synchronize()    # the last chunk's copy of io_h has been done
                chunk = ids[c0:c0 + B]
                last = c0 + chunk.size == ids.size
                self.io_h[0], self.io_h[1:1 + chunk.size] = self.n_past + c0, chunk
                self._run([Copy(Buf("io"), Buf("io_h"), 4 * (1 + chunk.size), "h2d")])
                self._run(self._forward(int(chunk.size), all_logits))
                if all_logits or last:
                    rows = chunk.size if all_logits else 1
                    out.append(self.bufs["logits"][:4 * rows * self.n_vocab].view(self.cp.float32)
                               .reshape(rows, self.n_vocab).get(stream=self.stream))
            self.stream.synchronize()
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
        self.io_h[0], self.io_h[1] = self.n_past, token
        with self.device, self.stream:
            if self.graph is None:       # first token: run eagerly (loads every kernel), then capture
                self._eager_decode()
                self.graph = self._capture()
            else:
                self.graph.launch(self.stream)
                self.stream.synchronize()
        self.n_past += 1
        return self.logits_h.copy()

    def _eager_decode(self) -> None:
        """One decode pass outside a graph; where the cooperative launch fails, fall back to the
        graph of launches; where programmatic launch fails, drop it and redo the pass with
        ordinary launches (a pass is idempotent for its position and token)."""
        self._decode_plan = self._prepare(decode_steps(self.lay), self.pdl)
        try:
            self._run(self._decode_plan)
            self.stream.synchronize()
        except BackendError as e:
            if self.lay.persistent:
                self.persistent_error = str(e)      # kept for the tests and the bench to show
                self.lay.persistent = False
                return self._eager_decode()
            if self.pdl is None:
                raise
            self.pdl = None
            self._decode_plan = self._prepare(decode_steps(self.lay))
            self._run(self._decode_plan)
            self.stream.synchronize()

    def _capture(self):
        """The decode graph; if capturing programmatic launches fails, captured without them;
        if capturing the cooperative launch fails, its three steps replayed directly."""
        try:
            return self._capture_plan()
        except Exception:  # noqa: BLE001 - retried once with ordinary launches, else raised
            if self.lay.persistent:
                return _DirectReplay(self)
            if self.pdl is None:
                raise
            self.pdl = None
            self._decode_plan = self._prepare(decode_steps(self.lay))
            return self._capture_plan()

    def _capture_plan(self):
        self.stream.begin_capture(self.cp.cuda.runtime.streamCaptureModeRelaxed)
        try:
            self._run(self._decode_plan)
        finally:
            graph = self.stream.end_capture()
        graph.upload(self.stream)
        return graph

    def close(self) -> None:
        if self.lay is None:
            return
        self.stream.synchronize()
        self.graph = None
        self._plans.clear()
        self._decode_plan = []
        self.bufs.clear()
        self.ptr.clear()
        self.lay = None
        self.module = self.kernels = None
        self.cp.get_default_memory_pool().free_all_blocks()

    # -- internals ------------------------------------------------------------

    def _check(self, tokens: Sequence[int]) -> np.ndarray:
        if self.lay is None:
            raise ValueError("runner is closed")
        return self.checked_tokens(tokens, np.int32)
