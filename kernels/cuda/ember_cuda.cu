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
 * Each weight type is a "unit" decoder: load(w, d, row, u, K, v) puts the UNIT weights of unit
 * u of a row in registers (see the unit decoders' section for their columns). The matrix x vector kernels give each warp
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
#define SHFL(v, src) __shfl((v), (src), WARP)
#define SYNCWARP() __builtin_amdgcn_wave_barrier()
#else
#include <cuda_fp16.h>
#define SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m), WARP)
#define SHFL(v, src) __shfl_sync(0xffffffffu, (v), (src), WARP)
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

/* Q::load(w, d, row, u, K, v) fills v[0..UNIT) with the weights of unit u of a row. They lie
 * in UNIT/RUN runs of RUN consecutive columns; run r starts at column Q::col(u, r). Runs of
 * 4 or more let the dot product read x as float4 and the dequantizer store 16 bytes at a time
 * (scalar accesses strided by a unit across the lanes of a warp were 32-way divergent). */

__device__ __forceinline__ void words16(const u8 *p, u32 w[4]) {
    const uint4 q = *(const uint4 *)p;
    w[0] = q.x; w[1] = q.y; w[2] = q.z; w[3] = q.w;
}

struct Q4_0 {
    enum { UNIT = 32, RUN = 32 };
    static __device__ __forceinline__ int col(int u, int r) { return u * 32; }
    static __device__ __forceinline__ void load(const u8 *w, const __half *d, i64 row, int u, int K, float *v) {
        const i64 b = row * (K / 32) + u;
        u32 q[4];
        words16(w + b * 16, q);
        const float s = __half2float(d[b]);
#pragma unroll
        for (int j = 0; j < 16; j++) {   /* byte j: low nibble = element j, high = j + 16 */
            const int byte = (q[j >> 2] >> (8 * (j & 3))) & 0xff;
            v[j] = s * (float)((byte & 15) - 8);
            v[j + 16] = s * (float)((byte >> 4) - 8);
        }
    }
};

struct Q8_0 {
    enum { UNIT = 32, RUN = 32 };
    static __device__ __forceinline__ int col(int u, int r) { return u * 32; }
    static __device__ __forceinline__ void load(const u8 *w, const __half *d, i64 row, int u, int K, float *v) {
        const i64 b = row * (K / 32) + u;
        u32 q[8];
        words16(w + b * 32, q);
        words16(w + b * 32 + 16, q + 4);
        const float s = __half2float(d[b]);
#pragma unroll
        for (int j = 0; j < 32; j++) v[j] = s * (float)(i8)((q[j >> 2] >> (8 * (j & 3))) & 0xff);
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
    enum { UNIT = 64, RUN = 64 };
    static __device__ __forceinline__ int col(int u, int r) { return (u >> 2) * 256 + 64 * (u & 3); }
    static __device__ __forceinline__ void load(const u8 *w, const __half *d, i64 row, int u, int K, float *v) {
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
#pragma unroll
        for (int l = 0; l < 32; l++) {
            const int byte = (q[l >> 2] >> (8 * (l & 3))) & 0xff;
            v[l] = a0 * (float)(byte & 15) - c0;
            v[32 + l] = a1 * (float)(byte >> 4) - c1;
        }
    }
};

/* Q6_K (padded to 224 bytes): ql[128] qh[64] scales[16] (int8) d (half). Unit u covers half
 * h of super-block u/4 (128 weights; h = (u%4)/2) and l in [16g, 16g+16), g = u%2, for the
 * four quarter-rows l, l+32, l+64, l+96 (llama.cpp's dequantize_row_q6_K order). */
struct Q6_K {
    enum { UNIT = 64, RUN = 16 };
    static __device__ __forceinline__ int col(int u, int r) {
        return (u >> 2) * 256 + 128 * ((u & 3) >> 1) + 16 * (u & 1) + 32 * r;
    }
    static __device__ __forceinline__ void load(const u8 *w, const __half *d, i64 row, int u, int K, float *v) {
        const int h = (u & 3) >> 1, g = u & 1;
        const u8 *b = w + (row * (K / 256) + u / 4) * 224;
        u32 lo[4], hi[4], qh[4];
        words16(b + 64 * h + 16 * g, lo);
        words16(b + 64 * h + 32 + 16 * g, hi);
        words16(b + 128 + 32 * h + 16 * g, qh);
        const i8 *sc = (const i8 *)(b + 192 + 8 * h + g);
        const float dd = __half2float(*(const __half *)(b + 208));
        const float s0 = dd * sc[0], s1 = dd * sc[2], s2 = dd * sc[4], s3 = dd * sc[6];
#pragma unroll
        for (int l = 0; l < 16; l++) {
            const int sh = 8 * (l & 3);
            const int a = (lo[l >> 2] >> sh) & 0xff, c = (hi[l >> 2] >> sh) & 0xff, e = (qh[l >> 2] >> sh) & 0xff;
            v[l] = s0 * (float)(((a & 15) | ((e & 3) << 4)) - 32);
            v[16 + l] = s1 * (float)(((c & 15) | (((e >> 2) & 3) << 4)) - 32);
            v[32 + l] = s2 * (float)(((a >> 4) | (((e >> 4) & 3) << 4)) - 32);
            v[48 + l] = s3 * (float)(((c >> 4) | (((e >> 6) & 3) << 4)) - 32);
        }
    }
};

/* plain rows: one element per unit, so consecutive lanes read consecutive elements (any K) */
struct F16 {
    enum { UNIT = 1, RUN = 1 };
    static __device__ __forceinline__ int col(int u, int r) { return u; }
    static __device__ __forceinline__ void load(const u8 *w, const __half *d, i64 row, int u, int K, float *v) {
        v[0] = __half2float(((const __half *)w)[row * K + u]);
    }
};

struct F32 {
    enum { UNIT = 1, RUN = 1 };
    static __device__ __forceinline__ int col(int u, int r) { return u; }
    static __device__ __forceinline__ void load(const u8 *w, const __half *d, i64 row, int u, int K, float *v) {
        v[0] = ((const float *)w)[row * K + u];
    }
};

/* Where column c of x sits in a block's shared copy: 4 floats of padding after every 32, so
 * the lanes of a warp, each reading a float4 of its own unit (units 32 or 64 columns apart),
 * hit distinct banks. (Straight from global memory those reads touched 32 cache lines per
 * instruction and capped a matvec at ~250 GB/s.) */
__device__ __forceinline__ int xpad(int c) { return c + (c >> 5) * 4; }

/* v . x[columns of unit u]; x is the padded shared copy for RUN >= 4, else global */
template <class Q>
__device__ __forceinline__ float unit_dot(const float *v, const float *x, int u) {
    float acc = 0.0f;
    if (Q::RUN >= 4) {
#pragma unroll
        for (int r = 0; r < Q::UNIT / Q::RUN; r++) {
#pragma unroll
            for (int e = 0; e < Q::RUN / 4; e++) {
                const float4 xv = *(const float4 *)(x + xpad(Q::col(u, r) + 4 * e));
                const float *vv = v + r * Q::RUN + 4 * e;
                acc += vv[0] * xv.x + vv[1] * xv.y + vv[2] * xv.z + vv[3] * xv.w;
            }
        }
    } else {
#pragma unroll
        for (int e = 0; e < Q::UNIT; e++) acc += v[e] * x[Q::col(u, 0) + e];
    }
    return acc;
}

/* Stage row x (K floats) into shared memory, padded, optionally RMS-normalized with weight
 * nw (the norm before a projection, fused here so it costs no launch of its own). Returns
 * the pointer the dot products read: the shared copy, or x itself for RUN = 1 types. */
template <class Q>
__device__ const float *stage_x(const float *x, const float *nw, float eps, int K, float *xs,
                                const float *part, int n_split, int hd) {
    if (part) {   /* x = the attention output, merged here from decode's split partials */
        for (int i = threadIdx.x; i < K; i += BLOCK) {
            const float *p = part + (i64)(i / hd) * n_split * (hd + 2);
            float M = NEG_BIG, L = 0.0f, a = 0.0f;
            for (int s = 0; s < n_split; s++) M = fmaxf(M, p[s * (hd + 2)]);
            for (int s = 0; s < n_split; s++) {
                const float e = expf(p[s * (hd + 2)] - M);
                L += p[s * (hd + 2) + 1] * e;
                a += p[s * (hd + 2) + 2 + i % hd] * e;
            }
            xs[Q::RUN >= 4 ? xpad(i) : i] = a / L;
        }
        __syncthreads();
        return xs;
    }
    float inv = 1.0f;
    if (nw) {
        float ss = 0.0f;
        for (int i = threadIdx.x; i < K; i += BLOCK) ss += x[i] * x[i];
        inv = rsqrtf(block_sum(ss) / (float)K + eps);
    }
    if (Q::RUN < 4 && !nw) return x;
    if (Q::RUN < 4) {
        for (int i = threadIdx.x; i < K; i += BLOCK) xs[i] = x[i] * inv * nw[i];
    } else {
        for (int i = 4 * threadIdx.x; i < K; i += 4 * BLOCK) {
            float4 v = *(const float4 *)(x + i);
            if (nw) {
                const float4 w = *(const float4 *)(nw + i);
                v.x *= inv * w.x; v.y *= inv * w.y; v.z *= inv * w.z; v.w *= inv * w.w;
            }
            *(float4 *)(xs + xpad(i)) = v;
        }
    }
    __syncthreads();
    return xs;
}

/* ---- matrix x vector (decode, small batches) -------------------------------------------- */

template <class Q>
__device__ __forceinline__ float row_dot(const u8 *w, const __half *d, i64 row, int K, const float *x) {
    const int lane = threadIdx.x % WARP, nu = K / Q::UNIT;
    float acc = 0.0f;
#pragma unroll 2
    for (int u = lane; u < nu; u += WARP) {
        float v[Q::UNIT];
        Q::load(w, d, row, u, K, v);
        acc += unit_dot<Q>(v, x, u);
    }
    return warp_sum(acc);
}

/* y[t, r] (+)= W[r] . norm(x[t]) for the rows of up to three matrices of one type stacked
 * (q|k|v share their input); grid (ceil(rows / (NWARPS * rpw)), n_tokens): a block stages its
 * token's x once, then its warps take rows in turn (rpw rows per warp). */
template <class Q>
__device__ void matvec_body(const u8 *w0, const __half *d0, int n0, const u8 *w1, const __half *d1, int n1,
                            const u8 *w2, const __half *d2, int n2, const float *x, float *y,
                            int K, int ldx, int ldy, int accumulate, const float *nw, float eps, int rpw,
                            const float *part, int n_split, int hd) {
    extern __shared__ float xs[];
    x += (i64)blockIdx.y * ldx;
    y += (i64)blockIdx.y * ldy;
    const float *xv = stage_x<Q>(x, nw, eps, K, xs, part, n_split, hd);
    const int r0 = blockIdx.x * NWARPS * rpw, r1 = min(r0 + NWARPS * rpw, n0 + n1 + n2);
    for (int r = r0 + threadIdx.x / WARP; r < r1; r += NWARPS) {
        int row = r;
        const u8 *w;
        const __half *d;
        if (row < n0) { w = w0; d = d0; }
        else if ((row -= n0) < n1) { w = w1; d = d1; }
        else { row -= n1; w = w2; d = d2; }
        const float s = row_dot<Q>(w, d, row, K, xv);
        if (threadIdx.x % WARP == 0) y[r] = accumulate ? y[r] + s : s;
    }
}

/* y[t, r] = silu(Wg[r] . norm(x[t])) * (Wu[r] . norm(x[t])): gate, up and SwiGLU in one pass */
template <class Q>
__device__ void matvec_swiglu_body(const u8 *wg, const __half *dg, const u8 *wu, const __half *du, int n,
                                   const float *x, float *y, int K, int ldx, int ldy,
                                   const float *nw, float eps, int rpw) {
    extern __shared__ float xs[];
    x += (i64)blockIdx.y * ldx;
    y += (i64)blockIdx.y * ldy;
    const float *xv = stage_x<Q>(x, nw, eps, K, xs, nullptr, 0, 1);
    const int r0 = blockIdx.x * NWARPS * rpw, r1 = min(r0 + NWARPS * rpw, n);
    for (int r = r0 + threadIdx.x / WARP; r < r1; r += NWARPS) {
        const float g = row_dot<Q>(wg, dg, r, K, xv);
        const float u = row_dot<Q>(wu, du, r, K, xv);
        if (threadIdx.x % WARP == 0) y[r] = g / (1.0f + expf(-g)) * u;
    }
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
    float v[Q::UNIT];
    Q::load(w, d, src, u, K, v);
    const i64 o = (i64)i * K;
#pragma unroll
    for (int r = 0; r < Q::UNIT / Q::RUN; r++) {
        const i64 c = o + Q::col(u, r);
        const float *vv = v + r * Q::RUN;
        if (Q::RUN >= 8 && out_h) {          /* 8 halves = one 16-byte store */
#pragma unroll
            for (int e = 0; e < Q::RUN / 8; e++) {
                uint4 pk;
                u32 *p32 = (u32 *)&pk;
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const __half2 h2 = __floats2half2_rn(vv[8 * e + 2 * k], vv[8 * e + 2 * k + 1]);
                    p32[k] = *(const u32 *)&h2;
                }
                *(uint4 *)(out_h + c + 8 * e) = pk;
            }
        } else if (Q::RUN >= 4 && out_f) {
#pragma unroll
            for (int e = 0; e < Q::RUN / 4; e++)
                *(float4 *)(out_f + c + 4 * e) = make_float4(vv[4 * e], vv[4 * e + 1], vv[4 * e + 2], vv[4 * e + 3]);
        } else {
#pragma unroll
            for (int e = 0; e < Q::RUN; e++) {
                if (out_h) out_h[c + e] = __float2half(vv[e]);
                else out_f[c + e] = vv[e];
            }
        }
    }
}

#define EMBER_TYPED(NAME, Q)                                                                     \
extern "C" __global__ void __launch_bounds__(BLOCK) matvec_##NAME(                               \
        const u8 *w0, const __half *d0, int n0, const u8 *w1, const __half *d1, int n1,          \
        const u8 *w2, const __half *d2, int n2, const float *x, float *y,                        \
        int K, int ldx, int ldy, int accumulate, const float *nw, float eps, int rpw,             \
        const float *part, int n_split, int hd) {                                                \
    matvec_body<Q>(w0, d0, n0, w1, d1, n1, w2, d2, n2, x, y, K, ldx, ldy, accumulate, nw, eps, rpw, \
                   part, n_split, hd);                                                           \
}                                                                                                \
extern "C" __global__ void __launch_bounds__(BLOCK) matvec_swiglu_##NAME(                        \
        const u8 *wg, const __half *dg, const u8 *wu, const __half *du, int n,                   \
        const float *x, float *y, int K, int ldx, int ldy, const float *nw, float eps, int rpw) { \
    matvec_swiglu_body<Q>(wg, dg, wu, du, n, x, y, K, ldx, ldy, nw, eps, rpw);                   \
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

/* grid (ceil((n_head + 2 n_kv) / NWARPS), n_tokens): a warp per head of q|k|v. Token t sits at
 * position io[0] + t. cs: (n_ctx, rope_dim/2, 2) cos, sin. neox: pairs (i, i + rope_dim/2),
 * else interleaved (2i, 2i+1). q is rewritten in place; k and v go to the f16 cache. */
extern "C" __global__ void __launch_bounds__(BLOCK) rope_kv(
        float *qkv, int ld, const float *bias, const float *q_norm, const float *k_norm,
        const float *cs, const int *io, __half *k_cache, __half *v_cache,
        int n_head, int n_kv, int hd, int rope_dim, int neox, float eps) {
    __shared__ float buf[NWARPS][HD_MAX];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int pos = io[0] + blockIdx.y, kv_dim = n_kv * hd, half_rd = rope_dim / 2;
    float *row = qkv + (i64)blockIdx.y * ld;
    float *s = buf[warp];
    for (int hh = blockIdx.x * NWARPS + warp; hh < min((int)(blockIdx.x + 1) * NWARPS, n_head + 2 * n_kv); hh += NWARPS) {
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

/* q . K[key] for one lane's key; q is a float copy in shared memory (16-byte aligned) */
__device__ __forceinline__ float key_dot(const float *q, const __half *kr, int hd) {
    float a = 0.0f;
    if ((hd & 7) == 0) {
        for (int i = 0; i < hd; i += 8) {
            const uint4 raw = *(const uint4 *)(kr + i);
            const __half2 *hp = (const __half2 *)&raw;
            const float4 qa = *(const float4 *)(q + i), qb = *(const float4 *)(q + i + 4);
            const float2 f0 = __half22float2(hp[0]), f1 = __half22float2(hp[1]);
            const float2 f2 = __half22float2(hp[2]), f3 = __half22float2(hp[3]);
            a += qa.x * f0.x + qa.y * f0.y + qa.z * f1.x + qa.w * f1.y
               + qb.x * f2.x + qb.y * f2.y + qb.z * f3.x + qb.w * f3.y;
        }
    } else {
        for (int i = 0; i < hd; i++) a += q[i] * __half2float(kr[i]);
    }
    return a;
}

#define NJ2 (HD_MAX / (2 * WARP))   /* half2 output slots per lane for the widest head */

/* One tile of WARP keys [k0, k0 + WARP) ∩ [.., last] into a warp's online softmax: a lane per
 * key takes a whole q.k dot, one warp max and one warp sum update (m, l), then the tile's
 * probabilities are broadcast lane by lane into acc. Lane owns output dims 2*(lane + j*WARP)
 * and the next one, j < nj = ceil(hd / (2*WARP)) (a warp-uniform bound, so narrow heads skip
 * the unused slots instead of predicating them). */
__device__ __forceinline__ void attend_tile(const float *q, const __half *kc, const __half *vc, int kv_stride,
                                            int hd, int k0, int last, float &m, float &l, float2 *acc) {
    const int lane = threadIdx.x % WARP, key = k0 + lane, nj = (hd + 2 * WARP - 1) / (2 * WARP);
    const float s = key <= last ? key_dot(q, kc + (i64)key * kv_stride, hd) : NEG_BIG;
    const float mn = fmaxf(m, warp_max(s));
    const float corr = expf(m - mn);
    const float p = key <= last ? expf(s - mn) : 0.0f;
    l = l * corr + warp_sum(p);
#pragma unroll
    for (int j = 0; j < NJ2; j++) { acc[j].x *= corr; acc[j].y *= corr; }
    /* fully unrolled so the V loads of the whole tile are in flight together; keys past
     * `last` have p = 0 and read row `last` instead (written, finite) */
#pragma unroll
    for (int kk = 0; kk < WARP; kk++) {
        const float pk = SHFL(p, kk);
        const __half *vr = vc + (i64)min(k0 + kk, last) * kv_stride;
#pragma unroll
        for (int j = 0; j < NJ2; j++) {
            if (j >= nj) break;
            const int i = 2 * (lane + j * WARP);
            if (i < hd) {
                const float2 v = __half22float2(*(const __half2 *)(vr + i));
                acc[j].x += pk * v.x;
                acc[j].y += pk * v.y;
            }
        }
    }
    m = mn;
}

/* Decode: grid (n_head, 1, n_split). Block (h, 0, s) attends query head h (position p = io[0],
 * keys 0..p) over keys [s*chunk, min((s+1)*chunk, p+1)), its warps a tile of WARP keys at a
 * time, then merges its warps and writes the unnormalized partial (max, sum, acc[hd]) to
 * part[h][s]; the o projection's matvec merges the splits while staging its input. */
extern "C" __global__ void __launch_bounds__(BLOCK) attention(
        const float *qkv, int ld, const __half *k_cache, const __half *v_cache, const int *io,
        float *part, int n_head, int n_kv, int hd, int chunk, float scale) {
    __shared__ __align__(16) float q[HD_MAX];
    __shared__ float wm[NWARPS], wl[NWARPS];
    __shared__ float wacc[NWARPS][HD_MAX];
    const int h = blockIdx.x, sp = blockIdx.z, n_split = gridDim.z;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int kv_dim = n_kv * hd, kvh = h / (n_head / n_kv);
    const int last = min((sp + 1) * chunk, io[0] + 1) - 1;
    for (int i = threadIdx.x; i < hd; i += BLOCK) q[i] = qkv[h * hd + i] * scale;
    __syncthreads();
    float m = NEG_BIG, l = 0.0f;
    float2 acc[NJ2];
#pragma unroll
    for (int j = 0; j < NJ2; j++) acc[j] = make_float2(0.0f, 0.0f);
    for (int k0 = sp * chunk + warp * WARP; k0 <= last; k0 += BLOCK)
        attend_tile(q, k_cache + kvh * hd, v_cache + kvh * hd, kv_dim, hd, k0, last, m, l, acc);
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int j = 0; j < NJ2; j++) {
        const int i = 2 * (lane + j * WARP);
        if (i < hd) { wacc[warp][i] = acc[j].x; wacc[warp][i + 1] = acc[j].y; }
    }
    __syncthreads();
    float M = NEG_BIG;
    for (int w = 0; w < NWARPS; w++) M = fmaxf(M, wm[w]);
    float *out = part + ((i64)h * n_split + sp) * (hd + 2);
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

/* Prefill attention: grid (n_head, ceil(n_tokens / NWARPS)), a warp per query row t (position
 * p = io[0] + t, keys 0..p), a tile of WARP keys at a time. Queries of a block are
 * consecutive, so their K/V rows are shared through L1. */
extern "C" __global__ void __launch_bounds__(BLOCK) attention_rows(
        const float *qkv, int ld, const __half *k_cache, const __half *v_cache, const int *io,
        float *out, int ld_out, int n_tok, int n_head, int n_kv, int hd, float scale) {
    __shared__ __align__(16) float qs[NWARPS][HD_MAX];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int h = blockIdx.x, t = blockIdx.y * NWARPS + warp;
    if (t >= n_tok) return;                        /* warp-uniform; no block barrier below */
    const int kv_dim = n_kv * hd, kvh = h / (n_head / n_kv), pos = io[0] + t;
    float *q = qs[warp];
    for (int i = lane; i < hd; i += WARP) q[i] = qkv[(i64)t * ld + h * hd + i] * scale;
    SYNCWARP();
    float m = NEG_BIG, l = 0.0f;
    float2 acc[NJ2];
#pragma unroll
    for (int j = 0; j < NJ2; j++) acc[j] = make_float2(0.0f, 0.0f);
    for (int k0 = 0; k0 <= pos; k0 += WARP)
        attend_tile(q, k_cache + kvh * hd, v_cache + kvh * hd, kv_dim, hd, k0, pos, m, l, acc);
    float *o = out + (i64)t * ld_out + h * hd;
#pragma unroll
    for (int j = 0; j < NJ2; j++) {
        const int i = 2 * (lane + j * WARP);
        if (i < hd) { o[i] = acc[j].x / l; o[i + 1] = acc[j].y / l; }
    }
}
