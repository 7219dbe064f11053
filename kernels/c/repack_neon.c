/* NEON (dotprod) kernels for the repacked 16-row layouts, Q4_0 and Q8_0 (see repack.c).
 *
 * A 128-bit register holds a quarter of a piece: 4 codes of 4 rows, one row
 * per int32 lane. `sdot` by lane (vdotq_laneq_s32) multiplies it by one
 * 4-code group of the activation held in a register, so a 16-byte activation
 * load serves 4 groups and no broadcast is needed. Codes are made signed
 * (Q4_0: nibble - 8; Q8_0 already is), so the sums need no offset term.
 * Per 16 row-blocks: 16 loads and 32 sdot (Q4_0), then 4 cvt + mul + fma.
 *
 * Order: the one repack.c documents; results equal the portable twin's bit
 * for bit (vfmaq_f32 is fused like fmaf). Without dotprod the portable twin
 * runs (the plain NEON build keeps the file's layout).
 *
 * Not preferred by default yet (ember_fill_repacked_neon returns 0): the
 * kernels are checked under qemu (tests/kernels/neon), but their speed
 * against the file layout's NEON kernels has not been measured on an ARM
 * machine; repack="on" uses them.
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

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")

#define R16 EMBER_REPACK_ROWS

static inline int8x16_t lo_q4(uint8x16_t q) {
    return vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
}
static inline int8x16_t hi_q4(uint8x16_t q) {
    return vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
}

/* exact block sums of rows 4qd..4qd+3: qs = the block's pieces, x = its 32 codes */
static inline int32x4_t isum4_q4_0_r16(const uint8_t *qs, int qd, int8x16_t xl, int8x16_t xh) {
    const uint8_t *q = qs + 16 * qd;
    const uint8x16_t p0 = vld1q_u8(q), p1 = vld1q_u8(q + 64), p2 = vld1q_u8(q + 128), p3 = vld1q_u8(q + 192);
    int32x4_t a = vdupq_n_s32(0), b = vdupq_n_s32(0);
    a = vdotq_laneq_s32(a, lo_q4(p0), xl, 0);
    b = vdotq_laneq_s32(b, hi_q4(p0), xh, 0);
    a = vdotq_laneq_s32(a, lo_q4(p1), xl, 1);
    b = vdotq_laneq_s32(b, hi_q4(p1), xh, 1);
    a = vdotq_laneq_s32(a, lo_q4(p2), xl, 2);
    b = vdotq_laneq_s32(b, hi_q4(p2), xh, 2);
    a = vdotq_laneq_s32(a, lo_q4(p3), xl, 3);
    b = vdotq_laneq_s32(b, hi_q4(p3), xh, 3);
    return vaddq_s32(a, b);
}

static inline int32x4_t isum4_q8_0_r16(const uint8_t *qs, int qd, int8x16_t xl, int8x16_t xh) {
    const int8_t *q = (const int8_t *)qs + 16 * qd;
    int32x4_t a = vdupq_n_s32(0), b = vdupq_n_s32(0);
    a = vdotq_laneq_s32(a, vld1q_s8(q), xl, 0);
    b = vdotq_laneq_s32(b, vld1q_s8(q + 64), xl, 1);
    a = vdotq_laneq_s32(a, vld1q_s8(q + 128), xl, 2);
    b = vdotq_laneq_s32(b, vld1q_s8(q + 192), xl, 3);
    a = vdotq_laneq_s32(a, vld1q_s8(q + 256), xh, 0);
    b = vdotq_laneq_s32(b, vld1q_s8(q + 320), xh, 1);
    a = vdotq_laneq_s32(a, vld1q_s8(q + 384), xh, 2);
    b = vdotq_laneq_s32(b, vld1q_s8(q + 448), xh, 3);
    return vaddq_s32(a, b);
}

/* one group against one activation row: 16 results at y */
#define GROUP_NEON(name, bsz)                                                            \
static void group_##name(int64_t n, const uint8_t *wg, const uint8_t *xq, float *y) {   \
    const int64_t nblk = n / QK8_0;                                                     \
    const int8_t *x = ember_q8_0_qs(xq, n);                                             \
    const float *dx8 = ember_q8_0_dx8(xq, n);                                           \
    float32x4_t A[4][4];                                                                \
    for (int qd = 0; qd < 4; qd++)                                                      \
        for (int c = 0; c < 4; c++) A[qd][c] = vdupq_n_f32(0);                          \
    for (int64_t b = 0; b < nblk; b++) {                                                \
        const uint8_t *wb = wg + (size_t)b * R16 * (bsz);                               \
        const int8x16_t xl = vld1q_s8(x + 32 * b), xh = vld1q_s8(x + 32 * b + 16);      \
        const float32x4_t dx = vdupq_n_f32(dx8[8 * b]);                                 \
        for (int qd = 0; qd < 4; qd++) {                                                \
            const int32x4_t is = isum4_##name(wb + 2 * R16, qd, xl, xh);                \
            const float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)wb + 4 * qd))); \
            A[qd][b & 3] = vfmaq_f32(A[qd][b & 3], vcvtq_f32_s32(is), vmulq_f32(dw, dx)); \
        }                                                                               \
    }                                                                                   \
    for (int qd = 0; qd < 4; qd++)                                                      \
        vst1q_f32(y + 4 * qd, vaddq_f32(vaddq_f32(A[qd][0], A[qd][1]), vaddq_f32(A[qd][2], A[qd][3]))); \
}                                                                                       \
                                                                                        \
static void rows_##name##_neon(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1, \
                               const void *x, size_t xs, int64_t nb, float *Y, int64_t ldy) { \
    const uint8_t *W = w, *X = x;                                                       \
    const size_t gbytes = R16 * row_bytes;                                              \
    for (int64_t a = 0; a < nb; a++) {                                                  \
        const uint8_t *xa = X + a * xs;                                                 \
        float *ya = Y + a * ldy;                                                        \
        int64_t r = r0;                                                                 \
        for (; r < r1 && (r % R16 || r + R16 > r1); r++)   /* partial groups: row by row */ \
            ya[r - r0] = ember_row_##name(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16), xa); \
        for (; r + R16 <= r1; r += R16) group_##name(n, W + (size_t)(r / R16) * gbytes, xa, ya + (r - r0)); \
        for (; r < r1; r++)                                                             \
            ya[r - r0] = ember_row_##name(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16), xa); \
    }                                                                                   \
}

GROUP_NEON(q4_0_r16, sizeof(block_q4_0))
GROUP_NEON(q8_0_r16, sizeof(block_q8_0))

#pragma GCC pop_options

static int has_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return 0;
#endif
}

int ember_fill_repacked_neon(ember_type_kernels *k, int use_extensions) {
    if (use_extensions && has_dotprod()) {
        k[EMBER_Q4_0_R16].rows = rows_q4_0_r16_neon;
        k[EMBER_Q8_0_R16].rows = rows_q8_0_r16_neon;
    }
    return 0;   /* not measured on ARM hardware yet: the file layout stays the default */
}

#else
int ember_fill_repacked_neon(ember_type_kernels *k, int use_extensions) {
    (void)k; (void)use_extensions;
    return 0;
}
#endif
