# Bindings of the C decoder (kernels/c/forward.c), the ops (ember_ops.h) and
# the thread pool; included at the end of _native.pyx.
#
# Design: `Forward` owns one ember_model and a list of the Python objects
# whose memory the model points into (weight views of the read-only map, f32
# norm vectors, the rope table), so they live exactly as long as the model.
# `forward()` is the one call per decoded token: it checks bounds (token ids,
# cache positions, output size) and runs the whole pass with the GIL released.
# The op wrappers below exist for tests: they run one op of one ISA's table.
from libc.math cimport sqrt
from libc.stdint cimport uint16_t


cdef extern from "ember_forward.h":
    ctypedef struct ember_pool:
        pass
    ctypedef struct ember_model:
        pass
    ctypedef struct ember_hparams:
        int64_t n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, rope_dim
        int64_t n_ctx, max_batch
        float rms_eps
        int neox, qk_norm, fused_qkv, fused_gate_up, act, pre_norms
        float embd_scale, residual_scale, attn_scale, attn_softcap, final_softcap, logit_scale
        int64_t sliding_window, conv_l_cache
    ctypedef struct ember_att_args:
        const float *q
        int64_t ldq
        const uint16_t *K
        const uint16_t *V
        int64_t kv_stride, rows, window, pos0, n_head, n_head_kv, hd
        float scale, softcap
        float *out
        int64_t ldo
    void ember_gelu_init() nogil
    ctypedef struct ember_ops:
        const char *name
        void (*rmsnorm)(const float *x, const float *w, float *y, int64_t n, float eps) nogil
        void (*rope)(float *x, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                     const float *cs, int neox) nogil
        void (*softmax)(float *x, int64_t n) nogil
        void (*attention)(const ember_att_args *a, float *scores, int64_t i0, int64_t i1) nogil
        void (*swiglu)(const float *g, const float *u, float *y, int64_t n) nogil
        void (*geglu)(const float *g, const float *u, float *y, int64_t n) nogil
        void (*add)(float *y, const float *x, int64_t n) nogil
        void (*to_f16)(const float *x, uint16_t *y, int64_t n) nogil
    enum:
        EMBER_ATT_HEADS
        EMBER_CONV_MAX_TAPS
    enum:
        EMBER_QK_NORM_NONE, EMBER_QK_NORM_HEAD, EMBER_QK_NORM_FULL
    enum:
        EMBER_ACT_SILU, EMBER_ACT_GELU
    enum:
        EMBER_LAYER_ATTN, EMBER_LAYER_SWA, EMBER_LAYER_CONV
    enum:
        EMBER_ROPE_NONE, EMBER_ROPE_GLOBAL, EMBER_ROPE_SWA
    enum:
        EMBER_M_Q, EMBER_M_K, EMBER_M_V, EMBER_M_QKV, EMBER_M_O, EMBER_M_GATE, EMBER_M_UP,
        EMBER_M_GATE_UP, EMBER_M_DOWN, EMBER_M_CONV_IN, EMBER_M_CONV_OUT, EMBER_M_TOK_EMBD,
        EMBER_M_OUTPUT
    enum:
        EMBER_V_ATTN_NORM, EMBER_V_FFN_NORM, EMBER_V_Q_NORM, EMBER_V_K_NORM,
        EMBER_V_BQ, EMBER_V_BK, EMBER_V_BV, EMBER_V_POST_ATTN_NORM, EMBER_V_POST_FFN_NORM,
        EMBER_V_CONV, EMBER_V_OUTPUT_NORM

    const ember_ops *ember_ops_for(const char *isa) nogil
    ember_pool *ember_pool_new(int n_threads) nogil
    void ember_pool_free(ember_pool *p) nogil
    double ember_pool_bench_barrier(ember_pool *p, int64_t n_ops) nogil
    double ember_pool_bench_run(ember_pool *p, int64_t n_runs) nogil
    double ember_pool_bench_read(ember_pool *p, const void *buf, size_t nbytes) nogil

    ember_model *ember_model_new(const ember_hparams *hp, const float *rope_cs,
                                 const float *rope_cs_swa, int n_threads, const char *isa) nogil
    int ember_model_set_layer(ember_model *m, int64_t layer, int kind, int rope) nogil
    int64_t ember_model_cache_rows(const ember_model *m, int64_t layer) nogil
    size_t ember_model_cache_bytes(const ember_model *m) nogil
    size_t ember_model_cache_row_bytes(const ember_model *m, int64_t layer) nogil
    int ember_model_cache_copy(ember_model *m, int64_t layer, int64_t rows, void *buf,
                               int to_cache) nogil
    int ember_model_set_mat(ember_model *m, int64_t layer, int which, const void *data, int type,
                            int64_t rows, int64_t cols, size_t row_bytes) nogil
    int ember_model_set_vec(ember_model *m, int64_t layer, int which, const float *data) nogil
    int ember_model_finish(ember_model *m) nogil
    void ember_model_free(ember_model *m) nogil
    size_t ember_model_scratch_bytes(const ember_model *m) nogil
    const char *ember_model_ops_name(const ember_model *m) nogil
    int ember_model_threads(const ember_model *m) nogil
    void ember_forward(ember_model *m, const int32_t *tokens, int64_t n, int64_t pos0,
                       float *logits, int all_logits) nogil


ATT_HEADS = EMBER_ATT_HEADS   # attention scratch: this many heads x n_ctx floats per thread
CONV_MAX_TAPS = EMBER_CONV_MAX_TAPS
MATS = {"q": EMBER_M_Q, "k": EMBER_M_K, "v": EMBER_M_V, "qkv": EMBER_M_QKV, "o": EMBER_M_O,
        "gate": EMBER_M_GATE, "up": EMBER_M_UP, "gate_up": EMBER_M_GATE_UP, "down": EMBER_M_DOWN,
        "conv_in": EMBER_M_CONV_IN, "conv_out": EMBER_M_CONV_OUT,
        "tok_embd": EMBER_M_TOK_EMBD, "output": EMBER_M_OUTPUT}
VECS = {"attn_norm": EMBER_V_ATTN_NORM, "ffn_norm": EMBER_V_FFN_NORM, "q_norm": EMBER_V_Q_NORM,
        "k_norm": EMBER_V_K_NORM, "bq": EMBER_V_BQ, "bk": EMBER_V_BK, "bv": EMBER_V_BV,
        "post_attn_norm": EMBER_V_POST_ATTN_NORM, "post_ffn_norm": EMBER_V_POST_FFN_NORM,
        "conv": EMBER_V_CONV, "output_norm": EMBER_V_OUTPUT_NORM}
QK_NORMS = {"none": EMBER_QK_NORM_NONE, "head": EMBER_QK_NORM_HEAD, "full": EMBER_QK_NORM_FULL}
ACTS = {"silu": EMBER_ACT_SILU, "gelu": EMBER_ACT_GELU}
LAYER_KINDS = {"attn": EMBER_LAYER_ATTN, "swa": EMBER_LAYER_SWA, "conv": EMBER_LAYER_CONV}
ROPES = {"none": EMBER_ROPE_NONE, "global": EMBER_ROPE_GLOBAL, "swa": EMBER_ROPE_SWA}

# ---------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------

cdef class Forward:
    """One C decoder model: weights by pointer, f16 KV cache, scratch, thread pool."""

    cdef ember_model *m
    cdef ember_hparams hp
    cdef list _keep

    def __cinit__(self, dict hp, const float[:, ::1] rope_cs, int n_threads, str isa=None,
                  const float[:, ::1] rope_cs_swa=None):
        """hp: ember_hparams by field name (qk_norm and act by name: QK_NORMS, ACTS);
        rope_cs_swa: the sliding-window layers' table where their base differs."""
        for key in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim",
                    "n_ff", "rope_dim", "n_ctx", "max_batch"):
            if int(hp[key]) <= 0:
                raise ValueError(f"hparam {key} must be positive, got {hp[key]}")
        self.hp.n_vocab, self.hp.n_embd, self.hp.n_layer = hp["n_vocab"], hp["n_embd"], hp["n_layer"]
        self.hp.n_head, self.hp.n_head_kv, self.hp.head_dim = hp["n_head"], hp["n_head_kv"], hp["head_dim"]
        self.hp.n_ff, self.hp.rope_dim, self.hp.n_ctx = hp["n_ff"], hp["rope_dim"], hp["n_ctx"]
        self.hp.max_batch, self.hp.rms_eps = hp["max_batch"], hp["rms_eps"]
        self.hp.neox, self.hp.qk_norm = hp["neox"], QK_NORMS[hp.get("qk_norm", "none")]
        self.hp.fused_qkv, self.hp.fused_gate_up = hp["fused_qkv"], hp["fused_gate_up"]
        self.hp.act = ACTS[hp.get("act", "silu")]
        self.hp.pre_norms = hp.get("pre_norms", True)
        self.hp.embd_scale, self.hp.residual_scale = hp.get("embd_scale", 1.0), hp.get("residual_scale", 1.0)
        self.hp.attn_scale = hp.get("attn_scale") or 1.0 / sqrt(<double> self.hp.head_dim)
        self.hp.attn_softcap, self.hp.final_softcap = hp.get("attn_softcap", 0.0), hp.get("final_softcap", 0.0)
        self.hp.logit_scale = hp.get("logit_scale") or 1.0
        self.hp.sliding_window, self.hp.conv_l_cache = hp.get("sliding_window", 0), hp.get("conv_l_cache", 0)
        if self.hp.n_head % self.hp.n_head_kv or self.hp.rope_dim > self.hp.head_dim or self.hp.rope_dim % 2:
            raise ValueError("inconsistent heads or rope_dim")
        for name, t in (("rope", rope_cs), ("swa rope", rope_cs_swa)):
            if t is not None and (t.shape[0] < self.hp.n_ctx or t.shape[1] != self.hp.rope_dim):
                raise ValueError(f"{name} table {tuple(t.shape)} does not cover "
                                 f"({self.hp.n_ctx}, {self.hp.rope_dim})")
        self._keep = [rope_cs, rope_cs_swa]
        cdef bytes isa_b = isa.encode() if isa is not None else None
        self.m = ember_model_new(&self.hp, &rope_cs[0, 0],
                                 &rope_cs_swa[0, 0] if rope_cs_swa is not None else NULL, n_threads,
                                 <const char *> isa_b if isa_b is not None else NULL)
        if self.m is NULL:
            raise MemoryError("cannot allocate the model or the thread pool")

    def __dealloc__(self):
        if self.m is not NULL:
            ember_model_free(self.m)
            self.m = NULL

    cdef ember_model *_model(self) except NULL:
        if self.m is NULL:
            raise ValueError("the model is closed")
        return self.m

    def set_mat(self, int64_t layer, str which, int wtype, const uint8_t[:, ::1] data, int64_t cols):
        """Weight matrix `which` of `layer` (-1: model level): (rows, row_bytes) bytes."""
        cdef ember_model *m = self._model()
        if not ember_type_supported(wtype):
            raise ValueError(f"{which}: GGML type {wtype} has no kernels")
        if data.shape[1] != _row_len(wtype, cols):
            raise ValueError(f"{which}: rows of {data.shape[1]} bytes do not hold {cols} values")
        if ember_model_set_mat(m, layer, MATS[which], &data[0, 0], wtype, data.shape[0], cols,
                               data.shape[1]) != 0:
            raise ValueError(f"{which}: layer {layer} or type {wtype} rejected")
        self._keep.append(data)

    def set_vec(self, int64_t layer, str which, const float[::1] data):
        cdef ember_model *m = self._model()
        if ember_model_set_vec(m, layer, VECS[which], &data[0]) != 0:
            raise ValueError(f"{which}: layer {layer} rejected")
        self._keep.append(data)

    def set_layer(self, int64_t layer, str kind, str rope):
        """Layer kind (LAYER_KINDS) and rope table (ROPES); before finish()."""
        if ember_model_set_layer(self._model(), layer, LAYER_KINDS[kind], ROPES[rope]) != 0:
            raise ValueError(f"layer {layer}: kind {kind!r} with rope {rope!r} rejected "
                             f"(window {self.hp.sliding_window}, conv taps {self.hp.conv_l_cache})")

    def cache_rows(self, int64_t layer):
        """Rows of the layer's cache: n_ctx, or a ring for window and conv layers."""
        return ember_model_cache_rows(self._model(), layer)

    def cache_row_bytes(self, int64_t layer):
        """Bytes per row of the layer's cache (K and V f16, or a conv state row f32)."""
        return ember_model_cache_row_bytes(self._model(), layer)

    def cache_copy(self, int64_t layer, int64_t rows, uint8_t[::1] buf, bint to_cache):
        """Copy the layer's cache rows [0, rows) into buf, or (to_cache) from buf into the cache."""
        cdef ember_model *m = self._model()
        cdef size_t need = ember_model_cache_row_bytes(m, layer) * <size_t> max(rows, 0)
        if <size_t> buf.shape[0] != need or need == 0 and rows != 0:
            raise ValueError(f"layer {layer}: a buffer of {buf.shape[0]} bytes for {rows} rows "
                             f"(needs {need})")
        cdef void *p = &buf[0] if buf.shape[0] else NULL
        cdef int rc
        with nogil:
            rc = ember_model_cache_copy(m, layer, rows, p, to_cache)
        if rc != 0:
            raise ValueError(f"layer {layer}: cannot copy {rows} cache rows")

    def finish(self):
        if ember_model_finish(self._model()) != 0:
            raise MemoryError("cannot allocate the decoder's caches or scratch buffers")

    def forward(self, const int32_t[::1] tokens, int64_t pos0, float[::1] logits, bint all_logits):
        """Run tokens at positions pos0..; logits: (n * n_vocab) if all_logits else (n_vocab)."""
        cdef ember_model *m = self._model()
        cdef int64_t n = tokens.shape[0], i
        if n == 0 or pos0 < 0 or pos0 + n > self.hp.n_ctx:
            raise ValueError(f"positions [{pos0}, {pos0 + n}) outside the cache [0, {self.hp.n_ctx})")
        if logits.shape[0] != (n if all_logits else 1) * self.hp.n_vocab:
            raise ValueError("logits buffer has the wrong size")
        for i in range(n):
            if tokens[i] < 0 or tokens[i] >= self.hp.n_vocab:
                raise ValueError(f"token id {tokens[i]} outside [0, {self.hp.n_vocab})")
        with nogil:
            ember_forward(m, &tokens[0], n, pos0, &logits[0], all_logits)

    def kept(self):
        """The buffers the C model points into (for tests: weights must be views of the map)."""
        return list(self._keep)

    @property
    def scratch_bytes(self):
        return ember_model_scratch_bytes(self._model())

    @property
    def cache_bytes(self):
        return ember_model_cache_bytes(self._model())

    @property
    def ops_name(self):
        return ember_model_ops_name(self._model()).decode()

    @property
    def threads(self):
        return ember_model_threads(self._model())

    def close(self):
        if self.m is not NULL:
            with nogil:
                ember_model_free(self.m)
            self.m = NULL
        self._keep = []

# ---------------------------------------------------------------------------
# The thread pool's own cost
# ---------------------------------------------------------------------------

def pool_costs(int n_threads, int64_t n_ops=20000, int64_t n_runs=2000):
    """(seconds per barrier, seconds per pool run) measured on a fresh pool."""
    cdef ember_pool *p = ember_pool_new(n_threads)
    cdef double per_op, per_run
    if p is NULL:
        raise MemoryError("cannot start the thread pool")
    with nogil:
        ember_pool_bench_barrier(p, 100)  # wake the workers first
        per_op = ember_pool_bench_barrier(p, n_ops)
        per_run = ember_pool_bench_run(p, n_runs)
        ember_pool_free(p)
    return per_op, per_run

def read_bandwidth(int n_threads, const uint8_t[::1] buf, int repeats=5):
    """Best bytes/second over `repeats` reads of buf (make it far larger than the caches)."""
    cdef ember_pool *p = ember_pool_new(n_threads)
    cdef double best = 1e30, t
    cdef int i
    if p is NULL:
        raise MemoryError("cannot start the thread pool")
    with nogil:
        for i in range(repeats):
            t = ember_pool_bench_read(p, &buf[0], buf.shape[0])
            if t < best:
                best = t
        ember_pool_free(p)
    return buf.shape[0] / best

# ---------------------------------------------------------------------------
# Single ops of one ISA's table (for tests)
# ---------------------------------------------------------------------------

cdef const ember_ops *_ops(str isa) except NULL:
    cdef bytes b = isa.encode()
    return ember_ops_for(b)


def ops_name(str isa):
    """Name of the ops table ISA `isa` runs (an ISA without its own falls back)."""
    return _ops(isa).name.decode()


def op_rmsnorm(str isa, const float[::1] x, const float[::1] w, float[::1] y, float eps):
    cdef const ember_ops *o = _ops(isa)
    if w.shape[0] != x.shape[0] or y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ValueError("rmsnorm: x, w, y must have one non-zero length")
    with nogil:
        o.rmsnorm(&x[0], &w[0], &y[0], x.shape[0], eps)


def op_rope(str isa, float[:, ::1] x, int64_t head_dim, int64_t rope_dim, const float[::1] cs, bint neox):
    """x: (n_heads, head_dim) of one token, rotated in place; cs: rope_dim/2 (cos, sin) pairs."""
    cdef const ember_ops *o = _ops(isa)
    if x.shape[1] != head_dim or rope_dim > head_dim or rope_dim % 2 or cs.shape[0] != rope_dim:
        raise ValueError("rope: shapes do not fit")
    with nogil:
        o.rope(&x[0, 0], x.shape[0], head_dim, rope_dim, &cs[0], neox)


def op_softmax(str isa, float[::1] x):
    cdef const ember_ops *o = _ops(isa)
    if x.shape[0] == 0:
        raise ValueError("softmax of nothing")
    with nogil:
        o.softmax(&x[0], x.shape[0])


def op_swiglu(str isa, const float[::1] g, const float[::1] u, float[::1] y):
    cdef const ember_ops *o = _ops(isa)
    if u.shape[0] != g.shape[0] or y.shape[0] != g.shape[0] or g.shape[0] == 0:
        raise ValueError("swiglu: g, u, y must have one non-zero length")
    with nogil:
        o.swiglu(&g[0], &u[0], &y[0], g.shape[0])


def op_geglu(str isa, const float[::1] g, const float[::1] u, float[::1] y):
    cdef const ember_ops *o = _ops(isa)
    if u.shape[0] != g.shape[0] or y.shape[0] != g.shape[0] or g.shape[0] == 0:
        raise ValueError("geglu: g, u, y must have one non-zero length")
    ember_gelu_init()
    with nogil:
        o.geglu(&g[0], &u[0], &y[0], g.shape[0])


def op_add(str isa, float[::1] y, const float[::1] x):
    cdef const ember_ops *o = _ops(isa)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError("add: x, y must have one non-zero length")
    with nogil:
        o.add(&y[0], &x[0], x.shape[0])


def op_to_f16(str isa, const float[::1] x, uint16_t[::1] y):
    cdef const ember_ops *o = _ops(isa)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError("to_f16: x, y must have one non-zero length")
    with nogil:
        o.to_f16(&x[0], &y[0], x.shape[0])


def op_attention(str isa, const float[:, ::1] q, const uint16_t[:, ::1] K, const uint16_t[:, ::1] V,
                 int64_t pos0, int64_t n_head, int64_t n_head_kv, int64_t hd, float[:, ::1] out,
                 int64_t window=0, float softcap=0.0, float scale=0.0):
    """Causal attention: q (B, n_head*hd) at positions pos0.., K/V (rows, n_head_kv*hd) f16
    bits with position t in row t % rows; window 0 = every position; scale 0 = 1/sqrt(hd)."""
    cdef const ember_ops *o = _ops(isa)
    cdef int64_t B = q.shape[0], rows = K.shape[0]
    if (q.shape[1] != n_head * hd or K.shape[1] != n_head_kv * hd or V.shape[1] != K.shape[1]
            or n_head % n_head_kv or V.shape[0] != rows or out.shape[0] != B
            or out.shape[1] != q.shape[1] or B == 0 or window < 0
            or (pos0 + B > rows and (window == 0 or window - 1 + B > rows))):
        raise ValueError("attention: shapes do not fit")
    import numpy as np
    cdef float[::1] scores = np.empty(EMBER_ATT_HEADS * (pos0 + B), dtype=np.float32)
    cdef ember_att_args a
    a.q, a.ldq, a.K, a.V, a.kv_stride = &q[0, 0], q.shape[1], &K[0, 0], &V[0, 0], K.shape[1]
    a.rows, a.window, a.pos0, a.n_head, a.n_head_kv, a.hd = rows, window, pos0, n_head, n_head_kv, hd
    a.scale = scale if scale > 0 else 1.0 / sqrt(<double> hd)
    a.softcap, a.out, a.ldo = softcap, &out[0, 0], out.shape[1]
    with nogil:
        o.attention(&a, &scores[0], 0, B * n_head)
