/* Repacked weight layouts: 16 rows interleaved for the "rows in lanes" kernels.
 *
 * Why: decode reads every weight byte once, so it runs at memory speed only if
 * the arithmetic per byte is small. In the file's layout a row is a run of
 * blocks; a SIMD kernel needs one row's 32 codes in one register and then
 * sums the register horizontally to one exact int per block before it can
 * scale it -- shuffles that cost more than the multiply (Q4_0 decode was
 * compute-bound at ~13 GB/s a thread). Interleaving 16 rows puts 4 codes of
 * each row in the 16 int32 lanes of one 512-bit register: 8 vpdpbusd with a
 * broadcast 4-code activation group finish 16 exact block sums at once, and
 * the 16 scales come in with one 32-byte load (llama.cpp's block_q4_0x8 is
 * the same idea for 8 rows). The rows of a matrix are the lanes, exactly as
 * the activation rows are in the prefill kernels (quants_avx512.c, matmul16),
 * so the float order is theirs: matvec == matmul row, bit for bit, and equal
 * to the file-layout AVX-512 VNNI results.
 *
 * Layout (R16 = 16 rows), for a (rows, n) matrix, rows % 16 == 0: group g
 * holds rows 16g..16g+15 in the same bytes the file gives them
 * (16 * row_bytes); inside it, block b of every row (32 values; Q4_K 256) is
 *     fp16    f[F][16]        each leading fp16 field of the block, 16 rows'
 *                             (F = 1: d; Q4_K F = 2: d, dmin)
 *     uint8_t qs[P][16][4]    piece p, row j: bytes 4p..4p+3 of the rest of
 *                             row j's block
 * with P = 4 for Q4_0 (its 16 nibble bytes; the low nibbles of piece p are
 * codes 4p..4p+3, the high ones 16+4p..16+4p+3), P = 8 for Q8_0 (codes
 * 4p..4p+3) and P = 35 for Q4_K (3 pieces of packed 6-bit scales and mins,
 * then 32 of nibbles). That is a 16 x P transpose of 4-byte groups: a piece
 * is one 64-byte register, row j in int32 lane j. Same size as the file's
 * blocks.
 *
 * Repacking happens once at load (kernels/repack.py), into memory that
 * replaces the map's pages (one copy). This file holds the repacker and the
 * portable C twins of the kernels (repack_avx2.c: Q4_0, Q8_0; repack_avx512.c
 * with VNNI: Q4_0, Q8_0, Q4_K). NEON has no kernels for these layouts yet, so
 * ARM keeps the file's layout (dispatch.c asks each ISA which it prefers).
 */
#include <math.h>

#include "quants_internal.h"

#define R16 EMBER_REPACK_ROWS

/* ======================================================================== */
/* Layout facts                                                              */
/* ======================================================================== */

int ember_repack_type_of(int wtype) {
    switch (wtype) {
    case EMBER_Q4_0: return EMBER_Q4_0_R16;
    case EMBER_Q8_0: return EMBER_Q8_0_R16;
    case EMBER_Q4_K: return EMBER_Q4_K_R16;
    default: return -1;
    }
}

/* leading fp16 fields of a block (d; Q4_K: d, dmin): each becomes a 16-row array */
static int fp16_fields(int base) { return base == EMBER_Q4_K ? 2 : 1; }

/* ======================================================================== */
/* The repacker                                                              */
/* ======================================================================== */

int ember_repack(int wtype, const void *src, size_t row_bytes, int64_t rows, int64_t n, void *dst) {
    const int rtype = ember_repack_type_of(wtype);
    const int64_t qk = ember_block_elems(wtype);
    if (rtype < 0 || rows % R16 || n % qk) return -1;
    const size_t bsz = ember_block_bytes(wtype), head = 2 * (size_t)fp16_fields(wtype);
    const size_t pieces = (bsz - head) / 4;   /* 4-byte groups after the fp16 fields */
    const int64_t nblk = n / qk;
    const uint8_t *s = src;
    uint8_t *d = dst;
    for (int64_t g = 0; g < rows / R16; g++) {
        const uint8_t *sg = s + (size_t)g * R16 * row_bytes;
        uint8_t *dg = d + (size_t)g * R16 * row_bytes;
        for (int64_t b = 0; b < nblk; b++) {
            uint8_t *db = dg + (size_t)b * R16 * bsz;   /* fp16 fields [F][16] | pieces [P][16][4] */
            for (int j = 0; j < R16; j++) {
                const uint8_t *sb = sg + (size_t)j * row_bytes + (size_t)b * bsz;
                for (size_t f = 0; f < head / 2; f++) memcpy(db + 2 * R16 * f + 2 * j, sb + 2 * f, 2);
                for (size_t p = 0; p < pieces; p++) memcpy(db + head * R16 + 64 * p + 4 * j, sb + head + 4 * p, 4);
            }
        }
    }
    return rtype;
}

/* ======================================================================== */
/* Portable kernels (the twins of repack_avx2.c / repack_avx512.c)           */
/* ======================================================================== */

/* exact signed block sum of row j of a repacked block `qs` with activation codes x */
static int32_t isum_q4_0_r16(const uint8_t *qs, int j, const int8_t *x) {
    int32_t s = 0;
    for (int p = 0; p < 4; p++)
        for (int t = 0; t < 4; t++) {
            const uint8_t v = qs[64 * p + 4 * j + t];
            s += ((v & 0xF) - 8) * x[4 * p + t] + ((v >> 4) - 8) * x[16 + 4 * p + t];
        }
    return s;
}

static int32_t isum_q8_0_r16(const uint8_t *qs, int j, const int8_t *x) {
    int32_t s = 0;
    for (int p = 0; p < 8; p++)
        for (int t = 0; t < 4; t++) s += (int8_t)qs[64 * p + 4 * j + t] * x[4 * p + t];
    return s;
}

/* The float order every R16 kernel keeps (see quants_avx512.c, "activation
 * rows in lanes"): chain c = b % 4 does A_c = fma((float)isum_b, d(w_b) * d(x_b), A_c),
 * the result is (A_0 + A_1) + (A_2 + A_3). */
#define R16_GENERIC(name, bsz)                                                           \
static float row_##name(int64_t nblk, const uint8_t *wg, int j, const void *xq, int64_t n) { \
    const int8_t *x = ember_q8_0_qs(xq, n);                                             \
    const float *dx8 = ember_q8_0_dx8(xq, n);                                           \
    float A[4] = {0, 0, 0, 0};                                                          \
    for (int64_t b = 0; b < nblk; b++) {                                                \
        const uint8_t *wb = wg + (size_t)b * R16 * (bsz);                               \
        ember_fp16_t d;                                                                 \
        memcpy(&d, wb + 2 * j, 2);                                                      \
        const float sc = ember_fp16_table[d] * dx8[8 * b];                              \
        A[b & 3] = fmaf((float)isum_##name(wb + 2 * R16, j, x + 32 * b), sc, A[b & 3]); \
    }                                                                                   \
    return (A[0] + A[1]) + (A[2] + A[3]);                                               \
}                                                                                       \
                                                                                        \
void ember_rows_##name##_generic(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1, \
                                 const void *x, size_t xs, int64_t nb, float *Y, int64_t ldy) { \
    const uint8_t *W = w, *X = x;                                                       \
    for (int64_t a = 0; a < nb; a++)                                                    \
        for (int64_t r = r0; r < r1; r++)                                               \
            Y[a * ldy + (r - r0)] = row_##name(n / QK8_0, W + (size_t)(r / R16) * R16 * row_bytes, \
                                               (int)(r % R16), X + a * xs, n);          \
}

R16_GENERIC(q4_0_r16, sizeof(block_q4_0))
R16_GENERIC(q8_0_r16, sizeof(block_q8_0))

/* Q4_K: [d[16], dmin[16], scales as 3 pieces, qs as 32 pieces]. Piece 3 + p
 * holds bytes 4p..4p+3 of the row's qs: chunk c = p / 8 (64 values), low
 * nibbles = sub-block 2c, high = 2c + 1, codes 4 (p % 8)..+3 of it. The float
 * order is the file layout's Q4_K lanes order (quants_avx512.c): exact
 * sumi = sum_j sc_j isum_j and summ = sum_j m_j bsum_j per super-block i,
 * A_c = fma(sumi, d(x) d(w), A_c), M_c = fma(-summ, d(x) dmin, M_c) for
 * c = i % 4, then ((A_0 + A_1) + (A_2 + A_3)) + ((M_0 + M_1) + (M_2 + M_3)). */
#define Q4K_BYTES sizeof(block_q4_K)

static float row_q4_K_r16(int64_t nsb, const uint8_t *wg, int j, const block_q8_K *x) {
    float A[4] = {0, 0, 0, 0}, M[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < nsb; i++) {
        const uint8_t *wb = wg + (size_t)i * R16 * Q4K_BYTES;
        ember_fp16_t d, dmin;
        memcpy(&d, wb + 2 * j, 2);
        memcpy(&dmin, wb + 2 * R16 + 2 * j, 2);
        uint8_t sc[K_SCALE_SIZE], qs[QK_K / 2];
        for (int p = 0; p < 3; p++) memcpy(sc + 4 * p, wb + 4 * R16 + 64 * p + 4 * j, 4);
        for (int p = 0; p < 32; p++) memcpy(qs + 4 * p, wb + 4 * R16 + 64 * (3 + p) + 4 * j, 4);
        int32_t sumi = 0, summ = 0;
        for (int sb = 0; sb < 8; sb++) {
            uint8_t s, m;
            ember_scale_min_k4(sb, sc, &s, &m);
            const int c = sb / 2, shift = 4 * (sb % 2);
            int32_t is = 0;
            for (int k = 0; k < 32; k++) is += ((qs[32 * c + k] >> shift) & 0xF) * x[i].qs[32 * sb + k];
            sumi += s * is;
            summ += m * (x[i].bsums[2 * sb] + x[i].bsums[2 * sb + 1]);
        }
        A[i & 3] = fmaf((float)sumi, x[i].d * ember_fp16_table[d], A[i & 3]);
        M[i & 3] = fmaf(-(float)summ, x[i].d * ember_fp16_table[dmin], M[i & 3]);
    }
    return ((A[0] + A[1]) + (A[2] + A[3])) + ((M[0] + M[1]) + (M[2] + M[3]));
}

void ember_rows_q4_K_r16_generic(int64_t n, const void *w, size_t row_bytes, int64_t r0, int64_t r1,
                                 const void *x, size_t xs, int64_t nb, float *Y, int64_t ldy) {
    const uint8_t *W = w, *X = x;
    for (int64_t a = 0; a < nb; a++)
        for (int64_t r = r0; r < r1; r++)
            Y[a * ldy + (r - r0)] = row_q4_K_r16(n / QK_K, W + (size_t)(r / R16) * R16 * row_bytes,
                                                 (int)(r % R16), (const block_q8_K *)(X + a * xs));
}

float ember_row_q4_K_r16(int64_t n, const uint8_t *wg, int j, const void *xq) {
    return row_q4_K_r16(n / QK_K, wg, j, xq);
}

/* row j of a 16-row group, for the SIMD kernels' partial groups (same order) */
float ember_row_q4_0_r16(int64_t n, const uint8_t *wg, int j, const void *xq) {
    return row_q4_0_r16(n / QK8_0, wg, j, xq, n);
}

float ember_row_q8_0_r16(int64_t n, const uint8_t *wg, int j, const void *xq) {
    return row_q8_0_r16(n / QK8_0, wg, j, xq, n);
}

/* The portable twins are correct but slower than the file layout's portable
 * kernels are not: returns 0, so the generic ISA keeps the file's layout. */
int ember_fill_repacked_generic(ember_type_kernels *k) {
    k[EMBER_Q4_0_R16] = (ember_type_kernels){NULL, NULL, ember_quantize_row_q8_0_generic, NULL,
                                             ember_rows_q4_0_r16_generic};
    k[EMBER_Q8_0_R16] = (ember_type_kernels){NULL, NULL, ember_quantize_row_q8_0_generic, NULL,
                                             ember_rows_q8_0_r16_generic};
    k[EMBER_Q4_K_R16] = (ember_type_kernels){NULL, NULL, ember_quantize_row_q8_K_generic, NULL,
                                             ember_rows_q4_K_r16_generic};
    return 0;
}
