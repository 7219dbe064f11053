/* AVX2 + FMA quantized kernels, every weight type.
 *
 * Compiled for every x86 CPU with `#pragma GCC target`, run only when
 * dispatch.c saw avx2+fma+f16c. Same signatures as quants_generic.c; each
 * block loop ends by handing leftover blocks to the generic twin.
 *
 * Integer core (all types): weights are widened to one byte per value, then
 * multiplied with the int8 activations by `maddubs` (u8 x s8 -> pairs of
 * int16), and pairs are summed into int32 by `madd`. maddubs needs its first
 * operand unsigned, so either the weights are kept unsigned (0..15, 0..31,
 * 0..63) and their offset is paid once per 16 values through Q8_K's bsums,
 * or (signed 32-blocks) the sign is moved onto the activation (`sign` trick:
 * |w| * sign(w)*y). None of the int16 pair sums can saturate: the largest is
 * 2 * 63 * 128 = 16128.
 *
 * dot4 variants decode a weight block once and use it for four activation
 * rows (matmul).
 */
#include <math.h>

#include "quants_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

/* ======================================================================== */
/* Helpers                                                                   */
/* ======================================================================== */

static inline float fp16(ember_fp16_t h) { return ember_fp16_table[h]; }

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 packed nibbles -> 32 bytes: low nibbles (values 0..15), then high (16..31) */
static inline __m256i nibbles32(const uint8_t *qs) {
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    const __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set */
static inline __m256i bits32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    /* byte i keeps bit (i % 8) of its source byte; all others forced to 1 */
    const __m256i ored = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(ored, _mm256_set1_epi64x(-1));
}

/* sum of u8 x s8 products, 8 int32 lanes */
static inline __m256i dot_u8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* sum of s8 x s8 products: move the weight's sign onto y, then u8 x s8 */
static inline __m256i dot_s8(__m256i w, __m256i y) {
    return dot_u8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
}

static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* ======================================================================== */
/* Q8_0-activation types (32-blocks)                                          */
/* ======================================================================== */

/* dot and dot4 run the same per-row step on the same decoded weights, so a
 * row's result never depends on which of them computed it (matvec == each
 * row of matmul, bit for bit, whatever the batch split). */

/* One generic shape for the signed 32-blocks: `decode` gives int8 weights. */
typedef struct { __m256 a0, a1; } acc2;

static inline void step_s8(acc2 *acc, __m256i q0, __m256i q1, float dw0, float dw1, const block_q8_0 *x) {
    const __m256 p0 = _mm256_cvtepi32_ps(dot_s8(q0, load256(x[0].qs)));
    const __m256 p1 = _mm256_cvtepi32_ps(dot_s8(q1, load256(x[1].qs)));
    acc->a0 = _mm256_fmadd_ps(_mm256_set1_ps(dw0 * fp16(x[0].d)), p0, acc->a0);
    acc->a1 = _mm256_fmadd_ps(_mm256_set1_ps(dw1 * fp16(x[1].d)), p1, acc->a1);
}

#define Q8_0_DOT(name, wtype_t, decode)                                              \
void ember_vec_dot4_##name##_q8_0_avx2(int64_t n, const void *vw, const void *vx,    \
                                       size_t xs, float *s) {                        \
    const wtype_t *w = vw;                                                           \
    const uint8_t *xb = vx;                                                          \
    const int64_t nb = n / QK8_0;                                                    \
    acc2 acc[4];                                                                     \
    for (int r = 0; r < 4; r++) acc[r].a0 = acc[r].a1 = _mm256_setzero_ps();         \
    int64_t i = 0;                                                                   \
    for (; i + 2 <= nb; i += 2) {                                                    \
        const __m256i q0 = decode(&w[i]), q1 = decode(&w[i + 1]);                    \
        const float dw0 = fp16(w[i].d), dw1 = fp16(w[i + 1].d);                      \
        for (int r = 0; r < 4; r++) {                                                \
            step_s8(&acc[r], q0, q1, dw0, dw1, (const block_q8_0 *)(xb + r * xs) + i); \
        }                                                                            \
    }                                                                                \
    for (int r = 0; r < 4; r++) {                                                    \
        const block_q8_0 *x = (const block_q8_0 *)(xb + r * xs);                     \
        s[r] = hsum8(_mm256_add_ps(acc[r].a0, acc[r].a1));                           \
        if (i < nb) s[r] += ember_vec_dot_##name##_q8_0_generic((nb - i) * QK8_0, w + i, x + i); \
    }                                                                                \
}                                                                                    \
                                                                                     \
float ember_vec_dot_##name##_q8_0_avx2(int64_t n, const void *vw, const void *vx) {  \
    const wtype_t *w = vw;                                                           \
    const block_q8_0 *x = vx;                                                        \
    const int64_t nb = n / QK8_0;                                                    \
    acc2 acc = {_mm256_setzero_ps(), _mm256_setzero_ps()};                           \
    int64_t i = 0;                                                                   \
    for (; i + 2 <= nb; i += 2) {                                                    \
        step_s8(&acc, decode(&w[i]), decode(&w[i + 1]), fp16(w[i].d), fp16(w[i + 1].d), x + i); \
    }                                                                                \
    float sum = hsum8(_mm256_add_ps(acc.a0, acc.a1));                                \
    if (i < nb) sum += ember_vec_dot_##name##_q8_0_generic((nb - i) * QK8_0, w + i, x + i); \
    return sum;                                                                      \
}

static inline __m256i decode_q8_0(const block_q8_0 *b) { return load256(b->qs); }

static inline __m256i decode_q5_0(const block_q5_0 *b) {
    const __m256i hi = _mm256_and_si256(bits32(b->qh), _mm256_set1_epi8(0x10));
    return _mm256_sub_epi8(_mm256_or_si256(nibbles32(b->qs), hi), _mm256_set1_epi8(16));
}

static inline __m256i decode_iq4_nl(const block_iq4_nl *b) {
    const __m128i t = _mm_loadu_si128((const __m128i *)ember_kvalues_iq4nl);
    return _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles32(b->qs));
}

Q8_0_DOT(q8_0, block_q8_0, decode_q8_0)
Q8_0_DOT(q5_0, block_q5_0, decode_q5_0)
Q8_0_DOT(iq4_nl, block_iq4_nl, decode_iq4_nl)

/* Q4_0, the decode hot loop: raw nibbles (0..15) times y, the bias 8 paid by
 * the activation's precomputed corr, its scale read as float from the aux
 * area; per block that leaves unpack, maddubs+madd, and three float ops. */
static inline void step_q4_0(acc2 *acc, __m256i u0, __m256i u1, float dw0, float dw1, const block_q8_0 *x,
                             const float *dx8, const int32_t *corr) {
    const __m256i p0 = _mm256_add_epi32(load256(corr), dot_u8(u0, load256(x[0].qs)));
    const __m256i p1 = _mm256_add_epi32(load256(corr + 8), dot_u8(u1, load256(x[1].qs)));
    const __m256 t0 = _mm256_mul_ps(_mm256_cvtepi32_ps(p0), _mm256_loadu_ps(dx8));
    const __m256 t1 = _mm256_mul_ps(_mm256_cvtepi32_ps(p1), _mm256_loadu_ps(dx8 + 8));
    acc->a0 = _mm256_fmadd_ps(t0, _mm256_set1_ps(dw0), acc->a0);
    acc->a1 = _mm256_fmadd_ps(t1, _mm256_set1_ps(dw1), acc->a1);
}

float ember_vec_dot_q4_0_q8_0_avx2(int64_t n, const void *vw, const void *vx) {
    const block_q4_0 *w = vw;
    const block_q8_0 *x = vx;
    const float *dx8 = ember_q8_0_dx8(vx, n);
    const int32_t *corr = ember_q8_0_corr(vx, n);
    const int64_t nb = n / QK8_0;
    acc2 acc = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        step_q4_0(&acc, nibbles32(w[i].qs), nibbles32(w[i + 1].qs), fp16(w[i].d), fp16(w[i + 1].d),
                  x + i, dx8 + 8 * i, corr + 8 * i);
    }
    float sum = hsum8(_mm256_add_ps(acc.a0, acc.a1));
    if (i < nb) sum += ember_vec_dot_q4_0_q8_0_generic((nb - i) * QK8_0, w + i, x + i);
    return sum;
}

void ember_vec_dot4_q4_0_q8_0_avx2(int64_t n, const void *vw, const void *vx, size_t xs, float *s) {
    const block_q4_0 *w = vw;
    const uint8_t *xb = vx;
    const int64_t nb = n / QK8_0;
    acc2 acc[4];
    for (int r = 0; r < 4; r++) acc[r].a0 = acc[r].a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i u0 = nibbles32(w[i].qs), u1 = nibbles32(w[i + 1].qs);
        const float dw0 = fp16(w[i].d), dw1 = fp16(w[i + 1].d);
        for (int r = 0; r < 4; r++) {
            const void *xr = xb + r * xs;
            step_q4_0(&acc[r], u0, u1, dw0, dw1, (const block_q8_0 *)xr + i,
                      ember_q8_0_dx8(xr, n) + 8 * i, ember_q8_0_corr(xr, n) + 8 * i);
        }
    }
    for (int r = 0; r < 4; r++) {
        const block_q8_0 *x = (const block_q8_0 *)(xb + r * xs);
        s[r] = hsum8(_mm256_add_ps(acc[r].a0, acc[r].a1));
        if (i < nb) s[r] += ember_vec_dot_q4_0_q8_0_generic((nb - i) * QK8_0, w + i, x + i);
    }
}

/* Unsigned weights with a min (Q4_1, Q5_1): d*sum(q*y)*dx + m*dx*sum(y) */
#define Q8_0_DOT_MIN(name, wtype_t, decode)                                          \
float ember_vec_dot_##name##_q8_0_avx2(int64_t n, const void *vw, const void *vx) {  \
    const wtype_t *w = vw;                                                           \
    const block_q8_0 *x = vx;                                                        \
    const int64_t nb = n / QK8_0;                                                    \
    const __m256i ones = _mm256_set1_epi8(1);                                        \
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();                    \
    for (int64_t i = 0; i < nb; i++) {                                               \
        const __m256i y = load256(x[i].qs);                                          \
        const float dx = fp16(x[i].d);                                               \
        const __m256 p = _mm256_cvtepi32_ps(dot_u8(decode(&w[i]), y));               \
        const __m256 sy = _mm256_cvtepi32_ps(dot_u8(ones, y));                       \
        acc = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i].d) * dx), p, acc);            \
        accm = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w[i].m) * dx), sy, accm);         \
    }                                                                                \
    return hsum8(acc) + hsum8(accm);                                                 \
}

static inline __m256i decode_q4_1(const block_q4_1 *b) { return nibbles32(b->qs); }

static inline __m256i decode_q5_1(const block_q5_1 *b) {
    const __m256i hi = _mm256_and_si256(bits32(b->qh), _mm256_set1_epi8(0x10));
    return _mm256_or_si256(nibbles32(b->qs), hi);
}

Q8_0_DOT_MIN(q4_1, block_q4_1, decode_q4_1)
Q8_0_DOT_MIN(q5_1, block_q5_1, decode_q5_1)

/* ======================================================================== */
/* K-quants against Q8_K                                                     */
/* ======================================================================== */

/* Q4_K/Q5_K: 8 scales (bytes 0..7) and 8 mins (bytes 8..15) from 12 packed bytes */
static inline __m256i k4_scales_mins(const uint8_t *packed) {
    uint32_t u[4];
    memcpy(u, packed, 12);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    const uint32_t mins_lo = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = mins_lo;
    u[0] &= m1;
    return _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
}

/* int16 lane j of a 128-bit scale vector, broadcast to all 16 lanes */
static inline __m256i bcast16(__m128i v, int j) {
    const __m256i both = _mm256_set_m128i(v, v);
    return _mm256_shuffle_epi8(both, _mm256_set1_epi16((short)(((2 * j + 1) << 8) | (2 * j))));
}

/* per-16 int8 scales k, k+1 -> int16 lanes 0..7 = sc[k], 8..15 = sc[k+1] */
static inline __m256i scale_pair(__m128i sc8, int k) {
    const __m128i m = _mm_set_epi64x(0x0101010101010101LL * (k + 1), 0x0101010101010101LL * k);
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, m));
}

/* sum over 16 groups of sc16[k] * bsums[k] (int32, 8 lanes) */
static inline __m256i scaled_bsums(__m128i sc8, const block_q8_K *x) {
    return _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8), load256(x->bsums));
}

/* min part of Q4_K/Q5_K: sum_j m_j * (bsums[2j] + bsums[2j+1]), 4 int32 lanes */
static inline __m128i k4_min_sums(__m256i scmin, const block_q8_K *x) {
    const __m256i bs = load256(x->bsums);
    const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    return _mm_madd_epi16(_mm256_extracti128_si256(scmin, 1), pairs);
}

static inline float hsum4(__m128 v) {
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

/* ---- Q4_K ---------------------------------------------------------------- */

/* chunk j (64 values): low nibbles (sub-block 2j) and high nibbles (2j+1) */
static inline __m256i q4k_chunk(const uint8_t *q, __m256i sl, __m256i sh, const int8_t *y) {
    const __m256i bits = load256(q);
    const __m256i lo = _mm256_and_si256(bits, _mm256_set1_epi8(0x0F));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), _mm256_set1_epi8(0x0F));
    const __m256i pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, load256(y)));
    const __m256i ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, load256(y + 32)));
    return _mm256_add_epi32(pl, ph);
}

float ember_vec_dot_q4_K_q8_K_avx2(int64_t n, const void *vw, const void *vx) {
    const block_q4_K *w = vw;
    const block_q8_K *x = vx;
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m256i scmin = k4_scales_mins(w[i].scales);
        const __m128i sc = _mm256_castsi256_si128(scmin);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            sumi = _mm256_add_epi32(sumi, q4k_chunk(w[i].qs + 32 * j, bcast16(sc, 2 * j), bcast16(sc, 2 * j + 1), x[i].qs + 64 * j));
        }
        const float dy = x[i].d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dy * fp16(w[i].d)), _mm256_cvtepi32_ps(sumi), acc);
        accm = _mm_fmadd_ps(_mm_set1_ps(-dy * fp16(w[i].dmin)), _mm_cvtepi32_ps(k4_min_sums(scmin, &x[i])), accm);
    }
    return hsum8(acc) + hsum4(accm);
}

/* 4-row dots, Q4_K and Q5_K alike: chunk j's unsigned codes (lo: sub-block 2j,
 * hi: 2j+1, scales sl/sh) against each row's 64 activations, into sumi[r] */
static inline void k4_rows4_chunk(__m256i lo, __m256i hi, __m256i sl, __m256i sh,
                                  const block_q8_K *const x[4], int j, __m256i sumi[4]) {
    for (int r = 0; r < 4; r++) {
        const int8_t *y = x[r]->qs + 64 * j;
        const __m256i pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, load256(y)));
        const __m256i ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, load256(y + 32)));
        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(pl, ph));
    }
}

/* the super-block's float step per row: the same order as the 1-row dot (equal bits) */
static inline void k4_rows4_scale(const block_q8_K *const x[4], float dw, float dmin, __m256i scmin,
                                  const __m256i sumi[4], __m256 acc[4], __m128 accm[4]) {
    for (int r = 0; r < 4; r++) {
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r]->d * dw), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        accm[r] = _mm_fmadd_ps(_mm_set1_ps(-x[r]->d * dmin), _mm_cvtepi32_ps(k4_min_sums(scmin, x[r])), accm[r]);
    }
}

void ember_vec_dot4_q4_K_q8_K_avx2(int64_t n, const void *vw, const void *vx, size_t xs, float *s) {
    const block_q4_K *w = vw;
    const uint8_t *xb = vx;
    __m256 acc[4];
    __m128 accm[4];
    for (int r = 0; r < 4; r++) { acc[r] = _mm256_setzero_ps(); accm[r] = _mm_setzero_ps(); }
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m256i scmin = k4_scales_mins(w[i].scales);
        const __m128i sc = _mm256_castsi256_si128(scmin);
        const block_q8_K *x[4];
        __m256i sumi[4];
        for (int r = 0; r < 4; r++) {
            x[r] = (const block_q8_K *)(xb + r * xs) + i;
            sumi[r] = _mm256_setzero_si256();
        }
        for (int j = 0; j < 4; j++) {
            const __m256i bits = load256(w[i].qs + 32 * j);
            const __m256i lo = _mm256_and_si256(bits, _mm256_set1_epi8(0x0F));
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), _mm256_set1_epi8(0x0F));
            const __m256i sl = bcast16(sc, 2 * j), sh = bcast16(sc, 2 * j + 1);
            k4_rows4_chunk(lo, hi, sl, sh, x, j, sumi);
        }
        k4_rows4_scale(x, fp16(w[i].d), fp16(w[i].dmin), scmin, sumi, acc, accm);
    }
    for (int r = 0; r < 4; r++) s[r] = hsum8(acc[r]) + hsum4(accm[r]);
}

/* ---- Q5_K ---------------------------------------------------------------- */

/* chunk j (64 values) as unsigned 5-bit codes: sub-block 2j (lo) and 2j+1 (hi);
 * the 5th bit of sub-block k is bit k of qh */
static inline void q5k_chunk(const uint8_t *qs, __m256i qh, int j, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    const __m256i bits = load256(qs + 32 * j);
    const __m256i hl = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4);
    const __m256i hh = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4);
    *lo = _mm256_or_si256(_mm256_and_si256(bits, m4), hl);
    *hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), hh);
}

float ember_vec_dot_q5_K_q8_K_avx2(int64_t n, const void *vw, const void *vx) {
    const block_q5_K *w = vw;
    const block_q8_K *x = vx;
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m256i scmin = k4_scales_mins(w[i].scales);
        const __m128i sc = _mm256_castsi256_si128(scmin);
        const __m256i qh = load256(w[i].qh);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i lo, hi;
            q5k_chunk(w[i].qs, qh, j, &lo, &hi);
            const int8_t *y = x[i].qs + 64 * j;
            const __m256i pl = _mm256_madd_epi16(bcast16(sc, 2 * j), _mm256_maddubs_epi16(lo, load256(y)));
            const __m256i ph = _mm256_madd_epi16(bcast16(sc, 2 * j + 1), _mm256_maddubs_epi16(hi, load256(y + 32)));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        const float dy = x[i].d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dy * fp16(w[i].d)), _mm256_cvtepi32_ps(sumi), acc);
        accm = _mm_fmadd_ps(_mm_set1_ps(-dy * fp16(w[i].dmin)), _mm_cvtepi32_ps(k4_min_sums(scmin, &x[i])), accm);
    }
    return hsum8(acc) + hsum4(accm);
}

/* same integer sums and float steps per row as the 1-row dot (equal bits) */
void ember_vec_dot4_q5_K_q8_K_avx2(int64_t n, const void *vw, const void *vx, size_t xs, float *s) {
    const block_q5_K *w = vw;
    const uint8_t *xb = vx;
    __m256 acc[4];
    __m128 accm[4];
    for (int r = 0; r < 4; r++) { acc[r] = _mm256_setzero_ps(); accm[r] = _mm_setzero_ps(); }
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m256i scmin = k4_scales_mins(w[i].scales);
        const __m128i sc = _mm256_castsi256_si128(scmin);
        const __m256i qh = load256(w[i].qh);
        const block_q8_K *x[4];
        __m256i sumi[4];
        for (int r = 0; r < 4; r++) {
            x[r] = (const block_q8_K *)(xb + r * xs) + i;
            sumi[r] = _mm256_setzero_si256();
        }
        for (int j = 0; j < 4; j++) {
            __m256i lo, hi;
            q5k_chunk(w[i].qs, qh, j, &lo, &hi);
            const __m256i sl = bcast16(sc, 2 * j), sh = bcast16(sc, 2 * j + 1);
            k4_rows4_chunk(lo, hi, sl, sh, x, j, sumi);
        }
        k4_rows4_scale(x, fp16(w[i].d), fp16(w[i].dmin), scmin, sumi, acc, accm);
    }
    for (int r = 0; r < 4; r++) s[r] = hsum8(acc[r]) + hsum4(accm[r]);
}

/* ---- Q6_K ---------------------------------------------------------------- */

/* The four 32-value chunks of one 128-value half, as unsigned 0..63. */
static inline void q6k_half(const uint8_t *ql, const uint8_t *qh, __m256i u[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(0x03);
    const __m256i l0 = load256(ql), l1 = load256(ql + 32), h = load256(qh);
    u[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
    u[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4));
    u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4));
    u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4));
}

/* Values are u - 32: pay the -32 once per 16 through bsums instead of per value. */
float ember_vec_dot_q6_K_q8_K_avx2(int64_t n, const void *vw, const void *vx) {
    const block_q6_K *w = vw;
    const block_q8_K *x = vx;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)w[i].scales);
        __m256i sumi = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++) {
            __m256i u[4];
            q6k_half(w[i].ql + 64 * half, w[i].qh + 32 * half, u);
            const int8_t *y = x[i].qs + 128 * half;
            for (int c = 0; c < 4; c++) {
                const __m256i p = _mm256_maddubs_epi16(u[c], load256(y + 32 * c));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale_pair(sc8, 8 * half + 2 * c), p));
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(scaled_bsums(sc8, &x[i]), 5));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d * fp16(w[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum8(acc);
}

void ember_vec_dot4_q6_K_q8_K_avx2(int64_t n, const void *vw, const void *vx, size_t xs, float *s) {
    const block_q6_K *w = vw;
    const uint8_t *xb = vx;
    __m256 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)w[i].scales);
        const block_q8_K *x[4];
        __m256i sumi[4];
        for (int r = 0; r < 4; r++) {
            x[r] = (const block_q8_K *)(xb + r * xs) + i;
            sumi[r] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(scaled_bsums(sc8, x[r]), 5));
        }
        for (int half = 0; half < 2; half++) {
            __m256i u[4];
            q6k_half(w[i].ql + 64 * half, w[i].qh + 32 * half, u);
            for (int c = 0; c < 4; c++) {
                const __m256i sp = scale_pair(sc8, 8 * half + 2 * c);
                for (int r = 0; r < 4; r++) {
                    const __m256i p = _mm256_maddubs_epi16(u[c], load256(x[r]->qs + 128 * half + 32 * c));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(sp, p));
                }
            }
        }
        const float dw = fp16(w[i].d);
        for (int r = 0; r < 4; r++) {
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r]->d * dw), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) s[r] = hsum8(acc[r]);
}

/* ---- Q2_K, Q3_K: 16-value groups, unsigned codes, offsets via bsums ------ */

float ember_vec_dot_q2_K_q8_K_avx2(int64_t n, const void *vw, const void *vx) {
    const block_q2_K *w = vw;
    const block_q8_K *x = vx;
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)w[i].scales);
        const __m128i sc8 = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
        const __m128i mn8 = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
        __m256i sumi = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++) {
            const __m256i q = load256(w[i].qs + 32 * half);
            for (int s = 0; s < 4; s++) {
                const __m256i u = _mm256_and_si256(_mm256_srli_epi16(q, 2 * s), m3);
                const __m256i p = _mm256_maddubs_epi16(u, load256(x[i].qs + 128 * half + 32 * s));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale_pair(sc8, 8 * half + 2 * s), p));
            }
        }
        const __m256 mins = _mm256_cvtepi32_ps(scaled_bsums(mn8, &x[i]));
        const __m256 main = _mm256_mul_ps(_mm256_set1_ps(fp16(w[i].d)), _mm256_cvtepi32_ps(sumi));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d), _mm256_fnmadd_ps(_mm256_set1_ps(fp16(w[i].dmin)), mins, main), acc);
    }
    return hsum8(acc);
}

/* Q3_K value = low2 - 4*(1 - hbit) = (low2 | hbit<<2) - 4: unsigned code, -4 via bsums */
float ember_vec_dot_q3_K_q8_K_avx2(int64_t n, const void *vw, const void *vx) {
    const block_q3_K *w = vw;
    const block_q8_K *x = vx;
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        int8_t scales[16];
        ember_q3k_scales(w[i].scales, scales);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)scales);
        const __m256i hm = load256(w[i].hmask);
        __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(scaled_bsums(sc8, &x[i]), 2));
        for (int half = 0; half < 2; half++) {
            const __m256i q = load256(w[i].qs + 32 * half);
            for (int s = 0; s < 4; s++) {
                const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * half + s), one);
                const __m256i u = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * s), m3), _mm256_slli_epi16(hb, 2));
                const __m256i p = _mm256_maddubs_epi16(u, load256(x[i].qs + 128 * half + 32 * s));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale_pair(sc8, 8 * half + 2 * s), p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d * fp16(w[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum8(acc);
}

/* ---- IQ4_XS: IQ4_NL's code book in 256-blocks, a 6-bit scale per 32 ----- */

/* Group ib's 32 values via pshufb into the code book, as int8, split into
 * |v| (maddubs' unsigned side) and the sign that moves onto y. */
static inline __m256i iq4xs_values(const block_iq4_xs *b, int ib) {
    const __m128i t = _mm_loadu_si128((const __m128i *)ember_kvalues_iq4nl);
    return _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles32(b->qs + 16 * ib));
}

/* One group against y: int16 pair sums (|p| <= 2*127*127) times the scale,
 * summed into 8 int32 lanes. The same step for dot and dot4. */
static inline __m256i iq4xs_group(__m256i absv, __m256i v, __m256i scale16, const int8_t *y) {
    const __m256i p = _mm256_maddubs_epi16(absv, _mm256_sign_epi8(load256(y), v));
    return _mm256_madd_epi16(p, scale16);
}

float ember_vec_dot_iq4_xs_q8_K_avx2(int64_t n, const void *vw, const void *vx) {
    const block_iq4_xs *w = vw;
    const block_q8_K *x = vx;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const __m256i v = iq4xs_values(&w[i], ib);
            const __m256i sc = _mm256_set1_epi16((short)ember_iq4xs_scale(&w[i], ib));
            sumi = _mm256_add_epi32(sumi, iq4xs_group(_mm256_sign_epi8(v, v), v, sc, x[i].qs + 32 * ib));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d * fp16(w[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum8(acc);
}

void ember_vec_dot4_iq4_xs_q8_K_avx2(int64_t n, const void *vw, const void *vx, size_t xs, float *s) {
    const block_iq4_xs *w = vw;
    const uint8_t *xb = vx;
    __m256 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const block_q8_K *x[4];
        __m256i sumi[4];
        for (int r = 0; r < 4; r++) {
            x[r] = (const block_q8_K *)(xb + r * xs) + i;
            sumi[r] = _mm256_setzero_si256();
        }
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const __m256i v = iq4xs_values(&w[i], ib), absv = _mm256_sign_epi8(v, v);
            const __m256i sc = _mm256_set1_epi16((short)ember_iq4xs_scale(&w[i], ib));
            for (int r = 0; r < 4; r++) {
                sumi[r] = _mm256_add_epi32(sumi[r], iq4xs_group(absv, v, sc, x[r]->qs + 32 * ib));
            }
        }
        const float dw = fp16(w[i].d);
        for (int r = 0; r < 4; r++) {
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r]->d * dw), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) s[r] = hsum8(acc[r]);
}

/* ======================================================================== */
/* Float weights against f32 activations                                     */
/* ======================================================================== */

#define FLOAT_DOT(name, load8)                                                       \
float ember_vec_dot_##name##_f32_avx2(int64_t n, const void *vw, const void *vx) {   \
    const float *x = vx;                                                             \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                       \
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                       \
    int64_t i = 0;                                                                   \
    for (; i + 32 <= n; i += 32) {                                                   \
        a0 = _mm256_fmadd_ps(load8(vw, i), _mm256_loadu_ps(x + i), a0);               \
        a1 = _mm256_fmadd_ps(load8(vw, i + 8), _mm256_loadu_ps(x + i + 8), a1);       \
        a2 = _mm256_fmadd_ps(load8(vw, i + 16), _mm256_loadu_ps(x + i + 16), a2);     \
        a3 = _mm256_fmadd_ps(load8(vw, i + 24), _mm256_loadu_ps(x + i + 24), a3);     \
    }                                                                                \
    float sum = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));  \
    if (i < n) sum += ember_vec_dot_##name##_f32_generic(n - i, (const char *)vw + i * sizeof_##name, x + i); \
    return sum;                                                                      \
}

enum { sizeof_f32 = 4, sizeof_f16 = 2, sizeof_bf16 = 2 };

static inline __m256 load8_f32(const void *w, int64_t i) { return _mm256_loadu_ps((const float *)w + i); }
static inline __m256 load8_f16(const void *w, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const ember_fp16_t *)w + i)));
}
static inline __m256 load8_bf16(const void *w, int64_t i) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const ember_bf16_t *)w + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

FLOAT_DOT(f32, load8_f32)
FLOAT_DOT(f16, load8_f16)
FLOAT_DOT(bf16, load8_bf16)

/* ======================================================================== */
/* Activation quantization (bit-identical to the generic quantizers)         */
/* ======================================================================== */

/* roundf (half away from zero) of 8 lanes, exactly: t = trunc|v|, plus one
 * where the exact fraction |v| - t is >= 0.5, the sign put back on the int */
static inline __m256i roundf_epi32_avx2(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 a = _mm256_andnot_ps(sign, v);
    const __m256 t = _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(a, t), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    const __m256i r = _mm256_sub_epi32(_mm256_cvttps_epi32(t), _mm256_castps_si256(up));  /* up = -1 */
    return _mm256_sign_epi32(r, _mm256_castps_si256(_mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0f))));
}

/* 4 x 8 int32 (each in -127..127) -> 32 int8 in order */
static inline __m256i pack_epi8_avx2(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    const __m256i q = _mm256_packs_epi16(ab, cd);   /* lanes interleaved by 128-bit halves */
    return _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

void ember_quantize_row_q8_0_avx2(const float *x, void *vy, int64_t n) {
    block_q8_0 *y = vy;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / QK8_0; i++, x += QK8_0) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 8 * j);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
        }
        const float d = hmax8(m) / 127.0f;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        y[i].d = ember_fp32_to_fp16(d);
        __m256i q[4];
        for (int j = 0; j < 4; j++) q[j] = roundf_epi32_avx2(_mm256_mul_ps(v[j], id));
        _mm256_storeu_si256((__m256i *)y[i].qs, pack_epi8_avx2(q[0], q[1], q[2], q[3]));
    }
}

void ember_quantize_row_q8_K_avx2(const float *x, void *vy, int64_t n) {
    block_q8_K *y = vy;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK_K; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        const float amax = hmax8(m);
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        float max = 0.0f;   /* the first x[j] with |x[j]| == amax, as the generic loop keeps */
        for (int j = 0; j < QK_K; j++) {
            if (fabsf(x[j]) == amax) { max = x[j]; break; }
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j += 32) {
            __m256i q[4];
            for (int l = 0; l < 4; l++) {
                /* cvtps rounds half to even, as ember_nearest_int */
                q[l] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_set1_ps(iscale), _mm256_loadu_ps(x + j + 8 * l)));
                q[l] = _mm256_min_epi32(q[l], _mm256_set1_epi32(127));
            }
            _mm256_storeu_si256((__m256i *)(y[i].qs + j), pack_epi8_avx2(q[0], q[1], q[2], q[3]));
            for (int h = 0; h < 2; h++) {
                const __m256i s = _mm256_add_epi32(q[2 * h], q[2 * h + 1]);
                const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                y[i].bsums[j / 16 + h] = (int16_t)_mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
            }
        }
        y[i].d = 1.0f / iscale;
    }
}

/* ======================================================================== */
/* Table                                                                     */
/* ======================================================================== */

void ember_fill_kernels_avx2(ember_type_kernels *k) {
    k[EMBER_Q4_0].dot = ember_vec_dot_q4_0_q8_0_avx2;
    k[EMBER_Q4_0].dot4 = ember_vec_dot4_q4_0_q8_0_avx2;
    k[EMBER_Q8_0].dot = ember_vec_dot_q8_0_q8_0_avx2;
    k[EMBER_Q8_0].dot4 = ember_vec_dot4_q8_0_q8_0_avx2;
    k[EMBER_Q5_0].dot = ember_vec_dot_q5_0_q8_0_avx2;
    k[EMBER_Q5_0].dot4 = ember_vec_dot4_q5_0_q8_0_avx2;
    k[EMBER_IQ4_NL].dot = ember_vec_dot_iq4_nl_q8_0_avx2;
    k[EMBER_IQ4_NL].dot4 = ember_vec_dot4_iq4_nl_q8_0_avx2;
    k[EMBER_Q4_1].dot = ember_vec_dot_q4_1_q8_0_avx2;
    k[EMBER_Q5_1].dot = ember_vec_dot_q5_1_q8_0_avx2;
    k[EMBER_Q2_K].dot = ember_vec_dot_q2_K_q8_K_avx2;
    k[EMBER_Q3_K].dot = ember_vec_dot_q3_K_q8_K_avx2;
    k[EMBER_Q4_K].dot = ember_vec_dot_q4_K_q8_K_avx2;
    k[EMBER_Q4_K].dot4 = ember_vec_dot4_q4_K_q8_K_avx2;
    k[EMBER_Q5_K].dot = ember_vec_dot_q5_K_q8_K_avx2;
    k[EMBER_Q5_K].dot4 = ember_vec_dot4_q5_K_q8_K_avx2;
    k[EMBER_Q6_K].dot = ember_vec_dot_q6_K_q8_K_avx2;
    k[EMBER_Q6_K].dot4 = ember_vec_dot4_q6_K_q8_K_avx2;
    k[EMBER_IQ4_XS].dot = ember_vec_dot_iq4_xs_q8_K_avx2;
    k[EMBER_IQ4_XS].dot4 = ember_vec_dot4_iq4_xs_q8_K_avx2;
    k[EMBER_F32].dot = ember_vec_dot_f32_f32_avx2;
    k[EMBER_F16].dot = ember_vec_dot_f16_f32_avx2;
    k[EMBER_BF16].dot = ember_vec_dot_bf16_f32_avx2;
    /* every Q8_0- / Q8_K-paired type shares its activation quantizer */
    for (int t = 0; t < EMBER_N_TYPES; t++) {
        if (k[t].quantize == ember_quantize_row_q8_0_generic) k[t].quantize = ember_quantize_row_q8_0_avx2;
        if (k[t].quantize == ember_quantize_row_q8_K_generic) k[t].quantize = ember_quantize_row_q8_K_avx2;
    }
}

#pragma GCC pop_options
#endif
