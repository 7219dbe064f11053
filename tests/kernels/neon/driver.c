/* Cross-ISA check of the quantized kernels, in C, for targets Python cannot
 * reach here (NEON under qemu-user); it runs natively on x86 as well.
 *
 * For every weight type: random weight bytes with sane fp16 scales and random
 * activations; quantize, matvec and matmul (5 activation rows, so both the
 * 4-row path and its remainder run) under the portable C table and under each
 * SIMD ISA this CPU runs; then compare. Products must agree within
 * TOL * sum|w * xq| per row (float rounding of per-block sums; the integer
 * parts are exact); quantized activations and dequantized rows must be
 * byte-identical, and within each ISA matmul's row 0 must equal matvec bit
 * for bit (a row's result may not depend on the batch it came in). Prints one line per (type, ISA) and exits 1 on any failure.
 *
 *   driver [seed]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ember_kernels.h"

#define ROWS 9
#define BATCH 5
#define TOL 2e-5

static const struct { const char *name; int id; int fp16_fields[2]; } TYPES[] = {
    {"Q4_0", EMBER_Q4_0, {0, -1}}, {"Q4_1", EMBER_Q4_1, {0, 2}}, {"Q5_0", EMBER_Q5_0, {0, -1}},
    {"Q5_1", EMBER_Q5_1, {0, 2}}, {"Q8_0", EMBER_Q8_0, {0, -1}}, {"IQ4_NL", EMBER_IQ4_NL, {0, -1}},
    {"Q2_K", EMBER_Q2_K, {80, 82}}, {"Q3_K", EMBER_Q3_K, {108, -1}}, {"Q4_K", EMBER_Q4_K, {0, 2}},
    {"Q5_K", EMBER_Q5_K, {0, 2}}, {"Q6_K", EMBER_Q6_K, {208, -1}}, {"IQ4_XS", EMBER_IQ4_XS, {0, -1}},
    {"F16", EMBER_F16, {-1, -1}}, {"BF16", EMBER_BF16, {-1, -1}}, {"F32", EMBER_F32, {-1, -1}},
};
static const char *ISAS[EMBER_N_ISA] = {"generic", "avx2", "avx512", "neon"};

/* ---- inputs -------------------------------------------------------------- */

static uint64_t rng_state;
static uint32_t rnd(void) {   /* xorshift64*: same stream on every target */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 2685821657736338717ULL) >> 32);
}
static float rndf(void) { return (float)rnd() / 4294967296.0f * 2.0f - 1.0f; }

static uint16_t to_fp16(float f) {   /* small normal values only */
    uint32_t b; memcpy(&b, &f, 4);
    return (uint16_t)(((b >> 16) & 0x8000) | ((((b >> 23) & 0xff) - 112) << 10) | ((b >> 13) & 0x3ff));
}

static void fill_weights(int t, uint8_t *w, int64_t rows, int64_t n) {
    const int id = TYPES[t].id;
    const size_t rb = (size_t)(n / ember_block_elems(id)) * ember_block_bytes(id);
    if (id == EMBER_F32 || id == EMBER_F16 || id == EMBER_BF16) {
        for (int64_t i = 0; i < rows * n; i++) {
            const float v = rndf();
            uint32_t b; memcpy(&b, &v, 4);
            if (id == EMBER_F32) memcpy(w + 4 * i, &v, 4);
            else { uint16_t h = id == EMBER_F16 ? to_fp16(v * 0.5f + 0.75f) : (uint16_t)(b >> 16); memcpy(w + 2 * i, &h, 2); }
        }
        return;
    }
    for (size_t i = 0; i < rows * rb; i++) w[i] = (uint8_t)rnd();
    const size_t bb = ember_block_bytes(id);
    for (size_t b = 0; b < rows * rb / bb; b++) {
        for (int f = 0; f < 2; f++) {
            if (TYPES[t].fp16_fields[f] < 0) continue;
            const uint16_t h = to_fp16((0.001f + 0.1f * fabsf(rndf())) * (rnd() & 1 ? 1.0f : -1.0f));
            memcpy(w + b * bb + TYPES[t].fp16_fields[f], &h, 2);
        }
    }
}

/* ---- one type under one ISA ---------------------------------------------- */

typedef struct { float y[BATCH][ROWS]; float mv[ROWS]; uint8_t *xq; float *deq; } result;

static void run(int id, const uint8_t *w, size_t rb, const float *x, int64_t n, size_t xs, result *r) {
    for (int b = 0; b < BATCH; b++) ember_quantize_act(id, x + b * n, r->xq + b * xs, n);
    ember_matvec(id, w, rb, r->xq, r->mv, n, 0, ROWS);
    ember_matmul(id, w, rb, r->xq, xs, &r->y[0][0], ROWS, n, BATCH, 0, ROWS);
    ember_dequantize_row(id, w, r->deq, n);
}

/* worst |a - b| / (sum |w * xq|) over rows of one activation row */
static double rel_err(const float *a, const float *b, const float *wabs_dot) {
    double worst = 0;
    for (int r = 0; r < ROWS; r++) {
        const double e = fabs((double)a[r] - b[r]) / (wabs_dot[r] + 1e-30);
        if (e > worst) worst = e;
    }
    return worst;
}

static int check_type(int t, int64_t n) {
    const int id = TYPES[t].id;
    const size_t rb = (size_t)(n / ember_block_elems(id)) * ember_block_bytes(id);
    const size_t xs = ember_act_row_bytes(id, n);
    uint8_t *w = malloc(ROWS * rb);
    float *x = malloc(sizeof(float) * BATCH * n), *wd = malloc(sizeof(float) * n), *xd = malloc(sizeof(float) * n);
    result ref = {.xq = malloc(BATCH * xs), .deq = malloc(sizeof(float) * n)};
    result got = {.xq = malloc(BATCH * xs), .deq = malloc(sizeof(float) * n)};
    fill_weights(t, w, ROWS, n);
    for (int64_t i = 0; i < BATCH * n; i++) x[i] = rndf() * 3.0f;

    ember_set_isa(EMBER_ISA_GENERIC);
    run(id, w, rb, x, n, xs, &ref);
    /* the scale of each product: sum |w_i * xq_i| (activation row 0 and b) */
    float wabs[BATCH][ROWS];
    for (int b = 0; b < BATCH; b++) {
        ember_dequantize_row(ember_act_type(id), ref.xq + b * xs, xd, n);
        for (int r = 0; r < ROWS; r++) {
            ember_dequantize_row(id, w + r * rb, wd, n);
            double s = 0;
            for (int64_t i = 0; i < n; i++) s += fabs((double)wd[i] * xd[i]);
            wabs[b][r] = (float)s;
        }
    }
    int failed = 0;
    for (int isa = 1; isa < EMBER_N_ISA; isa++) {
        if (!(ember_cpu_isas() & (1 << isa))) continue;
        ember_set_isa(isa);
        run(id, w, rb, x, n, xs, &got);
        double err = rel_err(got.mv, ref.mv, wabs[0]);
        for (int b = 0; b < BATCH; b++) {
            const double e = rel_err(got.y[b], ref.y[b], wabs[b]);
            if (e > err) err = e;
        }
        const int xq_same = memcmp(got.xq, ref.xq, BATCH * xs) == 0;
        const int deq_same = memcmp(got.deq, ref.deq, sizeof(float) * n) == 0;
        const int mm_same = memcmp(got.y[0], got.mv, sizeof got.mv) == 0;
        const int ok = err <= TOL && xq_same && deq_same && mm_same;
        printf("%s %-6s n=%-5lld %-13s max rel err %.2e  act %s  dequant %s  matmul==matvec %s\n",
               ok ? "PASS" : "FAIL", TYPES[t].name, (long long)n, ember_isa_variant(), err,
               xq_same ? "same" : "DIFF", deq_same ? "same" : "DIFF", mm_same ? "yes" : "NO");
        failed |= !ok;
    }
    free(w); free(x); free(wd); free(xd); free(ref.xq); free(ref.deq); free(got.xq); free(got.deq);
    return failed;
}

/* ---- repacked layouts (kernels/c/repack*.c) ------------------------------- */

#define RROWS 32   /* two 16-row groups */

/* The repacked matrix under each ISA against the portable twin, bit for bit (one
 * float order for all), and against the file layout within TOL; matvec over a
 * range that cuts both groups must equal those rows of the matmul. */
static int check_repacked(int t, int64_t n) {
    const int id = TYPES[t].id, rid = ember_repack_type_of(id);
    const size_t rb = (size_t)(n / ember_block_elems(id)) * ember_block_bytes(id);
    const size_t xs = ember_act_row_bytes(id, n);
    uint8_t *w = malloc(RROWS * rb), *p = malloc(RROWS * rb), *xq = malloc(BATCH * xs);
    float *x = malloc(sizeof(float) * BATCH * n);
    static float ref[BATCH][RROWS], file[BATCH][RROWS], got[BATCH][RROWS], mv[RROWS];
    fill_weights(t, w, RROWS, n);
    for (int64_t i = 0; i < BATCH * n; i++) x[i] = rndf() * 3.0f;
    int failed = ember_repack(id, w, rb, RROWS, n, p) != rid;
    ember_set_isa(EMBER_ISA_GENERIC);
    for (int b = 0; b < BATCH; b++) ember_quantize_act(id, x + b * n, xq + b * xs, n);
    ember_matmul(rid, p, rb, xq, xs, &ref[0][0], RROWS, n, BATCH, 0, RROWS);
    ember_matmul(id, w, rb, xq, xs, &file[0][0], RROWS, n, BATCH, 0, RROWS);
    double err = 0;
    for (int b = 0; b < BATCH; b++)
        for (int r = 0; r < RROWS; r++) {
            const double e = fabs((double)ref[b][r] - file[b][r]) / (fabs((double)file[b][r]) + 1.0);
            if (e > err) err = e;
        }
    for (int isa = 0; isa < EMBER_N_ISA; isa++) {
        if (!(ember_cpu_isas() & (1 << isa))) continue;
        ember_set_isa(isa);
        ember_matmul(rid, p, rb, xq, xs, &got[0][0], RROWS, n, BATCH, 0, RROWS);
        ember_matvec(rid, p, rb, xq + 2 * xs, mv, n, 3, RROWS - 2);
        const int same = memcmp(got, ref, sizeof got) == 0;
        const int mv_same = memcmp(mv, &got[2][3], sizeof(float) * (RROWS - 5)) == 0;
        const int ok = same && mv_same && err <= TOL && !failed;
        printf("%s %-6s repacked n=%-5lld %-13s vs twin %s  matvec rows==matmul %s  vs file layout %.2e\n",
               ok ? "PASS" : "FAIL", TYPES[t].name, (long long)n, ember_isa_variant(),
               same ? "same" : "DIFF", mv_same ? "yes" : "NO", err);
        failed |= !ok;
    }
    free(w); free(p); free(xq); free(x);
    return failed;
}

int main(int argc, char **argv) {
    rng_state = argc > 1 ? strtoull(argv[1], NULL, 10) : 88172645463325252ULL;
    printf("cpu ISAs:");
    for (int i = 0; i < EMBER_N_ISA; i++) if (ember_cpu_isas() & (1 << i)) printf(" %s", ISAS[i]);
    printf("\n");
    int failed = 0;
    const int64_t sizes[] = {256, 256 * 7, 256 * 33};   /* odd block counts for both block sizes */
    for (size_t t = 0; t < sizeof TYPES / sizeof TYPES[0]; t++) {
        for (size_t s = 0; s < 3; s++) failed |= check_type((int)t, sizes[s]);
    }
    for (size_t t = 0; t < sizeof TYPES / sizeof TYPES[0]; t++)
        if (ember_repack_type_of(TYPES[t].id) >= 0) failed |= check_repacked((int)t, 256 * 3);
    /* once more without the optional extensions (VNNI / dotprod) */
    ember_set_isa_extensions(0);
    for (size_t t = 0; t < sizeof TYPES / sizeof TYPES[0]; t++) failed |= check_type((int)t, 256 * 7);
    ember_set_isa_extensions(1);
    printf(failed ? "FAILED\n" : "ALL PASSED\n");
    return failed;
}
