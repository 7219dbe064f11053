/* ARM NEON quantized kernels for the hot types: Q4_0, Q8_0, Q4_K, Q6_K, IQ4_XS.
 *
 * Every other type runs the generic kernel (dispatch.c copies the generic
 * table before this file fills its entries). Each kernel is built twice:
 * with the dotprod extension (`sdot`: four int8 products summed into each
 * int32 lane, ARMv8.2, e.g. Cortex-A76 / Pi 5) and without it (widening
 * multiplies `smull` + pairwise accumulate `sadalp`, e.g. Cortex-A72 / Pi 4).
 * The fill function picks one from the CPU's HWCAP, once.
 *
 * Without dotprod, an int16 product of two int8 never overflows (|p| <=
 * 2^14) and pairs are widened to int32 before they are added, so both
 * builds are exact integer math and give identical integer sums.
 */
#include "quants_internal.h"

#if defined(__aarch64__)
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

/* ======================================================================== */
/* Helpers                                                                   */
/* ======================================================================== */

static inline float fp16(ember_fp16_t h) { return ember_fp16_table[h]; }

/* acc + sum of 4-product groups of a*b, without dotprod */
static inline int32x4_t dot16_plain(int32x4_t acc, int8x16_t a, int8x16_t b) {
    const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    const int16x8_t hi = vmull_high_s8(a, b);
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
}

/* 6-bit scales and mins of Q4_K, as bytes: sc[0..7], mn[0..7] */
static inline void k4_unpack(const uint8_t *packed, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 8; j++) ember_scale_min_k4(j, packed, &sc[j], &mn[j]);
}

/* ======================================================================== */
/* Kernels, generated for each dot-product instruction                        */
/* ======================================================================== */

#define NEON_KERNELS(SFX, DOT)                                                          \
                                                                                        \
float ember_vec_dot_q4_0_q8_0_##SFX(int64_t n, const void *vw, const void *vx) {        \
    const block_q4_0 *w = vw;                                                           \
    const block_q8_0 *x = vx;                                                           \
    float32x4_t acc0 = vdupq_n_f32(0), acc1 = vdupq_n_f32(0);                           \
    const int64_t nb = n / QK8_0;                                                       \
    int64_t i = 0;                                                                      \
    for (; i + 2 <= nb; i += 2) {                                                       \
        for (int k = 0; k < 2; k++) {                                                   \
            const uint8x16_t q = vld1q_u8(w[i + k].qs);                                 \
            const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vdupq_n_s8(8)); \
            const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8)); \
            int32x4_t p = DOT(vdupq_n_s32(0), lo, vld1q_s8(x[i + k].qs));               \
            p = DOT(p, hi, vld1q_s8(x[i + k].qs + 16));                                 \
            const float d = fp16(w[i + k].d) * fp16(x[i + k].d);                        \
            if (k == 0) acc0 = vmlaq_n_f32(acc0, vcvtq_f32_s32(p), d);                  \
            else acc1 = vmlaq_n_f32(acc1, vcvtq_f32_s32(p), d);                         \
        }                                                                               \
    }                                                                                   \
    float sum = vaddvq_f32(vaddq_f32(acc0, acc1));                                      \
    if (i < nb) sum += ember_vec_dot_q4_0_q8_0_generic((nb - i) * QK8_0, w + i, x + i); \
    return sum;                                                                         \
}                                                                                       \
                                                                                        \
float ember_vec_dot_q8_0_q8_0_##SFX(int64_t n, const void *vw, const void *vx) {        \
    const block_q8_0 *w = vw;                                                           \
    const block_q8_0 *x = vx;                                                           \
    float32x4_t acc0 = vdupq_n_f32(0), acc1 = vdupq_n_f32(0);                           \
    const int64_t nb = n / QK8_0;                                                       \
    int64_t i = 0;                                                                      \
    for (; i + 2 <= nb; i += 2) {                                                       \
        for (int k = 0; k < 2; k++) {                                                   \
            int32x4_t p = DOT(vdupq_n_s32(0), vld1q_s8(w[i + k].qs), vld1q_s8(x[i + k].qs)); \
            p = DOT(p, vld1q_s8(w[i + k].qs + 16), vld1q_s8(x[i + k].qs + 16));         \
            const float d = fp16(w[i + k].d) * fp16(x[i + k].d);                        \
            if (k == 0) acc0 = vmlaq_n_f32(acc0, vcvtq_f32_s32(p), d);                  \
            else acc1 = vmlaq_n_f32(acc1, vcvtq_f32_s32(p), d);                         \
        }                                                                               \
    }                                                                                   \
    float sum = vaddvq_f32(vaddq_f32(acc0, acc1));                                      \
    if (i < nb) sum += ember_vec_dot_q8_0_q8_0_generic((nb - i) * QK8_0, w + i, x + i); \
    return sum;                                                                         \
}                                                                                       \
                                                                                        \
/* Q4_K: unsigned nibbles fit int8, so one signed dot per 16 values. */                \
float ember_vec_dot_q4_K_q8_K_##SFX(int64_t n, const void *vw, const void *vx) {        \
    const block_q4_K *w = vw;                                                           \
    const block_q8_K *x = vx;                                                           \
    float sum = 0.0f;                                                                   \
    for (int64_t i = 0; i < n / QK_K; i++) {                                            \
        uint8_t sc[8], mn[8];                                                           \
        k4_unpack(w[i].scales, sc, mn);                                                 \
        int summs = 0;                                                                  \
        for (int j = 0; j < 8; j++) summs += mn[j] * (x[i].bsums[2 * j] + x[i].bsums[2 * j + 1]); \
        int sumi = 0;                                                                   \
        for (int j = 0; j < 4; j++) {                                                   \
            const uint8_t *q = w[i].qs + 32 * j;                                        \
            const int8_t *y = x[i].qs + 64 * j;                                         \
            const uint8x16_t b0 = vld1q_u8(q), b1 = vld1q_u8(q + 16);                   \
            const uint8x16_t m4 = vdupq_n_u8(0x0F);                                     \
            int32x4_t pl = DOT(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(b0, m4)), vld1q_s8(y)); \
            pl = DOT(pl, vreinterpretq_s8_u8(vandq_u8(b1, m4)), vld1q_s8(y + 16));      \
            int32x4_t ph = DOT(vdupq_n_s32(0), vreinterpretq_s8_u8(vshrq_n_u8(b0, 4)), vld1q_s8(y + 32)); \
            ph = DOT(ph, vreinterpretq_s8_u8(vshrq_n_u8(b1, 4)), vld1q_s8(y + 48));     \
            sumi += sc[2 * j] * vaddvq_s32(pl) + sc[2 * j + 1] * vaddvq_s32(ph);        \
        }                                                                               \
        sum += x[i].d * fp16(w[i].d) * (float)sumi - x[i].d * fp16(w[i].dmin) * (float)summs; \
    }                                                                                   \
    return sum;                                                                         \
}                                                                                       \
                                                                                        \
/* IQ4_XS: the code book by one table lookup (tbl) per 16 values, then the     \
 * signed dot; the scaled group sums add up exactly, as in the generic twin. */        \
float ember_vec_dot_iq4_xs_q8_K_##SFX(int64_t n, const void *vw, const void *vx) {      \
    const block_iq4_xs *w = vw;                                                         \
    const block_q8_K *x = vx;                                                           \
    const int8x16_t book = vld1q_s8(ember_kvalues_iq4nl);                               \
    const uint8x16_t m4 = vdupq_n_u8(0x0F);                                             \
    float sum = 0.0f;                                                                   \
    for (int64_t i = 0; i < n / QK_K; i++) {                                            \
        int sumi = 0;                                                                   \
        for (int ib = 0; ib < QK_K / 32; ib++) {                                        \
            const uint8x16_t q = vld1q_u8(w[i].qs + 16 * ib);                           \
            const int8_t *y = x[i].qs + 32 * ib;                                        \
            int32x4_t p = DOT(vdupq_n_s32(0), vqtbl1q_s8(book, vandq_u8(q, m4)), vld1q_s8(y)); \
            p = DOT(p, vqtbl1q_s8(book, vshrq_n_u8(q, 4)), vld1q_s8(y + 16));           \
            sumi += ember_iq4xs_scale(&w[i], ib) * vaddvq_s32(p);                       \
        }                                                                               \
        sum += x[i].d * fp16(w[i].d) * (float)sumi;                                     \
    }                                                                                   \
    return sum;                                                                         \
}                                                                                       \
                                                                                        \
/* Q6_K: codes 0..63 shifted to -32..31 before the signed dot. */                       \
float ember_vec_dot_q6_K_q8_K_##SFX(int64_t n, const void *vw, const void *vx) {        \
    const block_q6_K *w = vw;                                                           \
    const block_q8_K *x = vx;                                                           \
    float sum = 0.0f;                                                                   \
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m3 = vdupq_n_u8(0x03);                      \
    const int8x16_t off = vdupq_n_s8(32);                                               \
    for (int64_t i = 0; i < n / QK_K; i++) {                                            \
        const int8_t *sc = w[i].scales;                                                 \
        int sumi = 0;                                                                   \
        for (int half = 0; half < 2; half++) {                                          \
            const uint8_t *ql = w[i].ql + 64 * half, *qh = w[i].qh + 32 * half;         \
            const int8_t *y = x[i].qs + 128 * half;                                     \
            for (int k = 0; k < 2; k++) {   /* 16-byte lanes of ql[0..31] / qh */       \
                const uint8x16_t l0 = vld1q_u8(ql + 16 * k), l1 = vld1q_u8(ql + 32 + 16 * k); \
                const uint8x16_t h = vld1q_u8(qh + 16 * k);                             \
                int8x16_t v[4];                                                         \
                v[0] = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(vandq_u8(h, m3), 4))); \
                v[1] = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h, 2), m3), 4))); \
                v[2] = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h, 4), m3), 4))); \
                v[3] = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(h, 6), 4))); \
                for (int c = 0; c < 4; c++) {                                           \
                    /* chunk c covers values 32c..32c+31 of the half; this lane 16k.. */ \
                    const int32x4_t p = DOT(vdupq_n_s32(0), vsubq_s8(v[c], off), vld1q_s8(y + 32 * c + 16 * k)); \
                    sumi += sc[8 * half + 2 * c + k] * vaddvq_s32(p);                   \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        sum += x[i].d * fp16(w[i].d) * (float)sumi;                                     \
    }                                                                                   \
    return sum;                                                                         \
}                                                                                       \
                                                                                        \
void ember_vec_dot4_q4_0_q8_0_##SFX(int64_t n, const void *vw, const void *vx,          \
                                    size_t xs, float *s) {                              \
    /* the same blocks into the same two accumulators as the 1-row dot: equal bits */   \
    const block_q4_0 *w = vw;                                                           \
    const uint8_t *xb = vx;                                                             \
    const int64_t nb = n / QK8_0;                                                       \
    float32x4_t acc[4][2];                                                              \
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = vdupq_n_f32(0);                 \
    int64_t i = 0;                                                                      \
    for (; i + 2 <= nb; i += 2) {                                                       \
        for (int k = 0; k < 2; k++) {                                                   \
            const uint8x16_t q = vld1q_u8(w[i + k].qs);                                 \
            const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vdupq_n_s8(8));\
            const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));\
            const float dw = fp16(w[i + k].d);                                          \
            for (int r = 0; r < 4; r++) {                                               \
                const block_q8_0 *x = (const block_q8_0 *)(xb + r * xs) + i + k;        \
                int32x4_t p = DOT(vdupq_n_s32(0), lo, vld1q_s8(x->qs));                 \
                p = DOT(p, hi, vld1q_s8(x->qs + 16));                                   \
                acc[r][k] = vmlaq_n_f32(acc[r][k], vcvtq_f32_s32(p), dw * fp16(x->d));  \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    for (int r = 0; r < 4; r++) {                                                       \
        const block_q8_0 *x = (const block_q8_0 *)(xb + r * xs);                        \
        s[r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));                             \
        if (i < nb) s[r] += ember_vec_dot_q4_0_q8_0_generic((nb - i) * QK8_0, w + i, x + i);\
    }                                                                                   \
}                                                                                       \
                                                                                        \
void ember_vec_dot4_q8_0_q8_0_##SFX(int64_t n, const void *vw, const void *vx,          \
                                    size_t xs, float *s) {                              \
    /* the same blocks into the same two accumulators as the 1-row dot: equal bits */   \
    const block_q8_0 *w = vw;                                                           \
    const uint8_t *xb = vx;                                                             \
    const int64_t nb = n / QK8_0;                                                       \
    float32x4_t acc[4][2];                                                              \
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = vdupq_n_f32(0);                 \
    int64_t i = 0;                                                                      \
    for (; i + 2 <= nb; i += 2) {                                                       \
        for (int k = 0; k < 2; k++) {                                                   \
            const int8x16_t lo = vld1q_s8(w[i + k].qs), hi = vld1q_s8(w[i + k].qs + 16);\
            const float dw = fp16(w[i + k].d);                                          \
            for (int r = 0; r < 4; r++) {                                               \
                const block_q8_0 *x = (const block_q8_0 *)(xb + r * xs) + i + k;        \
                int32x4_t p = DOT(vdupq_n_s32(0), lo, vld1q_s8(x->qs));                 \
                p = DOT(p, hi, vld1q_s8(x->qs + 16));                                   \
                acc[r][k] = vmlaq_n_f32(acc[r][k], vcvtq_f32_s32(p), dw * fp16(x->d));  \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    for (int r = 0; r < 4; r++) {                                                       \
        const block_q8_0 *x = (const block_q8_0 *)(xb + r * xs);                        \
        s[r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));                             \
        if (i < nb) s[r] += ember_vec_dot_q8_0_q8_0_generic((nb - i) * QK8_0, w + i, x + i);\
    }                                                                                   \
}

NEON_KERNELS(neon, dot16_plain)

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
static inline int32x4_t dot16_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }
NEON_KERNELS(neon_dotprod, dot16_sdot)
#pragma GCC pop_options

/* ======================================================================== */
/* Table                                                                     */
/* ======================================================================== */

static int has_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__ARM_FEATURE_DOTPROD)
    return 1;
#else
    return 0;
#endif
}

const char *ember_fill_kernels_neon(ember_type_kernels *k, int use_extensions) {
    if (use_extensions && has_dotprod()) {
        k[EMBER_Q4_0].dot = ember_vec_dot_q4_0_q8_0_neon_dotprod;
        k[EMBER_Q4_0].dot4 = ember_vec_dot4_q4_0_q8_0_neon_dotprod;
        k[EMBER_Q8_0].dot = ember_vec_dot_q8_0_q8_0_neon_dotprod;
        k[EMBER_Q8_0].dot4 = ember_vec_dot4_q8_0_q8_0_neon_dotprod;
        k[EMBER_Q4_K].dot = ember_vec_dot_q4_K_q8_K_neon_dotprod;
        k[EMBER_Q6_K].dot = ember_vec_dot_q6_K_q8_K_neon_dotprod;
        k[EMBER_IQ4_XS].dot = ember_vec_dot_iq4_xs_q8_K_neon_dotprod;
        return "neon+dotprod";
    }
    k[EMBER_Q4_0].dot = ember_vec_dot_q4_0_q8_0_neon;
    k[EMBER_Q4_0].dot4 = ember_vec_dot4_q4_0_q8_0_neon;
    k[EMBER_Q8_0].dot = ember_vec_dot_q8_0_q8_0_neon;
    k[EMBER_Q8_0].dot4 = ember_vec_dot4_q8_0_q8_0_neon;
    k[EMBER_Q4_K].dot = ember_vec_dot_q4_K_q8_K_neon;
    k[EMBER_Q6_K].dot = ember_vec_dot_q6_K_q8_K_neon;
    k[EMBER_IQ4_XS].dot = ember_vec_dot_iq4_xs_q8_K_neon;
    return "neon";
}
#endif
