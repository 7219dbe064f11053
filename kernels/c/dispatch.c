/* ISA detection, the per-ISA kernel tables, and the public ember_* entry points.
 *
 * Design: each ISA's table starts as a copy of its fallback's and then
 * overwrites the entries it accelerates: generic <- avx2 <- avx512 on x86,
 * generic <- neon on ARM. That is the ONE place where a missing SIMD version
 * falls back (ggml's arch-fallback.h, as data instead of macros). Tables are
 * built once, at load (a constructor), before any thread can call in; after
 * that they are read-only, so every entry point is thread-safe.
 *
 * The row loops live here, not in the ISA files: a matvec is one dot per
 * weight row; a matmul walks weight rows in tiles small enough to stay in L1
 * and, inside a tile, applies each weight row to four activation rows at a
 * time (dot4), so each weight block is decoded once per four rows. Types
 * with a matmul16 kernel (AVX-512 VNNI Q4_0/Q8_0) take the activation rows
 * 16 at a time in their own loop; only the leftover rows come here.
 */
#include "quants_internal.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

/* ======================================================================== */
/* CPU features                                                              */
/* ======================================================================== */

static int detect_isas(void) {
    int mask = 1 << EMBER_ISA_GENERIC;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    /* __builtin_cpu_supports also checks that the OS saves the wide registers */
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2) mask |= 1 << EMBER_ISA_AVX2;
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        mask |= 1 << EMBER_ISA_AVX512;
    }
#elif defined(__aarch64__)
    mask |= 1 << EMBER_ISA_NEON;   /* Advanced SIMD is mandatory on AArch64 */
#endif
    return mask;
}

static const char *const ISA_NAMES[EMBER_N_ISA] = {"generic", "avx2", "avx512", "neon"};

/* ======================================================================== */
/* Tables                                                                    */
/* ======================================================================== */

static ember_type_kernels tables[EMBER_N_ISA][EMBER_N_TYPES];
static const char *variants[EMBER_N_ISA] = {"generic", "avx2", "avx512", "neon"};
static int use_extensions = 1;
static int cpu_isas;
static int current_isa;
static const ember_type_kernels *cur;
/* bit (R16 type - EMBER_Q4_0_R16) set: the ISA computes that repacked layout
 * faster than the file's (repack.c), so models load repacked by default */
static int repack_preferred[EMBER_N_ISA];

static void build_tables(void) {
    ember_fill_kernels_generic(tables[EMBER_ISA_GENERIC]);
    repack_preferred[EMBER_ISA_GENERIC] = ember_fill_repacked_generic(tables[EMBER_ISA_GENERIC]);
#if defined(__x86_64__) || defined(__i386__)
    memcpy(tables[EMBER_ISA_AVX2], tables[EMBER_ISA_GENERIC], sizeof tables[0]);
    ember_fill_kernels_avx2(tables[EMBER_ISA_AVX2]);
    repack_preferred[EMBER_ISA_AVX2] = ember_fill_repacked_avx2(tables[EMBER_ISA_AVX2]);
    memcpy(tables[EMBER_ISA_AVX512], tables[EMBER_ISA_AVX2], sizeof tables[0]);
    variants[EMBER_ISA_AVX512] = ember_fill_kernels_avx512(tables[EMBER_ISA_AVX512], use_extensions);
    const int r512 = ember_fill_repacked_avx512(tables[EMBER_ISA_AVX512], use_extensions);
    repack_preferred[EMBER_ISA_AVX512] = r512 ? r512 : repack_preferred[EMBER_ISA_AVX2];
#elif defined(__aarch64__)
    memcpy(tables[EMBER_ISA_NEON], tables[EMBER_ISA_GENERIC], sizeof tables[0]);
    variants[EMBER_ISA_NEON] = ember_fill_kernels_neon(tables[EMBER_ISA_NEON], use_extensions);
    repack_preferred[EMBER_ISA_NEON] = ember_fill_repacked_neon(tables[EMBER_ISA_NEON], use_extensions);
#endif
}

float ember_fp16_table[1 << 16];

__attribute__((constructor)) static void ember_kernels_init(void) {
    for (uint32_t h = 0; h < (1u << 16); h++) ember_fp16_table[h] = ember_fp16_to_fp32((ember_fp16_t)h);
    cpu_isas = detect_isas();
    build_tables();
    /* default: the widest ISA the CPU runs; dispatch.py may override it */
    for (int isa = EMBER_N_ISA - 1; isa >= 0; isa--) {
        if (ember_set_isa(isa) == 0) break;
    }
}

int ember_cpu_isas(void) { return cpu_isas; }

int ember_set_isa(int isa) {
    if (isa < 0 || isa >= EMBER_N_ISA || !(cpu_isas & (1 << isa))) return -1;
    current_isa = isa;
    cur = tables[isa];
    return 0;
}

int ember_get_isa(void) { return current_isa; }

const char *ember_isa_name(void) { return ISA_NAMES[current_isa]; }

const char *ember_isa_variant(void) { return variants[current_isa]; }

/* Tests only: not safe while kernels run on other threads. */
int ember_set_isa_extensions(int on) {
    use_extensions = on != 0;
    build_tables();
    cur = tables[current_isa];
    return 0;
}

/* ======================================================================== */
/* Type facts                                                                */
/* ======================================================================== */

int ember_block_elems(int wtype) {
    switch (wtype) {
    case EMBER_Q4_0_R16: case EMBER_Q8_0_R16: return 32;
    case EMBER_F32: case EMBER_F16: case EMBER_BF16: return 1;
    case EMBER_Q4_0: case EMBER_Q4_1: case EMBER_Q5_0: case EMBER_Q5_1:
    case EMBER_Q8_0: case EMBER_IQ4_NL: return 32;
    case EMBER_Q2_K: case EMBER_Q3_K: case EMBER_Q4_K: case EMBER_Q5_K:
    case EMBER_Q6_K: case EMBER_Q8_K: case EMBER_Q4_K_R16: case EMBER_IQ4_XS: return QK_K;
    default: return 0;
    }
}

size_t ember_block_bytes(int wtype) {
    switch (wtype) {
    case EMBER_F32: return 4;
    case EMBER_F16: case EMBER_BF16: return 2;
    case EMBER_Q4_0: case EMBER_Q4_0_R16: return sizeof(block_q4_0);
    case EMBER_Q4_1: return sizeof(block_q4_1);
    case EMBER_Q5_0: return sizeof(block_q5_0);
    case EMBER_Q5_1: return sizeof(block_q5_1);
    case EMBER_Q8_0: case EMBER_Q8_0_R16: return sizeof(block_q8_0);
    case EMBER_IQ4_NL: return sizeof(block_iq4_nl);
    case EMBER_Q2_K: return sizeof(block_q2_K);
    case EMBER_Q3_K: return sizeof(block_q3_K);
    case EMBER_Q4_K: case EMBER_Q4_K_R16: return sizeof(block_q4_K);
    case EMBER_Q5_K: return sizeof(block_q5_K);
    case EMBER_Q6_K: return sizeof(block_q6_K);
    case EMBER_Q8_K: return sizeof(block_q8_K);
    case EMBER_IQ4_XS: return sizeof(block_iq4_xs);
    default: return 0;
    }
}

int ember_type_supported(int wtype) {
    return wtype >= 0 && wtype < EMBER_N_TYPES
        && (tables[EMBER_ISA_GENERIC][wtype].dot != NULL || tables[EMBER_ISA_GENERIC][wtype].rows != NULL);
}

int ember_repacked_type(int wtype) {
    const int rtype = ember_repack_type_of(wtype);
    return rtype >= 0 && (repack_preferred[current_isa] >> (rtype - EMBER_Q4_0_R16) & 1) ? rtype : -1;
}

int ember_act_type(int wtype) {
    if (!ember_type_supported(wtype)) return -1;
    switch (ember_block_elems(wtype)) {
    case 1: return EMBER_F32;
    case 32: return EMBER_Q8_0;
    default: return EMBER_Q8_K;
    }
}

size_t ember_act_row_bytes(int wtype, int64_t n) {
    const int act = ember_act_type(wtype);
    if (act < 0) return 0;
    const size_t blocks = (size_t)(n / ember_block_elems(act)) * ember_block_bytes(act);
    return act == EMBER_Q8_0 ? blocks + ember_q8_0_aux_bytes(n) : blocks;
}

/* code offset of a Q8_0-paired weight type, for the activation aux area */
static int q8_0_bias(int wtype) {
    switch (wtype) {
    case EMBER_Q4_0: case EMBER_Q4_0_R16: return 8;
    case EMBER_Q5_0: return 16;
    case EMBER_Q8_0: case EMBER_Q8_0_R16: return 128;
    default: return 0;
    }
}

/* ======================================================================== */
/* Entry points                                                              */
/* ======================================================================== */

void ember_quantize_act(int wtype, const float *x, void *xq, int64_t n) {
    cur[wtype].quantize(x, xq, n);
    if (ember_act_type(wtype) == EMBER_Q8_0) ember_q8_0_fill_aux(xq, n, q8_0_bias(wtype));
}

/* Decode streams each weight byte once; the hardware prefetcher stops at 4 KiB
 * page boundaries, so while row r computes we ask for the bytes one row plus
 * PREFETCH_AHEAD past it (one prefetch per cache line, each line once).
 * Measured single-thread streaming, 5632x2048: Q4_0 7.5 -> 9.6 GB/s, Q4_K
 * 7.3 -> 9.6. The hint is T0, not NTA: a Q8_0 row is 34 lines, and a burst
 * of that many NTA prefetches held the fill buffers long enough to stall the
 * kernel (Q8_0 streaming, 1 GiB, 2 threads: NTA 15.3 GB/s, T0 19.8; NTA also
 * evicted L2-resident weights: 12.5 vs 25.5 GB/s on a 1 MB matrix). */
#define PREFETCH_AHEAD 2048

static void prefetch_row(const uint8_t *w, size_t row_bytes, int64_t r, int64_t r1) {
    const size_t end = (size_t)r1 * row_bytes;
    const size_t from = (size_t)(r + 1) * row_bytes + PREFETCH_AHEAD;
    for (size_t o = from; o < from + row_bytes && o < end; o += 64) __builtin_prefetch(w + o, 0, 3);
}

void ember_matvec(int wtype, const void *W, size_t row_bytes, const void *xq, float *y,
                  int64_t n, int64_t r0, int64_t r1) {
    if (cur[wtype].rows) {   /* a repacked layout: rows are not contiguous */
        cur[wtype].rows(n, W, row_bytes, r0, r1, xq, 0, 1, y, 0);
        return;
    }
    const ember_vec_dot_fn dot = cur[wtype].dot;
    const uint8_t *w = W;
    for (int64_t r = r0; r < r1; r++) {
        prefetch_row(w, row_bytes, r, r1);
        y[r - r0] = dot(n, w + (size_t)r * row_bytes, xq);
    }
}

/* Y[b*ldy + r] for rows [r, rend) and activation rows [b, b+4) */
static void matmul_tile4(const ember_type_kernels *k, const uint8_t *w, size_t row_bytes,
                         const uint8_t *xq, size_t xs, float *Y, int64_t ldy, int64_t n,
                         int64_t r, int64_t rend) {
    float s[4];
    for (; r < rend; r++) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        if (k->dot4) {
            k->dot4(n, wr, xq, xs, s);
        } else {
            for (int j = 0; j < 4; j++) s[j] = k->dot(n, wr, xq + j * xs);
        }
        for (int j = 0; j < 4; j++) Y[j * ldy + r] = s[j];
    }
}

void ember_matmul(int wtype, const void *W, size_t row_bytes, const void *Xq, size_t xq_stride,
                  float *Y, int64_t ldy, int64_t n, int64_t nb, int64_t r0, int64_t r1) {
    const ember_type_kernels *k = &cur[wtype];
    if (k->rows) {
        k->rows(n, W, row_bytes, r0, r1, Xq, xq_stride, nb, Y + r0, ldy);
        return;
    }
    const uint8_t *w = W, *xq = Xq;
    /* a tile of weight rows (~32 KiB) stays in L1/L2 while every activation row passes */
    int64_t tile = row_bytes ? (int64_t)(32768 / row_bytes) : 1;
    tile = tile < 1 ? 1 : (tile > 64 ? 64 : tile);
    int64_t b0 = 0;
    if (k->matmul16) {   /* its own loop order; falls back below if out of memory */
        for (; b0 + 16 <= nb; b0 += 16) {
            if (k->matmul16(n, W, row_bytes, r0, r1, xq + b0 * xq_stride, xq_stride, Y + b0 * ldy, ldy) != 0) break;
        }
    }
    for (int64_t r = r0; r < r1; r += tile) {
        const int64_t rend = r + tile < r1 ? r + tile : r1;
        int64_t b = b0;
        for (; b + 4 <= nb; b += 4) {
            matmul_tile4(k, w, row_bytes, xq + b * xq_stride, xq_stride, Y + b * ldy, ldy, n, r, rend);
        }
        for (; b < nb; b++) {
            for (int64_t rr = r; rr < rend; rr++) {
                Y[b * ldy + rr] = k->dot(n, w + (size_t)rr * row_bytes, xq + b * xq_stride);
            }
        }
    }
}

void ember_dequantize_row(int wtype, const void *x, float *y, int64_t n) {
    ember_dequantize_row_generic(wtype, x, y, n);
}

void ember_get_rows(int wtype, const void *W, size_t row_bytes, const int32_t *ids, int64_t n_ids,
                    float *out, int64_t n) {
    const uint8_t *w = W;
    for (int64_t i = 0; i < n_ids; i++) {
        ember_dequantize_row_generic(wtype, w + (size_t)ids[i] * row_bytes, out + i * n, n);
    }
}
