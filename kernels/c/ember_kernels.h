/* ember CPU kernels: quantized products, one declaration per op.
 *
 * Design: the public ember_* entry points take a GGML type id (`wtype`, see
 * formats/quant_blocks.py GGML_TYPE_NAMES) and dispatch through a function-pointer
 * table chosen once (dispatch.c). Every (op, format) has a portable C twin in
 * quants_generic.c and, per ISA, a SIMD version with the same signature in
 * quants_<isa>.c; a missing SIMD version falls back in ONE place
 * (dispatch.c's tables), never through #ifdefs in callers.
 *
 * Activations are quantized once per row and reused across every weight row:
 * Q8_0 (32-blocks) for the 32-block weight types, Q8_K (256-blocks with
 * 16-value partial sums) for the K-quants, plain f32 for F16/BF16/F32 weights.
 *
 * All functions are thread-safe and never allocate; callers split the row
 * range [r0, r1) across threads.
 */
#ifndef EMBER_KERNELS_H
#define EMBER_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ======================================================================== */
/* GGML type ids (subset ember computes with)                                */
/* ======================================================================== */

enum {
    EMBER_F32 = 0, EMBER_F16 = 1, EMBER_Q4_0 = 2, EMBER_Q4_1 = 3,
    EMBER_Q5_0 = 6, EMBER_Q5_1 = 7, EMBER_Q8_0 = 8,
    EMBER_Q2_K = 10, EMBER_Q3_K = 11, EMBER_Q4_K = 12, EMBER_Q5_K = 13,
    EMBER_Q6_K = 14, EMBER_Q8_K = 15, EMBER_IQ4_NL = 20, EMBER_IQ4_XS = 23, EMBER_BF16 = 30,
    /* ember's own repacked layouts (kernels/c/repack.c), never read from a file:
     * ids past every GGML type (ggml's GGML_TYPE_COUNT is 40) */
    EMBER_Q4_0_R16 = 40, EMBER_Q8_0_R16 = 41, EMBER_Q4_K_R16 = 42,
    EMBER_N_TYPES = 48
};

/* ======================================================================== */
/* Block layouts (must agree with formats/quant_blocks.py BLOCKS)                  */
/* ======================================================================== */

typedef uint16_t ember_fp16_t;
typedef uint16_t ember_bf16_t;

#define QK4_0 32
typedef struct {
    ember_fp16_t d;              /* scale */
    uint8_t qs[QK4_0 / 2];       /* nibbles: low = values 0..15, high = 16..31 */
} block_q4_0;
_Static_assert(sizeof(block_q4_0) == 2 + QK4_0 / 2, "block_q4_0 size");

#define QK4_1 32
typedef struct {
    ember_fp16_t d;              /* scale */
    ember_fp16_t m;              /* min */
    uint8_t qs[QK4_1 / 2];
} block_q4_1;
_Static_assert(sizeof(block_q4_1) == 4 + QK4_1 / 2, "block_q4_1 size");

#define QK5_0 32
typedef struct {
    ember_fp16_t d;
    uint8_t qh[4];               /* 5th bit of each of the 32 values */
    uint8_t qs[QK5_0 / 2];
} block_q5_0;
_Static_assert(sizeof(block_q5_0) == 2 + 4 + QK5_0 / 2, "block_q5_0 size");

#define QK5_1 32
typedef struct {
    ember_fp16_t d;
    ember_fp16_t m;
    uint8_t qh[4];
    uint8_t qs[QK5_1 / 2];
} block_q5_1;
_Static_assert(sizeof(block_q5_1) == 4 + 4 + QK5_1 / 2, "block_q5_1 size");

#define QK8_0 32
typedef struct {
    ember_fp16_t d;              /* scale */
    int8_t qs[QK8_0];            /* quants */
} block_q8_0;
_Static_assert(sizeof(block_q8_0) == 2 + QK8_0, "block_q8_0 size");

#define QK4_NL 32
typedef struct {
    ember_fp16_t d;
    uint8_t qs[QK4_NL / 2];      /* indices into the non-linear 16-entry table */
} block_iq4_nl;
_Static_assert(sizeof(block_iq4_nl) == 2 + QK4_NL / 2, "block_iq4_nl size");

#define QK_K 256
#define K_SCALE_SIZE 12

typedef struct {
    uint8_t scales[QK_K / 16];   /* 4-bit scale (low) and min (high) per 16 */
    uint8_t qs[QK_K / 4];        /* 2-bit quants */
    ember_fp16_t d;              /* super-block scale of the scales */
    ember_fp16_t dmin;           /* super-block scale of the mins */
} block_q2_K;
_Static_assert(sizeof(block_q2_K) == QK_K / 16 + QK_K / 4 + 4, "block_q2_K size");

typedef struct {
    uint8_t hmask[QK_K / 8];     /* high bit of each 3-bit quant */
    uint8_t qs[QK_K / 4];        /* low 2 bits */
    uint8_t scales[12];          /* 16 6-bit scales, packed */
    ember_fp16_t d;
} block_q3_K;
_Static_assert(sizeof(block_q3_K) == QK_K / 8 + QK_K / 4 + 12 + 2, "block_q3_K size");

typedef struct {
    ember_fp16_t d;
    ember_fp16_t dmin;
    uint8_t scales[K_SCALE_SIZE]; /* 8 6-bit scales + 8 6-bit mins, packed */
    uint8_t qs[QK_K / 2];
} block_q4_K;
_Static_assert(sizeof(block_q4_K) == 4 + K_SCALE_SIZE + QK_K / 2, "block_q4_K size");

typedef struct {
    ember_fp16_t d;
    ember_fp16_t dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];        /* 5th bits */
    uint8_t qs[QK_K / 2];
} block_q5_K;
_Static_assert(sizeof(block_q5_K) == 4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2, "block_q5_K size");

typedef struct {
    uint8_t ql[QK_K / 2];        /* low 4 bits */
    uint8_t qh[QK_K / 4];        /* high 2 bits */
    int8_t scales[QK_K / 16];    /* 8-bit signed scale per 16 */
    ember_fp16_t d;
} block_q6_K;
_Static_assert(sizeof(block_q6_K) == QK_K / 2 + QK_K / 4 + QK_K / 16 + 2, "block_q6_K size");

typedef struct {
    ember_fp16_t d;              /* super-block scale */
    uint16_t scales_h;           /* high 2 bits of the 8 6-bit scales */
    uint8_t scales_l[QK_K / 64]; /* low 4 bits, two scales a byte */
    uint8_t qs[QK_K / 2];        /* IQ4_NL code-book indices, 16 bytes per 32 values */
} block_iq4_xs;
_Static_assert(sizeof(block_iq4_xs) == 4 + QK_K / 64 + QK_K / 2, "block_iq4_xs size");

typedef struct {
    float d;                     /* f32 scale: activations need the range */
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];    /* sum of each 16 quants: pays the K-quant mins */
} block_q8_K;
_Static_assert(sizeof(block_q8_K) == 4 + QK_K + QK_K / 16 * 2, "block_q8_K size");

/* ======================================================================== */
/* Public API (dispatched)                                                   */
/* ======================================================================== */

/* Activation rows. Q8_K and F32 rows are plain arrays of their blocks/values.
 * A Q8_0 row (32-block weights) is n/32 standard block_q8_0 followed by an aux
 * area that the SIMD matvec kernels read instead of redoing, for every weight
 * row, work that depends on the activation alone:
 *   float   dx8[n/32][8]    each block's scale, 8 times (one 256-bit lane)
 *   int32_t corr[n/32][8]   -bias * (sum of each 4 consecutive codes), bias =
 *                           the weight type's code offset (Q4_0 8, Q5_0 16,
 *                           Q8_0 128 as offset binary, others 0)
 *   int8_t  qs[n/32][32]    the codes again, contiguous (two blocks = one
 *                           aligned-free 512-bit load, no lane insert)
 * ember_act_row_bytes includes it; the row stays a valid Q8_0 row prefix. */

int     ember_act_type(int wtype);              /* activation format the weight type pairs with: GGML id of Q8_0, Q8_K or F32 (-1: unsupported wtype) */
size_t  ember_act_row_bytes(int wtype, int64_t n);  /* bytes of one quantized activation row of n values */
void    ember_quantize_act(int wtype, const float *x, void *xq, int64_t n);     /* one row */
/* y[r - r0] = dot(W row r, x) for r in [r0, r1); W rows are `row_bytes` apart; n = row length */
void    ember_matvec(int wtype, const void *W, size_t row_bytes, const void *xq, float *y, int64_t n, int64_t r0, int64_t r1);
/* Y[b*ldy + r] = dot(W row r, X row b) for b in [0, nb), r in [r0, r1); Xq rows are xq_stride bytes apart */
void    ember_matmul(int wtype, const void *W, size_t row_bytes, const void *Xq, size_t xq_stride, float *Y, int64_t ldy, int64_t n, int64_t nb, int64_t r0, int64_t r1);
void    ember_dequantize_row(int wtype, const void *x, float *y, int64_t n);
void    ember_get_rows(int wtype, const void *W, size_t row_bytes, const int32_t *ids, int64_t n_ids, float *out, int64_t n); /* embedding lookup */
/* Repacked weights (kernels/c/repack.c): 16 rows interleaved so that one
 * 512-bit register holds 4 codes of each of 16 rows. ember_repacked_type
 * says which layout the current ISA computes wtype faster in (-1: keep the
 * file's); ember_repack writes a (rows, n) matrix of wtype in that layout to
 * dst (the same number of bytes, rows % EMBER_REPACK_ROWS == 0) and returns
 * its type id, or -1 if wtype has none. A repacked matrix keeps row_bytes;
 * matvec/matmul take it like any other type; dequantize/get_rows do not. */
#define EMBER_REPACK_ROWS 16
int     ember_repacked_type(int wtype);
int     ember_repack_type_of(int wtype);   /* the R16 layout of wtype regardless of ISA, or -1 */
int     ember_repack(int wtype, const void *src, size_t row_bytes, int64_t rows, int64_t n, void *dst);
int     ember_cpu_isas(void);  /* bitmask of ISAs this CPU can run: 1 << EMBER_ISA_* */
int     ember_set_isa(int isa); /* 0 ok, -1 unsupported */
const char *ember_isa_name(void);

/* ---- helpers for bindings and tests ------------------------------------ */

enum { EMBER_ISA_GENERIC = 0, EMBER_ISA_AVX2 = 1, EMBER_ISA_AVX512 = 2, EMBER_ISA_NEON = 3, EMBER_N_ISA = 4 };

int     ember_get_isa(void);                 /* the EMBER_ISA_* in use */
const char *ember_isa_variant(void);         /* e.g. "avx512+vnni", "neon+dotprod": ISA plus extensions in use */
int     ember_set_isa_extensions(int on);    /* tests: 0 = skip VNNI/dotprod builds; not thread-safe */
int     ember_type_supported(int wtype);     /* 1 if matvec/dequantize handle wtype */
int     ember_block_elems(int wtype);        /* values per block (1 for float types), 0 if unknown */
size_t  ember_block_bytes(int wtype);        /* sizeof the C block struct, 0 if unknown */

#endif
