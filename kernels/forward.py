"""The C decoder from Python: weights from the read-only map into kernels/c/forward.c.

Design: this module turns a GGUFFile + ModelConfig into one `_native.Forward`
(a C ember_model) without copying a weight matrix: every matrix is handed over
as a (rows, row_bytes) uint8 view of the map, and the Forward object keeps
those views (and so the map) alive. Only the small tensors (norms, biases,
lfm2's conv kernel) are converted to float32 when the file stores them
otherwise, and the rope cos/sin table(s) come from rope.rope_cos_sin once, for
every cache position (factors and scaling included): one for the global
layers and, where their base differs (gemma3), one for the sliding-window
layers. Per-layer settings (attention, sliding window, conv; rope table or
none) go to the C model before its caches are sized.

`Decoder.run(tokens, pos0, all_logits)` is the single call into C per batch;
it allocates only the logits it returns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ember.formats.quant_blocks import GGML_TYPE_IDS
from ember.kernels import _native
from ember.kernels import dispatch
from ember.formats.model_config import ModelConfig, UnsupportedModel
from ember.kernels.rope import rope_cos_sin, rope_factors

DEFAULT_MAX_BATCH = 256   # tokens per pool run; longer prompts run in chunks
F32_BYTES = 4

# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for c in cpus:
        p = f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"
        try:
            with open(p) as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores) or (os.cpu_count() or 1))


# ---------------------------------------------------------------------------
# The tensor table: which GGUF tensor feeds which slot of the C model
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    slot: str          # name in _native.MATS / _native.VECS
    tensor: str        # GGUF name, "blk.{i}." prefixed for layers
    shape: tuple       # expected numpy shape
    required: bool = True


def _attention_slots(c: ModelConfig) -> list[Slot]:
    d, q_dim, kv_dim, hd = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.head_dim
    s = [Slot("o", "attn_output.weight", (d, q_dim))]
    if c.fused_qkv:
        s.append(Slot("qkv", "attn_qkv.weight", (q_dim + 2 * kv_dim, d)))
    else:
        s += [Slot("q", "attn_q.weight", (q_dim, d)), Slot("k", "attn_k.weight", (kv_dim, d)),
              Slot("v", "attn_v.weight", (kv_dim, d))]
    s += [Slot("bq", "attn_q.bias", (q_dim,), c.qkv_bias), Slot("bk", "attn_k.bias", (kv_dim,), c.qkv_bias),
          Slot("bv", "attn_v.bias", (kv_dim,), c.qkv_bias)]
    if c.qk_norm != "none":   # per head, or over the whole projection (olmo2)
        full = c.qk_norm == "full"
        s += [Slot("q_norm", "attn_q_norm.weight", (q_dim if full else hd,)),
              Slot("k_norm", "attn_k_norm.weight", (kv_dim if full else hd,))]
    return s


def _conv_slots(c: ModelConfig) -> list[Slot]:
    d = c.n_embd
    return [Slot("conv_in", "shortconv.in_proj.weight", (3 * d, d)),
            Slot("conv", "shortconv.conv.weight", (d, c.conv_l_cache)),
            Slot("conv_out", "shortconv.out_proj.weight", (d, d))]


def layer_slots(c: ModelConfig, il: int) -> list[Slot]:
    d = c.n_embd
    s = [Slot("down", "ffn_down.weight", (d, c.n_ff))]
    if c.pre_norms:
        s += [Slot("attn_norm", "attn_norm.weight", (d,)), Slot("ffn_norm", "ffn_norm.weight", (d,))]
    if c.post_norms:
        s += [Slot("post_attn_norm", "post_attention_norm.weight", (d,)),
              Slot("post_ffn_norm", "post_ffw_norm.weight", (d,))]
    s += _conv_slots(c) if c.layer_kind(il) == "conv" else _attention_slots(c)
    if c.fused_gate_up:   # phi3: gate | up in one matrix
        s.append(Slot("gate_up", "ffn_up.weight", (2 * c.n_ff, d)))
    else:
        s += [Slot("gate", "ffn_gate.weight", (c.n_ff, d)), Slot("up", "ffn_up.weight", (c.n_ff, d))]
    return s


def model_slots(c: ModelConfig) -> list[Slot]:
    out = "token_embd.weight" if c.tied_embeddings else "output.weight"
    return [Slot("tok_embd", "token_embd.weight", (c.n_vocab, c.n_embd)),
            Slot("output", out, (c.n_vocab, c.n_embd)),
            Slot("output_norm", c.output_norm, (c.n_embd,))]


def layer_setting(c: ModelConfig, il: int) -> tuple[str, str]:
    """(kind, rope table) of layer il, by the names of _native.LAYER_KINDS and ROPES."""
    if c.layer_kind(il) == "conv":
        return "conv", "none"
    swa = c.is_swa(il)
    return ("swa" if swa else "attn"), ("none" if not c.uses_rope(il) else "swa" if swa else "global")


# ---------------------------------------------------------------------------
# Tensors -> buffers the C model can point at
# ---------------------------------------------------------------------------

def _tensor(gguf, name: str, shape: tuple):
    t = gguf.tensors.get(name)
    if t is None:
        raise UnsupportedModel(f"tensor {name!r} is missing")
    if tuple(t.shape) != shape:
        raise UnsupportedModel(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def matrix_view(t) -> tuple[int, np.ndarray]:
    """(GGML type id, (rows, row_bytes) uint8 view of the map): no copy."""
    tid = GGML_TYPE_IDS.get(t.type, -1)
    if tid < 0 or not _native.type_supported(tid):
        raise UnsupportedModel(f"tensor {t.name!r}: the cpu backend has no kernels for {t.type}")
    rows = t.shape[0]
    return tid, t.data.reshape(rows, t.data.shape[0] // rows)


def vector_f32(t) -> np.ndarray:
    """A 1-D tensor as float32: a view when it is F32, else a (small) converted copy."""
    if t.type == "F32":
        return np.frombuffer(t.data, dtype=np.float32)
    return np.ascontiguousarray(t.numpy(), dtype=np.float32).reshape(-1)


def rope_table(c: ModelConfig, n_ctx: int, factors: np.ndarray | None, swa: bool = False) -> np.ndarray:
    """(n_ctx, rope_dim) float32: rope.rope_cos_sin's (cos, sin) pairs interleaved, as
    the C rope reads them (scaling and factors included there, once for every backend)."""
    cos, sin = rope_cos_sin(c, n_ctx, factors, swa=swa)                      # (n_ctx, rope_dim/2)
    return np.ascontiguousarray(np.stack([cos, sin], axis=-1).reshape(n_ctx, c.rope_dim), dtype=np.float32)


def needs_swa_table(c: ModelConfig) -> bool:
    """gemma3: the sliding-window layers rotate with their own base (and without the
    global layers' scaling: rope_cos_sin), wherever the file declares one."""
    return c.rope_base_swa > 0 and any(c.is_swa(il) and c.uses_rope(il) for il in range(c.n_layer))


def hparams(c: ModelConfig, n_ctx: int, max_batch: int) -> dict:
    return dict(n_vocab=c.n_vocab, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                n_head_kv=c.n_head_kv, head_dim=c.head_dim, n_ff=c.n_ff, rope_dim=c.rope_dim,
                n_ctx=n_ctx, max_batch=max_batch, rms_eps=c.rms_eps, neox=c.rope_style == "neox",
                qk_norm=c.qk_norm, fused_qkv=c.fused_qkv, fused_gate_up=c.fused_gate_up,
                act=c.act, pre_norms=c.pre_norms, embd_scale=c.embd_scale,
                residual_scale=c.residual_scale, attn_scale=c.attn_scale, attn_softcap=c.attn_softcap,
                final_softcap=c.final_softcap, logit_scale=c.logit_scale,
                sliding_window=c.sliding_window, conv_l_cache=c.conv_l_cache)


# ---------------------------------------------------------------------------
# Memory: what a Decoder will hold besides the map
# ---------------------------------------------------------------------------

def cache_rows(c: ModelConfig, il: int, n_ctx: int, max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """Mirror of ember_model_cache_rows: n_ctx; a ring of the rows a chunk's oldest token
    reads back plus the chunk (sliding-window layers); the conv state (l_cache - 1)."""
    kind, _ = layer_setting(c, il)
    if kind == "conv":
        return c.conv_l_cache - 1
    return min(n_ctx, c.sliding_window - 1 + max_batch) if kind == "swa" else n_ctx


def cache_bytes(c: ModelConfig, n_ctx: int, max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """Mirror of ember_model_cache_bytes: f16 K and V per attention row, f32 conv inputs."""
    total = 0
    for il in range(c.n_layer):
        rows = cache_rows(c, il, n_ctx, max_batch)
        total += rows * c.n_embd * F32_BYTES if c.layer_kind(il) == "conv" \
            else 2 * rows * c.n_head_kv * c.head_dim * 2
    return total


def scratch_bytes(c: ModelConfig, n_ctx: int, threads: int, max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """Mirror of ember_model_scratch_bytes plus the rope table(s) (forward.c sizes it the same way)."""
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    act = 0
    for t in c.tensors.values():
        tid = GGML_TYPE_IDS.get(t.type, -1)
        if len(t.shape) == 2 and tid >= 0 and _native.type_supported(tid):
            act = max(act, _native.act_row_bytes(tid, t.shape[1]))
    act = (act + 63) // 64 * 64
    B = max_batch
    has_conv = "conv" in c.layer_kinds
    conv = (B * 4 + c.conv_l_cache - 1) * c.n_embd if has_conv else 0   # b|c|u and the window
    floats = (B * (2 * c.n_embd + q_dim + 2 * kv_dim + q_dim + 2 * c.n_ff) + conv
              + threads * _native.ATT_HEADS * n_ctx + c.n_embd)
    stage_counters = (c.n_layer + 1) * 32 * 128   # MAX_STAGES_PER_LAYER cache-line pairs
    tables = 2 if needs_swa_table(c) else 1
    return floats * F32_BYTES + B * act + tables * n_ctx * c.rope_dim * F32_BYTES + stage_counters


# ---------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------

class Decoder:
    """A loaded model on the C forward pass: KV caches for n_ctx, scratch, threads."""

    def __init__(self, gguf, config: ModelConfig, n_ctx: int, threads: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, isa: str | None = None):
        if isa is not None:
            dispatch.use(isa)   # products follow the kernels' global ISA
        if "conv" in config.layer_kinds:
            if not 1 <= config.conv_l_cache <= _native.CONV_MAX_TAPS:
                raise UnsupportedModel(f"shortconv.l_cache {config.conv_l_cache} is outside "
                                       f"[1, {_native.CONV_MAX_TAPS}]")
        self.config, self.n_ctx, self.max_batch = config, n_ctx, max_batch
        self.threads = threads or physical_cores()
        factors = rope_factors(config, gguf, n_ctx)
        self.rope = rope_table(config, n_ctx, factors)
        self.rope_swa = rope_table(config, n_ctx, factors, swa=True) if needs_swa_table(config) else None
        self.fw = _native.Forward(hparams(config, n_ctx, max_batch), self.rope, self.threads,
                                  dispatch.current_isa(), self.rope_swa)
        self._gguf = gguf   # keeps the map alive as long as the views into it
        for il in range(config.n_layer):
            self.fw.set_layer(il, *layer_setting(config, il))
            self._bind(gguf, il, layer_slots(config, il), f"blk.{il}.")
        self._bind(gguf, -1, model_slots(config), "")
        self.fw.finish()
        self.isa = dispatch.current_isa()

    def _bind(self, gguf, layer: int, slots: list[Slot], prefix: str) -> None:
        for s in slots:
            name = prefix + s.tensor
            if not s.required and name not in gguf.tensors:
                continue
            t = _tensor(gguf, name, s.shape)
            if len(s.shape) == 1 or s.slot == "conv":   # the conv kernel is a small (E, taps) table
                self.fw.set_vec(layer, s.slot, vector_f32(t))
            else:
                tid, view = matrix_view(t)
                self.fw.set_mat(layer, s.slot, tid, view, s.shape[1])

    def run(self, tokens: np.ndarray, pos0: int, all_logits: bool) -> np.ndarray:
        """tokens int32 (n,) at positions pos0.. -> logits (n, n_vocab) or (n_vocab,)"""
        n, V = tokens.shape[0], self.config.n_vocab
        out = np.empty((n, V) if all_logits else (V,), dtype=np.float32)
        self.fw.forward(tokens, pos0, out.reshape(-1), all_logits)
        return out

    def ring_layers(self) -> list[tuple[int, int]]:
        """(rows, window) of each sliding-window layer whose ring is shorter than n_ctx:
        what the runner needs to know how far back the cache can be truncated."""
        c = self.config
        return [(self.fw.cache_rows(il), c.sliding_window) for il in range(c.n_layer)
                if layer_setting(c, il)[0] == "swa" and self.fw.cache_rows(il) < self.n_ctx]

    @property
    def scratch_bytes(self) -> int:
        return self.fw.scratch_bytes + self.rope.nbytes + (self.rope_swa.nbytes if self.rope_swa is not None else 0)

    @property
    def cache_bytes(self) -> int:
        return self.fw.cache_bytes

    def close(self) -> None:
        self.fw.close()
        self._gguf = None
