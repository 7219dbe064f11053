/* Portable C twins of the ops in ember_ops.h: the reference every ISA variant
 * is tested against, and the ops table for CPUs without a SIMD variant. */
#include <math.h>
#include <pthread.h>
#include <string.h>

#include "ember_ops.h"

/* ---- norms, activations, adds ------------------------------------------------ */

static void rmsnorm_generic(const float *x, const float *w, float *y, int64_t n, float eps) {
    double ss = 0.0;  /* double: width-2048+ sums of squares lose bits in float */
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float scale = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * w[i];
}

static void swiglu_generic(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* ---- GELU: ggml's f16 table ------------------------------------------------------- */

uint16_t ember_gelu_table[(1 << 16) + 1];
static pthread_once_t gelu_once = PTHREAD_ONCE_INIT;

/* ggml_gelu_f32: the tanh approximation, in float as ggml computes it */
static float gelu_f32(float x) {
    const float sqrt_2_over_pi = 0.79788456080286535587989211986876f, coef_a = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(sqrt_2_over_pi * x * (1.0f + coef_a * x * x)));
}

static void gelu_fill(void) {
    for (uint32_t i = 0; i < (1u << 16); i++)
        ember_gelu_table[i] = ember_ops_f2h(gelu_f32(ember_ops_h2f((uint16_t)i)));
}

void ember_gelu_init(void) { pthread_once(&gelu_once, gelu_fill); }

static void geglu_generic(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = ember_gelu_f16(g[i]) * u[i];
}

static void add_generic(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

static void to_f16_generic(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = ember_ops_f2h(x[i]);
}

/* ---- rope --------------------------------------------------------------------- */

static void rope_generic(float *x, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                         const float *cs, int neox) {
    const int64_t half = rope_dim / 2;
    const int64_t stride = neox ? 1 : 2, off = neox ? half : 1;  /* where a pair's two halves lie */
    for (int64_t h = 0; h < n_heads; h++) {
        float *xh = x + h * head_dim;
        for (int64_t i = 0; i < half; i++) {
            float *a = xh + i * stride, *b = a + off;
            const float c = cs[2 * i], s = cs[2 * i + 1], x0 = *a, x1 = *b;
            *a = x0 * c - x1 * s;
            *b = x0 * s + x1 * c;
        }
    }
}

/* ---- softmax and attention ------------------------------------------------------- */

static void softmax_generic(float *x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

static float dot_f16_generic(const uint16_t *k, const float *q, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += ember_ops_h2f(k[i]) * q[i];
    return s;
}

static void attention_generic(const ember_att_args *a, float *scores, int64_t i0, int64_t i1) {
    const int64_t group = a->n_head / a->n_head_kv, hd = a->hd;  /* GQA: query heads per kv head */
    for (int64_t it = i0; it < i1; it++) {
        const int64_t b = it / a->n_head, h = it % a->n_head;
        int64_t r0, n0;
        const int64_t n_kv = ember_att_keys(a, a->pos0 + b, &r0, &n0);
        const float *qh = a->q + b * a->ldq + h * hd;
        const int64_t kvo = (h / group) * hd;
        for (int64_t t = 0; t < n_kv; t++) {   /* key t (in position order) lives in row */
            const int64_t row = t < n0 ? r0 + t : t - n0;
            scores[t] = dot_f16_generic(a->K + row * a->kv_stride + kvo, qh, hd) * a->scale;
        }
        ember_softcap(scores, n_kv, a->softcap);
        softmax_generic(scores, n_kv);
        float *oh = a->out + b * a->ldo + h * hd;
        memset(oh, 0, (size_t)hd * sizeof(float));
        for (int64_t t = 0; t < n_kv; t++) {
            const int64_t row = t < n0 ? r0 + t : t - n0;
            const uint16_t *vt = a->V + row * a->kv_stride + kvo;
            for (int64_t d = 0; d < hd; d++) oh[d] += scores[t] * ember_ops_h2f(vt[d]);
        }
    }
}

/* ---- the table ---------------------------------------------------------------------- */

const ember_ops ember_ops_generic = {
    .name = "generic",
    .rmsnorm = rmsnorm_generic,
    .rope = rope_generic,
    .softmax = softmax_generic,
    .attention = attention_generic,
    .swiglu = swiglu_generic,
    .geglu = geglu_generic,
    .add = add_generic,
    .to_f16 = to_f16_generic,
};

const ember_ops *ember_ops_for(const char *isa) {
#if defined(__x86_64__) || defined(_M_X64)
    /* avx512 has no ops of its own: its products are where it pays, these are not */
    if (isa && (strcmp(isa, "avx2") == 0 || strcmp(isa, "avx512") == 0)) return &ember_ops_avx2;
#endif
    (void)isa;  /* neon and everything else: the portable ops */
    return &ember_ops_generic;
}
