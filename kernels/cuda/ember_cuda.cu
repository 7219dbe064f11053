/* ember's GPU decoder kernels: one source for CUDA (NVRTC) and ROCm (hipRTC / hipcc).
 *
 * kernels/cuda_source.py prepends the per-platform macros before compiling:
 *   EMBER_HIP   1 on ROCm, 0 on CUDA
 *   WARP        lanes per warp: 32 on NVIDIA, 64 on AMD wave64 (never hard-coded below)
 *   BLOCK       threads per block of the row kernels (a multiple of WARP)
 *   HD_MAX      the widest attention head the kernels accept
 *
 * Data layout (plugins/cuda.py uploads weights once, repacked for aligned loads):
 *   q4_0  qs (rows, K/32, 16 bytes) + d (rows, K/32) half   - the 18-byte GGUF block split in two
 *   q8_0  qs (rows, K/32, 32 bytes) + d (rows, K/32) half
 *   q4_k  the GGUF 144-byte super-blocks as they are (16-byte aligned already)
 *   q6_k  the GGUF 210-byte super-blocks padded to 224 bytes (16-byte aligned)
 *   f16 / f32  plain rows; every other GGUF type is dequantized to f16 at load
 * Activations are float32; the KV cache is f16, (n_ctx, n_kv_heads * head_dim) per layer.
 *
 * Each weight type is a "unit" decoder: unit(w, d, row, u, K, f) calls f(i, value) for the
 * UNIT elements of unit u of a row (i = column). The matrix x vector kernels give each warp
 * one output row and stride the warp's lanes over the row's units (so a warp's loads are
 * contiguous); the dequantize kernel gives each thread one unit. The position of the token
 * being decoded is read from device memory (io[0]), never passed by value, so a CUDA graph
 * captured once replays for every token.
 */
#if EMBER_HIP
#if !defined(__HIPCC_RTC__)
#include <hip/hip_runtime.h>
#endif
#include <hip/hip_fp16.h>
#define SHFL_XOR(v, m) __shfl_xor((v), (m), WARP)
#define SYNCWARP() __builtin_amdgcn_wave_barrier()
#else
#include <cuda_fp16.h>
#define SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m), WARP)
#define SYNCWARP() __syncwarp()
#endif

#define NWARPS (BLOCK / WARP)
#define NEG_BIG (-1.0e30f)  /* "no key yet": exp(NEG_BIG - m) underflows to 0 without inf - inf */

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned int u32;
typedef long long i64;

/* ---- reductions ------------------------------------------------------------------------ */

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int m = WARP / 2; m > 0; m >>= 1) v += SHFL_XOR(v, m);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int m = WARP / 2; m > 0; m >>= 1) v = fmaxf(v, SHFL_XOR(v, m));
    return v;
}

/* sum over the whole block; every thread gets the result */
__device__ float block_sum(float v) {
    __shared__ float part[NWARPS];
    __shared__ float total;
    v = warp_sum(v);
    if (threadIdx.x % WARP == 0) part[threadIdx.x / WARP] = v;
    __syncthreads();
    if (threadIdx.x < WARP) {
        float s = threadIdx.x < NWARPS ? part[threadIdx.x] : 0.0f;
        s = warp_sum(s);
        if (threadIdx.x == 0) total = s;
    }
    __syncthreads();
    return total;
}

/* ---- unit decoders, one per weight type ------------------------------------------------- */

__device__ __forceinline__ void words16(const u8 *p, u32 w[4]) {
    const uint4 q = *(const uint4 *)p;
    w[0] = q.x; w[1] = q.y; w[2] = q.z; w[3] = q.w;
}

struct Q4_0 {
    enum { UNIT = 32 };
    template <class F>
    static __device__ __forceinline__ void unit(const u8 *w, const __half *d, i64 row, int u, int K, F f) {
        const i64 b = row * (K / 32) + u;
        u32 q[4];
        words16(w + b * 16, q);
        const float s = __half2float(d[b]);
#pragma unroll
        for (int j = 0; j < 16; j++) {   /* byte j: low nibble = element j, high = j + 16 */
            const int byte = (q[j >> 2] >> (8 * (j & 3))) & 0xff;
            f(u * 32 + j, s * (float)((byte & 15) - 8));
            f(u * 32 + j + 16, s * (float)((byte >> 4) - 8));
        }
    }
};

struct Q8_0 {
    enum { UNIT = 32 };
    template <class F>
    static __device__ __forceinline__ void unit(const u8 *w, const __half *d, i64 row, int u, int K, F f) {
        const i64 b = row * (K / 32) + u;
        u32 q[8];
        words16(w + b * 32, q);
        words16(w + b * 32 + 16, q + 4);
        const float s = __half2float(d[b]);
#pragma unroll
        for (int j = 0; j < 32; j++) f(u * 32 + j, s * (float)(i8)((q[j >> 2] >> (8 * (j & 3))) & 0xff));
    }
};

/* 6-bit scale and min of sub-block `is` of a Q4_K super-block (llama.cpp's get_scale_min_k4) */
__device__ __forceinline__ void scale_min_k4(int is, const u8 *sc, float *s, float *m) {
    if (is < 4) {
        *s = (float)(sc[is] & 63);
        *m = (float)(sc[is + 4] & 63);
    } else {
        *s = (float)((sc[is + 4] & 0xF) | ((sc[is - 4] >> 6) << 4));
        *m = (float)((sc[is + 4] >> 4) | ((sc[is] >> 6) << 4));
    }
}

/* Q4_K: 256 weights = d, dmin (half), 12 bytes of packed 6-bit scales/mins, 128 bytes of
 * nibbles; unit u (64 weights) is bytes qs[32j..32j+32) of super-block u/4, j = u%4: low
 * nibbles are sub-block 2j, high nibbles sub-block 2j+1. value = d*sc*q - dmin*m. */
struct Q4_K {
    enum { UNIT = 64 };
    template <class F>
    static __device__ __forceinline__ void unit(const u8 *w, const __half *d, i64 row, int u, int K, F f) {
        const u8 *b = w + (row * (K / 256) + u / 4) * 144;
        const int j = u & 3;
        const float dd = __half2float(((const __half *)b)[0]), dmin = __half2float(((const __half *)b)[1]);
        float s0, m0, s1, m1;
        scale_min_k4(2 * j, b + 4, &s0, &m0);
        scale_min_k4(2 * j + 1, b + 4, &s1, &m1);
        const float a0 = dd * s0, c0 = dmin * m0, a1 = dd * s1, c1 = dmin * m1;
        u32 q[8];
        words16(b + 16 + 32 * j, q);
        words16(b + 32 + 32 * j, q + 4);
        const int base = (u / 4) * 256 + 64 * j;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            const int byte = (q[l >> 2] >> (8 * (l & 3))) & 0xff;
            f(base + l, a0 * (float)(byte & 15) - c0);
            f(base + 32 + l, a1 * (float)(byte >> 4) - c1);
        }
    }
};

/* Q6_K (padded to 224 bytes): ql[128] qh[64] scales[16] (int8) d (half). Unit u covers half
 * h = u/2 of the super-block (128 weights) and l in [16g, 16g+16), g = u%2, for the four
 * quarter-rows l, l+32, l+64, l+96 (llama.cpp's dequantize_row_q6_K order). */
struct Q6_K {
    enum { UNIT = 64 };
    template <class F>
    static __device__ __forceinline__ void unit(const u8 *w, const __half *d, i64 row, int u, int K, F f) {
        const int sb = (u & 3), h = sb >> 1, g = sb & 1;
        const u8 *b = w + (row * (K / 256) + u / 4) * 224;
        u32 lo[4], hi[4], qh[4];
        words16(b + 64 * h + 16 * g, lo);
        words16(b + 64 * h + 32 + 16 * g, hi);
        words16(b + 128 + 32 * h + 16 * g, qh);
        const i8 *sc = (const i8 *)(b + 192 + 8 * h + g);
        const float dd = __half2float(*(const __half *)(b + 208));
        const float s0 = dd * sc[0], s1 = dd * sc[2], s2 = dd * sc[4], s3 = dd * sc[6];
        const int base = (u / 4) * 256 + 128 * h + 16 * g;
#pragma unroll
        for (int l = 0; l < 16; l++) {
            const int sh = 8 * (l & 3);
            const int a = (lo[l >> 2] >> sh) & 0xff, c = (hi[l >> 2] >> sh) & 0xff, e = (qh[l >> 2] >> sh) & 0xff;
            f(base + l, s0 * (float)(((a & 15) | ((e & 3) << 4)) - 32));
            f(base + 32 + l, s1 * (float)(((c & 15) | (((e >> 2) & 3) << 4)) - 32));
            f(base + 64 + l, s2 * (float)(((a >> 4) | (((e >> 4) & 3) << 4)) - 32));
            f(base + 96 + l, s3 * (float)(((c >> 4) | (((e >> 6) & 3) << 4)) - 32));
        }
    }
};

/* plain rows: one element per unit, so consecutive lanes read consecutive elements */
struct F16 {
    enum { UNIT = 1 };
    template <class F>
    static __device__ __forceinline__ void unit(const u8 *w, const __half *d, i64 row, int u, int K, F f) {
        f(u, __half2float(((const __half *)w)[row * K + u]));
    }
};

struct F32 {
    enum { UNIT = 1 };
    template <class F>
    static __device__ __forceinline__ void unit(const u8 *w, const __half *d, i64 row, int u, int K, F f) {
        f(u, ((const float *)w)[row * K + u]);
    }
};

/* ---- matrix x vector (decode, small batches) -------------------------------------------- */

template <class Q>
__device__ __forceinline__ float row_dot(const u8 *w, const __half *d, i64 row, int K, const float *x) {
    const int lane = threadIdx.x % WARP, nu = K / Q::UNIT;
    float acc = 0.0f;
#pragma unroll 2
    for (int u = lane; u < nu; u += WARP)
        Q::unit(w, d, row, u, K, [&](int i, float v) { acc += v * x[i]; });
    return warp_sum(acc);
}

/* y[t, r] (+)= W[r] . x[t] for the rows of up to three matrices of one type stacked
 * (q|k|v share their input); grid (ceil(rows / NWARPS), n_tokens), one warp per row. */
template <class Q>
__device__ void matvec_body(const u8 *w0, const __half *d0, int n0, const u8 *w1, const __half *d1, int n1,
                            const u8 *w2, const __half *d2, int n2, const float *x, float *y,
                            int K, int ldx, int ldy, int accumulate) {
    const int r = blockIdx.x * NWARPS + threadIdx.x / WARP;
    int row = r;
    const u8 *w;
    const __half *d;
    if (row < n0) { w = w0; d = d0; }
    else if ((row -= n0) < n1) { w = w1; d = d1; }
    else if ((row -= n1) < n2) { w = w2; d = d2; }
    else return;                                   /* warp-uniform: no block barrier follows */
    x += (i64)blockIdx.y * ldx;
    y += (i64)blockIdx.y * ldy;
    const float s = row_dot<Q>(w, d, row, K, x);
    if (threadIdx.x % WARP == 0) y[r] = accumulate ? y[r] + s : s;
}

/* y[t, r] = silu(Wg[r] . x[t]) * (Wu[r] . x[t]): the FFN's gate and up rows in one pass */
template <class Q>
__device__ void matvec_swiglu_body(const u8 *wg, const __half *dg, const u8 *wu, const __half *du, int n,
                                   const float *x, float *y, int K, int ldx, int ldy) {
    const int r = blockIdx.x * NWARPS + threadIdx.x / WARP;
    if (r >= n) return;
    x += (i64)blockIdx.y * ldx;
    y += (i64)blockIdx.y * ldy;
    const float g = row_dot<Q>(wg, dg, r, K, x);
    const float u = row_dot<Q>(wu, du, r, K, x);
    if (threadIdx.x % WARP == 0) y[r] = g / (1.0f + expf(-g)) * u;
}

/* ---- dequantize (prefill GEMM operands, embedding rows) ---------------------------------- */

/* out[i, :] = W[rows ? rows[i] : r0 + i, :] as half (out_h) or float (out_f); a thread per unit */
template <class Q>
__device__ void dequant_body(const u8 *w, const __half *d, const int *rows, int r0, int n_rows, int K,
                             __half *out_h, float *out_f) {
    const int nu = K / Q::UNIT;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)n_rows * nu) return;
    const int i = (int)(idx / nu), u = (int)(idx % nu);
    const i64 src = rows ? (i64)rows[i] : (i64)r0 + i;
    const i64 o = (i64)i * K;
    if (out_h) Q::unit(w, d, src, u, K, [&](int c, float v) { out_h[o + c] = __float2half(v); });
    else       Q::unit(w, d, src, u, K, [&](int c, float v) { out_f[o + c] = v; });
}

#define EMBER_TYPED(NAME, Q)                                                                     \
extern "C" __global__ void __launch_bounds__(BLOCK) matvec_##NAME(                               \
        const u8 *w0, const __half *d0, int n0, const u8 *w1, const __half *d1, int n1,          \
        const u8 *w2, const __half *d2, int n2, const float *x, float *y,                        \
        int K, int ldx, int ldy, int accumulate) {                                               \
    matvec_body<Q>(w0, d0, n0, w1, d1, n1, w2, d2, n2, x, y, K, ldx, ldy, accumulate);           \
}                                                                                                \
extern "C" __global__ void __launch_bounds__(BLOCK) matvec_swiglu_##NAME(                        \
        const u8 *wg, const __half *dg, const u8 *wu, const __half *du, int n,                   \
        const float *x, float *y, int K, int ldx, int ldy) {                                     \
    matvec_swiglu_body<Q>(wg, dg, wu, du, n, x, y, K, ldx, ldy);                                 \
}                                                                                                \
extern "C" __global__ void __launch_bounds__(BLOCK) dequant_##NAME(                              \
        const u8 *w, const __half *d, const int *rows, int r0, int n_rows, int K,                \
        __half *out_h, float *out_f) {                                                           \
    dequant_body<Q>(w, d, rows, r0, n_rows, K, out_h, out_f);                                    \
}

EMBER_TYPED(q4_0, Q4_0)
EMBER_TYPED(q8_0, Q8_0)
EMBER_TYPED(q4_k, Q4_K)
EMBER_TYPED(q6_k, Q6_K)
EMBER_TYPED(f16, F16)
EMBER_TYPED(f32, F32)

/* ---- row kernels --------------------------------------------------------------------------- */

/* y[t] = x[t] / rms(x[t]) * w; grid (n_tokens), rows ld apart */
extern "C" __global__ void __launch_bounds__(BLOCK) rmsnorm(const float *x, const float *w, float *y,
                                                            int n, int ld, float eps) {
    const float *xr = x + (i64)blockIdx.x * ld;
    float *yr = y + (i64)blockIdx.x * ld;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += BLOCK) ss += xr[i] * xr[i];
    const float inv = rsqrtf(block_sum(ss) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += BLOCK) yr[i] = xr[i] * inv * w[i];
}

/* out[t, i] = silu(gu[t, i]) * gu[t, F + i] (prefill: after the gate|up GEMM) */
extern "C" __global__ void swiglu(const float *gu, float *out, int F, int ld_in, int ld_out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= F) return;
    const float g = gu[(i64)blockIdx.y * ld_in + i], u = gu[(i64)blockIdx.y * ld_in + F + i];
    out[(i64)blockIdx.y * ld_out + i] = g / (1.0f + expf(-g)) * u;
}

/* y = half(x), n elements (the f16 GEMM's activation operand) */
extern "C" __global__ void to_half(const float *x, __half *y, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half(x[i]);
}

/* ---- q/k/v post-processing: biases, per-head q/k norm, rope, KV cache write --------------- */

/* grid (n_tokens); warp per head of q|k|v (n_head + 2 n_kv heads of hd). Token t sits at
 * position io[0] + t. cs: (n_ctx, rope_dim/2, 2) cos, sin. neox: pairs (i, i + rope_dim/2),
 * else interleaved (2i, 2i+1). q is rewritten in place; k and v go to the f16 cache. */
extern "C" __global__ void __launch_bounds__(BLOCK) rope_kv(
        float *qkv, int ld, const float *bias, const float *q_norm, const float *k_norm,
        const float *cs, const int *io, __half *k_cache, __half *v_cache,
        int n_head, int n_kv, int hd, int rope_dim, int neox, float eps) {
    __shared__ float buf[NWARPS][HD_MAX];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int pos = io[0] + blockIdx.x, kv_dim = n_kv * hd, half_rd = rope_dim / 2;
    float *row = qkv + (i64)blockIdx.x * ld;
    float *s = buf[warp];
    for (int hh = warp; hh < n_head + 2 * n_kv; hh += NWARPS) {
        float *v = row + (i64)hh * hd;
        for (int i = lane; i < hd; i += WARP) s[i] = v[i] + (bias ? bias[hh * hd + i] : 0.0f);
        if (hh >= n_head + n_kv) {       /* a v head: straight into the cache */
            for (int i = lane; i < hd; i += WARP)
                v_cache[(i64)pos * kv_dim + (hh - n_head - n_kv) * hd + i] = __float2half(s[i]);
            continue;
        }
        const float *nw = hh < n_head ? q_norm : k_norm;
        if (nw) {
            float ss = 0.0f;
            for (int i = lane; i < hd; i += WARP) ss += s[i] * s[i];
            const float inv = rsqrtf(warp_sum(ss) / (float)hd + eps);
            for (int i = lane; i < hd; i += WARP) s[i] = s[i] * inv * nw[i];
        }
        SYNCWARP();
        const float *c = cs + (i64)pos * rope_dim;
        for (int i = lane; i < half_rd; i += WARP) {
            const int ia = neox ? i : 2 * i, ib = neox ? i + half_rd : 2 * i + 1;
            const float a = s[ia], b = s[ib], co = c[2 * i], si = c[2 * i + 1];
            s[ia] = a * co - b * si;
            s[ib] = a * si + b * co;
        }
        SYNCWARP();
        if (hh < n_head) {
            for (int i = lane; i < hd; i += WARP) v[i] = s[i];
        } else {
            for (int i = lane; i < hd; i += WARP)
                k_cache[(i64)pos * kv_dim + (hh - n_head) * hd + i] = __float2half(s[i]);
        }
        SYNCWARP();
    }
}

/* ---- attention over the cache, split over the sequence (flash-decoding) -------------------- */

/* grid (n_head, n_tokens, n_split). Block (h, t, s) attends query head h of token t (position
 * p = io[0] + t, keys 0..p) over keys [s*chunk, min((s+1)*chunk, p+1)); its warps take keys
 * in turn with an online softmax each, then merge. Writes the unnormalized partial
 * (max, sum, acc[hd]) to part[t][h][s]; attn_reduce merges the splits. */
extern "C" __global__ void __launch_bounds__(BLOCK) attention(
        const float *qkv, int ld, const __half *k_cache, const __half *v_cache, const int *io,
        float *part, int n_head, int n_kv, int hd, int chunk, float scale) {
    __shared__ float q[HD_MAX];
    __shared__ float wm[NWARPS], wl[NWARPS];
    __shared__ float wacc[NWARPS][HD_MAX];
    const int h = blockIdx.x, t = blockIdx.y, sp = blockIdx.z, n_split = gridDim.z;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int kv_dim = n_kv * hd, kvh = h / (n_head / n_kv);
    const int n_keys = io[0] + t + 1, k0 = sp * chunk;
    const int k1 = min(k0 + chunk, n_keys);
    for (int i = threadIdx.x; i < hd; i += BLOCK) q[i] = qkv[(i64)t * ld + h * hd + i] * scale;
    __syncthreads();
    float m = NEG_BIG, l = 0.0f, acc[HD_MAX / WARP];
#pragma unroll
    for (int j = 0; j < HD_MAX / WARP; j++) acc[j] = 0.0f;
    for (int key = k0 + warp; key < k1; key += NWARPS) {
        const __half *kr = k_cache + (i64)key * kv_dim + kvh * hd;
        float sc = 0.0f;
        for (int i = lane; i < hd; i += WARP) sc += q[i] * __half2float(kr[i]);
        sc = warp_sum(sc);
        const float mn = fmaxf(m, sc), corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
        const __half *vr = v_cache + (i64)key * kv_dim + kvh * hd;
#pragma unroll
        for (int j = 0; j < HD_MAX / WARP; j++) {
            const int i = lane + j * WARP;
            if (i < hd) acc[j] = acc[j] * corr + p * __half2float(vr[i]);
        }
        m = mn;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int j = 0; j < HD_MAX / WARP; j++)
        if (lane + j * WARP < hd) wacc[warp][lane + j * WARP] = acc[j];
    __syncthreads();
    float M = NEG_BIG;
    for (int w = 0; w < NWARPS; w++) M = fmaxf(M, wm[w]);
    float *out = part + (((i64)t * n_head + h) * n_split + sp) * (hd + 2);
    for (int i = threadIdx.x; i < hd; i += BLOCK) {
        float a = 0.0f;
        for (int w = 0; w < NWARPS; w++) a += wacc[w][i] * expf(wm[w] - M);
        out[2 + i] = a;
    }
    if (threadIdx.x == 0) {
        float L = 0.0f;
        for (int w = 0; w < NWARPS; w++) L += wl[w] * expf(wm[w] - M);
        out[0] = M;
        out[1] = L;
    }
}

/* out[t, h*hd + i] = sum_s acc_s[i] e^(m_s - M) / sum_s l_s e^(m_s - M); grid (n_head, n_tokens) */
extern "C" __global__ void attn_reduce(const float *part, float *out, int n_head, int hd, int n_split, int ld_out) {
    const int h = blockIdx.x, t = blockIdx.y;
    const float *p = part + ((i64)t * n_head + h) * n_split * (hd + 2);
    float M = NEG_BIG;
    for (int s = 0; s < n_split; s++) M = fmaxf(M, p[s * (hd + 2)]);
    float L = 0.0f;
    for (int s = 0; s < n_split; s++) L += p[s * (hd + 2) + 1] * expf(p[s * (hd + 2)] - M);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < n_split; s++) a += p[s * (hd + 2) + 2 + i] * expf(p[s * (hd + 2)] - M);
        out[(i64)t * ld_out + h * hd + i] = a / L;
    }
}
