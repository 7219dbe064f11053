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
        int neox, qk_norm, fused_qkv, fused_gate_up
    ctypedef struct ember_ops:
        const char *name
        void (*rmsnorm)(const float *x, const float *w, float *y, int64_t n, float eps) nogil
        void (*rope)(float *x, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                     const float *cs, int neox) nogil
        void (*softmax)(float *x, int64_t n) nogil
        void (*attention)(const float *q, int64_t ldq, const uint16_t *K, const uint16_t *V,
                          int64_t kv_stride, int64_t pos0, int64_t n_head, int64_t n_head_kv,
                          int64_t hd, float scale, float *out, int64_t ldo, float *scores,
                          int64_t i0, int64_t i1) nogil
        void (*swiglu)(const float *g, const float *u, float *y, int64_t n) nogil
        void (*add)(float *y, const float *x, int64_t n) nogil
        void (*to_f16)(const float *x, uint16_t *y, int64_t n) nogil
    enum:
        EMBER_ATT_HEADS
    enum:
        EMBER_M_Q, EMBER_M_K, EMBER_M_V, EMBER_M_QKV, EMBER_M_O, EMBER_M_GATE, EMBER_M_UP,
        EMBER_M_GATE_UP, EMBER_M_DOWN, EMBER_M_TOK_EMBD, EMBER_M_OUTPUT
    enum:
        EMBER_V_ATTN_NORM, EMBER_V_FFN_NORM, EMBER_V_Q_NORM, EMBER_V_K_NORM,
        EMBER_V_BQ, EMBER_V_BK, EMBER_V_BV, EMBER_V_OUTPUT_NORM

    const ember_ops *ember_ops_for(const char *isa) nogil
    ember_pool *ember_pool_new(int n_threads) nogil
    void ember_pool_free(ember_pool *p) nogil
    double ember_pool_bench_barrier(ember_pool *p, int64_t n_ops) nogil
    double ember_pool_bench_run(ember_pool *p, int64_t n_runs) nogil
    double ember_pool_bench_read(ember_pool *p, const void *buf, size_t nbytes) nogil

    ember_model *ember_model_new(const ember_hparams *hp, const float *rope_cs, int n_threads,
                                 const char *isa) nogil
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
MATS = {"q": EMBER_M_Q, "k": EMBER_M_K, "v": EMBER_M_V, "qkv": EMBER_M_QKV, "o": EMBER_M_O,
        "gate": EMBER_M_GATE, "up": EMBER_M_UP, "gate_up": EMBER_M_GATE_UP, "down": EMBER_M_DOWN,
        "tok_embd": EMBER_M_TOK_EMBD, "output": EMBER_M_OUTPUT}
VECS = {"attn_norm": EMBER_V_ATTN_NORM, "ffn_norm": EMBER_V_FFN_NORM, "q_norm": EMBER_V_Q_NORM,
        "k_norm": EMBER_V_K_NORM, "bq": EMBER_V_BQ, "bk": EMBER_V_BK, "bv": EMBER_V_BV,
        "output_norm": EMBER_V_OUTPUT_NORM}

# ---------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------

cdef class Forward:
    """One C decoder model: weights by pointer, f16 KV cache, scratch, thread pool."""

    cdef ember_model *m
    cdef ember_hparams hp
    cdef list _keep

    def __cinit__(self, dict hp, const float[:, ::1] rope_cs, int n_threads, str isa=None):
        for key in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim",
                    "n_ff", "rope_dim", "n_ctx", "max_batch"):
            if int(hp[key]) <= 0:
                raise ValueError(f"hparam {key} must be positive, got {hp[key]}")
        self.hp.n_vocab, self.hp.n_embd, self.hp.n_layer = hp["n_vocab"], hp["n_embd"], hp["n_layer"]
        self.hp.n_head, self.hp.n_head_kv, self.hp.head_dim = hp["n_head"], hp["n_head_kv"], hp["head_dim"]
        self.hp.n_ff, self.hp.rope_dim, self.hp.n_ctx = hp["n_ff"], hp["rope_dim"], hp["n_ctx"]
        self.hp.max_batch, self.hp.rms_eps = hp["max_batch"], hp["rms_eps"]
        self.hp.neox, self.hp.qk_norm = hp["neox"], hp["qk_norm"]
        self.hp.fused_qkv, self.hp.fused_gate_up = hp["fused_qkv"], hp["fused_gate_up"]
        if self.hp.n_head % self.hp.n_head_kv or self.hp.rope_dim > self.hp.head_dim or self.hp.rope_dim % 2:
            raise ValueError("inconsistent heads or rope_dim")
        if rope_cs.shape[0] < self.hp.n_ctx or rope_cs.shape[1] != self.hp.rope_dim:
            raise ValueError(f"rope table {tuple(rope_cs.shape)} does not cover "
                             f"({self.hp.n_ctx}, {self.hp.rope_dim})")
        self._keep = [rope_cs]
        cdef bytes isa_b = isa.encode() if isa is not None else None
        self.m = ember_model_new(&self.hp, &rope_cs[0, 0], n_threads,
                                 <const char *> isa_b if isa_b is not None else NULL)
        if self.m is NULL:
            raise MemoryError("cannot allocate the KV cache or the thread pool")

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

    def finish(self):
        if ember_model_finish(self._model()) != 0:
            raise MemoryError("cannot allocate the decoder's scratch buffers")

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
                 int64_t pos0, int64_t n_head, int64_t n_head_kv, int64_t hd, float[:, ::1] out):
    """Causal attention: q (B, n_head*hd) at positions pos0.., K/V (n_ctx, n_head_kv*hd) f16 bits."""
    cdef const ember_ops *o = _ops(isa)
    cdef int64_t B = q.shape[0]
    if (q.shape[1] != n_head * hd or K.shape[1] != n_head_kv * hd or V.shape[1] != K.shape[1]
            or n_head % n_head_kv or pos0 + B > K.shape[0] or V.shape[0] < K.shape[0]
            or out.shape[0] != B or out.shape[1] != q.shape[1] or B == 0):
        raise ValueError("attention: shapes do not fit")
    import numpy as np
    cdef float[::1] scores = np.empty(EMBER_ATT_HEADS * K.shape[0], dtype=np.float32)
    cdef float scale = 1.0 / sqrt(<double> hd)
    with nogil:
        o.attention(&q[0, 0], q.shape[1], &K[0, 0], &V[0, 0], K.shape[1], pos0, n_head, n_head_kv,
                    hd, scale, &out[0, 0], out.shape[1], &scores[0], 0, B * n_head)
