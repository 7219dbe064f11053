/* ember CPU ops around the quantized products: norms, rope, softmax,
 * attention over an f16 KV cache, SwiGLU, residual/bias adds, and the thread
 * pool that runs the decoder (forward.c).
 *
 * Design: every op has one signature and one twin per ISA (ops_generic.c,
 * ops_avx2.c). The twins are gathered in an `ember_ops` table; ember_ops_for()
 * is the one place that maps an ISA name to a table, so an ISA without its own
 * ops (avx512, neon) falls back there and nowhere else. Ops never allocate:
 * callers pass every buffer. Vectors are float32 unless named f16.
 */
#ifndef EMBER_OPS_H
#define EMBER_OPS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* ---- f16 <-> f32 (IEEE binary16, round to nearest even) ----------------- */

static inline float ember_ops_h2f(uint16_t h) {
    union { uint32_t u; float f; } o;
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) {                       /* inf / nan */
        o.u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {                   /* zero / subnormal: man * 2^-24, exact */
        o.f = (float)man * 5.9604644775390625e-08f;
        o.u |= sign;
    } else {
        o.u = sign | ((exp + 112) << 23) | (man << 13);
    }
    return o.f;
}

static inline uint16_t ember_ops_f2h(float f) {
    union { float f; uint32_t u; } in = { f };
    uint32_t x = in.u, sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)                   /* inf / nan (keep nan quiet) */
        return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u)                   /* rounds past 65504: inf */
        return (uint16_t)(sign | 0x7c00);
    if (ax < 0x38800000u) {                  /* result is subnormal or zero */
        /* adding 0.5 shifts the value so the FPU's own round-to-nearest-even
         * lands the subnormal mantissa in the low bits */
        union { uint32_t u; float f; } t = { ax }, half = { 0x3f000000u };
        t.f += half.f;
        return (uint16_t)(sign | (t.u - half.u));
    }
    uint32_t mant_odd = (ax >> 13) & 1;      /* ties go to the even mantissa */
    ax += 0xc8000fffu + mant_odd;            /* rebias exponent (-112 << 23) and round */
    return (uint16_t)(sign | (ax >> 13));
}

/* ---- the op table --------------------------------------------------------- */

#define EMBER_ATT_HEADS 8   /* query heads an attention kernel may take at once (scratch size) */

/* Heads taken together: the largest divisor of the GQA group (query heads per KV
 * head) up to EMBER_ATT_HEADS, so runs tile every group and never depend on how
 * the work items were chunked (a head's result is the same in prefill and decode). */
static inline int64_t ember_att_run(int64_t n_head, int64_t n_head_kv) {
    const int64_t group = n_head / n_head_kv;
    int64_t d = group < EMBER_ATT_HEADS ? group : EMBER_ATT_HEADS;
    while (group % d) d--;
    return d;
}

/* One attention call: the query rows of a batch at positions pos0.. over one layer's
 * f16 K/V cache. The cache holds `rows` positions: position t lives in row t % rows,
 * so a sliding-window layer keeps a ring of window + batch - 1 rows instead of n_ctx.
 * Token b (position p = pos0 + b) sees positions p' <= p with p - p' < window
 * (window 0: all of them), in position order, so a ring and a full cache give the
 * same sums. Scores are scale * q.k, then softcap * tanh(s / softcap) when softcap > 0
 * (gemma2), then softmax. */
typedef struct {
    const float *q;          /* (B, ldq), head h at h * hd */
    int64_t ldq;
    const uint16_t *K, *V;   /* (rows, kv_stride) f16 */
    int64_t kv_stride, rows, window;
    int64_t pos0, n_head, n_head_kv, hd;
    float scale, softcap;
    float *out;              /* (B, ldo) */
    int64_t ldo;
} ember_att_args;

/* the keys of the token at position p: positions [lo, p], as at most two runs of
 * consecutive cache rows (a ring wraps once). Returns the number of keys. */
static inline int64_t ember_att_keys(const ember_att_args *a, int64_t p, int64_t *r0, int64_t *n0) {
    const int64_t lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
    const int64_t n = p - lo + 1;
    *r0 = lo % a->rows;
    *n0 = a->rows - *r0 < n ? a->rows - *r0 : n;   /* the rest starts at row 0 */
    return n;
}

/* scores of one head in place: gemma2's soft cap, s -> cap * tanh(s / cap) */
static inline void ember_softcap(float *s, int64_t n, float cap) {
    if (cap <= 0.0f) return;
    const float inv = 1.0f / cap;
    for (int64_t i = 0; i < n; i++) s[i] = cap * tanhf(s[i] * inv);
}

/* ggml's GELU (tanh approximation) as llama.cpp's CPU backend computes it: x is
 * rounded to f16 and looked up in a table of f16 results, except |x| >= 10. Matching
 * the table, not the exact formula, keeps F32 gemma logits within 1e-4 KL of it. */
extern uint16_t ember_gelu_table[(1 << 16) + 1];   /* +1: 32-bit gathers of the last entry */
void ember_gelu_init(void);   /* fills the table once; thread-safe */

static inline float ember_gelu_f16(float x) {
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x;
    return ember_ops_h2f(ember_gelu_table[ember_ops_f2h(x)]);
}

typedef struct ember_ops {
    const char *name;
    /* y[i] = x[i] / sqrt(mean(x^2) + eps) * w[i]; y may alias x */
    void (*rmsnorm)(const float *x, const float *w, float *y, int64_t n, float eps);
    /* rotate the first rope_dim dims of n_heads heads of one token at one position.
     * cs: (rope_dim/2, 2) interleaved cos, sin for that position. neox: pair (i, i+rope_dim/2)
     * instead of (2i, 2i+1) */
    void (*rope)(float *x, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                 const float *cs, int neox);
    /* x = softmax(x), in place */
    void (*softmax)(float *x, int64_t n);
    /* causal attention of query rows over the f16 cache, for work items [i0, i1) of
     * (token b, head h) = (i / n_head, i % n_head); see ember_att_args. scores: scratch
     * of EMBER_ATT_HEADS * rows floats (kernels may take the query heads of one KV head
     * together, up to EMBER_ATT_HEADS). */
    void (*attention)(const ember_att_args *a, float *scores, int64_t i0, int64_t i1);
    /* y[i] = silu(g[i]) * u[i]; y may alias g */
    void (*swiglu)(const float *g, const float *u, float *y, int64_t n);
    /* y[i] = gelu(g[i]) * u[i] with ggml's f16-table GELU (ember_gelu_f16); y may alias g */
    void (*geglu)(const float *g, const float *u, float *y, int64_t n);
    /* y[i] += x[i] (residual add, bias add) */
    void (*add)(float *y, const float *x, int64_t n);
    /* f32 -> f16 (KV cache writes) */
    void (*to_f16)(const float *x, uint16_t *y, int64_t n);
} ember_ops;

extern const ember_ops ember_ops_generic;
extern const ember_ops ember_ops_avx2;

/* The table for an ISA name ("generic", "avx2", "avx512", "neon"); unknown -> generic.
 * The single place where a missing ISA falls back. */
const ember_ops *ember_ops_for(const char *isa);

/* ---- thread pool ------------------------------------------------------------ */

/* the spin-wait hint: lets the sibling hyperthread run and saves power */
static inline void ember_cpu_relax(void) {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* A fixed set of worker threads plus the caller. ember_pool_run runs fn(ctx, ith, nth)
 * on all nth threads (the caller is ith 0) and returns when the CALLER is done: workers
 * may still be finishing, and the next ember_pool_run (or ember_pool_wait) waits for
 * them first, so fn must leave nothing for workers to do after the caller returns
 * (forward.c waits on work counters). ember_pool_barrier is a classic all-thread
 * barrier. Idle workers spin briefly, then sleep. */
typedef struct ember_pool ember_pool;
typedef void (*ember_pool_fn)(void *ctx, int ith, int nth);

ember_pool *ember_pool_new(int n_threads);   /* NULL on failure */
void        ember_pool_free(ember_pool *p);
int         ember_pool_size(const ember_pool *p);
void        ember_pool_run(ember_pool *p, ember_pool_fn fn, void *ctx);
void        ember_pool_wait(ember_pool *p);  /* until every worker left the last run */
void        ember_pool_barrier(ember_pool *p);
/* measured cost: seconds per (barrier) over n_ops ops in one run */
double      ember_pool_bench_barrier(ember_pool *p, int64_t n_ops);
/* measured cost: seconds per ember_pool_run (wake + finish) over n_runs */
double      ember_pool_bench_run(ember_pool *p, int64_t n_runs);
/* measured: seconds for the pool's threads to read nbytes of buf once, split evenly */
double      ember_pool_bench_read(ember_pool *p, const void *buf, size_t nbytes);

#endif
