/* AVX-512 quantized kernels for the hot types: Q4_0, Q8_0, Q4_K, Q6_K, IQ4_XS.
 *
 * Every other type runs the AVX2 kernel (dispatch.c copies the AVX2 table
 * before this file fills its entries). Needs avx512f/bw/vl/dq; Q4_0 and Q8_0
 * come in two builds, with VNNI (`vpdpbusd`: u8 x s8 -> int32 in one
 * instruction) where the CPU has it, and without (maddubs + madd).
 *
 * 32-blocks: two blocks per 512-bit register. Weights are made unsigned so
 * they can be the u8 operand (Q4_0: raw nibble 0..15; Q8_0: offset binary);
 * the code offset times the activation's 4-value sums is precomputed once per
 * activation row (the Q8_0 aux area) and seeds the int32 accumulator, and the
 * activation scales come from the same area already in float. What is left
 * per weight block is its unpacking, one vpdpbusd, and the float scaling --
 * decode has to keep up with memory bandwidth.
 *
 * K-quants: a 64-value run of a super-block fills one register in value
 * order, is multiplied by maddubs and scaled by its int16 sub-block scales in
 * the same madd that sums pairs, so no int32 multiply is ever needed.
 *
 * With VNNI, Q4_0, Q8_0, Q4_K and Q6_K prefill (matmul16) puts 16 activation
 * rows in the lanes instead: a broadcast 4-value weight group times 4 codes of
 * each of 16 rows, so every lane ends a block as one exact int sum and the
 * float work is paid once per block for 16 rows (about 2x-2.6x over dot4).
 * Their matvec (dot) is rewritten to the same per-pair order -- exact int
 * block sums, four fma chains by block index, a fixed final sum -- so a
 * matmul row still equals matvec bit for bit.
 *
 * Activation quantizers (Q8_0, Q8_K) are vectorized here too, bit-identical
 * to the generic ones (the generic Q8_0 uses roundf, 6x slower than this).
 */
#include <math.h>
#include <stdlib.h>

#include "quants_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>

/* ======================================================================== */
/* Helpers                                                                   */
/* ======================================================================== */

static inline float fp16(ember_fp16_t h) { return ember_fp16_table[h]; }

static inline __m512i load512(const void *p) { return _mm512_loadu_si512(p); }
static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* two 32-byte runs -> one register [a, b] */
static inline __m512i pair256(__m256i a, __m256i b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

/* One 4-byte weight group broadcast to 16 lanes, straight from memory. Left
 * to itself the compiler keeps the unpacked groups in registers and builds
 * each broadcast from 1-2 shuffles plus a register broadcast, all on port 5
 * -- two port-5 uops per vpdpbusd made prefill shuffle-bound. A broadcast
 * load is a load-port uop only. `p` must point at memory the caller wrote
 * (the "m" operand makes the compiler keep it there). */
static inline __m512i bcast_mem32(const uint32_t *p) {
    __m512i r;
    __asm__("vpbroadcastd %1, %0" : "=v"(r) : "m"(*p));
    return r;
}

/* Prefill packing: 16 activation rows' 4-code groups interleaved. src[r]
 * points at 16 consecutive groups (64 bytes) of row r; dst[g] (64 bytes)
 * receives group g of rows 0..15. A 16x16 dword transpose in registers
 * (64 shuffles) instead of 256 4-byte copies: packing was ~4% of a prompt,
 * repeated for every row chunk a thread takes. */
static inline void transpose16_groups(const int8_t *const src[16], int8_t (*dst)[64]) {
    __m512i a[16], b[16];
    for (int r = 0; r < 16; r += 2) {   /* per 128-bit lane L: [r0 r1 r0 r1] of dwords 4L, 4L+1 | 4L+2, 4L+3 */
        const __m512i x = _mm512_loadu_si512(src[r]), y = _mm512_loadu_si512(src[r + 1]);
        a[r] = _mm512_unpacklo_epi32(x, y);
        a[r + 1] = _mm512_unpackhi_epi32(x, y);
    }
    for (int m = 0; m < 4; m++) {       /* b[4m + j], lane L: rows 4m..4m+3 of dword 4L + j */
        const __m512i *t = a + 4 * m;
        b[4 * m + 0] = _mm512_unpacklo_epi64(t[0], t[2]);
        b[4 * m + 1] = _mm512_unpackhi_epi64(t[0], t[2]);
        b[4 * m + 2] = _mm512_unpacklo_epi64(t[1], t[3]);
        b[4 * m + 3] = _mm512_unpackhi_epi64(t[1], t[3]);
    }
    for (int j = 0; j < 4; j++) {       /* 4x4 transpose of 128-bit lanes: dst[4L + j] */
        const __m512i w0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), w1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xEE);
        const __m512i w2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44), w3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xEE);
        _mm512_storeu_si512(dst[j], _mm512_shuffle_i32x4(w0, w2, 0x88));
        _mm512_storeu_si512(dst[4 + j], _mm512_shuffle_i32x4(w0, w2, 0xDD));
        _mm512_storeu_si512(dst[8 + j], _mm512_shuffle_i32x4(w1, w3, 0x88));
        _mm512_storeu_si512(dst[12 + j], _mm512_shuffle_i32x4(w1, w3, 0xDD));
    }
}

/* 2 x 8 float lanes: s0 in lanes 0..7, s1 in 8..15 */
static inline __m512 pair_scale(float s0, float s1) {
    return _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
}

/* Q4_0 blocks b[0], b[1] -> nibbles in value order [b0 0..31, b1 0..31]:
 * [q0, q0, q1, q1] from two broadcast loads, then shift every other 128-bit
 * lane by 4 (one variable shift instead of shift + permute). */
static inline __m512i q4_0_pair(const block_q4_0 *b) {
    const __m256i q0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b[0].qs));
    const __m256i q1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b[1].qs));
    const __m512i t = _mm512_srlv_epi64(pair256(q0, q1), _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
    return _mm512_and_si512(t, _mm512_set1_epi8(0x0F));
}

static inline __m512i q8_0_pair(const block_q8_0 *b) {
    return pair256(load256(b[0].qs), load256(b[1].qs));
}

/* ======================================================================== */
/* Q4_0 and Q8_0, generated for the plain and the VNNI build                  */
/* ======================================================================== */

/* Exact signed dot of a two-block pair plus the activation's aux `corr`
 * (-bias * sums of 4 codes, see ember_kernels.h): 16 int32 lanes, 8 per block.
 * Q4_0: raw nibbles u (0..15) as the u8 operand, corr removes the bias 8
 * (maddubs pair sums <= 2*15*127: no saturation). Q8_0 with VNNI: offset
 * binary u = w ^ 0x80 (= w + 128), corr removes the 128; vpdpbusd adds into
 * int32 without saturating. Q8_0 without VNNI would saturate maddubs with
 * u up to 255, so it moves w's sign onto y instead and ignores corr (y is
 * never -128: Q8_0 activations round into [-127, 127]). */
static inline __m512i corr_pair(const int32_t *corr) { return _mm512_loadu_si512(corr); }

#define PAIR_FUNCS(ISA, DOT_ACC)                                                         \
static inline __m512i pair_q4_0_##ISA(const block_q4_0 *w, __m512i y, const int32_t *corr) { \
    return DOT_ACC(corr_pair(corr), q4_0_pair(w), y);                                   \
}

static inline __m512i dot_acc_plain(__m512i acc, __m512i u, __m512i s) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}

static inline __m512i pair_q8_0_avx512(const block_q8_0 *w, __m512i y, const int32_t *corr) {
    (void)corr;
    const __m512i q = q8_0_pair(w);
    const __m512i sy = _mm512_mask_sub_epi8(y, _mm512_movepi8_mask(q), _mm512_setzero_si512(), y);
    return dot_acc_plain(_mm512_setzero_si512(), _mm512_abs_epi8(q), sy);
}

/* [d(w0) x 8, d(w1) x 8]: two broadcasts straight from the fp16 table */
#define DW_PAIR(w) _mm512_insertf32x8(_mm512_set1_ps(fp16((w)[0].d)), _mm256_set1_ps(fp16((w)[1].d)), 1)

/* One step = four blocks of one activation row into two accumulators. dot and
 * dot4 run the same step on the same weights, so a row's result never depends
 * on which of them computed it (matvec == each row of matmul, bit for bit). */
typedef struct { __m512 a0, a1; } acc2;

#define Q8_0_KERNELS(name, wtype_t, ISA)                                                 \
static inline void step4_##name##_##ISA(acc2 *acc, const wtype_t *w, __m512 dw0, __m512 dw1, \
                                        const int8_t *qs, const float *dx8, const int32_t *corr) { \
    const __m512i p0 = pair_##name##_##ISA(w, load512(qs), corr);                       \
    const __m512i p1 = pair_##name##_##ISA(w + 2, load512(qs + 64), corr + 16);         \
    const __m512 t0 = _mm512_mul_ps(_mm512_cvtepi32_ps(p0), _mm512_loadu_ps(dx8));      \
    const __m512 t1 = _mm512_mul_ps(_mm512_cvtepi32_ps(p1), _mm512_loadu_ps(dx8 + 16)); \
    acc->a0 = _mm512_fmadd_ps(t0, dw0, acc->a0);                                        \
    acc->a1 = _mm512_fmadd_ps(t1, dw1, acc->a1);                                        \
}                                                                                       \
                                                                                        \
float ember_vec_dot_##name##_q8_0_##ISA(int64_t n, const void *vw, const void *vx) {    \
    const wtype_t *w = vw;                                                              \
    const block_q8_0 *x = vx;                                                           \
    const float *dx8 = ember_q8_0_dx8(vx, n);                                           \
    const int32_t *corr = ember_q8_0_corr(vx, n);                                       \
    const int8_t *qs = ember_q8_0_qs(vx, n);                                            \
    const int64_t nb = n / QK8_0;                                                       \
    acc2 acc = {_mm512_setzero_ps(), _mm512_setzero_ps()};                              \
    int64_t i = 0;                                                                      \
    for (; i + 4 <= nb; i += 4) {                                                       \
        step4_##name##_##ISA(&acc, w + i, DW_PAIR(&w[i]), DW_PAIR(&w[i + 2]), qs + 32 * i, dx8 + 8 * i, corr + 8 * i); \
    }                                                                                   \
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc.a0, acc.a1));                    \
    if (i < nb) sum += ember_vec_dot_##name##_q8_0_generic((nb - i) * QK8_0, w + i, x + i); \
    return sum;                                                                         \
}                                                                                       \
                                                                                        \
void ember_vec_dot4_##name##_q8_0_##ISA(int64_t n, const void *vw, const void *vx,      \
                                        size_t xs, float *s) {                          \
    const wtype_t *w = vw;                                                              \
    const uint8_t *xb = vx;                                                             \
    const int64_t nb = n / QK8_0;                                                       \
    acc2 acc[4];                                                                        \
    for (int r = 0; r < 4; r++) acc[r].a0 = acc[r].a1 = _mm512_setzero_ps();            \
    int64_t i = 0;                                                                      \
    for (; i + 4 <= nb; i += 4) {                                                       \
        const __m512 dw0 = DW_PAIR(&w[i]), dw1 = DW_PAIR(&w[i + 2]);                    \
        for (int r = 0; r < 4; r++) {                                                   \
            const void *xr = xb + r * xs;                                               \
            step4_##name##_##ISA(&acc[r], w + i, dw0, dw1, ember_q8_0_qs(xr, n) + 32 * i, \
                                 ember_q8_0_dx8(xr, n) + 8 * i, ember_q8_0_corr(xr, n) + 8 * i); \
        }                                                                               \
    }                                                                                   \
    for (int r = 0; r < 4; r++) {                                                       \
        const block_q8_0 *x = (const block_q8_0 *)(xb + r * xs);                        \
        s[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r].a0, acc[r].a1));               \
        if (i < nb) s[r] += ember_vec_dot_##name##_q8_0_generic((nb - i) * QK8_0, w + i, x + i); \
    }                                                                                   \
}

PAIR_FUNCS(avx512, dot_acc_plain)
Q8_0_KERNELS(q4_0, block_q4_0, avx512)
Q8_0_KERNELS(q8_0, block_q8_0, avx512)

#pragma GCC push_options
#pragma GCC target("avx512vnni")
PAIR_FUNCS(avx512vnni, _mm512_dpbusd_epi32)
static inline __m512i pair_q8_0_avx512vnni(const block_q8_0 *w, __m512i y, const int32_t *corr) {
    return _mm512_dpbusd_epi32(corr_pair(corr), _mm512_xor_si512(q8_0_pair(w), _mm512_set1_epi8((char)0x80)), y);
}
Q8_0_KERNELS(q4_0, block_q4_0, avx512vnni)
Q8_0_KERNELS(q8_0, block_q8_0, avx512vnni)
#pragma GCC pop_options


/* ------------------------------------------------------------------------ */
/* Q4_0 and Q8_0 with VNNI, activation rows in lanes                         */
/* ------------------------------------------------------------------------ */

/* Prefill layout: 16 activation rows interleaved, so that one vpdpbusd of a
 * broadcast 4-value weight group against 64 bytes (4 codes of each of 16
 * rows) advances 16 (weight row, activation row) dots at once and every
 * int32 lane is a finished block sum after 8 of them: the float work (cvt,
 * scale, fma) is paid once per block for 16 rows instead of once per 8
 * lanes per row. No weight repacking: a weight block is unpacked to 32 bytes
 * on the stack and broadcast 4 bytes at a time.
 *
 * The per-pair order both paths share (matvec == matmul row, bit for bit):
 * isum_b is the exact block sum (bias included), s_b = d(w_b) * d(x_b);
 * chain c = b % 4 does A_c = fma((float)isum_b, s_b, A_c); the result is
 * (A_0 + A_1) + (A_2 + A_3). Four chains keep matvec's fma latency hidden. */

typedef struct {
    int8_t qs[8][64];   /* group k: codes 4k..4k+3 of rows 0..15 */
    float dx[16];       /* d(x) per row */
    int32_t corr[16];   /* -bias * sum of the row's 32 codes (the aux corr, summed) */
} xpack16;

static void pack16(const uint8_t *xq, size_t xs, int64_t n, xpack16 *p) {
    const int64_t nb = n / QK8_0;
    const int8_t *src[16];
    for (int64_t b = 0; b + 2 <= nb; b += 2) {   /* two blocks = 16 groups per row */
        for (int r = 0; r < 16; r++) src[r] = ember_q8_0_qs(xq + r * xs, n) + 32 * b;
        int8_t grp[16][64];
        transpose16_groups(src, grp);
        memcpy(p[b].qs, grp, sizeof p[b].qs);
        memcpy(p[b + 1].qs, grp[8], sizeof p[b + 1].qs);
    }
    for (int r = 0; r < 16; r++) {
        const void *xr = xq + r * xs;
        const int8_t *qs = ember_q8_0_qs(xr, n);
        const float *dx8 = ember_q8_0_dx8(xr, n);
        const int32_t *corr = ember_q8_0_corr(xr, n);
        for (int64_t b = 0; b < nb; b++) {
            if (nb % 2 && b == nb - 1)   /* an odd last block: copied group by group */
                for (int k = 0; k < 8; k++) memcpy(p[b].qs[k] + 4 * r, qs + 32 * b + 4 * k, 4);
            int32_t c = 0;
            for (int l = 0; l < 8; l++) c += corr[8 * b + l];
            p[b].dx[r] = dx8[8 * b];
            p[b].corr[r] = c;
        }
    }
}

/* 32 weight codes (unsigned nibbles) in value order */
static inline void unpack_q4_0(const block_q4_0 *w, uint32_t u[8]) {
    const __m128i q = _mm_loadu_si128((const __m128i *)w->qs), m = _mm_set1_epi8(0x0F);
    _mm_storeu_si128((__m128i *)u, _mm_and_si128(q, m));
    _mm_storeu_si128((__m128i *)(u + 4), _mm_and_si128(_mm_srli_epi16(q, 4), m));
}

/* 32 Q8_0 weight codes made unsigned (offset binary; corr removes the 128) */
static inline void unpack_q8_0(const block_q8_0 *w, uint32_t u[8]) {
    _mm256_storeu_si256((__m256i *)u, _mm256_xor_si256(load256(w->qs), _mm256_set1_epi8((char)0x80)));
}

/* the exact signed block sum, for the < 4 leftover blocks of a row */
static inline int32_t isum_q4_0(const block_q4_0 *w, const block_q8_0 *x) {
    int32_t s = 0;
    for (int j = 0; j < 16; j++) s += ((w->qs[j] & 0xF) - 8) * x->qs[j] + ((w->qs[j] >> 4) - 8) * x->qs[j + 16];
    return s;
}

static inline int32_t isum_q8_0(const block_q8_0 *w, const block_q8_0 *x) {
    int32_t s = 0;
    for (int j = 0; j < 32; j++) s += w->qs[j] * x->qs[j];
    return s;
}

#pragma GCC push_options
#pragma GCC target("avx512vnni")

/* a per-thread packing buffer of n elements of `size` bytes: grows once to the
 * largest row seen, never per call after that */
static int pack_reserve(void **buf, int64_t *cap, int64_t n, size_t size) {
    if (n <= *cap) return 0;
    void *nbuf = aligned_alloc(64, (size_t)n * size);
    if (!nbuf) return -1;
    free(*buf);
    *buf = nbuf;
    *cap = n;
    return 0;
}

static __thread void *xpack_buf;
static __thread int64_t xpack_cap;

static int xpack_reserve(int64_t nb) {
    return pack_reserve(&xpack_buf, &xpack_cap, nb, sizeof(xpack16));
}

/* exact block sums of 4 blocks (bias included): [b0, b1, b2, b3] */
static inline __m128i block_sums4(__m512i p0, __m512i p1) {
    /* p0 = [b0 x8 | b1 x8], p1 = [b2 x8 | b3 x8]; 128-bit lanes L0 L1 = first block */
    const __m512i q = _mm512_add_epi32(_mm512_unpacklo_epi32(p0, p1), _mm512_unpackhi_epi32(p0, p1));
    const __m512i h = _mm512_add_epi32(q, _mm512_shuffle_epi32(q, _MM_PERM_BADC));  /* [p0 L, p1 L, ..] */
    const __m256i lo = _mm512_castsi512_si256(h), hi = _mm512_extracti64x4_epi64(h, 1);
    /* lo: L0 = [b0', b2', ..], L1 = [b0'', b2'', ..]; hi the same for b1, b3 */
    const __m128i e = _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
    const __m128i o = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    return _mm_unpacklo_epi32(e, o);   /* [b0, b1, b2, b3] */
}

/* d of 4 consecutive blocks: packed in a GPR (scalar ports are idle here),
 * one exact F16C conversion -- the same values as the fp16 table */
static inline __m128 dw4(const ember_fp16_t *d, size_t stride) {
    const uint8_t *p = (const uint8_t *)d;
    uint16_t h[4];
    for (int j = 0; j < 4; j++) memcpy(&h[j], p + j * stride, 2);
    const uint64_t v = h[0] | ((uint64_t)h[1] << 16) | ((uint64_t)h[2] << 32) | ((uint64_t)h[3] << 48);
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)v));
}

/* d(x) of 4 consecutive blocks from the aux area (each stored 8 times) */
static inline __m128 dx4(const float *dx8) {
    const __m512i idx = _mm512_setr_epi32(0, 8, 16, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps128(_mm512_permutex2var_ps(_mm512_loadu_ps(dx8), idx, _mm512_loadu_ps(dx8 + 16)));
}

static inline float chains_sum(__m128 A) {
    float a[4];
    _mm_storeu_ps(a, A);
    return (a[0] + a[1]) + (a[2] + a[3]);
}

/* one block of one weight row into its chain: exact isum over 16 rows, then
 * the float step (matvec does the same per row: see the order above) */
#define LANES_STEP(name, wb, pb, Ac) do {                                                \
    uint32_t u_[8];                                                                     \
    unpack_##name(wb, u_);                                                              \
    __m512i i0_ = _mm512_loadu_si512((pb)->corr), i1_ = _mm512_setzero_si512();         \
    for (int k_ = 0; k_ < 8; k_ += 2) {   /* two int chains: half the latency */        \
        i0_ = _mm512_dpbusd_epi32(i0_, bcast_mem32(&u_[k_]), load512((pb)->qs[k_])); \
        i1_ = _mm512_dpbusd_epi32(i1_, bcast_mem32(&u_[k_ + 1]), load512((pb)->qs[k_ + 1])); \
    }                                                                                   \
    const __m512 sc_ = _mm512_mul_ps(_mm512_set1_ps(fp16((wb)->d)), _mm512_loadu_ps((pb)->dx)); \
    Ac = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0_, i1_)), sc_, Ac);      \
} while (0)

/* lane j of y -> Y[j * ldy + r]: one output column of 16 activation rows */
static inline void store16_lanes(__m512 y, float *Y, int64_t ldy, int64_t r) {
    float t[16];
    _mm512_storeu_ps(t, y);
    for (int j = 0; j < 16; j++) Y[j * ldy + r] = t[j];
}

static inline void store16(const __m512 A[4], float *Y, int64_t ldy, int64_t r) {
    store16_lanes(_mm512_add_ps(_mm512_add_ps(A[0], A[1]), _mm512_add_ps(A[2], A[3])), Y, ldy, r);
}

#define LANES_KERNELS(name, wtype_t)                                                     \
/* rows [r, rend) of W against one packed 16-row group: Y[j * ldy + row]      \
 * (two weight rows per pass, sharing the activation loads, measured slower) */         \
static void mm16_rows_##name(int64_t n, const uint8_t *w, size_t row_bytes, int64_t r,  \
                             int64_t rend, const xpack16 *p, float *Y, int64_t ldy) {   \
    const int64_t nb = n / QK8_0;                                                       \
    for (; r < rend; r++) {                                                             \
        const wtype_t *w0 = (const wtype_t *)(w + (size_t)r * row_bytes);               \
        __m512 A[4];                                                                    \
        for (int c = 0; c < 4; c++) A[c] = _mm512_setzero_ps();                         \
        for (int64_t b = 0; b < nb; b++) LANES_STEP(name, &w0[b], &p[b], A[b & 3]);    \
        store16(A, Y, ldy, r);                                                          \
    }                                                                                   \
}                                                                                       \
                                                                                        \
int ember_matmul16_##name##_avx512vnni(int64_t n, const void *W, size_t row_bytes, int64_t r0, \
                                       int64_t r1, const void *xq, size_t xs, float *Y, int64_t ldy) { \
    if (xpack_reserve(n / QK8_0) != 0) return -1;                                       \
    pack16(xq, xs, n, xpack_buf);                                                       \
    mm16_rows_##name(n, W, row_bytes, r0, r1, xpack_buf, Y, ldy);                       \
    return 0;                                                                           \
}                                                                                       \
                                                                                        \
float ember_vec_dot_##name##_q8_0_lanes(int64_t n, const void *vw, const void *vx) {    \
    const wtype_t *w = vw;                                                              \
    const block_q8_0 *x = vx;                                                           \
    const float *dx8 = ember_q8_0_dx8(vx, n);                                           \
    const int32_t *corr = ember_q8_0_corr(vx, n);                                       \
    const int8_t *qs = ember_q8_0_qs(vx, n);                                            \
    const int64_t nb = n / QK8_0;                                                       \
    __m128 A = _mm_setzero_ps();                                                        \
    int64_t i = 0;                                                                      \
    for (; i + 4 <= nb; i += 4) {                                                       \
        const __m512i p0 = pair_##name##_avx512vnni(w + i, load512(qs + 32 * i), corr + 8 * i); \
        const __m512i p1 = pair_##name##_avx512vnni(w + i + 2, load512(qs + 32 * i + 64), corr + 8 * i + 16); \
        const __m128 dw = dw4(&w[i].d, sizeof(wtype_t));                                \
        const __m128 dx = dx4(dx8 + 8 * i);                                             \
        A = _mm_fmadd_ps(_mm_cvtepi32_ps(block_sums4(p0, p1)), _mm_mul_ps(dw, dx), A);  \
    }                                                                                   \
    if (i < nb) {                                                                       \
        float a[4];                                                                     \
        _mm_storeu_ps(a, A);                                                            \
        for (; i < nb; i++) a[i & 3] = fmaf((float)isum_##name(&w[i], &x[i]), fp16(w[i].d) * dx8[8 * i], a[i & 3]); \
        A = _mm_loadu_ps(a);                                                            \
    }                                                                                   \
    return chains_sum(A);                                                               \
}

LANES_KERNELS(q4_0, block_q4_0)
LANES_KERNELS(q8_0, block_q8_0)

#pragma GCC pop_options

/* ======================================================================== */
/* Q4_K                                                                      */
/* ======================================================================== */

/* 8 scales (int16 lanes 0..7) and 8 mins (lanes 8..15) from 12 packed bytes */
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

/* int16 index vector: lanes 0..15 take element a, lanes 16..31 element b */
static inline __m512i idx_2x16(int a, int b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)a)), _mm256_set1_epi16((short)b), 1);
}

/* int16 index vector: lanes 8k..8k+7 take element base+k, k = 0..3 */
static inline __m512i idx_4x8(int base) {
    const __m128i a = _mm_set1_epi16((short)base), b = _mm_set1_epi16((short)(base + 1));
    const __m128i c = _mm_set1_epi16((short)(base + 2)), d = _mm_set1_epi16((short)(base + 3));
    return pair256(_mm256_set_m128i(b, a), _mm256_set_m128i(d, c));
}

/* chunk j: 64 values in order (low nibbles of 32 bytes, then their high nibbles) */
static inline __m512i q4k_chunk(const uint8_t *qs) {
    const __m256i t = load256(qs);
    return _mm512_and_si512(pair256(t, _mm256_srli_epi16(t, 4)), _mm512_set1_epi8(0x0F));
}

/* sum_j m_j * (bsums[2j] + bsums[2j+1]), 4 int32 lanes */
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

float ember_vec_dot_q4_K_q8_K_avx512(int64_t n, const void *vw, const void *vx) {
    const block_q4_K *w = vw;
    const block_q8_K *x = vx;
    __m512 acc = _mm512_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m256i scmin = k4_scales_mins(w[i].scales);
        const __m512i sc = _mm512_castsi256_si512(scmin);
        __m512i sumi = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            const __m512i p = _mm512_maddubs_epi16(q4k_chunk(w[i].qs + 32 * j), load512(x[i].qs + 64 * j));
            sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(_mm512_permutexvar_epi16(idx_2x16(2 * j, 2 * j + 1), sc), p));
        }
        const float dy = x[i].d;
        acc = _mm512_fmadd_ps(_mm512_set1_ps(dy * fp16(w[i].d)), _mm512_cvtepi32_ps(sumi), acc);
        accm = _mm_fmadd_ps(_mm_set1_ps(-dy * fp16(w[i].dmin)), _mm_cvtepi32_ps(k4_min_sums(scmin, &x[i])), accm);
    }
    return _mm512_reduce_add_ps(acc) + hsum4(accm);
}

void ember_vec_dot4_q4_K_q8_K_avx512(int64_t n, const void *vw, const void *vx, size_t xs, float *s) {
    const block_q4_K *w = vw;
    const uint8_t *xb = vx;
    __m512 acc[4];
    __m128 accm[4];
    for (int r = 0; r < 4; r++) { acc[r] = _mm512_setzero_ps(); accm[r] = _mm_setzero_ps(); }
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m256i scmin = k4_scales_mins(w[i].scales);
        const __m512i sc = _mm512_castsi256_si512(scmin);
        const block_q8_K *x[4];
        __m512i sumi[4];
        for (int r = 0; r < 4; r++) {
            x[r] = (const block_q8_K *)(xb + r * xs) + i;
            sumi[r] = _mm512_setzero_si512();
        }
        for (int j = 0; j < 4; j++) {
            const __m512i u = q4k_chunk(w[i].qs + 32 * j);
            const __m512i scj = _mm512_permutexvar_epi16(idx_2x16(2 * j, 2 * j + 1), sc);
            for (int r = 0; r < 4; r++) {
                const __m512i p = _mm512_maddubs_epi16(u, load512(x[r]->qs + 64 * j));
                sumi[r] = _mm512_add_epi32(sumi[r], _mm512_madd_epi16(scj, p));
            }
        }
        const float dw = fp16(w[i].d), dmin = fp16(w[i].dmin);
        for (int r = 0; r < 4; r++) {
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r]->d * dw), _mm512_cvtepi32_ps(sumi[r]), acc[r]);
            accm[r] = _mm_fmadd_ps(_mm_set1_ps(-x[r]->d * dmin), _mm_cvtepi32_ps(k4_min_sums(scmin, x[r])), accm[r]);
        }
    }
    for (int r = 0; r < 4; r++) s[r] = _mm512_reduce_add_ps(acc[r]) + hsum4(accm[r]);
}


/* ------------------------------------------------------------------------ */
/* Q4_K with VNNI, activation rows in lanes (the Q4_0 scheme per sub-block)  */
/* ------------------------------------------------------------------------ */

/* Per super-block i the exact ints sumi = sum_j sc_j * isum_j and
 * summ = sum_j m_j * (codes of sub-block j); chain c = i % 4 does
 * A_c = fma(sumi, d(x) * d(w), A_c) and M_c = fma(summ, -(d(x) * dmin), M_c);
 * the result is ((A_0 + A_1) + (A_2 + A_3)) + ((M_0 + M_1) + (M_2 + M_3)),
 * in matvec and matmul16 alike. */

typedef struct {
    int8_t qs[64][64];  /* group g: codes 4g..4g+3 of rows 0..15 */
    float dx[16];
    int32_t bs[4][16];  /* int16 pair (codes of sub-block 2q, of 2q+1) per row */
} k4_xpack16;

/* qs of 16 Q8_K rows, super-block by super-block, 16 groups at a time */
static void pack16_k_qs(const uint8_t *xq, size_t xs, int64_t nsb, int8_t (*qs)[64][64], size_t pstride) {
    const int8_t *src[16];
    for (int64_t i = 0; i < nsb; i++) {
        int8_t (*dst)[64] = *(int8_t (*)[64][64])((uint8_t *)qs + (size_t)i * pstride);
        for (int t = 0; t < 4; t++) {
            for (int r = 0; r < 16; r++) src[r] = ((const block_q8_K *)(xq + r * xs))[i].qs + 64 * t;
            transpose16_groups(src, dst + 16 * t);
        }
    }
}

static void pack16_k4(const uint8_t *xq, size_t xs, int64_t nsb, k4_xpack16 *p) {
    pack16_k_qs(xq, xs, nsb, &p[0].qs, sizeof *p);
    for (int r = 0; r < 16; r++) {
        const block_q8_K *x = (const block_q8_K *)(xq + r * xs);
        for (int64_t i = 0; i < nsb; i++) {
            p[i].dx[r] = x[i].d;
            for (int q = 0; q < 4; q++) {
                const int16_t lo = (int16_t)(x[i].bsums[4 * q] + x[i].bsums[4 * q + 1]);
                const int16_t hi = (int16_t)(x[i].bsums[4 * q + 2] + x[i].bsums[4 * q + 3]);
                p[i].bs[q][r] = (int32_t)(((uint32_t)(uint16_t)hi << 16) | (uint16_t)lo);
            }
        }
    }
}

/* 256 unsigned codes of a Q4_K super-block in value order */
static inline void unpack_q4_K(const block_q4_K *w, uint32_t u[64]) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++) {
        const __m256i q = load256(w->qs + 32 * c);
        _mm256_storeu_si256((__m256i *)(u + 16 * c), _mm256_and_si256(q, m));
        _mm256_storeu_si256((__m256i *)(u + 16 * c + 8), _mm256_and_si256(_mm256_srli_epi16(q, 4), m));
    }
}

/* 6-bit scales (sm[0..7]) and mins (sm[8..15]) */
static inline void k4_unpack_sm(const block_q4_K *w, uint16_t sm[16]) {
    _mm256_storeu_si256((__m256i *)sm, k4_scales_mins(w->scales));
}

static inline float sum4x2(const float a[4], const float m[4]) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((m[0] + m[1]) + (m[2] + m[3]));
}

#pragma GCC push_options
#pragma GCC target("avx512vnni")

static __thread void *k4_buf;
static __thread int64_t k4_cap;

static void mm16_rows_q4_K(int64_t nsb, const uint8_t *w, size_t row_bytes, int64_t r, int64_t rend,
                           const k4_xpack16 *p, float *Y, int64_t ldy) {
    for (; r < rend; r++) {
        const block_q4_K *wr = (const block_q4_K *)(w + (size_t)r * row_bytes);
        __m512 A[4], M[4];
        for (int c = 0; c < 4; c++) A[c] = M[c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < nsb; i++) {
            uint32_t u[64];
            uint16_t sm[16];
            unpack_q4_K(&wr[i], u);
            k4_unpack_sm(&wr[i], sm);
            __m512i sumi = _mm512_setzero_si512(), summ = _mm512_setzero_si512();
            for (int j = 0; j < 8; j++) {
                __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
                for (int k = 0; k < 8; k += 2) {
                    i0 = _mm512_dpbusd_epi32(i0, bcast_mem32(&u[8 * j + k]), load512(p[i].qs[8 * j + k]));
                    i1 = _mm512_dpbusd_epi32(i1, bcast_mem32(&u[8 * j + k + 1]), load512(p[i].qs[8 * j + k + 1]));
                }
                sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(_mm512_add_epi32(i0, i1), _mm512_set1_epi32(sm[j])));
            }
            for (int q = 0; q < 4; q++) {
                const int mp = (int)((uint32_t)sm[8 + 2 * q] | ((uint32_t)sm[9 + 2 * q] << 16));
                summ = _mm512_add_epi32(summ, _mm512_madd_epi16(_mm512_loadu_si512(p[i].bs[q]), _mm512_set1_epi32(mp)));
            }
            const __m512 dx = _mm512_loadu_ps(p[i].dx);
            A[i & 3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_mul_ps(dx, _mm512_set1_ps(fp16(wr[i].d))), A[i & 3]);
            M[i & 3] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dx, _mm512_set1_ps(fp16(wr[i].dmin))), M[i & 3]);
        }
        const __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(A[0], A[1]), _mm512_add_ps(A[2], A[3])),
                                       _mm512_add_ps(_mm512_add_ps(M[0], M[1]), _mm512_add_ps(M[2], M[3])));
        store16_lanes(y, Y, ldy, r);
    }
}

int ember_matmul16_q4_K_avx512vnni(int64_t n, const void *W, size_t row_bytes, int64_t r0, int64_t r1,
                                   const void *xq, size_t xs, float *Y, int64_t ldy) {
    const int64_t nsb = n / QK_K;
    if (pack_reserve(&k4_buf, &k4_cap, nsb, sizeof(k4_xpack16))) return -1;
    pack16_k4(xq, xs, nsb, k4_buf);
    mm16_rows_q4_K(nsb, W, row_bytes, r0, r1, k4_buf, Y, ldy);
    return 0;
}

#pragma GCC pop_options

/* one super-block's exact int sums: sc-weighted codes (16 lanes) and mins (4) */
static inline __m512i k4_sumi(const block_q4_K *w, const block_q8_K *x, __m128i *mins) {
    const __m256i scmin = k4_scales_mins(w->scales);
    const __m512i sc = _mm512_castsi256_si512(scmin);
    __m512i sumi = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        const __m512i pr = _mm512_maddubs_epi16(q4k_chunk(w->qs + 32 * j), load512(x->qs + 64 * j));
        sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(_mm512_permutexvar_epi16(idx_2x16(2 * j, 2 * j + 1), sc), pr));
    }
    *mins = k4_min_sums(scmin, x);
    return sumi;
}

/* [sum(a), sum(b), sum(c), sum(d)] of four 4-lane int vectors */
static inline __m128i hsum4x4(__m128i a, __m128i b, __m128i c, __m128i d) {
    const __m128i ab = _mm_add_epi32(_mm_unpacklo_epi32(a, b), _mm_unpackhi_epi32(a, b));
    const __m128i cd = _mm_add_epi32(_mm_unpacklo_epi32(c, d), _mm_unpackhi_epi32(c, d));
    return _mm_add_epi32(_mm_unpacklo_epi64(ab, cd), _mm_unpackhi_epi64(ab, cd));
}

/* 16 lanes -> 4 lanes (exact ints: the order is free) */
static inline __m128i fold16(__m512i v) {
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

float ember_vec_dot_q4_K_q8_K_lanes(int64_t n, const void *vw, const void *vx) {
    const block_q4_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nsb = n / QK_K;
    __m128 A = _mm_setzero_ps(), M = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nsb; i += 4) {   /* lane c = chain c = super-block i + c */
        __m128i s[4], m[4];
        for (int c = 0; c < 4; c++) s[c] = fold16(k4_sumi(&w[i + c], &x[i + c], &m[c]));
        const __m128 dx = _mm_setr_ps(x[i].d, x[i + 1].d, x[i + 2].d, x[i + 3].d);
        const __m128 dw = _mm_setr_ps(fp16(w[i].d), fp16(w[i + 1].d), fp16(w[i + 2].d), fp16(w[i + 3].d));
        const __m128 dm = _mm_setr_ps(fp16(w[i].dmin), fp16(w[i + 1].dmin), fp16(w[i + 2].dmin), fp16(w[i + 3].dmin));
        A = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4x4(s[0], s[1], s[2], s[3])), _mm_mul_ps(dx, dw), A);
        M = _mm_fnmadd_ps(_mm_cvtepi32_ps(hsum4x4(m[0], m[1], m[2], m[3])), _mm_mul_ps(dx, dm), M);
    }
    float a[4], mm[4];
    _mm_storeu_ps(a, A);
    _mm_storeu_ps(mm, M);
    for (; i < nsb; i++) {
        __m128i mins;
        const __m128i si = fold16(k4_sumi(&w[i], &x[i], &mins));
        const __m128i t = hsum4x4(si, mins, si, mins);   /* [sumi, summ, ..] */
        a[i & 3] = fmaf((float)_mm_cvtsi128_si32(t), x[i].d * fp16(w[i].d), a[i & 3]);
        mm[i & 3] = fmaf(-(float)_mm_extract_epi32(t, 1), x[i].d * fp16(w[i].dmin), mm[i & 3]);
    }
    return sum4x2(a, mm);
}

/* ======================================================================== */
/* Q6_K                                                                      */
/* ======================================================================== */

/* One 128-value half as two registers of unsigned codes 0..63, value order. */
static inline void q6k_half(const uint8_t *ql, const uint8_t *qh, __m512i u[2]) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m3 = _mm512_set1_epi8(0x03);
    const __m512i l = load512(ql);                  /* ql[0..63]: values 0..63 low, 64..127 high nibbles */
    const __m256i h = load256(qh);
    const __m512i h01 = pair256(h, _mm256_srli_epi16(h, 2));                       /* values 0..63 */
    const __m512i h23 = pair256(_mm256_srli_epi16(h, 4), _mm256_srli_epi16(h, 6)); /* values 64..127 */
    u[0] = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_slli_epi16(_mm512_and_si512(h01, m3), 4));
    u[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                           _mm512_slli_epi16(_mm512_and_si512(h23, m3), 4));
}

/* codes are value + 32: the -32 is paid once per 16 values through bsums */
static inline __m256i q6k_offset(__m512i sc16, const block_q8_K *x) {
    return _mm256_slli_epi32(_mm256_madd_epi16(_mm512_castsi512_si256(sc16), load256(x->bsums)), 5);
}

/* sumi starts at -offset in lanes 0..7 (exact), the same in dot and dot4 */
static inline __m512i q6k_start(__m512i sc16, const block_q8_K *x) {
    const __m256i off = _mm256_sub_epi32(_mm256_setzero_si256(), q6k_offset(sc16, x));
    return _mm512_maskz_mov_epi32(0x00FF, _mm512_castsi256_si512(off));
}

float ember_vec_dot_q6_K_q8_K_avx512(int64_t n, const void *vw, const void *vx) {
    const block_q6_K *w = vw;
    const block_q8_K *x = vx;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[i].scales)));
        __m512i sumi = q6k_start(sc16, &x[i]);
        for (int half = 0; half < 2; half++) {
            __m512i u[2];
            q6k_half(w[i].ql + 64 * half, w[i].qh + 32 * half, u);
            for (int c = 0; c < 2; c++) {
                const __m512i p = _mm512_maddubs_epi16(u[c], load512(x[i].qs + 128 * half + 64 * c));
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(_mm512_permutexvar_epi16(idx_4x8(8 * half + 4 * c), sc16), p));
            }
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(x[i].d * fp16(w[i].d)), _mm512_cvtepi32_ps(sumi), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

void ember_vec_dot4_q6_K_q8_K_avx512(int64_t n, const void *vw, const void *vx, size_t xs, float *s) {
    const block_q6_K *w = vw;
    const uint8_t *xb = vx;
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[i].scales)));
        const block_q8_K *x[4];
        __m512i sumi[4];
        for (int r = 0; r < 4; r++) {
            x[r] = (const block_q8_K *)(xb + r * xs) + i;
            sumi[r] = q6k_start(sc16, x[r]);
        }
        for (int half = 0; half < 2; half++) {
            __m512i u[2];
            q6k_half(w[i].ql + 64 * half, w[i].qh + 32 * half, u);
            for (int c = 0; c < 2; c++) {
                const __m512i scc = _mm512_permutexvar_epi16(idx_4x8(8 * half + 4 * c), sc16);
                for (int r = 0; r < 4; r++) {
                    const __m512i p = _mm512_maddubs_epi16(u[c], load512(x[r]->qs + 128 * half + 64 * c));
                    sumi[r] = _mm512_add_epi32(sumi[r], _mm512_madd_epi16(scc, p));
                }
            }
        }
        const float dw = fp16(w[i].d);
        for (int r = 0; r < 4; r++) {
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r]->d * dw), _mm512_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) s[r] = _mm512_reduce_add_ps(acc[r]);
}


/* ------------------------------------------------------------------------ */
/* Q6_K with VNNI, activation rows in lanes (16-value sub-blocks)            */
/* ------------------------------------------------------------------------ */

/* Per super-block the exact int sumi = sum_s sc_s * isum_s - 32 sum_s sc_s *
 * bsum_s (codes are value + 32); chain c = i % 4 does A_c = fma(sumi,
 * d(x) * d(w), A_c); the result is (A_0 + A_1) + (A_2 + A_3). */

typedef struct {
    int8_t qs[64][64];  /* group g: codes 4g..4g+3 of rows 0..15 */
    float dx[16];
    int32_t bs[8][16];  /* int16 pair (bsums[2q], bsums[2q+1]) per row */
} k6_xpack16;

static void pack16_k6(const uint8_t *xq, size_t xs, int64_t nsb, k6_xpack16 *p) {
    pack16_k_qs(xq, xs, nsb, &p[0].qs, sizeof *p);
    for (int r = 0; r < 16; r++) {
        const block_q8_K *x = (const block_q8_K *)(xq + r * xs);
        for (int64_t i = 0; i < nsb; i++) {
            p[i].dx[r] = x[i].d;
            for (int q = 0; q < 8; q++) {
                p[i].bs[q][r] = (int32_t)(((uint32_t)(uint16_t)x[i].bsums[2 * q + 1] << 16) | (uint16_t)x[i].bsums[2 * q]);
            }
        }
    }
}

/* 256 unsigned codes (0..63) of a Q6_K super-block in value order */
static inline void unpack_q6_K(const block_q6_K *w, uint32_t u[64]) {
    for (int half = 0; half < 2; half++) {
        __m512i v[2];
        q6k_half(w->ql + 64 * half, w->qh + 32 * half, v);
        _mm512_storeu_si512(u + 32 * half, v[0]);
        _mm512_storeu_si512(u + 32 * half + 16, v[1]);
    }
}

#pragma GCC push_options
#pragma GCC target("avx512vnni")

static __thread void *k6_buf;
static __thread int64_t k6_cap;

static void mm16_rows_q6_K(int64_t nsb, const uint8_t *w, size_t row_bytes, int64_t r, int64_t rend,
                           const k6_xpack16 *p, float *Y, int64_t ldy) {
    for (; r < rend; r++) {
        const block_q6_K *wr = (const block_q6_K *)(w + (size_t)r * row_bytes);
        __m512 A[4];
        for (int c = 0; c < 4; c++) A[c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < nsb; i++) {
            uint32_t u[64];
            unpack_q6_K(&wr[i], u);
            const int8_t *sc = wr[i].scales;
            __m512i sumi = _mm512_setzero_si512(), off = _mm512_setzero_si512();
            for (int sb = 0; sb < 16; sb++) {
                __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bcast_mem32(&u[4 * sb]), load512(p[i].qs[4 * sb]));
                __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bcast_mem32(&u[4 * sb + 1]), load512(p[i].qs[4 * sb + 1]));
                i0 = _mm512_dpbusd_epi32(i0, bcast_mem32(&u[4 * sb + 2]), load512(p[i].qs[4 * sb + 2]));
                i1 = _mm512_dpbusd_epi32(i1, bcast_mem32(&u[4 * sb + 3]), load512(p[i].qs[4 * sb + 3]));
                sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(_mm512_add_epi32(i0, i1), _mm512_set1_epi32(sc[sb])));
            }
            for (int q = 0; q < 8; q++) {
                const int sp = (int)((uint32_t)(uint16_t)(int16_t)sc[2 * q] | ((uint32_t)(uint16_t)(int16_t)sc[2 * q + 1] << 16));
                off = _mm512_add_epi32(off, _mm512_madd_epi16(_mm512_loadu_si512(p[i].bs[q]), _mm512_set1_epi32(sp)));
            }
            sumi = _mm512_sub_epi32(sumi, _mm512_slli_epi32(off, 5));
            const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(p[i].dx), _mm512_set1_ps(fp16(wr[i].d)));
            A[i & 3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), s, A[i & 3]);
        }
        store16(A, Y, ldy, r);
    }
}

int ember_matmul16_q6_K_avx512vnni(int64_t n, const void *W, size_t row_bytes, int64_t r0, int64_t r1,
                                   const void *xq, size_t xs, float *Y, int64_t ldy) {
    const int64_t nsb = n / QK_K;
    if (pack_reserve(&k6_buf, &k6_cap, nsb, sizeof(k6_xpack16))) return -1;
    pack16_k6(xq, xs, nsb, k6_buf);
    mm16_rows_q6_K(nsb, W, row_bytes, r0, r1, k6_buf, Y, ldy);
    return 0;
}

#pragma GCC pop_options

/* one super-block's exact int sum, bias included (as dot's sumi) */
static inline __m512i k6_sumi(const block_q6_K *w, const block_q8_K *x) {
    const __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w->scales)));
    __m512i sumi = q6k_start(sc16, x);
    for (int half = 0; half < 2; half++) {
        __m512i u[2];
        q6k_half(w->ql + 64 * half, w->qh + 32 * half, u);
        for (int c = 0; c < 2; c++) {
            const __m512i pr = _mm512_maddubs_epi16(u[c], load512(x->qs + 128 * half + 64 * c));
            sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(_mm512_permutexvar_epi16(idx_4x8(8 * half + 4 * c), sc16), pr));
        }
    }
    return sumi;
}

float ember_vec_dot_q6_K_q8_K_lanes(int64_t n, const void *vw, const void *vx) {
    const block_q6_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nsb = n / QK_K;
    __m128 A = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nsb; i += 4) {   /* lane c = chain c = super-block i + c */
        __m128i s[4];
        for (int c = 0; c < 4; c++) s[c] = fold16(k6_sumi(&w[i + c], &x[i + c]));
        const __m128 dx = _mm_setr_ps(x[i].d, x[i + 1].d, x[i + 2].d, x[i + 3].d);
        const __m128 dw = _mm_setr_ps(fp16(w[i].d), fp16(w[i + 1].d), fp16(w[i + 2].d), fp16(w[i + 3].d));
        A = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4x4(s[0], s[1], s[2], s[3])), _mm_mul_ps(dx, dw), A);
    }
    float a[4];
    _mm_storeu_ps(a, A);
    for (; i < nsb; i++) {
        const __m128i si = fold16(k6_sumi(&w[i], &x[i]));
        const __m128i t = hsum4x4(si, si, si, si);
        a[i & 3] = fmaf((float)_mm_cvtsi128_si32(t), x[i].d * fp16(w[i].d), a[i & 3]);
    }
    return (a[0] + a[1]) + (a[2] + a[3]);
}

/* ======================================================================== */
/* Activation quantization (bit-identical to the generic quantizers)         */
/* ======================================================================== */

/* roundf (half away from zero) of 16 lanes, exactly: t = trunc|v|, plus one
 * where the fraction |v| - t (exact for |v| < 2^23) is >= 0.5, sign put back
 * on the integer. A biased add (|v| + 0.5) would round 0.49999997 up. */
static inline __m512i roundf_epi32(__m512 v) {
    const __m512 a = _mm512_abs_ps(v);
    const __m512 t = _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, t), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512i r = _mm512_mask_add_epi32(_mm512_cvttps_epi32(t), up, _mm512_cvttps_epi32(t), _mm512_set1_epi32(1));
    const __mmask16 neg = _mm512_movepi32_mask(_mm512_castps_si512(v));
    return _mm512_mask_sub_epi32(r, neg, _mm512_setzero_si512(), r);
}

void ember_quantize_row_q8_0_avx512(const float *x, void *vy, int64_t n) {
    block_q8_0 *y = vy;
    for (int64_t i = 0; i < n / QK8_0; i++, x += QK8_0) {
        const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        y[i].d = ember_fp32_to_fp16(d);
        _mm_storeu_si128((__m128i *)y[i].qs, _mm512_cvtepi32_epi8(roundf_epi32(_mm512_mul_ps(v0, id))));
        _mm_storeu_si128((__m128i *)(y[i].qs + 16), _mm512_cvtepi32_epi8(roundf_epi32(_mm512_mul_ps(v1, id))));
    }
}

/* the first x[j] with |x[j]| == amax (the generic loop keeps the first) */
static inline float first_extreme(const float *x, float amax) {
    for (int j = 0; j < QK_K; j += 16) {
        const __mmask16 m = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + j)), _mm512_set1_ps(amax), _CMP_EQ_OQ);
        if (m) return x[j + __builtin_ctz(m)];
    }
    return 0.0f;
}

void ember_quantize_row_q8_K_avx512(const float *x, void *vy, int64_t n) {
    block_q8_K *y = vy;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        __m512 m = _mm512_setzero_ps();
        for (int j = 0; j < QK_K; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
        const float amax = _mm512_reduce_max_ps(m);
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.0f / first_extreme(x, amax);
        for (int j = 0; j < QK_K; j += 16) {
            /* cvtps rounds half to even, as ember_nearest_int */
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_set1_ps(iscale), _mm512_loadu_ps(x + j)));
            q = _mm512_min_epi32(q, _mm512_set1_epi32(127));
            _mm_storeu_si128((__m128i *)(y[i].qs + j), _mm512_cvtepi32_epi8(q));
            y[i].bsums[j / 16] = (int16_t)_mm512_reduce_add_epi32(q);
        }
        y[i].d = 1.0f / iscale;
    }
}

/* ======================================================================== */
/* IQ4_XS                                                                    */
/* ======================================================================== */

/* Groups 2k and 2k+1 (64 values, value order) through the code book, as
 * int8: each group's 16 bytes give its low nibbles then its high ones. */
static inline __m512i iq4xs_pair(const block_iq4_xs *b, int k) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i t0 = _mm_loadu_si128((const __m128i *)(b->qs + 32 * k));
    const __m128i t1 = _mm_loadu_si128((const __m128i *)(b->qs + 32 * k + 16));
    const __m256i n0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t0, 4), m4), _mm_and_si128(t0, m4));
    const __m256i n1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t1, 4), m4), _mm_and_si128(t1, m4));
    const __m512i book = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)ember_kvalues_iq4nl));
    return _mm512_shuffle_epi8(book, pair256(n0, n1));
}

/* int16 scales of groups 2k (lanes 0..15) and 2k+1 (16..31) */
static inline __m512i iq4xs_scales(const block_iq4_xs *b, int k) {
    return pair256(_mm256_set1_epi16((short)ember_iq4xs_scale(b, 2 * k)),
                   _mm256_set1_epi16((short)ember_iq4xs_scale(b, 2 * k + 1)));
}

/* One pair of groups against y: AVX-512 has no sign_epi8, so |v| is the
 * unsigned operand and y is negated where v < 0 (no code is 0). Pair sums
 * are at most 2*127*127, scaled and summed into int32 by one madd. */
static inline __m512i iq4xs_step(__m512i absv, __mmask64 neg, __m512i sc, const int8_t *y) {
    const __m512i yy = load512(y);
    const __m512i ys = _mm512_mask_sub_epi8(yy, neg, _mm512_setzero_si512(), yy);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(absv, ys), sc);
}

float ember_vec_dot_iq4_xs_q8_K_avx512(int64_t n, const void *vw, const void *vx) {
    const block_iq4_xs *w = vw;
    const block_q8_K *x = vx;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        __m512i sumi = _mm512_setzero_si512();
        for (int k = 0; k < QK_K / 64; k++) {
            const __m512i v = iq4xs_pair(&w[i], k);
            sumi = _mm512_add_epi32(sumi, iq4xs_step(_mm512_abs_epi8(v), _mm512_movepi8_mask(v),
                                                     iq4xs_scales(&w[i], k), x[i].qs + 64 * k));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(x[i].d * fp16(w[i].d)), _mm512_cvtepi32_ps(sumi), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

void ember_vec_dot4_iq4_xs_q8_K_avx512(int64_t n, const void *vw, const void *vx, size_t xs, float *s) {
    const block_iq4_xs *w = vw;
    const uint8_t *xb = vx;
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const block_q8_K *x[4];
        __m512i sumi[4];
        for (int r = 0; r < 4; r++) {
            x[r] = (const block_q8_K *)(xb + r * xs) + i;
            sumi[r] = _mm512_setzero_si512();
        }
        for (int k = 0; k < QK_K / 64; k++) {
            const __m512i v = iq4xs_pair(&w[i], k), absv = _mm512_abs_epi8(v), sc = iq4xs_scales(&w[i], k);
            const __mmask64 neg = _mm512_movepi8_mask(v);
            for (int r = 0; r < 4; r++) {
                sumi[r] = _mm512_add_epi32(sumi[r], iq4xs_step(absv, neg, sc, x[r]->qs + 64 * k));
            }
        }
        const float dw = fp16(w[i].d);
        for (int r = 0; r < 4; r++) {
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r]->d * dw), _mm512_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) s[r] = _mm512_reduce_add_ps(acc[r]);
}

/* ======================================================================== */
/* Table                                                                     */
/* ======================================================================== */

const char *ember_fill_kernels_avx512(ember_type_kernels *k, int use_extensions) {
    __builtin_cpu_init();
    const int vnni = use_extensions && __builtin_cpu_supports("avx512vnni");
    if (vnni) {
        /* activation rows in lanes: dot and matmul16 share one order; the
         * leftover batch rows (< 16) go through dot, never dot4 */
        k[EMBER_Q4_0].dot = ember_vec_dot_q4_0_q8_0_lanes;
        k[EMBER_Q4_0].dot4 = NULL;
        k[EMBER_Q4_0].matmul16 = ember_matmul16_q4_0_avx512vnni;
        k[EMBER_Q8_0].dot = ember_vec_dot_q8_0_q8_0_lanes;
        k[EMBER_Q8_0].dot4 = NULL;
        k[EMBER_Q8_0].matmul16 = ember_matmul16_q8_0_avx512vnni;
    } else {
        k[EMBER_Q4_0].dot = ember_vec_dot_q4_0_q8_0_avx512;
        k[EMBER_Q4_0].dot4 = ember_vec_dot4_q4_0_q8_0_avx512;
        k[EMBER_Q8_0].dot = ember_vec_dot_q8_0_q8_0_avx512;
        k[EMBER_Q8_0].dot4 = ember_vec_dot4_q8_0_q8_0_avx512;
    }
    k[EMBER_Q4_K].dot = ember_vec_dot_q4_K_q8_K_avx512;
    k[EMBER_Q4_K].dot4 = ember_vec_dot4_q4_K_q8_K_avx512;
    if (vnni) {   /* activation rows in lanes, the same order in dot and matmul16 */
        k[EMBER_Q4_K].dot = ember_vec_dot_q4_K_q8_K_lanes;
        k[EMBER_Q4_K].dot4 = NULL;
        k[EMBER_Q4_K].matmul16 = ember_matmul16_q4_K_avx512vnni;
    }
    k[EMBER_Q6_K].dot = ember_vec_dot_q6_K_q8_K_avx512;
    k[EMBER_Q6_K].dot4 = ember_vec_dot4_q6_K_q8_K_avx512;
    if (vnni) {
        k[EMBER_Q6_K].dot = ember_vec_dot_q6_K_q8_K_lanes;
        k[EMBER_Q6_K].dot4 = NULL;
        k[EMBER_Q6_K].matmul16 = ember_matmul16_q6_K_avx512vnni;
    }
    k[EMBER_IQ4_XS].dot = ember_vec_dot_iq4_xs_q8_K_avx512;
    k[EMBER_IQ4_XS].dot4 = ember_vec_dot4_iq4_xs_q8_K_avx512;
    /* every Q8_0- / Q8_K-paired type shares its activation quantizer (the
     * table starts as a copy of AVX2's) */
    for (int t = 0; t < EMBER_N_TYPES; t++) {
        if (k[t].quantize == ember_quantize_row_q8_0_avx2) k[t].quantize = ember_quantize_row_q8_0_avx512;
        if (k[t].quantize == ember_quantize_row_q8_K_avx2) k[t].quantize = ember_quantize_row_q8_K_avx512;
    }
    return vnni ? "avx512+vnni" : "avx512";
}

#pragma GCC pop_options
#endif
