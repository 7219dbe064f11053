/* Portable C quantized kernels: the reference twin of every SIMD variant.
 *
 * Data flow: an activation row is quantized once (Q8_0 for 32-blocks, Q8_K
 * for the 256-block K-quants, or kept f32 for float weights), then every
 * weight row is dotted with it. Each dot accumulates integer products per
 * block (exact) and scales them to float once per block or sub-block, in the
 * same order llama.cpp does, so results agree to float rounding.
 *
 * Dequantization repeats the numpy reference's float expression order
 * exactly (e.g. Q4_K: (d*sc)*q - dmin*m) so it is bit-exact with it; the
 * build passes -ffp-contract=off so no FMA sneaks in.
 */
#include <math.h>

#include "quants_internal.h"

const int8_t ember_kvalues_iq4nl[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
};

/* ======================================================================== */
/* Activation quantization                                                   */
/* ======================================================================== */

void ember_quantize_row_q8_0_generic(const float *x, void *vy, int64_t n) {
    block_q8_0 *y = vy;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(x[i * QK8_0 + j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = ember_fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++) y[i].qs[j] = (int8_t)roundf(x[i * QK8_0 + j] * id);
    }
}

void ember_q8_0_fill_aux(void *xq, int64_t n, int bias) {
    const block_q8_0 *x = xq;
    uint8_t *dx8 = (uint8_t *)xq + (n / QK8_0) * sizeof(block_q8_0);
    uint8_t *corr = dx8 + (n / QK8_0) * 32;
    uint8_t *qs = corr + (n / QK8_0) * 32;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        memcpy(qs + 32 * i, x[i].qs, 32);
        const float d = ember_fp16_to_fp32(x[i].d);
        for (int l = 0; l < 8; l++) {
            const int32_t c = -bias * (x[i].qs[4 * l] + x[i].qs[4 * l + 1] + x[i].qs[4 * l + 2] + x[i].qs[4 * l + 3]);
            memcpy(dx8 + 32 * i + 4 * l, &d, 4);     /* memcpy: the area need not be 4-aligned */
            memcpy(corr + 32 * i + 4 * l, &c, 4);
        }
    }
}

void ember_quantize_row_q8_K_generic(const float *x, void *vy, int64_t n) {
    block_q8_K *y = vy;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            if (fabsf(x[j]) > amax) { amax = fabsf(x[j]); max = x[j]; }
        }
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        /* scale by the signed extreme, as llama.cpp: it lands on -127 exactly */
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = ember_nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[i].qs[j * 16 + l];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1.0f / iscale;
    }
}

void ember_quantize_row_f32_generic(const float *x, void *y, int64_t n) {
    memcpy(y, x, (size_t)n * sizeof(float));
}

/* ======================================================================== */
/* Dequantization (bit-exact with formats/quant_blocks.py)                        */
/* ======================================================================== */

static void dequant_q4_0(const block_q4_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK4_0) {
        const float d = ember_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = d * (float)((x[i].qs[j] & 0xF) - 8);
            y[j + 16] = d * (float)((x[i].qs[j] >> 4) - 8);
        }
    }
}

static void dequant_q4_1(const block_q4_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK4_1) {
        const float d = ember_fp16_to_fp32(x[i].d), m = ember_fp16_to_fp32(x[i].m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            y[j] = d * (float)(x[i].qs[j] & 0xF) + m;
            y[j + 16] = d * (float)(x[i].qs[j] >> 4) + m;
        }
    }
}

static uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static void dequant_q5_0(const block_q5_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK5_0) {
        const float d = ember_fp16_to_fp32(x[i].d);
        const uint32_t qh = load_u32(x[i].qh);
        for (int j = 0; j < QK5_0 / 2; j++) {
            const int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            y[j] = d * (float)(((x[i].qs[j] & 0xF) | (h0 << 4)) - 16);
            y[j + 16] = d * (float)(((x[i].qs[j] >> 4) | (h1 << 4)) - 16);
        }
    }
}

static void dequant_q5_1(const block_q5_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK5_1) {
        const float d = ember_fp16_to_fp32(x[i].d), m = ember_fp16_to_fp32(x[i].m);
        const uint32_t qh = load_u32(x[i].qh);
        for (int j = 0; j < QK5_1 / 2; j++) {
            const int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            y[j] = d * (float)((x[i].qs[j] & 0xF) | (h0 << 4)) + m;
            y[j + 16] = d * (float)((x[i].qs[j] >> 4) | (h1 << 4)) + m;
        }
    }
}

static void dequant_q8_0(const block_q8_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK8_0) {
        const float d = ember_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK8_0; j++) y[j] = (float)x[i].qs[j] * d;
    }
}

static void dequant_iq4_nl(const block_iq4_nl *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK4_NL) {
        const float d = ember_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK4_NL / 2; j++) {
            y[j] = d * (float)ember_kvalues_iq4nl[x[i].qs[j] & 0xF];
            y[j + 16] = d * (float)ember_kvalues_iq4nl[x[i].qs[j] >> 4];
        }
    }
}

static void dequant_iq4_xs(const block_iq4_xs *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = ember_fp16_to_fp32(x[i].d);
        const uint8_t *qs = x[i].qs;
        for (int ib = 0; ib < QK_K / 32; ib++, qs += 16, y += 32) {
            const float dl = d * (float)ember_iq4xs_scale(&x[i], ib);
            for (int j = 0; j < 16; j++) {
                y[j] = dl * (float)ember_kvalues_iq4nl[qs[j] & 0xF];
                y[j + 16] = dl * (float)ember_kvalues_iq4nl[qs[j] >> 4];
            }
        }
    }
}

static void dequant_q2_K(const block_q2_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = ember_fp16_to_fp32(x[i].d), dmin = ember_fp16_to_fp32(x[i].dmin);
        const uint8_t *q = x[i].qs;
        int is = 0;
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int k = 0; k < 2; k++) {   /* two 16-value groups per shift */
                    const uint8_t sc = x[i].scales[is++];
                    const float dl = d * (float)(sc & 0xF), ml = dmin * (float)(sc >> 4);
                    for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[l + 16 * k] >> shift) & 3) - ml;
                }
            }
        }
    }
}

static void dequant_q3_K(const block_q3_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = ember_fp16_to_fp32(x[i].d);
        int8_t sc[16];
        ember_q3k_scales(x[i].scales, sc);
        const uint8_t *q = x[i].qs;
        uint8_t m = 1;
        int is = 0;
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int k = 0; k < 2; k++) {
                    const float dl = d * (float)sc[is++];
                    for (int l = 16 * k; l < 16 * k + 16; l++) {
                        /* the high bit SET means no -4 offset */
                        const int v = ((q[l] >> shift) & 3) - ((x[i].hmask[l] & m) ? 0 : 4);
                        *y++ = dl * (float)v;
                    }
                }
            }
        }
    }
}

static void dequant_q4_K(const block_q4_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = ember_fp16_to_fp32(x[i].d), dmin = ember_fp16_to_fp32(x[i].dmin);
        const uint8_t *q = x[i].qs;
        for (int j = 0; j < 8; j += 2, q += 32) {
            uint8_t sc, m;
            ember_scale_min_k4(j, x[i].scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            ember_scale_min_k4(j + 1, x[i].scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

static void dequant_q5_K(const block_q5_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = ember_fp16_to_fp32(x[i].d), dmin = ember_fp16_to_fp32(x[i].dmin);
        const uint8_t *q = x[i].qs;
        for (int j = 0; j < 8; j += 2, q += 32) {
            uint8_t sc, m;
            ember_scale_min_k4(j, x[i].scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            ember_scale_min_k4(j + 1, x[i].scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++) {
                *y++ = d1 * (float)((q[l] & 0xF) | (((x[i].qh[l] >> j) & 1) << 4)) - m1;
            }
            for (int l = 0; l < 32; l++) {
                *y++ = d2 * (float)((q[l] >> 4) | (((x[i].qh[l] >> (j + 1)) & 1) << 4)) - m2;
            }
        }
    }
}

static void dequant_q6_K(const block_q6_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = ember_fp16_to_fp32(x[i].d);
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int half = 0; half < 2; half++, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is + 0] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

static void dequant_q8_K(const block_q8_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK_K) {
        for (int j = 0; j < QK_K; j++) y[j] = x[i].d * (float)x[i].qs[j];
    }
}

void ember_dequantize_row_generic(int wtype, const void *x, float *y, int64_t n) {
    switch (wtype) {
    case EMBER_F32: memcpy(y, x, (size_t)n * 4); break;
    case EMBER_F16: for (int64_t i = 0; i < n; i++) y[i] = ember_fp16_to_fp32(((const ember_fp16_t *)x)[i]); break;
    case EMBER_BF16: for (int64_t i = 0; i < n; i++) y[i] = ember_bf16_to_fp32(((const ember_bf16_t *)x)[i]); break;
    case EMBER_Q4_0: dequant_q4_0(x, y, n / QK4_0); break;
    case EMBER_Q4_1: dequant_q4_1(x, y, n / QK4_1); break;
    case EMBER_Q5_0: dequant_q5_0(x, y, n / QK5_0); break;
    case EMBER_Q5_1: dequant_q5_1(x, y, n / QK5_1); break;
    case EMBER_Q8_0: dequant_q8_0(x, y, n / QK8_0); break;
    case EMBER_IQ4_NL: dequant_iq4_nl(x, y, n / QK4_NL); break;
    case EMBER_IQ4_XS: dequant_iq4_xs(x, y, n / QK_K); break;
    case EMBER_Q2_K: dequant_q2_K(x, y, n / QK_K); break;
    case EMBER_Q3_K: dequant_q3_K(x, y, n / QK_K); break;
    case EMBER_Q4_K: dequant_q4_K(x, y, n / QK_K); break;
    case EMBER_Q5_K: dequant_q5_K(x, y, n / QK_K); break;
    case EMBER_Q6_K: dequant_q6_K(x, y, n / QK_K); break;
    case EMBER_Q8_K: dequant_q8_K(x, y, n / QK_K); break;
    default: break;
    }
}

/* ======================================================================== */
/* Dot products against Q8_0 activations (32-blocks)                         */
/* ======================================================================== */

float ember_vec_dot_q4_0_q8_0_generic(int64_t n, const void *vw, const void *vx) {
    const block_q4_0 *w = vw;
    const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += ((w[i].qs[j] & 0xF) - 8) * x[i].qs[j] + ((w[i].qs[j] >> 4) - 8) * x[i].qs[j + 16];
        }
        sum += (float)sumi * (ember_fp16_to_fp32(w[i].d) * ember_fp16_to_fp32(x[i].d));
    }
    return sum;
}

static int sum_q8(const int8_t *q) {
    int s = 0;
    for (int j = 0; j < 32; j++) s += q[j];
    return s;
}

float ember_vec_dot_q4_1_q8_0_generic(int64_t n, const void *vw, const void *vx) {
    const block_q4_1 *w = vw;
    const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += (w[i].qs[j] & 0xF) * x[i].qs[j] + (w[i].qs[j] >> 4) * x[i].qs[j + 16];
        }
        const float dx = ember_fp16_to_fp32(x[i].d);
        /* the min contributes m * sum(x) = m * dx * sum(q8) */
        sum += (float)sumi * (ember_fp16_to_fp32(w[i].d) * dx) + ember_fp16_to_fp32(w[i].m) * (dx * (float)sum_q8(x[i].qs));
    }
    return sum;
}

float ember_vec_dot_q5_0_q8_0_generic(int64_t n, const void *vw, const void *vx) {
    const block_q5_0 *w = vw;
    const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const uint32_t qh = load_u32(w[i].qh);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int v0 = ((w[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16;
            const int v1 = ((w[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
            sumi += v0 * x[i].qs[j] + v1 * x[i].qs[j + 16];
        }
        sum += (float)sumi * (ember_fp16_to_fp32(w[i].d) * ember_fp16_to_fp32(x[i].d));
    }
    return sum;
}

float ember_vec_dot_q5_1_q8_0_generic(int64_t n, const void *vw, const void *vx) {
    const block_q5_1 *w = vw;
    const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const uint32_t qh = load_u32(w[i].qh);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int v0 = (w[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4);
            const int v1 = (w[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            sumi += v0 * x[i].qs[j] + v1 * x[i].qs[j + 16];
        }
        const float dx = ember_fp16_to_fp32(x[i].d);
        sum += (float)sumi * (ember_fp16_to_fp32(w[i].d) * dx) + ember_fp16_to_fp32(w[i].m) * (dx * (float)sum_q8(x[i].qs));
    }
    return sum;
}

float ember_vec_dot_q8_0_q8_0_generic(int64_t n, const void *vw, const void *vx) {
    const block_q8_0 *w = vw;
    const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < QK8_0; j++) sumi += w[i].qs[j] * x[i].qs[j];
        sum += (float)sumi * (ember_fp16_to_fp32(w[i].d) * ember_fp16_to_fp32(x[i].d));
    }
    return sum;
}

float ember_vec_dot_iq4_nl_q8_0_generic(int64_t n, const void *vw, const void *vx) {
    const block_iq4_nl *w = vw;
    const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += ember_kvalues_iq4nl[w[i].qs[j] & 0xF] * x[i].qs[j]
                  + ember_kvalues_iq4nl[w[i].qs[j] >> 4] * x[i].qs[j + 16];
        }
        sum += (float)sumi * (ember_fp16_to_fp32(w[i].d) * ember_fp16_to_fp32(x[i].d));
    }
    return sum;
}

/* ======================================================================== */
/* Dot products against Q8_K activations (256-blocks)                        */
/* ======================================================================== */

float ember_vec_dot_q2_K_q8_K_generic(int64_t n, const void *vw, const void *vx) {
    const block_q2_K *w = vw;
    const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int summs = 0, isum = 0, is = 0;
        for (int j = 0; j < 16; j++) summs += x[i].bsums[j] * (w[i].scales[j] >> 4);
        const uint8_t *q = w[i].qs;
        const int8_t *q8 = x[i].qs;
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int k = 0; k < 2; k++, q8 += 16) {
                    int s = 0;
                    for (int l = 0; l < 16; l++) s += q8[l] * ((q[l + 16 * k] >> shift) & 3);
                    isum += (w[i].scales[is++] & 0xF) * s;
                }
            }
        }
        const float dall = x[i].d * ember_fp16_to_fp32(w[i].d);
        const float dmin = x[i].d * ember_fp16_to_fp32(w[i].dmin);
        sum += dall * (float)isum - dmin * (float)summs;
    }
    return sum;
}

float ember_vec_dot_q3_K_q8_K_generic(int64_t n, const void *vw, const void *vx) {
    const block_q3_K *w = vw;
    const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int8_t sc[16];
        ember_q3k_scales(w[i].scales, sc);
        const uint8_t *q = w[i].qs;
        const int8_t *q8 = x[i].qs;
        uint8_t m = 1;
        int isum = 0, is = 0;
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int k = 0; k < 2; k++, q8 += 16) {
                    int s = 0;
                    for (int l = 16 * k; l < 16 * k + 16; l++) {
                        const int v = ((q[l] >> shift) & 3) - ((w[i].hmask[l] & m) ? 0 : 4);
                        s += v * q8[l - 16 * k];
                    }
                    isum += sc[is++] * s;
                }
            }
        }
        sum += ember_fp16_to_fp32(w[i].d) * x[i].d * (float)isum;
    }
    return sum;
}

/* Integer sum over the super-block (sum of scale * code-book dot per 32 values,
 * |.| < 2^27), scaled once: every ISA's twin computes the same integer. */
float ember_vec_dot_iq4_xs_q8_K_generic(int64_t n, const void *vw, const void *vx) {
    const block_iq4_xs *w = vw;
    const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *qs = w[i].qs;
        const int8_t *q8 = x[i].qs;
        int isum = 0;
        for (int ib = 0; ib < QK_K / 32; ib++, qs += 16, q8 += 32) {
            int s = 0;
            for (int j = 0; j < 16; j++) {
                s += ember_kvalues_iq4nl[qs[j] & 0xF] * q8[j] + ember_kvalues_iq4nl[qs[j] >> 4] * q8[j + 16];
            }
            isum += ember_iq4xs_scale(&w[i], ib) * s;
        }
        sum += ember_fp16_to_fp32(w[i].d) * x[i].d * (float)isum;
    }
    return sum;
}

/* sum over the 8 sub-blocks of Q4_K/Q5_K: scale * dot - min * sum(x) */
static float k4_block(const block_q8_K *x, float d, float dmin, const uint8_t *scales, const int *dots) {
    int isum = 0, summs = 0;
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        ember_scale_min_k4(j, scales, &sc, &m);
        isum += sc * dots[j];
        summs += m * (x->bsums[2 * j] + x->bsums[2 * j + 1]);
    }
    return x->d * d * (float)isum - x->d * dmin * (float)summs;
}

float ember_vec_dot_q4_K_q8_K_generic(int64_t n, const void *vw, const void *vx) {
    const block_q4_K *w = vw;
    const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int dots[8] = {0};
        const uint8_t *q = w[i].qs;
        const int8_t *q8 = x[i].qs;
        for (int j = 0; j < 8; j += 2, q += 32, q8 += 64) {
            for (int l = 0; l < 32; l++) {
                dots[j] += (q[l] & 0xF) * q8[l];
                dots[j + 1] += (q[l] >> 4) * q8[l + 32];
            }
        }
        sum += k4_block(&x[i], ember_fp16_to_fp32(w[i].d), ember_fp16_to_fp32(w[i].dmin), w[i].scales, dots);
    }
    return sum;
}

float ember_vec_dot_q5_K_q8_K_generic(int64_t n, const void *vw, const void *vx) {
    const block_q5_K *w = vw;
    const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int dots[8] = {0};
        const uint8_t *q = w[i].qs;
        const int8_t *q8 = x[i].qs;
        for (int j = 0; j < 8; j += 2, q += 32, q8 += 64) {
            for (int l = 0; l < 32; l++) {
                dots[j] += ((q[l] & 0xF) | (((w[i].qh[l] >> j) & 1) << 4)) * q8[l];
                dots[j + 1] += ((q[l] >> 4) | (((w[i].qh[l] >> (j + 1)) & 1) << 4)) * q8[l + 32];
            }
        }
        sum += k4_block(&x[i], ember_fp16_to_fp32(w[i].d), ember_fp16_to_fp32(w[i].dmin), w[i].scales, dots);
    }
    return sum;
}

float ember_vec_dot_q6_K_q8_K_generic(int64_t n, const void *vw, const void *vx) {
    const block_q6_K *w = vw;
    const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *ql = w[i].ql, *qh = w[i].qh;
        const int8_t *sc = w[i].scales, *q8 = x[i].qs;
        int isum = 0;
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, q8 += 128) {
            int s[8] = {0};
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                s[is + 0] += (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32) * q8[l];
                s[is + 2] += (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32) * q8[l + 32];
                s[is + 4] += (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32) * q8[l + 64];
                s[is + 6] += (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32) * q8[l + 96];
            }
            for (int k = 0; k < 8; k++) isum += sc[k] * s[k];
        }
        sum += ember_fp16_to_fp32(w[i].d) * x[i].d * (float)isum;
    }
    return sum;
}

/* ======================================================================== */
/* Float weights against f32 activations                                     */
/* ======================================================================== */

/* Four partial sums: shortens the dependency chain and halves the error growth. */
float ember_vec_dot_f32_f32_generic(int64_t n, const void *vw, const void *vx) {
    const float *w = vw, *x = vx;
    float s[4] = {0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int k = 0; k < 4; k++) s[k] += w[i + k] * x[i + k];
    }
    for (; i < n; i++) s[0] += w[i] * x[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

float ember_vec_dot_f16_f32_generic(int64_t n, const void *vw, const void *vx) {
    const ember_fp16_t *w = vw;
    const float *x = vx;
    float s[4] = {0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int k = 0; k < 4; k++) s[k] += ember_fp16_to_fp32(w[i + k]) * x[i + k];
    }
    for (; i < n; i++) s[0] += ember_fp16_to_fp32(w[i]) * x[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

float ember_vec_dot_bf16_f32_generic(int64_t n, const void *vw, const void *vx) {
    const ember_bf16_t *w = vw;
    const float *x = vx;
    float s[4] = {0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int k = 0; k < 4; k++) s[k] += ember_bf16_to_fp32(w[i + k]) * x[i + k];
    }
    for (; i < n; i++) s[0] += ember_bf16_to_fp32(w[i]) * x[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* ======================================================================== */
/* The generic table: every supported type                                   */
/* ======================================================================== */

void ember_fill_kernels_generic(ember_type_kernels *k) {
    const ember_quantize_fn q80 = ember_quantize_row_q8_0_generic;
    const ember_quantize_fn q8k = ember_quantize_row_q8_K_generic;
    const ember_quantize_fn f32 = ember_quantize_row_f32_generic;
    k[EMBER_Q4_0] = (ember_type_kernels){ember_vec_dot_q4_0_q8_0_generic, NULL, q80};
    k[EMBER_Q4_1] = (ember_type_kernels){ember_vec_dot_q4_1_q8_0_generic, NULL, q80};
    k[EMBER_Q5_0] = (ember_type_kernels){ember_vec_dot_q5_0_q8_0_generic, NULL, q80};
    k[EMBER_Q5_1] = (ember_type_kernels){ember_vec_dot_q5_1_q8_0_generic, NULL, q80};
    k[EMBER_Q8_0] = (ember_type_kernels){ember_vec_dot_q8_0_q8_0_generic, NULL, q80};
    k[EMBER_IQ4_NL] = (ember_type_kernels){ember_vec_dot_iq4_nl_q8_0_generic, NULL, q80};
    k[EMBER_Q2_K] = (ember_type_kernels){ember_vec_dot_q2_K_q8_K_generic, NULL, q8k};
    k[EMBER_Q3_K] = (ember_type_kernels){ember_vec_dot_q3_K_q8_K_generic, NULL, q8k};
    k[EMBER_Q4_K] = (ember_type_kernels){ember_vec_dot_q4_K_q8_K_generic, NULL, q8k};
    k[EMBER_Q5_K] = (ember_type_kernels){ember_vec_dot_q5_K_q8_K_generic, NULL, q8k};
    k[EMBER_Q6_K] = (ember_type_kernels){ember_vec_dot_q6_K_q8_K_generic, NULL, q8k};
    k[EMBER_IQ4_XS] = (ember_type_kernels){ember_vec_dot_iq4_xs_q8_K_generic, NULL, q8k};
    k[EMBER_F32] = (ember_type_kernels){ember_vec_dot_f32_f32_generic, NULL, f32};
    k[EMBER_F16] = (ember_type_kernels){ember_vec_dot_f16_f32_generic, NULL, f32};
    k[EMBER_BF16] = (ember_type_kernels){ember_vec_dot_bf16_f32_generic, NULL, f32};
}
