# cython: boundscheck=False, wraparound=False, cdivision=True
"""Thin Cython bindings over the C kernels in kernels/c.

Design: the C functions take raw pointers and never allocate; this layer
checks shapes and hands them typed memoryviews, releasing the GIL around
every call. Inputs may be read-only (weights are mapped read-only), hence
`const` memoryviews.
"""
import numpy as np

from libc.stdint cimport int64_t, uint8_t


cdef extern from "ember_kernels.h":
    ctypedef struct block_q8_0:
        pass
    void ember_dequantize_row_q8_0(const block_q8_0 *x, float *y, int64_t k) nogil


def dequantize_q8_0(const uint8_t[::1] blocks, float[::1] out):
    """Dequantize Q8_0 bytes (n_blocks * 34) into out (n_blocks * 32 floats)."""
    cdef int64_t k = out.shape[0]
    if k % 32 != 0 or blocks.shape[0] != (k // 32) * 34:
        raise ValueError(f"q8_0: {blocks.shape[0]} bytes do not hold {k} values")
    if k == 0:
        return out
    with nogil:
        ember_dequantize_row_q8_0(<const block_q8_0 *> &blocks[0], &out[0], k)
    return out
