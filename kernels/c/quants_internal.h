/* Internal to kernels/c: conversions shared by every ISA file, the per-ISA
 * kernel signatures, and the declarations dispatch.c builds its tables from.
 *
 * Naming follows ggml: ember_vec_dot_<weight>_<act>_<isa> computes one dot
 * product of a weight row with an activation row; ember_vec_dot4_..._<isa>
 * computes it against four activation rows at once so that each weight block
 * is decoded once and used four times (prefill is then compute-bound).
 */
#ifndef EMBER_QUANTS_INTERNAL_H
#define EMBER_QUANTS_INTERNAL_H

#include <string.h>

#include "ember_kernels.h"

/* ======================================================================== */
/* Kernel signatures                                                         */
/* ======================================================================== */

/* dot(w row, x row) over n values; w and x in their block formats */
typedef float (*ember_vec_dot_fn)(int64_t n, const void *w, const void *x);
/* s[j] = dot(w row, x row j) for j < 4; x rows are x_stride bytes apart */
typedef void (*ember_vec_dot4_fn)(int64_t n, const void *w, const void *x, size_t x_stride, float *s);
typedef void (*ember_quantize_fn)(const float *x, void *y, int64_t n);
/* Y[j * ldy + r] = dot(w row r, x row j) for r0 <= r < r1, j < 16; -1 if out of memory */
typedef int (*ember_matmul16_fn)(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1,
                                 const void *x, size_t x_stride, float *Y, int64_t ldy);

/* Y[b * ldy + (r - r0)] = dot(w row r, x row b) for r0 <= r < r1, b < nb: a
 * whole row range at once, for layouts whose rows are not contiguous (the
 * repacked ones); matvec is nb = 1. */
typedef void (*ember_rows_fn)(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1,
                              const void *x, size_t x_stride, int64_t nb, float *Y, int64_t ldy);

typedef struct {
    ember_vec_dot_fn dot;
    ember_vec_dot4_fn dot4;       /* NULL: dispatch calls dot four times */
    ember_quantize_fn quantize;   /* quantizer of this type's activation format */
    ember_matmul16_fn matmul16;   /* NULL: dispatch tiles with dot4 / dot */
    ember_rows_fn rows;           /* set: the type's only product kernel (dot is NULL) */
} ember_type_kernels;

/* ======================================================================== */
/* Scalar conversions (exact, portable; SIMD files use their own intrinsics) */
/* ======================================================================== */

static inline float ember_fp32_from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t ember_fp32_to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

static inline float ember_fp16_to_fp32(ember_fp16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return ember_fp32_from_bits(sign | 0x7f800000u | (mant << 13)); /* inf/nan */
    if (exp != 0) return ember_fp32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
    if (mant == 0) return ember_fp32_from_bits(sign);
    /* subnormal half: renormalize into a normal float (exactly representable) */
    exp = 113;
    while (!(mant & 0x400u)) { mant <<= 1; exp--; }
    return ember_fp32_from_bits(sign | (exp << 23) | ((mant & 0x3ffu) << 13));
}

/* Round-to-nearest-even f32 -> f16, the same result as F16C/vcvt. */
static inline ember_fp16_t ember_fp32_to_fp16(float f) {
    const uint32_t x = ember_fp32_to_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (ember_fp16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u) return (ember_fp16_t)(sign | 0x7c00u);          /* overflow -> inf */
    if (ax < 0x38800000u) {                                                /* subnormal half */
        /* adding 0.5 (as float) lets the FPU do the RNE shift for us */
        const float v = ember_fp32_from_bits(ax) + 0.5f;
        return (ember_fp16_t)(sign | (ember_fp32_to_bits(v) - 0x3f000000u));
    }
    const uint32_t odd = (ax >> 13) & 1u;
    return (ember_fp16_t)(sign | ((ax + 0xc8000fffu + odd) >> 13));       /* rebias + RNE */
}

static inline float ember_bf16_to_fp32(ember_bf16_t h) { return ember_fp32_from_bits((uint32_t)h << 16); }

/* round half to even, like llama.cpp's nearest_int for |v| < 2^22 */
static inline int ember_nearest_int(float v) {
    const float big = v + 12582912.f;
    return (int)(ember_fp32_to_bits(big) & 0x007fffff) - 0x00400000;
}

/* 6-bit scale j and min j of a Q4_K/Q5_K super-block (8 of each, packed in 12 bytes) */
static inline void ember_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

/* 16 signed 6-bit Q3_K scales (value - 32) from their 12-byte packing.
 * Scale i: low 4 bits from byte i (i < 8) or the high nibble of byte i-8;
 * high 2 bits are bits 2*(i/4) of byte 8 + i%4. Four at a time in u32s. */
static inline void ember_q3k_scales(const uint8_t *s, int8_t out[16]) {
    uint32_t a[3], u[4];
    memcpy(a, s, 12);
    const uint32_t m2 = 0x03030303u, m4 = 0x0f0f0f0fu;
    u[0] = (a[0] & m4) | (((a[2] >> 0) & m2) << 4);
    u[1] = (a[1] & m4) | (((a[2] >> 2) & m2) << 4);
    u[2] = ((a[0] >> 4) & m4) | (((a[2] >> 4) & m2) << 4);
    u[3] = ((a[1] >> 4) & m4) | (((a[2] >> 6) & m2) << 4);
    uint8_t b[16];
    memcpy(b, u, 16);
    for (int i = 0; i < 16; i++) out[i] = (int8_t)(b[i] - 32);
}

/* 6-bit scale of 32-value group ib of an IQ4_XS super-block, bias 32 removed */
static inline int ember_iq4xs_scale(const block_iq4_xs *b, int ib) {
    const int lo = (b->scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
    const int hi = (b->scales_h >> (2 * ib)) & 3;
    return (lo | (hi << 4)) - 32;
}

extern const int8_t ember_kvalues_iq4nl[16];

/* fp16 bit pattern -> f32, filled once at load (dispatch.c). A table load is
 * cheaper than a scalar F16C conversion (which needs a GPR->XMM move) and
 * SIMD kernels broadcast straight from it; it stays in L2. */
extern float ember_fp16_table[1 << 16];

/* ======================================================================== */
/* Q8_0 activation aux area (see ember_kernels.h)                            */
/* ======================================================================== */

static inline size_t ember_q8_0_aux_bytes(int64_t n) { return (size_t)(n / QK8_0) * 96; }
static inline const float *ember_q8_0_dx8(const void *xq, int64_t n) {
    return (const float *)((const uint8_t *)xq + (n / QK8_0) * sizeof(block_q8_0));
}
static inline const int32_t *ember_q8_0_corr(const void *xq, int64_t n) {
    return (const int32_t *)((const uint8_t *)xq + (n / QK8_0) * (sizeof(block_q8_0) + 32));
}
static inline const int8_t *ember_q8_0_qs(const void *xq, int64_t n) {
    return (const int8_t *)((const uint8_t *)xq + (n / QK8_0) * (sizeof(block_q8_0) + 64));
}
/* write the aux area of a quantized Q8_0 row for weights with code bias `bias` */
void ember_q8_0_fill_aux(void *xq, int64_t n, int bias);

/* ======================================================================== */
/* Portable kernels (quants_generic.c)                                       */
/* ======================================================================== */

void ember_quantize_row_q8_0_generic(const float *x, void *y, int64_t n);
void ember_quantize_row_q8_K_generic(const float *x, void *y, int64_t n);
void ember_quantize_row_f32_generic(const float *x, void *y, int64_t n);
void ember_quantize_row_q8_0_avx2(const float *x, void *y, int64_t n);
void ember_quantize_row_q8_K_avx2(const float *x, void *y, int64_t n);

void ember_dequantize_row_generic(int wtype, const void *x, float *y, int64_t n);

float ember_vec_dot_q4_0_q8_0_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q4_1_q8_0_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q5_0_q8_0_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q5_1_q8_0_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q8_0_q8_0_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_iq4_nl_q8_0_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_iq4_xs_q8_K_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q2_K_q8_K_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q3_K_q8_K_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q4_K_q8_K_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q5_K_q8_K_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_q6_K_q8_K_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_f32_f32_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_f16_f32_generic(int64_t n, const void *w, const void *x);
float ember_vec_dot_bf16_f32_generic(int64_t n, const void *w, const void *x);

/* repacked layouts (repack.c): the portable kernels, and one row of a 16-row
 * group (wg = the group's first byte, j < 16) for the SIMD kernels' partial groups */
void ember_rows_q4_0_r16_generic(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1,
                                 const void *x, size_t xs, int64_t nb, float *Y, int64_t ldy);
void ember_rows_q8_0_r16_generic(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1,
                                 const void *x, size_t xs, int64_t nb, float *Y, int64_t ldy);
void ember_rows_q4_K_r16_generic(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1,
                                 const void *x, size_t xs, int64_t nb, float *Y, int64_t ldy);
float ember_row_q4_0_r16(int64_t n, const uint8_t *wg, int j, const void *xq);
float ember_row_q4_K_r16(int64_t n, const uint8_t *wg, int j, const void *xq);
float ember_row_q8_0_r16(int64_t n, const uint8_t *wg, int j, const void *xq);

/* ======================================================================== */
/* Per-ISA tables (each quants_<isa>.c fills the entries it implements)      */
/* ======================================================================== */

/* Fill kernels[wtype] for the types this ISA accelerates; leave the rest.
 * use_extensions = 0 skips optional extensions (VNNI, dotprod) even where the
 * CPU has them, so tests can run the plain build too. Returns the variant
 * name ("avx512+vnni", "neon", ...). */
void ember_fill_kernels_generic(ember_type_kernels *k);
void ember_fill_kernels_avx2(ember_type_kernels *k);
/* repacked layouts (repack*.c); they return a mask, bit (R16 type -
 * EMBER_Q4_0_R16) set where the ISA computes that layout faster than the
 * file's (dispatch.c then repacks it by default) */
int ember_fill_repacked_generic(ember_type_kernels *k);
int ember_fill_repacked_avx2(ember_type_kernels *k);
int ember_fill_repacked_avx512(ember_type_kernels *k, int use_extensions);
int ember_fill_repacked_neon(ember_type_kernels *k, int use_extensions);
const char *ember_fill_kernels_avx512(ember_type_kernels *k, int use_extensions);
const char *ember_fill_kernels_neon(ember_type_kernels *k, int use_extensions);

#endif
