/* AVX2 kernels for the repacked 16-row layouts (see repack.c).
 *
 * A 256-bit register holds half a piece: 4 codes of 8 rows, one row per
 * int32 lane. Each half-group (8 rows) is done on its own (16 ymm registers
 * do not hold 16 unpacked pieces): maddubs multiplies the u8 weights by a
 * broadcast 4-code activation group into int16 pairs, madd sums the pairs to
 * the rows' int32 block sums. Q4_0 (raw nibbles, offset 8 paid by the aux
 * corr) sums its 8 maddubs results in int16 first (8 * 2 * 15 * 127 = 30480
 * fits); Q8_0 moves the weights' sign onto the activation (|w| * sign(x, w))
 * and needs a madd per piece (2 * 128 * 127 = 32512 fits one pair, not two).
 *
 * Order: the one repack.c documents; results equal the portable twin's bit
 * for bit.
 */
#include "quants_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#define R16 EMBER_REPACK_ROWS

static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

static inline __m256i bcast4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

/* -bias * sum of the block's 32 codes: the aux corr summed (Q4_0's offset 8) */
static inline int32_t block_corr(const int32_t *corr) {
    int32_t s = 0;
    for (int l = 0; l < 8; l++) s += corr[l];
    return s;
}

/* exact block sums of 8 rows: qs = the half's first piece (pieces 64 bytes apart) */
static inline __m256i isum8_q4_0_r16(const uint8_t *qs, const int8_t *x, const int32_t *corr) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    __m256i s16 = _mm256_setzero_si256();
    for (int p = 0; p < 4; p++) {
        const __m256i q = load256(qs + 64 * p);
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(q, m), bcast4(x + 4 * p)));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m),
                                                         bcast4(x + 16 + 4 * p)));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)), _mm256_set1_epi32(block_corr(corr)));
}

static inline __m256i isum8_q8_0_r16(const uint8_t *qs, const int8_t *x, const int32_t *corr) {
    (void)corr;
    __m256i s = _mm256_setzero_si256();
    for (int p = 0; p < 8; p++) {
        const __m256i q = load256(qs + 64 * p);
        const __m256i pr = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(bcast4(x + 4 * p), q));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(pr, _mm256_set1_epi16(1)));
    }
    return s;
}

/* rows 8h..8h+7 of one group against one activation row: 8 results at y */
#define HALF_FN(name, bsz)                                                               \
static void half_##name(int64_t n, const uint8_t *wg, int h, const uint8_t *xq, float *y) { \
    const int64_t nblk = n / QK8_0;                                                     \
    const int8_t *x = ember_q8_0_qs(xq, n);                                             \
    const float *dx8 = ember_q8_0_dx8(xq, n);                                           \
    const int32_t *corr = ember_q8_0_corr(xq, n);                                       \
    __m256 A[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
    for (int64_t b = 0; b < nblk; b++) {                                                \
        const uint8_t *wb = wg + (size_t)b * R16 * (bsz);                               \
        const __m256i is = isum8_##name(wb + 2 * R16 + 32 * h, x + 32 * b, corr + 8 * b); \
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wb + 16 * h))); \
        const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(dx8[8 * b]));                \
        A[b & 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), sc, A[b & 3]);               \
    }                                                                                   \
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_add_ps(A[0], A[1]), _mm256_add_ps(A[2], A[3]))); \
}                                                                                       \
                                                                                        \
static void rows_##name##_avx2(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1, \
                               const void *x, size_t xs, int64_t nb, float *Y, int64_t ldy) { \
    const uint8_t *W = w, *X = x;                                                       \
    const size_t gbytes = R16 * row_bytes;                                              \
    for (int64_t a = 0; a < nb; a++) {                                                  \
        const uint8_t *xa = X + a * xs;                                                 \
        float *ya = Y + a * ldy;                                                   \
        int64_t r = r0;                                                                 \
        for (; r < r1 && (r % 8 || r + 8 > r1); r++)   /* partial half-groups: row by row */ \
            ya[r - r0] = ember_row_##name(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16), xa); \
        for (; r + 8 <= r1; r += 8) {                                                   \
            half_##name(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16) / 8, xa, ya + (r - r0)); \
        }                                                                               \
        for (; r < r1; r++)                                                             \
            ya[r - r0] = ember_row_##name(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16), xa); \
    }                                                                                   \
}

HALF_FN(q4_0_r16, sizeof(block_q4_0))
HALF_FN(q8_0_r16, sizeof(block_q8_0))

#pragma GCC pop_options

int ember_fill_repacked_avx2(ember_type_kernels *k) {
    k[EMBER_Q4_0_R16].rows = rows_q4_0_r16_avx2;
    k[EMBER_Q4_0_R16].quantize = k[EMBER_Q4_0].quantize;
    k[EMBER_Q8_0_R16].rows = rows_q8_0_r16_avx2;
    k[EMBER_Q8_0_R16].quantize = k[EMBER_Q8_0].quantize;
    k[EMBER_Q4_K_R16].quantize = k[EMBER_Q4_K].quantize;   /* rows: the portable twin (no AVX2 kernel) */
    /* measured side by side (5632 x 2048, 1 thread, Zen 5 as AVX2): Q4_0 decode
     * 5.5 -> 37.6 GB/s and 64-row prefill 66 -> 49 ms; Q8_0 decode 9.6 -> 33
     * GB/s but prefill 57 -> 94 ms (a madd per piece), so Q8_0 stays as filed */
    return 1 << (EMBER_Q4_0_R16 - EMBER_Q4_0_R16);
}

#else
int ember_fill_repacked_avx2(ember_type_kernels *k) {
    (void)k;
    return 0;
}
#endif
