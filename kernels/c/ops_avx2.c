/* x86 AVX2+FMA+F16C twins of the ops in ember_ops.h (same signatures as
 * ops_generic.c). Compiled with a target pragma, so the binary still runs on
 * CPUs without AVX2: dispatch only selects this table where the CPU has it.
 * Every loop ends in the scalar tail of its generic twin. */
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "ember_ops.h"

/* ---- vector helpers ------------------------------------------------------------- */

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x, relative error ~2 ulp: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial
 * for e^r (Cephes coefficients), and 2^n built in the exponent bits. Inputs are
 * clamped to the float range so 2^n never leaves the normal exponents. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln2 split in two so n*ln2_hi is exact and r keeps its low bits */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 load_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* ---- norms, activations, adds ------------------------------------------------------- */

static void rmsnorm_avx2(const float *x, const float *w, float *y, int64_t n, float eps) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
        acc1 = _mm256_fmadd_ps(b, b, acc1);
    }
    double ss = hsum256(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) ss += (double)x[i] * x[i];
    const float scale = (float)(1.0 / sqrt(ss / (double)n + eps));
    const __m256 vs = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs),
                                              _mm256_loadu_ps(w + i)));
    for (; i < n; i++) y[i] = x[i] * scale * w[i];
}

static void swiglu_avx2(const float *g, const float *u, float *y, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 vg = _mm256_loadu_ps(g + i);
        const __m256 den = _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), vg)));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(vg, den), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void add_avx2(float *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] += x[i];
}

static void to_f16_avx2(const float *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = ember_ops_f2h(x[i]);
}

/* ---- rope ------------------------------------------------------------------------------ */

/* interleaved pairs: 8 floats are 4 (x0, x1) pairs and line up with 4 (cos, sin) pairs */
static void rope_pairs_avx2(float *xh, int64_t half, const float *cs) {
    int64_t i = 0;
    for (; i + 4 <= half; i += 4) {
        const __m256 x = _mm256_loadu_ps(xh + 2 * i), t = _mm256_loadu_ps(cs + 2 * i);
        const __m256 c = _mm256_moveldup_ps(t), s = _mm256_movehdup_ps(t);
        const __m256 xs = _mm256_permute_ps(x, 0xB1);  /* (x1, x0) per pair */
        /* even lanes x0 c - x1 s, odd lanes x1 c + x0 s */
        _mm256_storeu_ps(xh + 2 * i, _mm256_addsub_ps(_mm256_mul_ps(x, c), _mm256_mul_ps(xs, s)));
    }
    for (; i < half; i++) {
        const float c = cs[2 * i], s = cs[2 * i + 1], x0 = xh[2 * i], x1 = xh[2 * i + 1];
        xh[2 * i] = x0 * c - x1 * s;
        xh[2 * i + 1] = x0 * s + x1 * c;
    }
}

/* NEOX halves: x_i pairs with x_{i+half}; cos and sin are de-interleaved from cs */
static void rope_halves_avx2(float *xh, int64_t half, const float *cs) {
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 lo = _mm256_loadu_ps(cs + 2 * i), hi = _mm256_loadu_ps(cs + 2 * i + 8);
        const __m256 c = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
        const __m256 s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
        const __m256 a = _mm256_loadu_ps(xh + i), b = _mm256_loadu_ps(xh + half + i);
        _mm256_storeu_ps(xh + i, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
        _mm256_storeu_ps(xh + half + i, _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c)));
    }
    for (; i < half; i++) {
        const float c = cs[2 * i], s = cs[2 * i + 1], x0 = xh[i], x1 = xh[half + i];
        xh[i] = x0 * c - x1 * s;
        xh[half + i] = x0 * s + x1 * c;
    }
}

static void rope_avx2(float *x, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                      const float *cs, int neox) {
    for (int64_t h = 0; h < n_heads; h++) {
        if (neox) rope_halves_avx2(x + h * head_dim, rope_dim / 2, cs);
        else rope_pairs_avx2(x + h * head_dim, rope_dim / 2, cs);
    }
}

/* ---- softmax and attention ----------------------------------------------------------------- */

static void softmax_avx2(float *x, int64_t n) {
    int64_t i = 0;
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(x + i));
    float mx = hmax256(vmx);
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    const __m256 m = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
        _mm256_storeu_ps(x + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    double sum = hsum256(vsum);
    for (; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    const float inv = (float)(1.0 / sum);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
    for (; i < n; i++) x[i] *= inv;
}

static inline float dot_f16_avx2(const uint16_t *k, const float *q, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load_f16(k + i), _mm256_loadu_ps(q + i), acc);
    float s = hsum256(acc);
    for (; i < n; i++) s += ember_ops_h2f(k[i]) * q[i];
    return s;
}

/* out += a * v (v in f16) */
static inline void axpy_f16_avx2(float *out, const uint16_t *v, float a, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(va, load_f16(v + i), _mm256_loadu_ps(out + i)));
    for (; i < n; i++) out[i] += a * ember_ops_h2f(v[i]);
}

/* scores[t] = scale * K[t] . q for t < n_kv. Four keys at a time: four independent
 * fma chains instead of one per key (one chain of hd/8 fmas was latency-bound). */
static void qk_scores_avx2(const uint16_t *K, int64_t kv_stride, const float *q, int64_t hd,
                           int64_t n_kv, float scale, float *scores) {
    const int64_t hd8 = hd / 8 * 8;
    int64_t t = 0;
    for (; t + 4 <= n_kv; t += 4) {
        const uint16_t *k0 = K + t * kv_stride, *k1 = k0 + kv_stride, *k2 = k1 + kv_stride, *k3 = k2 + kv_stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < hd8; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(load_f16(k0 + i), qv, a0);
            a1 = _mm256_fmadd_ps(load_f16(k1 + i), qv, a1);
            a2 = _mm256_fmadd_ps(load_f16(k2 + i), qv, a2);
            a3 = _mm256_fmadd_ps(load_f16(k3 + i), qv, a3);
        }
        /* [sum a0, sum a1, sum a2, sum a3] */
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        float d[4];
        _mm_storeu_ps(d, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        for (int64_t i = hd8; i < hd; i++) {
            d[0] += ember_ops_h2f(k0[i]) * q[i];
            d[1] += ember_ops_h2f(k1[i]) * q[i];
            d[2] += ember_ops_h2f(k2[i]) * q[i];
            d[3] += ember_ops_h2f(k3[i]) * q[i];
        }
        for (int j = 0; j < 4; j++) scores[t + j] = d[j] * scale;
    }
    for (; t < n_kv; t++) scores[t] = dot_f16_avx2(K + t * kv_stride, q, hd) * scale;
}

/* out += sum_t p[t] V[t] (hd values). 64 output values at a time stay in eight
 * registers over all keys: accumulating through memory (axpy per key) was
 * bound by the store -> load round trip of each output line. */
static void pv_avx2(const uint16_t *V, int64_t kv_stride, const float *p, int64_t n_kv,
                    int64_t hd, float *out) {
    int64_t c = 0;
    for (; c + 64 <= hd; c += 64) {
        __m256 o[8];
        for (int j = 0; j < 8; j++) o[j] = _mm256_loadu_ps(out + c + 8 * j);
        for (int64_t t = 0; t < n_kv; t++) {
            const __m256 a = _mm256_set1_ps(p[t]);
            const uint16_t *v = V + t * kv_stride + c;
            for (int j = 0; j < 8; j++) o[j] = _mm256_fmadd_ps(a, load_f16(v + 8 * j), o[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + c + 8 * j, o[j]);
    }
    if (c < hd)   /* leftover < 64 values (odd head sizes): one key at a time */
        for (int64_t t = 0; t < n_kv; t++) axpy_f16_avx2(out + c, V + t * kv_stride + c, p[t], hd - c);
}

/* ---- attention: the query heads of one KV head together ---------------------------------- */

/* GQA: the query heads of a KV head read the same K and V rows. Converting a
 * row from f16 once for all of them (up to EMBER_ATT_HEADS), instead of once
 * per head, takes the conversions (2 uops per 8 values) off the fma ports:
 * per (key, head) 8 fmas remain where 8 conversions and 8 fmas were. */
#define ATT_KB 8          /* keys per converted block */
#define ATT_MAX_HD 256    /* head sizes up to this (multiples of 8) take the shared path */

/* n rows of an f16 cache (row stride `stride`) -> f32 rows of hd in buf */
static inline void rows_f32(const uint16_t *src, int64_t stride, int n, int64_t hd, float *buf) {
    for (int k = 0; k < n; k++)
        for (int64_t i = 0; i < hd; i += 8) _mm256_storeu_ps(buf + k * hd + i, load_f16(src + k * stride + i));
}

/* [sum a0, ..., sum a7] */
static inline __m256 hsum8x8(const __m256 a[8]) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* scores[j * ld + t] = scale * K[t] . q_j for nh heads (q_j = q + j * hd) */
static void qk_heads_avx2(const uint16_t *K, int64_t kv_stride, const float *q, int nh, int64_t hd,
                          int64_t n_kv, float scale, float *scores, int64_t ld) {
    float kb[ATT_KB * ATT_MAX_HD];
    for (int64_t t0 = 0; t0 < n_kv; t0 += ATT_KB) {
        const int nk = n_kv - t0 < ATT_KB ? (int)(n_kv - t0) : ATT_KB;
        rows_f32(K + t0 * kv_stride, kv_stride, nk, hd, kb);
        for (int j = 0; j < nh; j++) {
            const float *qj = q + j * hd;
            float *sj = scores + j * ld + t0;
            if (nk == ATT_KB) {
                __m256 acc[ATT_KB];
                for (int k = 0; k < ATT_KB; k++) acc[k] = _mm256_setzero_ps();
                for (int64_t i = 0; i < hd; i += 8) {
                    const __m256 qv = _mm256_loadu_ps(qj + i);
                    for (int k = 0; k < ATT_KB; k++) acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(kb + k * hd + i), qv, acc[k]);
                }
                _mm256_storeu_ps(sj, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
            } else {
                for (int k = 0; k < nk; k++) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int64_t i = 0; i < hd; i += 8)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(kb + k * hd + i), _mm256_loadu_ps(qj + i), acc);
                    sj[k] = hsum256(acc) * scale;
                }
            }
        }
    }
}

/* out_j += sum_t p_j[t] V[t] for nh heads (p_j = p + j * ld, out_j = out + j * hd) */
static void pv_heads_avx2(const uint16_t *V, int64_t kv_stride, const float *p, int64_t ld, int nh,
                          int64_t n_kv, int64_t hd, float *out) {
    float vb[ATT_KB * ATT_MAX_HD];
    for (int64_t t0 = 0; t0 < n_kv; t0 += ATT_KB) {
        const int nk = n_kv - t0 < ATT_KB ? (int)(n_kv - t0) : ATT_KB;
        rows_f32(V + t0 * kv_stride, kv_stride, nk, hd, vb);
        for (int j = 0; j < nh; j++) {
            const float *pj = p + j * ld + t0;
            float *oj = out + j * hd;
            int64_t c = 0;
            for (; c + 32 <= hd; c += 32) {   /* 32 outputs in registers over the block's keys */
                __m256 o0 = _mm256_loadu_ps(oj + c), o1 = _mm256_loadu_ps(oj + c + 8);
                __m256 o2 = _mm256_loadu_ps(oj + c + 16), o3 = _mm256_loadu_ps(oj + c + 24);
                for (int k = 0; k < nk; k++) {
                    const __m256 a = _mm256_set1_ps(pj[k]);
                    const float *v = vb + k * hd + c;
                    o0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(v), o0);
                    o1 = _mm256_fmadd_ps(a, _mm256_loadu_ps(v + 8), o1);
                    o2 = _mm256_fmadd_ps(a, _mm256_loadu_ps(v + 16), o2);
                    o3 = _mm256_fmadd_ps(a, _mm256_loadu_ps(v + 24), o3);
                }
                _mm256_storeu_ps(oj + c, o0);
                _mm256_storeu_ps(oj + c + 8, o1);
                _mm256_storeu_ps(oj + c + 16, o2);
                _mm256_storeu_ps(oj + c + 24, o3);
            }
            for (; c < hd; c += 8) {
                __m256 o = _mm256_loadu_ps(oj + c);
                for (int k = 0; k < nk; k++) o = _mm256_fmadd_ps(_mm256_set1_ps(pj[k]), _mm256_loadu_ps(vb + k * hd + c), o);
                _mm256_storeu_ps(oj + c, o);
            }
        }
    }
}

/* the nh heads of a run over keys in two runs of rows (a ring wraps once): the same
 * per-key order as one run, so a ring gives the sums of a full cache */
static void heads_avx2(const ember_att_args *a, const float *q, int64_t kvo, int nh, int64_t r0,
                       int64_t n0, int64_t n_kv, float *scores, float *out) {
    const int64_t st = a->kv_stride, hd = a->hd;
    const uint16_t *K = a->K + kvo, *V = a->V + kvo;
    qk_heads_avx2(K + r0 * st, st, q, nh, hd, n0, a->scale, scores, n_kv);
    if (n_kv > n0) qk_heads_avx2(K, st, q, nh, hd, n_kv - n0, a->scale, scores + n0, n_kv);
    for (int j = 0; j < nh; j++) {
        ember_softcap(scores + j * n_kv, n_kv, a->softcap);
        softmax_avx2(scores + j * n_kv, n_kv);
    }
    memset(out, 0, (size_t)(nh * hd) * sizeof(float));
    pv_heads_avx2(V + r0 * st, st, scores, n_kv, nh, n0, hd, out);
    if (n_kv > n0) pv_heads_avx2(V, st, scores + n0, n_kv, nh, n_kv - n0, hd, out);
}

static void head_avx2(const ember_att_args *a, const float *q, int64_t kvo, int64_t r0, int64_t n0,
                      int64_t n_kv, float *scores, float *out) {
    const int64_t st = a->kv_stride, hd = a->hd;
    const uint16_t *K = a->K + kvo, *V = a->V + kvo;
    qk_scores_avx2(K + r0 * st, st, q, hd, n0, a->scale, scores);
    if (n_kv > n0) qk_scores_avx2(K, st, q, hd, n_kv - n0, a->scale, scores + n0);
    ember_softcap(scores, n_kv, a->softcap);
    softmax_avx2(scores, n_kv);
    memset(out, 0, (size_t)hd * sizeof(float));
    pv_avx2(V + r0 * st, st, scores, n0, hd, out);
    if (n_kv > n0) pv_avx2(V, st, scores + n0, n_kv - n0, hd, out);
}

static void attention_avx2(const ember_att_args *a, float *scores, int64_t i0, int64_t i1) {
    const int64_t n_head = a->n_head, hd = a->hd;
    const int64_t group = n_head / a->n_head_kv;  /* GQA: query heads per kv head */
    const int64_t run = ember_att_run(n_head, a->n_head_kv);
    const int shared = hd % 8 == 0 && hd <= ATT_MAX_HD;
    for (int64_t it = i0; it < i1;) {
        const int64_t b = it / n_head, h = it % n_head, kvo = (h / group) * hd;
        int64_t r0, n0;
        const int64_t n_kv = ember_att_keys(a, a->pos0 + b, &r0, &n0);
        const float *q = a->q + b * a->ldq + h * hd;
        float *out = a->out + b * a->ldo + h * hd;
        int64_t nh = run - h % run;            /* heads left in this run (runs tile each group) */
        nh = nh < i1 - it ? nh : i1 - it;
        if (shared && nh > 1) {
            heads_avx2(a, q, kvo, (int)nh, r0, n0, n_kv, scores, out);
            it += nh;
        } else {
            head_avx2(a, q, kvo, r0, n0, n_kv, scores, out);
            it++;
        }
    }
}

/* y = gelu(g) * u through ggml's f16 table (ember_gelu_f16): eight lookups per gather */
static void geglu_avx2(const float *g, const float *u, float *y, int64_t n) {
    const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256i h = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        /* 32-bit gathers at 2-byte steps: the entry is the low half (little-endian) */
        const __m256i t = _mm256_and_si256(_mm256_i32gather_epi32((const int *)ember_gelu_table, h, 2),
                                           _mm256_set1_epi32(0xffff));
        __m256 v = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
        v = _mm256_blendv_ps(v, x, _mm256_cmp_ps(x, hi, _CMP_GE_OQ));                /* x >= 10: x */
        v = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LE_OQ)); /* x <= -10: 0 */
        _mm256_storeu_ps(y + i, _mm256_mul_ps(v, _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) y[i] = ember_gelu_f16(g[i]) * u[i];
}

/* ---- the table ------------------------------------------------------------------------------ */

const ember_ops ember_ops_avx2 = {
    .name = "avx2",
    .rmsnorm = rmsnorm_avx2,
    .rope = rope_avx2,
    .softmax = softmax_avx2,
    .attention = attention_avx2,
    .swiglu = swiglu_avx2,
    .geglu = geglu_avx2,
    .add = add_avx2,
    .to_f16 = to_f16_avx2,
};

#endif
