/* AVX-512 VNNI kernels for the repacked 16-row layouts (see repack.c).
 *
 * One 16-row group, block b: the pieces are loaded as they lie (Q4_0: 4
 * registers, split into low and high nibbles = 8; Q8_0: 8 registers made
 * offset binary), then for each activation row 8 vpdpbusd against a broadcast
 * 4-code group finish the 16 rows' exact block sums (the activation's aux
 * corr, summed per block, seeds them and removes the code offset), and one
 * cvt + mul + fma scales them with the 16 row scales (one 32-byte F16C load).
 * Per 16 row-blocks that is ~12 unpack + 8 dot + 4 float uops for decode,
 * against ~35 per 4 row-blocks in the file layout: decode stops being bound
 * by the arithmetic.
 *
 * Prefill takes the activation rows 4 at a time per group: the unpacked
 * pieces stay in registers while 4 rows pass (16 accumulators), and the group
 * (16 rows x n/32 blocks) is re-read from L1/L2 for the next 4.
 *
 * Order: the one repack.c documents (four fma chains by block index), so
 * these results equal the portable twin's and the file-layout VNNI kernels'
 * bit for bit, for matvec and matmul alike.
 */
#include <stdlib.h>

#include "quants_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include <immintrin.h>

#define R16 EMBER_REPACK_ROWS
#define TILE 4   /* activation rows per pass over a group */

/* ======================================================================== */
/* Per-call activation facts                                                 */
/* ======================================================================== */

/* csum[a][b]: the activation's aux corr summed over block b (-bias * sum of its
 * 32 codes), one int per (row, block) instead of 8 reloaded per group. A
 * per-thread buffer that grows once to the largest call, never per call after. */
static __thread int32_t *csum_buf;
static __thread int64_t csum_cap;

static const int32_t *block_corr(const uint8_t *X, size_t xs, int64_t nb, int64_t n) {
    const int64_t nblk = n / QK8_0, need = nb * nblk;
    if (need > csum_cap) {
        int32_t *p = aligned_alloc(64, (size_t)((need + 15) / 16 * 16) * sizeof(int32_t));
        if (!p) return NULL;
        free(csum_buf);
        csum_buf = p;
        csum_cap = need;
    }
    for (int64_t a = 0; a < nb; a++) {
        const int32_t *corr = ember_q8_0_corr(X + a * xs, n);
        for (int64_t b = 0; b < nblk; b++) {
            const __m256i c = _mm256_loadu_si256((const __m256i *)(corr + 8 * b));
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            csum_buf[a * nblk + b] = _mm_cvtsi128_si32(s);
        }
    }
    return csum_buf;
}

/* ======================================================================== */
/* Weight pieces                                                             */
/* ======================================================================== */

static inline __m512i load512(const void *p) { return _mm512_loadu_si512(p); }

/* u[k]: codes 4k..4k+3 of the 16 rows as u8 (Q4_0: raw nibbles, offset 8) */
static inline void pieces_q4_0(const uint8_t *qs, __m512i u[8]) {
    const __m512i m = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 4; p++) {
        const __m512i q = load512(qs + 64 * p);
        u[p] = _mm512_and_si512(q, m);
        u[p + 4] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m);
    }
}

/* Q8_0: offset binary (w + 128), the aux corr removes the 128 */
static inline void pieces_q8_0(const uint8_t *qs, __m512i u[8]) {
    for (int p = 0; p < 8; p++) u[p] = _mm512_xor_si512(load512(qs + 64 * p), _mm512_set1_epi8((char)0x80));
}

/* Decode streams the weights once: while a group computes, ask for the same
 * block of the next group (one group ahead, each line once). The hardware
 * prefetcher stops at 4 KiB pages; the file layout's matvec does the same
 * one row ahead (dispatch.c). */
static inline void prefetch_block(const uint8_t *next, size_t bytes) {
    if (!next) return;
    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)next + o, _MM_HINT_T0);
}

/* 4 activation codes as one int32, broadcast to 16 lanes (a load-port uop) */
static inline __m512i bcast4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm512_set1_epi32(v);
}

/* exact block sums of the 16 rows against one activation block (codes x) */
static inline __m512i isum16(const __m512i u[8], const int8_t *x, int32_t corr) {
    __m512i i0 = _mm512_set1_epi32(corr), i1 = _mm512_setzero_si512();
    for (int k = 0; k < 8; k += 2) {   /* two int chains: half the latency */
        i0 = _mm512_dpbusd_epi32(i0, u[k], bcast4(x + 4 * k));
        i1 = _mm512_dpbusd_epi32(i1, u[k + 1], bcast4(x + 4 * k + 4));
    }
    return _mm512_add_epi32(i0, i1);
}

#define PIECES_q4_0_r16 pieces_q4_0
#define PIECES_q8_0_r16 pieces_q8_0

/* ======================================================================== */
/* Kernels                                                                   */
/* ======================================================================== */

/* One group against T activation rows: Y[t * ldy + j] for rows j < 16.
 * always_inline with a constant T: the 4T accumulators live in registers. */
#define GROUP_FN(name, bsz)                                                              \
static inline __attribute__((always_inline)) void group_##name(                         \
        int64_t n, const uint8_t *wg, const uint8_t *next, const uint8_t *X, size_t xs, \
        const int32_t *csum, int T, float *Y, int64_t ldy) {                            \
    const int64_t nblk = n / QK8_0;                                                     \
    __m512 A[TILE][4];                                                                  \
    const int8_t *xqs[TILE];                                                            \
    const float *dx8[TILE];                                                             \
    for (int t = 0; t < T; t++) {                                                       \
        for (int c = 0; c < 4; c++) A[t][c] = _mm512_setzero_ps();                      \
        xqs[t] = ember_q8_0_qs(X + t * xs, n);                                          \
        dx8[t] = ember_q8_0_dx8(X + t * xs, n);                                         \
    }                                                                                   \
    for (int64_t b = 0; b < nblk; b++) {                                                \
        const uint8_t *wb = wg + (size_t)b * R16 * (bsz);                               \
        prefetch_block(next ? next + (size_t)b * R16 * (bsz) : NULL, R16 * (bsz));      \
        __m512i u[8];                                                                   \
        PIECES_##name(wb + 2 * R16, u);                                                 \
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)wb));     \
        for (int t = 0; t < T; t++) {                                                   \
            const __m512i is = isum16(u, xqs[t] + 32 * b, csum[t * nblk + b]);          \
            const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(dx8[t][8 * b]));         \
            A[t][b & 3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), sc, A[t][b & 3]);     \
        }                                                                               \
    }                                                                                   \
    for (int t = 0; t < T; t++)                                                         \
        _mm512_storeu_ps(Y + t * ldy, _mm512_add_ps(_mm512_add_ps(A[t][0], A[t][1]),    \
                                                    _mm512_add_ps(A[t][2], A[t][3])));  \
}                                                                                       \
                                                                                        \
static void rows_##name##_avx512vnni(int64_t n, const void *w, size_t row_bytes, int64_t r0, \
                                     int64_t r1, const void *x, size_t xs, int64_t nb,  \
                                     float *Y, int64_t ldy) {                           \
    const uint8_t *W = w, *X = x;                                                       \
    const size_t gbytes = R16 * row_bytes;                                              \
    const int32_t *csum = block_corr(X, xs, nb, n);                                     \
    if (!csum) {   /* out of memory for 4 bytes a block: the portable twin needs none */ \
        ember_rows_##name##_generic(n, w, row_bytes, r0, r1, x, xs, nb, Y, ldy);        \
        return;                                                                         \
    }                                                                                   \
    const int64_t nblk = n / QK8_0;                                                     \
    int64_t r = r0;                                                                     \
    for (; r < r1 && r % R16; r++)   /* a partial first group: row by row */            \
        for (int64_t a = 0; a < nb; a++)                                                \
            Y[a * ldy + (r - r0)] = ember_row_##name(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16), X + a * xs); \
    for (; r + R16 <= r1; r += R16) {                                                   \
        const uint8_t *wg = W + (size_t)(r / R16) * gbytes;                             \
        int64_t a = 0;                                                                  \
        const uint8_t *next = nb == 1 && r + 2 * R16 <= r1 ? wg + gbytes : NULL;        \
        for (; a + TILE <= nb; a += TILE)                                               \
            group_##name(n, wg, NULL, X + a * xs, xs, csum + a * nblk, TILE, Y + a * ldy + (r - r0), ldy); \
        for (; a < nb; a++)                                                             \
            group_##name(n, wg, next, X + a * xs, xs, csum + a * nblk, 1, Y + a * ldy + (r - r0), ldy); \
    }                                                                                   \
    for (; r < r1; r++)              /* a partial last group */                         \
        for (int64_t a = 0; a < nb; a++)                                                \
            Y[a * ldy + (r - r0)] = ember_row_##name(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16), X + a * xs); \
}

GROUP_FN(q4_0_r16, sizeof(block_q4_0))
GROUP_FN(q8_0_r16, sizeof(block_q8_0))

/* ------------------------------------------------------------------------ */
/* Q4_K                                                                      */
/* ------------------------------------------------------------------------ */

/* Per act row and super-block, from the Q8_K row: the 8 sub-block code sums as
 * int16 pairs (bsum_j, bsum_{j+2}) for the madd against (m_j, m_{j+2}) --
 * the pairing the mins' byte lanes give without a shuffle. */
typedef struct { int32_t bs[4]; } k4_bsums;

static __thread k4_bsums *k4bs_buf;
static __thread int64_t k4bs_cap;

static const k4_bsums *k4_block_sums(const uint8_t *X, size_t xs, int64_t nb, int64_t nsb) {
    const int64_t need = nb * nsb;
    if (need > k4bs_cap) {
        k4_bsums *p = aligned_alloc(64, (size_t)((need + 3) / 4 * 4) * sizeof(k4_bsums));
        if (!p) return NULL;
        free(k4bs_buf);
        k4bs_buf = p;
        k4bs_cap = need;
    }
    for (int64_t a = 0; a < nb; a++) {
        const block_q8_K *x = (const block_q8_K *)(X + a * xs);
        for (int64_t i = 0; i < nsb; i++) {
            int16_t b[8];
            for (int j = 0; j < 8; j++) b[j] = (int16_t)(x[i].bsums[2 * j] + x[i].bsums[2 * j + 1]);
            /* pair q: bytes (k, k+2) of a dword of 4 mins -> (m_{4h+k}, m_{4h+k+2}), q = 2h + k */
            for (int h = 0; h < 2; h++)
                for (int k = 0; k < 2; k++)
                    k4bs_buf[a * nsb + i].bs[2 * h + k] =
                        (int32_t)((uint32_t)(uint16_t)b[4 * h + k] | (uint32_t)(uint16_t)b[4 * h + k + 2] << 16);
        }
    }
    return k4bs_buf;
}

/* 16 rows' 6-bit scales and mins from their 3 packed dwords (lane-wise
 * k4_scales_mins): sm[0] = sc 0..3, sm[1] = sc 4..7, sm[2] = m 0..3, sm[3] = m 4..7 */
static inline void k4_sm16(const uint8_t *p, __m512i sm[4]) {
    const __m512i a0 = load512(p), a1 = load512(p + 64), a2 = load512(p + 128);
    const __m512i m1 = _mm512_set1_epi32(0x3f3f3f3f), m2 = _mm512_set1_epi32(0x0f0f0f0f), m3 = _mm512_set1_epi32(0x03030303);
    sm[0] = _mm512_and_si512(a0, m1);
    sm[1] = _mm512_or_si512(_mm512_and_si512(a2, m2), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a0, 6), m3), 4));
    sm[2] = _mm512_and_si512(a1, m1);
    sm[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(a2, 4), m2), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a1, 6), m3), 4));
}

/* byte k of each lane of v, as int32 */
static inline __m512i byte_lane(__m512i v, int k) {
    return _mm512_and_si512(_mm512_srli_epi32(v, 8 * k), _mm512_set1_epi32(0xFF));
}

#define Q4K_BYTES sizeof(block_q4_K)
#define Q4K_PF_AHEAD 4096

static inline __attribute__((always_inline)) void group_q4_K_r16(
        int64_t n, const uint8_t *wg, const uint8_t *next, const uint8_t *X, size_t xs,
        const k4_bsums *bsp, int T, float *Y, int64_t ldy) {
    const int64_t nsb = n / QK_K;
    __m512 A[TILE][4], M[TILE][4];
    const block_q8_K *x[TILE];
    for (int t = 0; t < T; t++) {
        for (int c = 0; c < 4; c++) A[t][c] = M[t][c] = _mm512_setzero_ps();
        x[t] = (const block_q8_K *)(X + t * xs);
    }
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    for (int64_t i = 0; i < nsb; i++) {
        const uint8_t *wb = wg + (size_t)i * R16 * Q4K_BYTES;
        __m512i sm[4];
        k4_sm16(wb + 4 * R16, sm);
        __m512i sumi[TILE];
        for (int t = 0; t < T; t++) sumi[t] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {   /* chunk c: sub-blocks 2c (low nibbles), 2c + 1 (high) */
            /* a super-block is 36 lines: spread its prefetch over the chunks, 4 KiB ahead */
            if (next) prefetch_block(wb + Q4K_PF_AHEAD + c * (R16 * Q4K_BYTES / 4), R16 * Q4K_BYTES / 4);
            __m512i lo[8], hi[8];
            for (int k = 0; k < 8; k++) {
                const __m512i q = load512(wb + 4 * R16 + 64 * (3 + 8 * c + k));
                lo[k] = _mm512_and_si512(q, lo4);
                hi[k] = _mm512_and_si512(_mm512_srli_epi16(q, 4), lo4);
            }
            const __m512i s0 = byte_lane(sm[(2 * c) / 4], (2 * c) % 4), s1 = byte_lane(sm[(2 * c + 1) / 4], (2 * c + 1) % 4);
            for (int t = 0; t < T; t++) {
                const int8_t *q0 = x[t][i].qs + 64 * c, *q1 = q0 + 32;
                __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
                __m512i h0 = _mm512_setzero_si512(), h1 = _mm512_setzero_si512();
                for (int k = 0; k < 8; k += 2) {
                    i0 = _mm512_dpbusd_epi32(i0, lo[k], bcast4(q0 + 4 * k));
                    i1 = _mm512_dpbusd_epi32(i1, lo[k + 1], bcast4(q0 + 4 * k + 4));
                    h0 = _mm512_dpbusd_epi32(h0, hi[k], bcast4(q1 + 4 * k));
                    h1 = _mm512_dpbusd_epi32(h1, hi[k + 1], bcast4(q1 + 4 * k + 4));
                }
                sumi[t] = _mm512_add_epi32(sumi[t], _mm512_mullo_epi32(_mm512_add_epi32(i0, i1), s0));
                sumi[t] = _mm512_add_epi32(sumi[t], _mm512_mullo_epi32(_mm512_add_epi32(h0, h1), s1));
            }
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)wb));
        const __m512 dm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wb + 2 * R16)));
        const __m512i mask16 = _mm512_set1_epi32(0x00FF00FF);
        const __m512i mp[4] = {   /* (m_j, m_{j+2}) int16 pairs, j = 0, 1, 4, 5 */
            _mm512_and_si512(sm[2], mask16), _mm512_and_si512(_mm512_srli_epi32(sm[2], 8), mask16),
            _mm512_and_si512(sm[3], mask16), _mm512_and_si512(_mm512_srli_epi32(sm[3], 8), mask16)};
        for (int t = 0; t < T; t++) {
            const k4_bsums *b = &bsp[t * nsb + i];
            __m512i summ = _mm512_setzero_si512();
            for (int q = 0; q < 4; q++) summ = _mm512_add_epi32(summ, _mm512_madd_epi16(mp[q], _mm512_set1_epi32(b->bs[q])));
            const __m512 dx = _mm512_set1_ps(x[t][i].d);
            A[t][i & 3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[t]), _mm512_mul_ps(dx, dw), A[t][i & 3]);
            M[t][i & 3] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dx, dm), M[t][i & 3]);
        }
    }
    for (int t = 0; t < T; t++) {
        const __m512 a = _mm512_add_ps(_mm512_add_ps(A[t][0], A[t][1]), _mm512_add_ps(A[t][2], A[t][3]));
        const __m512 m = _mm512_add_ps(_mm512_add_ps(M[t][0], M[t][1]), _mm512_add_ps(M[t][2], M[t][3]));
        _mm512_storeu_ps(Y + t * ldy, _mm512_add_ps(a, m));
    }
}

static void rows_q4_K_r16_avx512vnni(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1,
                                     const void *x, size_t xs, int64_t nb, float *Y, int64_t ldy) {
    const uint8_t *W = w, *X = x;
    const size_t gbytes = R16 * row_bytes;
    const int64_t nsb = n / QK_K;
    const k4_bsums *bsp = k4_block_sums(X, xs, nb, nsb);
    if (!bsp) {
        ember_rows_q4_K_r16_generic(n, w, row_bytes, r0, r1, x, xs, nb, Y, ldy);
        return;
    }
    int64_t r = r0;
    for (; r < r1 && r % R16; r++)
        for (int64_t a = 0; a < nb; a++)
            Y[a * ldy + (r - r0)] = ember_row_q4_K_r16(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16), X + a * xs);
    for (; r + R16 <= r1; r += R16) {
        const uint8_t *wg = W + (size_t)(r / R16) * gbytes;
        int64_t a = 0;
        const uint8_t *next = nb == 1 && r + 2 * R16 <= r1 ? wg + gbytes : NULL;
        for (; a + TILE <= nb; a += TILE)
            group_q4_K_r16(n, wg, NULL, X + a * xs, xs, bsp + a * nsb, TILE, Y + a * ldy + (r - r0), ldy);
        for (; a < nb; a++)
            group_q4_K_r16(n, wg, next, X + a * xs, xs, bsp + a * nsb, 1, Y + a * ldy + (r - r0), ldy);
    }
    for (; r < r1; r++)
        for (int64_t a = 0; a < nb; a++)
            Y[a * ldy + (r - r0)] = ember_row_q4_K_r16(n, W + (size_t)(r / R16) * gbytes, (int)(r % R16), X + a * xs);
}

#pragma GCC pop_options

int ember_fill_repacked_avx512(ember_type_kernels *k, int use_extensions) {
    __builtin_cpu_init();
    if (!(use_extensions && __builtin_cpu_supports("avx512vnni"))) return 0;
    k[EMBER_Q4_0_R16].rows = rows_q4_0_r16_avx512vnni;
    k[EMBER_Q8_0_R16].rows = rows_q8_0_r16_avx512vnni;
    k[EMBER_Q4_K_R16].rows = rows_q4_K_r16_avx512vnni;
    k[EMBER_Q4_K_R16].quantize = k[EMBER_Q4_K].quantize;
    /* measured side by side (5632 x 2048, 1 thread, Zen 5): decode Q4_0 21.6 ->
     * 54.5 GB/s, Q8_0 10.8 -> 74 GB/s (L3-resident); 64-row prefill Q4_0 30.7
     * -> 8.7 ms, Q8_0 32.8 -> 18.9 ms */
    return 1 << (EMBER_Q4_0_R16 - EMBER_Q4_0_R16) | 1 << (EMBER_Q8_0_R16 - EMBER_Q4_0_R16)
         | 1 << (EMBER_Q4_K_R16 - EMBER_Q4_0_R16);
}

#else
int ember_fill_repacked_avx512(ember_type_kernels *k, int use_extensions) {
    (void)k; (void)use_extensions;
    return 0;
}
#endif
