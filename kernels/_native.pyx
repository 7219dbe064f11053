# cython: boundscheck=False, wraparound=False, cdivision=True
"""Thin Cython bindings over the C kernels in kernels/c.

Design: the C functions take raw pointers and never allocate; this layer
takes typed memoryviews, checks only what would let C read or write out of
bounds (so a bad call raises ValueError instead of crashing), and releases
the GIL around every call. Inputs are `const` memoryviews because weights
are mapped read-only. Argument checking in user terms and output allocation
live in kernels/quant_ops.py.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t


cdef extern from "ember_kernels.h":
    int ember_act_type(int wtype) nogil
    size_t ember_act_row_bytes(int wtype, int64_t n) nogil
    void ember_quantize_act(int wtype, const float *x, void *xq, int64_t n) nogil
    void ember_matvec(int wtype, const void *W, size_t row_bytes, const void *xq, float *y,
                      int64_t n, int64_t r0, int64_t r1) nogil
    void ember_matmul(int wtype, const void *W, size_t row_bytes, const void *Xq, size_t xq_stride,
                      float *Y, int64_t ldy, int64_t n, int64_t nb, int64_t r0, int64_t r1) nogil
    void ember_dequantize_row(int wtype, const void *x, float *y, int64_t n) nogil
    void ember_get_rows(int wtype, const void *W, size_t row_bytes, const int32_t *ids, int64_t n_ids,
                        float *out, int64_t n) nogil
    int ember_cpu_isas() nogil
    int ember_set_isa(int isa) nogil
    int ember_get_isa() nogil
    const char *ember_isa_name() nogil
    const char *ember_isa_variant() nogil
    int ember_set_isa_extensions(int on) nogil
    int ember_type_supported(int wtype) nogil
    int ember_block_elems(int wtype) nogil
    size_t ember_block_bytes(int wtype) nogil
    enum:
        EMBER_ISA_GENERIC, EMBER_ISA_AVX2, EMBER_ISA_AVX512, EMBER_ISA_NEON, EMBER_N_ISA


ISA_IDS = {"generic": EMBER_ISA_GENERIC, "avx2": EMBER_ISA_AVX2,
           "avx512": EMBER_ISA_AVX512, "neon": EMBER_ISA_NEON}

# ---------------------------------------------------------------------------
# ISA selection and type facts
# ---------------------------------------------------------------------------

def cpu_isas():
    """Bitmask (1 << ISA id) of the ISAs this CPU runs."""
    return ember_cpu_isas()


def set_isa(int isa):
    """Switch every kernel to ISA id `isa`; ValueError if the CPU lacks it."""
    if ember_set_isa(isa) != 0:
        raise ValueError(f"ISA id {isa} is not supported by this CPU")


def isa_name():
    return ember_isa_name().decode()


def get_isa():
    return ember_get_isa()


def isa_variant():
    """The ISA plus the optional extensions in use, e.g. 'avx512+vnni'."""
    return ember_isa_variant().decode()


def set_isa_extensions(bint on):
    """Tests only: build the tables without (False) or with VNNI/dotprod."""
    ember_set_isa_extensions(on)


def type_supported(int wtype):
    return bool(ember_type_supported(wtype))


def block_elems(int wtype):
    return ember_block_elems(wtype)


def block_bytes(int wtype):
    """sizeof the C block struct of wtype (0 if unknown)."""
    return ember_block_bytes(wtype)


def act_type(int wtype):
    return ember_act_type(wtype)


def act_row_bytes(int wtype, int64_t n):
    return ember_act_row_bytes(wtype, n)

# ---------------------------------------------------------------------------
# Checks that keep C inside its buffers
# ---------------------------------------------------------------------------

cdef int64_t _row_len(int wtype, int64_t n) except -1:
    """Validate wtype and n; return bytes of one weight row of n values."""
    if not ember_type_supported(wtype):
        raise ValueError(f"GGML type {wtype} has no kernels")
    cdef int64_t qk = ember_block_elems(wtype)
    if n <= 0 or n % qk:
        raise ValueError(f"row length {n} is not a positive multiple of the block size {qk}")
    return n // qk * <int64_t> ember_block_bytes(wtype)


cdef int _check_act(int wtype, int64_t n, int64_t nbytes) except -1:
    if nbytes < <int64_t> ember_act_row_bytes(wtype, n):
        raise ValueError(f"activation row holds {nbytes} bytes, needs {ember_act_row_bytes(wtype, n)}")
    return 0

# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

def quantize_act(int wtype, const float[::1] x, uint8_t[::1] xq):
    """Quantize one activation row x into xq (ember_act_row_bytes bytes)."""
    cdef int64_t n = x.shape[0]
    _row_len(wtype, n)
    _check_act(wtype, n, xq.shape[0])
    with nogil:
        ember_quantize_act(wtype, &x[0], &xq[0], n)


def matvec(int wtype, const uint8_t[:, ::1] W, const uint8_t[::1] xq, float[::1] y,
           int64_t n, int64_t r0, int64_t r1):
    """y[r - r0] = dot(W[r], x) for r in [r0, r1); xq from quantize_act."""
    cdef int64_t rb = _row_len(wtype, n)
    if W.shape[1] < rb or not (0 <= r0 <= r1 <= W.shape[0]) or y.shape[0] < r1 - r0:
        raise ValueError("matvec: W, y or the row range do not fit")
    _check_act(wtype, n, xq.shape[0])
    if r1 == r0:
        return
    with nogil:
        ember_matvec(wtype, &W[0, 0], W.strides[0], &xq[0], &y[0], n, r0, r1)


def matmul(int wtype, const uint8_t[:, ::1] W, const uint8_t[:, ::1] Xq, float[:, ::1] Y,
           int64_t n, int64_t r0, int64_t r1):
    """Y[b, r] = dot(W[r], X[b]) for every activation row b and r in [r0, r1)."""
    cdef int64_t rb = _row_len(wtype, n)
    cdef int64_t nb = Xq.shape[0]
    if W.shape[1] < rb or not (0 <= r0 <= r1 <= W.shape[0]) or Y.shape[0] < nb or Y.shape[1] < r1:
        raise ValueError("matmul: W, Y or the row range do not fit")
    _check_act(wtype, n, Xq.shape[1])
    if r1 == r0 or nb == 0:
        return
    with nogil:
        ember_matmul(wtype, &W[0, 0], W.strides[0], &Xq[0, 0], Xq.strides[0],
                     &Y[0, 0], Y.strides[0] // 4, n, nb, r0, r1)


def dequantize_row(int wtype, const uint8_t[::1] x, float[::1] y):
    """Dequantize len(y) values of wtype from bytes x (Q8_K allowed too)."""
    cdef int64_t n = y.shape[0]
    cdef int64_t qk = ember_block_elems(wtype)
    if qk == 0 or n % qk or x.shape[0] < n // qk * <int64_t> ember_block_bytes(wtype):
        raise ValueError(f"dequantize_row: {x.shape[0]} bytes of type {wtype} do not hold {n} values")
    if n == 0:
        return
    with nogil:
        ember_dequantize_row(wtype, &x[0], &y[0], n)


def get_rows(int wtype, const uint8_t[:, ::1] W, const int32_t[::1] ids, float[:, ::1] out):
    """out[i] = dequantized W[ids[i]] (embedding lookup)."""
    cdef int64_t n = out.shape[1]
    cdef int64_t rb = _row_len(wtype, n)
    cdef int64_t i
    if W.shape[1] < rb or out.shape[0] < ids.shape[0] or out.strides[0] != 4 * n:
        raise ValueError("get_rows: W or out do not fit")
    for i in range(ids.shape[0]):
        if ids[i] < 0 or ids[i] >= W.shape[0]:
            raise ValueError(f"get_rows: id {ids[i]} outside [0, {W.shape[0]})")
    if ids.shape[0] == 0:
        return
    with nogil:
        ember_get_rows(wtype, &W[0, 0], W.strides[0], &ids[0], ids.shape[0], &out[0, 0], n)


include "_forward.pxi"
include "_mapguard.pxi"
