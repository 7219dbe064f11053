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

/* Programmatic dependent launch (Hopper and later, CUDA): a decode kernel launched with the
 * programmatic-serialization attribute may start while the kernel before it still runs.
 * GRID_DEP_TRIGGER lets the next kernel launch; GRID_DEP_WAIT blocks until the previous kernel
 * has finished and its writes are visible, so everything before it may only read what no
 * earlier kernel of the pass writes (weights). Both are no-ops for an ordinary launch. */
#if !EMBER_HIP && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GRID_DEP_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define GRID_DEP_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define GRID_DEP_TRIGGER()
#define GRID_DEP_WAIT()
#endif

#define NWARPS (BLOCK / WARP)
#ifdef EMBER_HOST_TEST
#define EMBER_HD __host__ __device__ __forceinline__
#else
#define EMBER_HD __device__ __forceinline__
#endif
#define PF_ROWS 2    /* rows a warp of a _pf matvec fetches ahead (the first PF units a lane of each) */
#define PF_BLOCKS 2  /* _pf matvecs: blocks an SM must hold (caps registers at 80, so a grid of ~2.5
                      * blocks per SM runs in one wave) */
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

/* A row of each weight type is a sequence of units of UNIT weights. Q::fetch(w, d, row, u, K, r)
 * issues the global loads of unit u into a Raw (registers only); once they have arrived,
 * Q::scales(r, u) works out the unit's scale factors once and Q::quad(r, sc, u, k, v) decodes
 * the k-th group of 4 weights of the unit; those 4 weights are consecutive columns starting at
 * Q::col4(u, k) (a group never straddles a run of RUN consecutive columns). Fetch and decode
 * are apart so a matvec can put a row's loads in flight before it stages x, and decoding 4 at
 * a time keeps a unit's 32-64 floats out of registers. Runs of 4 or more let the dot product
 * read x as float4 and the dequantizer store 16 bytes at a time (scalar accesses strided by a
 * unit across the lanes of a warp were 32-way divergent). PF: units a lane fetches ahead in
 * the _pf matvecs (sized so they fit the register cap). EMBER_HD: host-callable too when the
 * host test harness (tests/plugins/test_cuda.py) compiles the decoders for the CPU. */

/* byte e (0..3) of a word, as an int */
EMBER_HD int byte_of(u32 w, int e) { return (int)((w >> (8 * e)) & 0xff); }

/* a uint4's word i for a compile-time i (after unrolling) */
EMBER_HD u32 word_of(const uint4 &q, int i) {
    return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
}

/* Activations as int8 for the dp4a matvecs (option dp4a): each run of 32 columns of x as
 * llama.cpp's q8_1 block, q[i] = round(x[i] / d) with d = max|x| / 127, kept with d and
 * d * sum(q) (the k-quants' mins and Q4_0's offset of 8 need the block's sum). 48 bytes, not
 * 40: 16-byte aligned, so the 8 lanes of a quarter-warp reading their units' 16 bytes from
 * shared memory hit distinct banks. */
struct __align__(16) XQ {
    int q[8];       /* 32 int8, four a word */
    float d, s;     /* scale, scale * sum of q */
    float pad[2];
};

/* a block's 32 int8 as two 16-byte loads (words 0-3, 4-7) */
struct XQ16 { uint4 lo, hi; };
EMBER_HD XQ16 xq_words(const XQ &b) { return {*(const uint4 *)b.q, *(const uint4 *)(b.q + 4)}; }

/* sum of the 4 byte products a[i] * b[i] (signed) plus c: one instruction on sm_61+ */
EMBER_HD int dp4a(int a, int b, int c) {
#if !EMBER_HIP && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
    return __dp4a(a, b, c);
#else
#pragma unroll
    for (int e = 0; e < 4; e++) c += (int)(i8)(a >> (8 * e)) * (int)(i8)(b >> (8 * e));
    return c;
#endif
}

/* 32 weights as bytes (lo: columns 0-15, hi: 16-31) . x's block: the integer sum */
EMBER_HD int dot32(const uint4 &lo, const uint4 &hi, const XQ16 &x) {
    int s = 0;
#pragma unroll
    for (int k = 0; k < 4; k++)
        s = dp4a((int)word_of(hi, k), (int)word_of(x.hi, k), dp4a((int)word_of(lo, k), (int)word_of(x.lo, k), s));
    return s;
}

/* 32 packed nibbles as bytes: the low ones, or the high ones */
EMBER_HD uint4 nibbles(const uint4 &q, int shift) {
    return make_uint4((q.x >> shift) & 0x0F0F0F0Fu, (q.y >> shift) & 0x0F0F0F0Fu, (q.z >> shift) & 0x0F0F0F0Fu,
                      (q.w >> shift) & 0x0F0F0F0Fu);
}

struct Q4_0 {
    enum { UNIT = 32, RUN = 32, PF = 1, I8 = 1 };
    struct Raw { uint4 q; __half s; };
    struct Scales { float s; };
    static EMBER_HD int col(int u, int r) { return u * 32; }
    static EMBER_HD int col4(int u, int k) { return u * 32 + 4 * k; }
    static EMBER_HD void fetch(const u8 *w, const __half *d, i64 row, int u, int K, Raw &r) {
        const i64 b = row * (K / 32) + u;
        r.q = *(const uint4 *)(w + b * 16);
        r.s = d[b];
    }
    static EMBER_HD Scales scales(const Raw &r, int u) { return {__half2float(r.s)}; }
    /* byte j: low nibble = element j, high = j + 16; groups 0-3 low nibbles, 4-7 high */
    static EMBER_HD void quad(const Raw &r, const Scales &sc, int u, int k, float *v) {
        const u32 wd = word_of(r.q, k & 3);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int b = byte_of(wd, e);
            v[e] = sc.s * (float)((k < 4 ? b & 15 : b >> 4) - 8);
        }
    }
    /* W[unit u] . x from the int8 copy: the low nibbles are columns 0-15, the high 16-31 */
    static EMBER_HD float dot8(const Raw &r, int u, const XQ *xq) {
        const XQ &b = xq[u];
        const int s = dot32(nibbles(r.q, 0), nibbles(r.q, 4), xq_words(b));
        return __half2float(r.s) * (b.d * (float)s - 8.0f * b.s);
    }
};

struct Q8_0 {
    enum { UNIT = 32, RUN = 32, PF = 1, I8 = 1 };
    struct Raw { uint4 a, b; __half s; };
    struct Scales { float s; };
    static EMBER_HD int col(int u, int r) { return u * 32; }
    static EMBER_HD int col4(int u, int k) { return u * 32 + 4 * k; }
    static EMBER_HD void fetch(const u8 *w, const __half *d, i64 row, int u, int K, Raw &r) {
        const i64 b = row * (K / 32) + u;
        r.a = *(const uint4 *)(w + b * 32);
        r.b = *(const uint4 *)(w + b * 32 + 16);
        r.s = d[b];
    }
    static EMBER_HD Scales scales(const Raw &r, int u) { return {__half2float(r.s)}; }
    static EMBER_HD void quad(const Raw &r, const Scales &sc, int u, int k, float *v) {
        const u32 wd = k < 4 ? word_of(r.a, k) : word_of(r.b, k - 4);
#pragma unroll
        for (int e = 0; e < 4; e++) v[e] = sc.s * (float)(i8)byte_of(wd, e);
    }
    static EMBER_HD float dot8(const Raw &r, int u, const XQ *xq) {
        const XQ &b = xq[u];
        return __half2float(r.s) * b.d * (float)dot32(r.a, r.b, xq_words(b));
    }
};

/* byte i (0..11) of a Q4_K super-block's packed scales, held as three words; selects, not
 * an indexed array, so a run-time i keeps them in registers */
EMBER_HD int sc_byte(const u32 *sc, int i) {
    const u32 word = (i >> 2) == 0 ? sc[0] : (i >> 2) == 1 ? sc[1] : sc[2];
    return byte_of(word, i & 3);
}

/* 6-bit scale and min of sub-block `is` of a Q4_K super-block (llama.cpp's get_scale_min_k4) */
EMBER_HD void scale_min_k4(int is, const u32 *sc, float *s, float *m) {
    if (is < 4) {
        *s = (float)(sc_byte(sc, is) & 63);
        *m = (float)(sc_byte(sc, is + 4) & 63);
    } else {
        *s = (float)((sc_byte(sc, is + 4) & 0xF) | ((sc_byte(sc, is - 4) >> 6) << 4));
        *m = (float)((sc_byte(sc, is + 4) >> 4) | ((sc_byte(sc, is) >> 6) << 4));
    }
}

/* Q4_K: 256 weights = d, dmin (half), 12 bytes of packed 6-bit scales/mins, 128 bytes of
 * nibbles; unit u (64 weights) is bytes qs[32j..32j+32) of super-block u/4, j = u%4: low
 * nibbles are sub-block 2j (groups 0-7), high nibbles sub-block 2j+1 (groups 8-15).
 * value = d*sc*q - dmin*m. The two sub-blocks' factors are worked out once a unit (per group,
 * the run-time scale selects doubled the kernel's instructions). */
struct Q4_K {
    enum { UNIT = 64, RUN = 64, PF = 1, I8 = 1 };
    struct Raw { uint4 q0, q1; u32 sc[3]; u32 dm; };
    struct Scales { float a0, c0, a1, c1; };
    static EMBER_HD int col(int u, int r) { return (u >> 2) * 256 + 64 * (u & 3); }
    static EMBER_HD int col4(int u, int k) { return col(u, 0) + 4 * k; }
    static EMBER_HD void fetch(const u8 *w, const __half *d, i64 row, int u, int K, Raw &r) {
        const u8 *b = w + (row * (K / 256) + u / 4) * 144;
        const int j = u & 3;
        r.dm = *(const u32 *)b;                       /* d, dmin */
        r.sc[0] = *(const u32 *)(b + 4);
        r.sc[1] = *(const u32 *)(b + 8);
        r.sc[2] = *(const u32 *)(b + 12);
        r.q0 = *(const uint4 *)(b + 16 + 32 * j);
        r.q1 = *(const uint4 *)(b + 32 + 32 * j);
    }
    static EMBER_HD Scales scales(const Raw &r, int u) {
        const __half2 dm = *(const __half2 *)&r.dm;
        const float dd = __low2float(dm), dmin = __high2float(dm);
        float s0, m0, s1, m1;
        scale_min_k4(2 * (u & 3), r.sc, &s0, &m0);
        scale_min_k4(2 * (u & 3) + 1, r.sc, &s1, &m1);
        return {dd * s0, dmin * m0, dd * s1, dmin * m1};
    }
    static EMBER_HD void quad(const Raw &r, const Scales &sc, int u, int k, float *v) {
        const float a = k < 8 ? sc.a0 : sc.a1, c = k < 8 ? sc.c0 : sc.c1;
        const u32 wd = (k & 7) < 4 ? word_of(r.q0, k & 3) : word_of(r.q1, k & 3);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int b = byte_of(wd, e);
            v[e] = a * (float)(k < 8 ? b & 15 : b >> 4) - c;
        }
    }
    /* sub-block 2j (low nibbles) against x's run col(u, 0) / 32, 2j + 1 (high) the next run */
    static EMBER_HD float dot8(const Raw &r, int u, const XQ *xq) {
        const Scales sc = scales(r, u);
        const XQ &lo = xq[col(u, 0) / 32], &hi = xq[col(u, 0) / 32 + 1];
        const int sl = dot32(nibbles(r.q0, 0), nibbles(r.q1, 0), xq_words(lo));
        const int sh = dot32(nibbles(r.q0, 4), nibbles(r.q1, 4), xq_words(hi));
        return sc.a0 * lo.d * (float)sl - sc.c0 * lo.s + sc.a1 * hi.d * (float)sh - sc.c1 * hi.s;
    }
};

/* Q6_K (padded to 224 bytes): ql[128] qh[64] scales[16] (int8) d (half). Unit u covers half
 * h of super-block u/4 (128 weights; h = (u%4)/2) and l in [16g, 16g+16), g = u%2, for the
 * four quarter-rows l, l+32, l+64, l+96 (llama.cpp's dequantize_row_q6_K order): group k is
 * quarter k/4, l = 16g + 4(k%4) .. +3. */
struct Q6_K {
    enum { UNIT = 64, RUN = 16, PF = 1, I8 = 0 };
    struct Raw { uint4 lo, hi, qh; i8 sc0, sc1, sc2, sc3; __half d; };
    struct Scales { float s[4]; };
    static EMBER_HD int col(int u, int r) {
        return (u >> 2) * 256 + 128 * ((u & 3) >> 1) + 16 * (u & 1) + 32 * r;
    }
    static EMBER_HD int col4(int u, int k) { return col(u, k >> 2) + 4 * (k & 3); }
    static EMBER_HD void fetch(const u8 *w, const __half *d, i64 row, int u, int K, Raw &r) {
        const int h = (u & 3) >> 1, g = u & 1;
        const u8 *b = w + (row * (K / 256) + u / 4) * 224;
        r.lo = *(const uint4 *)(b + 64 * h + 16 * g);
        r.hi = *(const uint4 *)(b + 64 * h + 32 + 16 * g);
        r.qh = *(const uint4 *)(b + 128 + 32 * h + 16 * g);
        const i8 *sc = (const i8 *)(b + 192 + 8 * h + g);
        r.sc0 = sc[0]; r.sc1 = sc[2]; r.sc2 = sc[4]; r.sc3 = sc[6];
        r.d = *(const __half *)(b + 208);
    }
    static EMBER_HD Scales scales(const Raw &r, int u) {
        const float dd = __half2float(r.d);
        return {{dd * r.sc0, dd * r.sc1, dd * r.sc2, dd * r.sc3}};
    }
    static EMBER_HD void quad(const Raw &r, const Scales &sc, int u, int k, float *v) {
        const int q = k >> 2;                       /* quarter: 0..3 (compile-time after unrolling) */
        const u32 a = word_of(q & 1 ? r.hi : r.lo, k & 3), e = word_of(r.qh, k & 3);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int nib = q < 2 ? byte_of(a, i) & 15 : byte_of(a, i) >> 4;
            v[i] = sc.s[q] * (float)((nib | (((byte_of(e, i) >> (2 * q)) & 3) << 4)) - 32);
        }
    }
};

/* plain rows: one element per unit, so consecutive lanes read consecutive elements (any K) */
struct F16 {
    enum { UNIT = 1, RUN = 1, PF = 0, I8 = 0 };
    struct Raw { float v; };
    static EMBER_HD int col(int u, int r) { return u; }
    static EMBER_HD void fetch(const u8 *w, const __half *d, i64 row, int u, int K, Raw &r) {
        r.v = __half2float(((const __half *)w)[row * K + u]);
    }
};

struct F32 {
    enum { UNIT = 1, RUN = 1, PF = 0, I8 = 0 };
    struct Raw { float v; };
    static EMBER_HD int col(int u, int r) { return u; }
    static EMBER_HD void fetch(const u8 *w, const __half *d, i64 row, int u, int K, Raw &r) {
        r.v = ((const float *)w)[row * K + u];
    }
};

/* v[0..UNIT) = the weights of unit u of a row, group by group (the dequantizer's path) */
template <class Q>
EMBER_HD void load_unit(const u8 *w, const __half *d, i64 row, int u, int K, float *v) {
    typename Q::Raw r;
    Q::fetch(w, d, row, u, K, r);
    if constexpr (Q::RUN >= 4) {
        const typename Q::Scales sc = Q::scales(r, u);
#pragma unroll
        for (int k = 0; k < Q::UNIT / 4; k++) Q::quad(r, sc, u, k, v + 4 * k);
    } else {
        v[0] = r.v;
    }
}

/* Where column c of x sits in a block's shared copy: 4 floats of padding after every 32, so
 * the lanes of a warp, each reading a float4 of its own unit (units 32 or 64 columns apart),
 * hit distinct banks. (Straight from global memory those reads touched 32 cache lines per
 * instruction and capped a matvec at ~250 GB/s.) */
__device__ __forceinline__ int xpad(int c) { return c + (c >> 5) * 4; }

/* W[unit u] . x[its columns] from a fetched Raw; x is the padded shared copy for RUN >= 4,
 * else global (or the unpadded shared copy) */
template <class Q>
__device__ __forceinline__ float raw_dot(const typename Q::Raw &r, int u, const float *x) {
    if constexpr (Q::RUN >= 4) {
        float acc = 0.0f;
        const typename Q::Scales sc = Q::scales(r, u);
#pragma unroll
        for (int k = 0; k < Q::UNIT / 4; k++) {
            float v[4];
            Q::quad(r, sc, u, k, v);
            const float4 xv = *(const float4 *)(x + xpad(Q::col4(u, k)));
            acc += v[0] * xv.x + v[1] * xv.y + v[2] * xv.z + v[3] * xv.w;
        }
        return acc;
    } else {
        return r.v * x[u];
    }
}

/* W[unit u] . x: from the int8 copy xq when the kernel has one (I8), else from x */
template <class Q, bool I8>
__device__ __forceinline__ float unit_dot(const typename Q::Raw &r, int u, const float *x, const XQ *xq) {
    if constexpr (I8) return Q::dot8(r, u, xq);
    else return raw_dot<Q>(r, u, x);
}

/* The int8 copy of a staged x (padded floats, K a multiple of 32): a warp per run of 32
 * columns, a lane per column (wave64: lanes past 32 idle). */
__device__ void quantize_x(const float *xs, int K, XQ *xq) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    for (int b = warp; b < K / 32; b += NWARPS) {
        const float v = lane < 32 ? xs[xpad(32 * b + lane)] : 0.0f;
        const float amax = warp_max(fabsf(v)), d = amax / 127.0f;
        const int q = amax == 0.0f ? 0 : (int)roundf(v / d);
        const float sum = warp_sum((float)q);          /* exact: |sum| <= 32 * 127 */
        if (lane < 32) ((i8 *)xq[b].q)[lane] = (i8)q;
        if (lane == 0) { xq[b].d = d; xq[b].s = d * sum; }
    }
    __syncthreads();
}

/* Where a matvec's int8 copy of x starts in its dynamic shared memory, in floats: past the
 * padded float copy and the split merge's weights (merge_floats), 16-byte aligned
 * (plugins/cuda.py's _xq_offset) */
__device__ __forceinline__ int xq_offset(int K, int merge_floats) { return (xpad(K) + merge_floats + 3) & ~3; }

/* Stage row x (K floats) into shared memory, padded, optionally RMS-normalized with weight
 * nw (the norm before a projection, fused here so it costs no launch of its own). Returns
 * the pointer the dot products read: the shared copy, or x itself for RUN = 1 types. With
 * part, x is the attention output merged from decode's split partials: first each (head,
 * split)'s weight exp(M_s - M) / L into wsc (shared, n_head * n_split floats past the padded
 * copy), then every element one weighted sum; loads independent of each other, so a few
 * round trips to L2 instead of one per split per element. */
template <class Q>
__device__ const float *stage_x(const float *x, const float *nw, float eps, int K, float *xs,
                                const float *part, int n_split, int n_live, int hd) {
    if (part) {
        float *wsc = xs + xpad(K);
        const int stride = hd + 2;
        for (int j = threadIdx.x; j < K / hd * n_live; j += BLOCK) {
            const float *p = part + (i64)(j / n_live) * n_split * stride;
            float M = NEG_BIG, L = 0.0f;
#pragma unroll 4
            for (int s = 0; s < n_live; s++) M = fmaxf(M, p[s * stride]);
#pragma unroll 4
            for (int s = 0; s < n_live; s++) L += p[s * stride + 1] * expf(p[s * stride] - M);
            wsc[j] = expf(p[(j % n_live) * stride] - M) / L;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < K; i += BLOCK) {
            const int h = i / hd;
            const float *p = part + (i64)h * n_split * stride + 2 + i % hd;
            float a = 0.0f;
#pragma unroll 4
            for (int s = 0; s < n_live; s++) a += wsc[h * n_live + s] * p[s * stride];
            xs[Q::RUN >= 4 ? xpad(i) : i] = a;
        }
        __syncthreads();
        return xs;
    }
    if (Q::RUN >= 4 && nw && K <= 16 * BLOCK) {   /* one pass: x and nw stay in registers */
        float4 xr[4], wr[4];
        float ss = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = 4 * (threadIdx.x + j * BLOCK);
            if (i < K) {
                xr[j] = *(const float4 *)(x + i);
                wr[j] = *(const float4 *)(nw + i);
                ss += xr[j].x * xr[j].x + xr[j].y * xr[j].y + xr[j].z * xr[j].z + xr[j].w * xr[j].w;
            }
        }
        const float inv = rsqrtf(block_sum(ss) / (float)K + eps);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = 4 * (threadIdx.x + j * BLOCK);
            if (i < K)
                *(float4 *)(xs + xpad(i)) = make_float4(xr[j].x * inv * wr[j].x, xr[j].y * inv * wr[j].y,
                                                        xr[j].z * inv * wr[j].z, xr[j].w * inv * wr[j].w);
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

/* This lane's part of W[row] . x over units u0, u0 + WARP, ... (the caller sums the warp) */
template <class Q, int UNROLL = 2, bool I8 = false>
__device__ __forceinline__ float row_part(const u8 *w, const __half *d, i64 row, int K, const float *x, int u0,
                                          const XQ *xq = nullptr) {
    const int nu = K / Q::UNIT;
    float acc = 0.0f;
#pragma unroll UNROLL
    for (int u = u0; u < nu; u += WARP) {
        typename Q::Raw r;
        Q::fetch(w, d, row, u, K, r);
        acc += unit_dot<Q, I8>(r, u, x, xq);
    }
    return acc;
}

/* Units lane, lane + WARP, ... (NP of them) of one row, fetched before x is staged so their
 * memory latency overlaps the staging; NP = 0 for the plain kinds (nothing worth hiding). */
template <class Q, int NP>
struct Prefetch {
    typename Q::Raw raw[NP > 0 ? NP : 1];
    __device__ __forceinline__ void fetch(const u8 *w, const __half *d, i64 row, int K) {
        const int lane = threadIdx.x % WARP, nu = K / Q::UNIT;
#pragma unroll
        for (int j = 0; j < NP; j++)
            if (lane + j * WARP < nu) Q::fetch(w, d, row, lane + j * WARP, K, raw[j]);
    }
    /* the lane's part of the row's dot product: the fetched units, then the rest */
    template <bool I8>
    __device__ __forceinline__ float dot(const u8 *w, const __half *d, i64 row, int K, const float *x,
                                         const XQ *xq) {
        const int lane = threadIdx.x % WARP, nu = K / Q::UNIT;
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < NP; j++) {
            const int u = lane + j * WARP;
            if (u < nu) acc += unit_dot<Q, I8>(raw[j], u, x, xq);
        }
        return acc + row_part<Q, 1, I8>(w, d, row, K, x, lane + NP * WARP, xq);
    }
};

/* which of up to three stacked matrices holds row r, and its row there */
__device__ __forceinline__ i64 pick_row(int r, const u8 *w0, const __half *d0, int n0, const u8 *w1,
                                        const __half *d1, int n1, const u8 *w2, const __half *d2,
                                        const u8 **w, const __half **d) {
    if (r < n0) { *w = w0; *d = d0; return r; }
    if (r - n0 < n1) { *w = w1; *d = d1; return r - n0; }
    *w = w2; *d = d2;
    return r - n0 - n1;
}

/* y[t, r] (+)= W[r] . norm(x[t]) for the rows of up to three matrices of one type stacked
 * (q|k|v share their input); grid (ceil(rows / (NWARPS * rpw)), n_tokens): a block stages its
 * token's x once, then its warps take rows in turn (rpw rows per warp). With PF > 0 each warp
 * fetches the first PF units a lane of its first row before the staging. I8: x is quantized
 * to int8 once staged and the dot products are dp4a's (Q::I8 types only). */
template <class Q, int PF, bool I8 = false>
__device__ void matvec_body(const u8 *w0, const __half *d0, int n0, const u8 *w1, const __half *d1, int n1,
                            const u8 *w2, const __half *d2, int n2, const float *x, float *y,
                            int K, int ldx, int ldy, int accumulate, const float *nw, float eps, int rpw,
                            const float *part, int n_split, int hd) {
    extern __shared__ float xs[];
    constexpr int NP = Q::RUN >= 4 ? PF : 0;
    x += (i64)blockIdx.y * ldx;
    y += (i64)blockIdx.y * ldy;
    const int r0 = blockIdx.x * NWARPS * rpw, r1 = min(r0 + NWARPS * rpw, n0 + n1 + n2);
    const int first = r0 + threadIdx.x / WARP;
    Prefetch<Q, NP> pre[PF_ROWS];
    GRID_DEP_TRIGGER();
#pragma unroll
    for (int j = 0; j < PF_ROWS; j++) {
        const int r = first + j * NWARPS;
        if (NP > 0 && r < r1) {
            const u8 *w;
            const __half *d;
            const i64 row = pick_row(r, w0, d0, n0, w1, d1, n1, w2, d2, &w, &d);
            pre[j].fetch(w, d, row, K);
        }
    }
    GRID_DEP_WAIT();             /* x, part and y are the previous kernels' */
    const float *xv = stage_x<Q>(x, nw, eps, K, xs, part, n_split, n_split, hd);
    XQ *xq = (XQ *)(xs + xq_offset(K, part ? K / hd * n_split : 0));
    if constexpr (I8) quantize_x(xv, K, xq);
    int r = first;
#pragma unroll
    for (int j = 0; j < PF_ROWS; j++) {
        if (NP > 0 && r < r1) {  /* the first rows from their fetched units */
            const u8 *w;
            const __half *d;
            const i64 row = pick_row(r, w0, d0, n0, w1, d1, n1, w2, d2, &w, &d);
            const float s = warp_sum(pre[j].template dot<I8>(w, d, row, K, xv, xq));
            if (threadIdx.x % WARP == 0) y[r] = accumulate ? y[r] + s : s;
            r += NWARPS;
        }
    }
    for (; r < r1; r += NWARPS) {
        const u8 *w;
        const __half *d;
        const i64 row = pick_row(r, w0, d0, n0, w1, d1, n1, w2, d2, &w, &d);
        const float s = warp_sum(row_part<Q, 2, I8>(w, d, row, K, xv, threadIdx.x % WARP, xq));
        if (threadIdx.x % WARP == 0) y[r] = accumulate ? y[r] + s : s;
    }
}

/* y[t, r] = silu(Wg[r] . norm(x[t])) * (Wu[r] . norm(x[t])): gate, up and SwiGLU in one pass */
template <class Q, int PF, bool I8 = false>
__device__ void matvec_swiglu_body(const u8 *wg, const __half *dg, const u8 *wu, const __half *du, int n,
                                   const float *x, float *y, int K, int ldx, int ldy,
                                   const float *nw, float eps, int rpw) {
    extern __shared__ float xs[];
    constexpr int NP = Q::RUN >= 4 ? PF : 0;
    x += (i64)blockIdx.y * ldx;
    y += (i64)blockIdx.y * ldy;
    const int r0 = blockIdx.x * NWARPS * rpw, r1 = min(r0 + NWARPS * rpw, n);
    const int first = r0 + threadIdx.x / WARP;
    Prefetch<Q, NP> pg[PF_ROWS], pu[PF_ROWS];
    GRID_DEP_TRIGGER();
#pragma unroll
    for (int j = 0; j < PF_ROWS; j++) {
        if (NP > 0 && first + j * NWARPS < r1) {
            pg[j].fetch(wg, dg, first + j * NWARPS, K);
            pu[j].fetch(wu, du, first + j * NWARPS, K);
        }
    }
    GRID_DEP_WAIT();
    const float *xv = stage_x<Q>(x, nw, eps, K, xs, nullptr, 0, 0, 1);
    XQ *xq = (XQ *)(xs + xq_offset(K, 0));
    if constexpr (I8) quantize_x(xv, K, xq);
    const int lane = threadIdx.x % WARP;
    int r = first;
#pragma unroll
    for (int j = 0; j < PF_ROWS; j++) {
        if (NP > 0 && r < r1) {  /* the first rows from their fetched units */
            const float g = warp_sum(pg[j].template dot<I8>(wg, dg, r, K, xv, xq));
            const float u = warp_sum(pu[j].template dot<I8>(wu, du, r, K, xv, xq));
            if (lane == 0) y[r] = g / (1.0f + expf(-g)) * u;
            r += NWARPS;
        }
    }
    for (; r < r1; r += NWARPS) {
        const float g = warp_sum(row_part<Q, 2, I8>(wg, dg, r, K, xv, lane, xq));
        const float u = warp_sum(row_part<Q, 2, I8>(wu, du, r, K, xv, lane, xq));
        if (lane == 0) y[r] = g / (1.0f + expf(-g)) * u;
    }
}

/* ---- dequantize (prefill GEMM operands, embedding rows) ---------------------------------- */

/* Unit u of row src of W, decoded into row o of out_h (half) or out_f (float) */
template <class Q>
__device__ __forceinline__ void dequant_unit(const u8 *w, const __half *d, i64 src, int u, int K, i64 o,
                                             __half *out_h, float *out_f) {
    float v[Q::UNIT];
    load_unit<Q>(w, d, src, u, K, v);
    o *= K;
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

/* out[i, :] = W[rows ? rows[i] : r0 + i, :] as half (out_h) or float (out_f); a thread per unit */
template <class Q>
__device__ void dequant_body(const u8 *w, const __half *d, const int *rows, int r0, int n_rows, int K,
                             __half *out_h, float *out_f) {
    GRID_DEP_TRIGGER();
    GRID_DEP_WAIT();
    const int nu = K / Q::UNIT;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)n_rows * nu) return;
    const int i = (int)(idx / nu), u = (int)(idx % nu);
    dequant_unit<Q>(w, d, rows ? (i64)rows[i] : (i64)r0 + i, u, K, i, out_h, out_f);
}

/* matvec_<t> / matvec_swiglu_<t>: x staged first, then the rows (PF = 0); the _pf variants
 * (PF units a lane in flight during the staging) are what decode launches by default */
#define EMBER_TYPED(NAME, Q)                                                                     \
extern "C" __global__ void __launch_bounds__(BLOCK) matvec_##NAME(                               \
        const u8 *w0, const __half *d0, int n0, const u8 *w1, const __half *d1, int n1,          \
        const u8 *w2, const __half *d2, int n2, const float *x, float *y,                        \
        int K, int ldx, int ldy, int accumulate, const float *nw, float eps, int rpw,             \
        const float *part, int n_split, int hd) {                                                \
    matvec_body<Q, 0>(w0, d0, n0, w1, d1, n1, w2, d2, n2, x, y, K, ldx, ldy, accumulate, nw, eps, rpw, \
                      part, n_split, hd);                                                        \
}                                                                                                \
extern "C" __global__ void __launch_bounds__(BLOCK, PF_BLOCKS) matvec_pf_##NAME(                            \
        const u8 *w0, const __half *d0, int n0, const u8 *w1, const __half *d1, int n1,          \
        const u8 *w2, const __half *d2, int n2, const float *x, float *y,                        \
        int K, int ldx, int ldy, int accumulate, const float *nw, float eps, int rpw,             \
        const float *part, int n_split, int hd) {                                                \
    matvec_body<Q, Q::PF>(w0, d0, n0, w1, d1, n1, w2, d2, n2, x, y, K, ldx, ldy, accumulate, nw, eps, \
                             rpw, part, n_split, hd);                                            \
}                                                                                                \
extern "C" __global__ void __launch_bounds__(BLOCK) matvec_swiglu_##NAME(                        \
        const u8 *wg, const __half *dg, const u8 *wu, const __half *du, int n,                   \
        const float *x, float *y, int K, int ldx, int ldy, const float *nw, float eps, int rpw) { \
    matvec_swiglu_body<Q, 0>(wg, dg, wu, du, n, x, y, K, ldx, ldy, nw, eps, rpw);                \
}                                                                                                \
extern "C" __global__ void __launch_bounds__(BLOCK, PF_BLOCKS) matvec_swiglu_pf_##NAME(                     \
        const u8 *wg, const __half *dg, const u8 *wu, const __half *du, int n,                   \
        const float *x, float *y, int K, int ldx, int ldy, const float *nw, float eps, int rpw) { \
    matvec_swiglu_body<Q, Q::PF>(wg, dg, wu, du, n, x, y, K, ldx, ldy, nw, eps, rpw);         \
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

/* matvec_i8_<t> / matvec_swiglu_i8_<t>: the _pf kernels with x quantized to int8 once staged
 * and dp4a dot products (option dp4a; the types with a Q::dot8) */
#define EMBER_TYPED_I8(NAME, Q)                                                                  \
extern "C" __global__ void __launch_bounds__(BLOCK, PF_BLOCKS) matvec_i8_##NAME(                 \
        const u8 *w0, const __half *d0, int n0, const u8 *w1, const __half *d1, int n1,          \
        const u8 *w2, const __half *d2, int n2, const float *x, float *y,                        \
        int K, int ldx, int ldy, int accumulate, const float *nw, float eps, int rpw,             \
        const float *part, int n_split, int hd) {                                                \
    matvec_body<Q, Q::PF, true>(w0, d0, n0, w1, d1, n1, w2, d2, n2, x, y, K, ldx, ldy, accumulate, nw, eps, \
                                rpw, part, n_split, hd);                                         \
}                                                                                                \
extern "C" __global__ void __launch_bounds__(BLOCK, PF_BLOCKS) matvec_swiglu_i8_##NAME(          \
        const u8 *wg, const __half *dg, const u8 *wu, const __half *du, int n,                   \
        const float *x, float *y, int K, int ldx, int ldy, const float *nw, float eps, int rpw) { \
    matvec_swiglu_body<Q, Q::PF, true>(wg, dg, wu, du, n, x, y, K, ldx, ldy, nw, eps, rpw);      \
}

EMBER_TYPED_I8(q4_0, Q4_0)
EMBER_TYPED_I8(q8_0, Q8_0)
EMBER_TYPED_I8(q4_k, Q4_K)

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

/* s[0..hd) = head hh of a token's q|k|v row, ready for attention: plus its bias, then for a
 * q or k head the per-head RMSNorm (q_norm / k_norm, when the model has them) and the rope
 * rotation at position pos; a v head only gets its bias. One warp; s in shared memory.
 * cs: (n_ctx, rope_dim/2, 2) cos, sin. neox: pairs (i, i + rope_dim/2), else (2i, 2i+1). */
__device__ void prep_head(const float *row, int hh, const float *bias, const float *q_norm, const float *k_norm,
                          const float *cs, int pos, int n_head, int n_kv, int hd, int rope_dim, int neox,
                          float eps, float *s) {
    const int lane = threadIdx.x % WARP, half_rd = rope_dim / 2;
    for (int i = lane; i < hd; i += WARP) s[i] = row[(i64)hh * hd + i] + (bias ? bias[hh * hd + i] : 0.0f);
    if (hh >= n_head + n_kv) {
        SYNCWARP();
        return;
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
}

/* grid (ceil((n_head + 2 n_kv) / NWARPS), n_tokens): a warp per head of q|k|v. Token t sits at
 * position io[0] + t. q is rewritten in place; k and v go to the f16 cache. (Decode fuses
 * this into attention_rope.) */
extern "C" __global__ void __launch_bounds__(BLOCK) rope_kv(
        float *qkv, int ld, const float *bias, const float *q_norm, const float *k_norm,
        const float *cs, const int *io, __half *k_cache, __half *v_cache,
        int n_head, int n_kv, int hd, int rope_dim, int neox, float eps) {
    __shared__ float buf[NWARPS][HD_MAX];
    GRID_DEP_TRIGGER();
    GRID_DEP_WAIT();
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int pos = io[0] + blockIdx.y, kv_dim = n_kv * hd;
    float *row = qkv + (i64)blockIdx.y * ld;
    float *s = buf[warp];
    for (int hh = blockIdx.x * NWARPS + warp; hh < min((int)(blockIdx.x + 1) * NWARPS, n_head + 2 * n_kv); hh += NWARPS) {
        prep_head(row, hh, bias, q_norm, k_norm, cs, pos, n_head, n_kv, hd, rope_dim, neox, eps, s);
        if (hh < n_head) {
            for (int i = lane; i < hd; i += WARP) row[(i64)hh * hd + i] = s[i];
        } else {
            const int at = hh < n_head + n_kv ? hh - n_head : hh - n_head - n_kv;
            __half *cache = hh < n_head + n_kv ? k_cache : v_cache;
            for (int i = lane; i < hd; i += WARP) cache[(i64)pos * kv_dim + at * hd + i] = __float2half(s[i]);
        }
        SYNCWARP();
    }
}

/* ---- attention over the cache, split over the sequence (flash-decoding) -------------------- */

/* q . K[key] for one lane's key; q is a float copy in shared memory (16-byte aligned) */
__device__ __forceinline__ float key_dot(const float *q, const __half *kr, int hd) {
    float a = 0.0f;
    if ((hd & 7) == 0) {
#pragma unroll 8
        for (int i = 0; i < hd; i += 8) {   /* unrolled: a 64-wide head's 8 loads in flight at once */
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

/* One tile of WARP keys [k0, k0 + WARP) ∩ [.., last] into a warp's online softmax (key `cur`,
 * if any, read from kcur / vcur instead of the cache): a lane per key takes a whole q.k dot, one warp max and one warp sum update (m, l), then the tile's
 * probabilities are broadcast lane by lane into acc. Lane owns output dims 2*(lane + j*WARP)
 * and the next one, j < nj = ceil(hd / (2*WARP)) (a warp-uniform bound, so narrow heads skip
 * the unused slots instead of predicating them). */
__device__ __forceinline__ void attend_tile(const float *q, const __half *kc, const __half *vc, int kv_stride,
                                            int hd, int k0, int last, float &m, float &l, float2 *acc,
                                            int cur = -1, const __half *kcur = nullptr,
                                            const __half *vcur = nullptr) {
    const int lane = threadIdx.x % WARP, key = k0 + lane, nj = (hd + 2 * WARP - 1) / (2 * WARP);
    const __half *kr = key == cur ? kcur : kc + (i64)key * kv_stride;
    const float s = key <= last ? key_dot(q, kr, hd) : NEG_BIG;
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
        const int kv = min(k0 + kk, last);
        const __half *vr = kv == cur ? vcur : vc + (i64)kv * kv_stride;
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

/* Decode: grid (n_head, 1, n_split) (or the persistent kernel's blocks in turn). Block (h, 0, s)
 * attends query head h (position p = io[0],
 * keys 0..p) over keys [s*chunk, min((s+1)*chunk, p+1)), its warps a tile of WARP keys at a
 * time, then merges its warps and writes the unnormalized partial (max, sum, acc[hd]) to
 * part[h][s]; the o projection's matvec merges the splits while staging its input. q: the
 * scaled query in shared memory; key p from kcur / vcur when they are given. */
__device__ void attend_split(int h, int sp, int n_split, const float *q, const __half *k_cache,
                             const __half *v_cache, int pos, float *part, int n_head, int n_kv, int hd,
                             int chunk, const __half *kcur, const __half *vcur) {
    __shared__ float wm[NWARPS], wl[NWARPS];
    __shared__ float wacc[NWARPS][HD_MAX];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int kv_dim = n_kv * hd, kvh = h / (n_head / n_kv);
    const int last = min((sp + 1) * chunk, pos + 1) - 1, cur = kcur ? pos : -1;
    float m = NEG_BIG, l = 0.0f;
    float2 acc[NJ2];
#pragma unroll
    for (int j = 0; j < NJ2; j++) acc[j] = make_float2(0.0f, 0.0f);
    for (int k0 = sp * chunk + warp * WARP; k0 <= last; k0 += BLOCK)
        attend_tile(q, k_cache + kvh * hd, v_cache + kvh * hd, kv_dim, hd, k0, last, m, l, acc, cur, kcur, vcur);
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

/* Split sp past the newest key p (every split of the graph's fixed grid runs, whatever p is):
 * write the partial attend_split would (max NEG_BIG, sum 0, zeros, so the merge weighs it 0)
 * without preparing a query. Block-uniform; true when the caller has nothing left to do. */
__device__ __forceinline__ bool empty_split(int h, int sp, int n_split, int pos, int chunk, int hd, float *part) {
    if (sp * chunk <= pos) return false;
    float *out = part + ((i64)h * n_split + sp) * (hd + 2);
    for (int i = threadIdx.x; i < hd + 2; i += BLOCK) out[i] = i == 0 ? NEG_BIG : 0.0f;
    return true;
}

/* decode attention after rope_kv: q from the q|k|v row (roped in place), every key from the cache */
extern "C" __global__ void __launch_bounds__(BLOCK) attention(
        const float *qkv, int ld, const __half *k_cache, const __half *v_cache, const int *io,
        float *part, int n_head, int n_kv, int hd, int chunk, float scale) {
    __shared__ __align__(16) float q[HD_MAX];
    GRID_DEP_TRIGGER();
    GRID_DEP_WAIT();
    const int h = blockIdx.x;
    if (empty_split(h, blockIdx.z, gridDim.z, io[0], chunk, hd, part)) return;
    for (int i = threadIdx.x; i < hd; i += BLOCK) q[i] = qkv[h * hd + i] * scale;
    __syncthreads();
    attend_split(h, blockIdx.z, gridDim.z, q, k_cache, v_cache, io[0], part, n_head, n_kv, hd, chunk,
                 nullptr, nullptr);
}

/* decode attention with rope_kv fused in (one launch a layer less): each block prepares its own
 * query head; the blocks whose split holds the new position p also prepare its key and value
 * and attend key p from those shared copies (so no block reads cache row p, which the first
 * block of each kv head writes for the tokens after this one). */
__device__ void attention_rope_body(
        int h, int sp, int n_split, const float *qkv, const float *bias, const float *q_norm,
        const float *k_norm, const float *cs, __half *k_cache, __half *v_cache, int pos, float *part,
        int n_head, int n_kv, int hd, int rope_dim, int neox, float eps, int chunk, float scale) {
    __shared__ __align__(16) float q[HD_MAX];
    __shared__ float kv[2][HD_MAX];
    __shared__ __align__(16) __half kcur[HD_MAX];
    __shared__ __align__(16) __half vcur[HD_MAX];
    if (empty_split(h, sp, n_split, pos, chunk, hd, part)) return;
    const int warp = threadIdx.x / WARP;
    const int kv_dim = n_kv * hd, group = n_head / n_kv, kvh = h / group;
    const bool has_cur = sp * chunk <= pos && pos < (sp + 1) * chunk;    /* block-uniform */
    if (warp == 0)
        prep_head(qkv, h, bias, q_norm, k_norm, cs, pos, n_head, n_kv, hd, rope_dim, neox, eps, q);
    else if (has_cur && warp == 1)
        prep_head(qkv, n_head + kvh, bias, q_norm, k_norm, cs, pos, n_head, n_kv, hd, rope_dim, neox, eps, kv[0]);
    else if (has_cur && warp == 2)
        prep_head(qkv, n_head + n_kv + kvh, bias, q_norm, k_norm, cs, pos, n_head, n_kv, hd, rope_dim, neox,
                  eps, kv[1]);
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += BLOCK) {
        q[i] *= scale;
        if (has_cur) {
            kcur[i] = __float2half(kv[0][i]);
            vcur[i] = __float2half(kv[1][i]);
            if (h % group == 0) {        /* one block per kv head stores the new key and value */
                k_cache[(i64)pos * kv_dim + kvh * hd + i] = kcur[i];
                v_cache[(i64)pos * kv_dim + kvh * hd + i] = vcur[i];
            }
        }
    }
    __syncthreads();
    attend_split(h, sp, n_split, q, k_cache, v_cache, pos, part, n_head, n_kv, hd, chunk,
                 has_cur ? kcur : nullptr, has_cur ? vcur : nullptr);
}

extern "C" __global__ void __launch_bounds__(BLOCK) attention_rope(
        const float *qkv, const float *bias, const float *q_norm, const float *k_norm, const float *cs,
        __half *k_cache, __half *v_cache, const int *io, float *part,
        int n_head, int n_kv, int hd, int rope_dim, int neox, float eps, int chunk, float scale) {
    GRID_DEP_TRIGGER();
    GRID_DEP_WAIT();
    attention_rope_body(blockIdx.x, blockIdx.z, gridDim.z, qkv, bias, q_norm, k_norm, cs, k_cache, v_cache,
                        io[0], part, n_head, n_kv, hd, rope_dim, neox, eps, chunk, scale);
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

/* ---- decode as one persistent kernel (CUDA) ------------------------------------------------- */

#if !EMBER_HIP
/* A decoded token in one launch instead of ~114 graph nodes (on an H100 each node cost ~11 us of
 * dependent latency against ~1 us of weight bandwidth). The grid is exactly as many blocks as the
 * GPU holds at once (a cooperative launch, so all are resident) and walks a table of stages built
 * by plugins/cuda.py (persistent_stages): the embedding row, then per layer
 *   norm + q|k|v matvec -> rope + KV write + split attention -> merge + o matvec (+= x)
 *   -> norm + gate|up + SwiGLU -> down matvec (+= x),
 * then norm + output matvec. Between stages every block passes a grid barrier (a counter in
 * global memory). Weights never depend on activations, so at the start of each stage a block
 * asks the copy engine to prefetch into L2 the rows it will multiply in the NEXT stage: HBM
 * streams stage s+1 while stage s computes and while the barrier waits, and the matvecs read
 * L2. Each block owns a contiguous range of a stage's rows (the same range for the prefetch and
 * the multiply), its warps taking them in turn; x is staged (normalized, or merged from the
 * attention splits) per block in shared memory as in the matvec kernels. The attention stage
 * and the o stage's merge visit only the splits that hold a key (p / chunk + 1 of them; the
 * graph's fixed grid writes empty partials for the rest). One block an SM (__launch_bounds__
 * (BLOCK, 1)): two measured no faster, and their 128-register cap spilled. Only the quantized
 * kinds are supported in the matvec stages (the host falls back to the graph otherwise). */

enum { PK_Q4_0 = 0, PK_Q8_0 = 1, PK_Q4_K = 2, PK_Q6_K = 3, PK_F16 = 4, PK_F32 = 5 };
enum { P_EMBED = 0, P_MATVEC = 1, P_SWIGLU = 2, P_ATTN = 3 };

/* rows [0, rows) of one matrix in its device layout (w at its first row) */
struct PMat {
    const u8 *w;
    const __half *d;     /* q4_0 / q8_0 scales at the first row, else null */
    int kind, rows;
};

/* One stage; plugins/cuda.py mirrors this layout with ctypes (tested against offsetof) */
struct PStage {
    int op, n_mat, rows, K;          /* P_*; matrices used; output rows; input width */
    const float *x;                  /* input row (embed: unused; attention: q|k|v) */
    float *y;                        /* output: y[r] for stage row r (the mats' rows in turn) */
    const float *nw;                 /* RMSNorm weight applied to x while staging, or null */
    int accumulate, merge;           /* y += instead of =; x = the attention splits merged */
    PMat mat[3];                     /* matvec: up to 3 stacked; swiglu: gate, up; embed: table */
    const float *bias, *q_norm, *k_norm;   /* attention: the layer's q|k|v bias, q/k norms */
    __half *kc, *vc;                 /* attention: the layer's KV cache */
};

/* Device-layout bytes of `rows` rows of a kind and of their scales (q4_0 / q8_0) */
EMBER_HD i64 kind_row_bytes(int kind, int K) {
    switch (kind) {
    case PK_Q4_0: return (i64)K / 32 * 16;
    case PK_Q8_0: return (i64)K;
    case PK_Q4_K: return (i64)K / 256 * 144;
    case PK_Q6_K: return (i64)K / 256 * 224;
    case PK_F16: return (i64)K * 2;
    default: return (i64)K * 4;
    }
}

/* decode_persistent's flags (plugins/cuda.py P_FLAGS; measured side by side, see bench/results) */
#define PF_SLEEP 1     /* barrier: back off 100 ns between polls */
#define PF_CLASSIC 2   /* barrier: fence + atomicAdd + volatile polling (cooperative groups' way) */
#define PF_LINES 4     /* L2 prefetch: a prefetch.global.L2 per 128-byte line over the block */
#define PF_I8 8        /* matvec stages: x quantized to int8 once staged, dp4a for the Q::I8 kinds */
#define PF_L1 16       /* before each grid barrier: the first L1_PF_BYTES of this block's rows of the
                        * next stage into L1, a prefetch.global.L1 a line (weights never depend on
                        * activations, so their loads need not wait for the barrier) */
#define L1_PF_BYTES (32 << 10)

/* Ask for bytes [p, p + n) in L2 (a hint: nothing waits for it). Hopper: the copy engine's bulk
 * prefetch, one instruction a range, from thread 0 (unless PF_LINES); older GPUs: a prefetch
 * per 128-byte line spread over the block; with PF_L1 a line at a time into L1 (and L2). The
 * range is trimmed to whole 16-byte pieces inside it. */
__device__ __forceinline__ void l2_prefetch(const void *p, i64 n, int flags) {
    unsigned long long a = ((unsigned long long)p + 15) & ~15ull, e = ((unsigned long long)p + n) & ~15ull;
#if defined(__CUDA_ARCH__)
    if (flags & PF_L1) {
        for (a += 128ull * threadIdx.x; a < e; a += 128ull * BLOCK)
            asm volatile("prefetch.global.L1 [%0];" :: "l"(a));
        return;
    }
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (!(flags & PF_LINES)) {
        if (threadIdx.x == 0)
            for (; a < e; a += 1u << 20) {
                const u32 sz = (u32)min(e - a, 1ull << 20);
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(a), "r"(sz) : "memory");
            }
        return;
    }
#endif
#if defined(__CUDA_ARCH__)
    for (a += 128ull * threadIdx.x; a < e; a += 128ull * BLOCK)
        asm volatile("prefetch.global.L2 [%0];" :: "l"(a));
#endif
}

/* This block's rows of a stage: [r0, r1), balanced to a row across the grid */
__device__ __forceinline__ void block_rows(int rows, int &r0, int &r1) {
    r0 = (int)((i64)blockIdx.x * rows / gridDim.x);
    r1 = (int)((i64)(blockIdx.x + 1) * rows / gridDim.x);
}

/* L2 prefetch of the weight rows this block multiplies in stage S, at most cap bytes */
__device__ void prefetch_stage(const PStage &S, i64 cap, int flags) {
    if (S.op != P_MATVEC && S.op != P_SWIGLU) return;
    int r0, r1;
    block_rows(S.rows, r0, r1);
    for (int m = 0, base = 0; m < S.n_mat && cap > 0; m++) {
        const PMat &M = S.mat[m];
        const int a = S.op == P_SWIGLU ? r0 : max(r0 - base, 0);
        const int b = S.op == P_SWIGLU ? r1 : min(r1 - base, M.rows);
        if (S.op == P_MATVEC) base += M.rows;
        if (a >= b) continue;
        const i64 rb = kind_row_bytes(M.kind, S.K), n = min((i64)(b - a) * rb, cap);
        l2_prefetch(M.w + a * rb, n, flags);
        if (M.d) l2_prefetch(M.d + (i64)a * (S.K / 32), n / rb * (S.K / 32) * 2, flags);
        cap -= n;
    }
}

/* Grid barrier i (1, 2, ...) of this launch: every block adds 1 (a posted reduction, no round
 * trip) and waits until the count reaches i * gridDim.x. The count restarts at 0 each launch:
 * the last block to leave (grid_exit) resets it. Thread 0's release/acquire, between two block
 * barriers, orders the whole block's memory accesses (as cooperative groups' grid.sync does). */
__device__ __forceinline__ u32 load_acquire(const u32 *p) {
#if defined(__CUDA_ARCH__)
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
#else   /* the tests' CPU emulation (tests/plugins/cuda_emu.h): one block at a time */
    return *(const volatile u32 *)p;
#endif
}

__device__ __forceinline__ void grid_barrier(u32 *count, u32 target, int flags) {
    __syncthreads();
    if (threadIdx.x == 0) {
        if (flags & PF_CLASSIC) {
            __threadfence();
            atomicAdd(count, 1u);
            while (*(volatile u32 *)count < target)
                if (flags & PF_SLEEP) __nanosleep(100);
            __threadfence();
        } else {
#if defined(__CUDA_ARCH__)
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(count) : "memory");
#else
            atomicAdd(count, 1u);
#endif
            while (load_acquire(count) < target)
                if (flags & PF_SLEEP) __nanosleep(100);
        }
    }
    __syncthreads();
}

/* true in the thread that left last */
__device__ __forceinline__ bool grid_exit(u32 *count, u32 total) {
    __syncthreads();
    if (threadIdx.x == 0 && atomicAdd(count, 1u) == total - 1) {
        atomicExch(count, 0u);
        return true;
    }
    return false;
}

/* nanoseconds (the profile's trace: block 0's clock at each stage start, barrier waits included) */
__device__ __forceinline__ i64 stage_clock() {
    unsigned long long t = 0;
#if defined(__CUDA_ARCH__)
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
#endif
    return (i64)t;
}

/* The lane's part of row `row` of M . x (x staged, padded; xq: its int8 copy, or null) */
template <class Q>
__device__ __forceinline__ float kind_part(const PMat &M, int row, int K, const float *xs, int lane, const XQ *xq) {
    if (Q::I8 && xq) return row_part<Q, 2, Q::I8 != 0>(M.w, M.d, row, K, xs, lane, xq);
    return row_part<Q>(M.w, M.d, row, K, xs, lane);
}

__device__ __forceinline__ float pmat_part(const PMat &M, int row, int K, const float *xs, int lane, const XQ *xq) {
    switch (M.kind) {
    case PK_Q4_0: return kind_part<Q4_0>(M, row, K, xs, lane, xq);
    case PK_Q8_0: return kind_part<Q8_0>(M, row, K, xs, lane, xq);
    case PK_Q4_K: return kind_part<Q4_K>(M, row, K, xs, lane, xq);
    default: return kind_part<Q6_K>(M, row, K, xs, lane, xq);
    }
}

/* Two rows' parts at once (A row ra, B row rb): both rows' loads in flight together, half the
 * dependent round trips of two pmat_part calls. Units of 32 (small Raws) two a lane at a
 * time; the k-quants' 64-wide units one at a time (their Raws x 4 spilled past the 128
 * registers that two blocks an SM allow, and a 2048-wide row is one unit a lane anyway). */
template <class Q, bool I8>
__device__ __forceinline__ void row_part2(const PMat &A, int ra, const PMat &B, int rb, int K, const float *x,
                                          int lane, const XQ *xq, float &a, float &b) {
    const int nu = K / Q::UNIT;
#pragma unroll (Q::UNIT == 32 ? 2 : 1)
    for (int u = lane; u < nu; u += WARP) {
        typename Q::Raw r0, r1;
        Q::fetch(A.w, A.d, ra, u, K, r0);
        Q::fetch(B.w, B.d, rb, u, K, r1);
        a += unit_dot<Q, I8>(r0, u, x, xq);
        b += unit_dot<Q, I8>(r1, u, x, xq);
    }
}

template <class Q>
__device__ __forceinline__ void kind_part2(const PMat &A, int ra, const PMat &B, int rb, int K, const float *xs,
                                           int lane, const XQ *xq, float &a, float &b) {
    if (Q::I8 && xq) row_part2<Q, Q::I8 != 0>(A, ra, B, rb, K, xs, lane, xq, a, b);
    else row_part2<Q, false>(A, ra, B, rb, K, xs, lane, xq, a, b);
}

__device__ __forceinline__ void pmat_part2(const PMat &A, int ra, const PMat &B, int rb, int K, const float *xs,
                                           int lane, const XQ *xq, float &a, float &b) {
    a = b = 0.0f;
    if (A.kind != B.kind) {
        a = pmat_part(A, ra, K, xs, lane, xq);
        b = pmat_part(B, rb, K, xs, lane, xq);
        return;
    }
    switch (A.kind) {
    case PK_Q4_0: kind_part2<Q4_0>(A, ra, B, rb, K, xs, lane, xq, a, b); break;
    case PK_Q8_0: kind_part2<Q8_0>(A, ra, B, rb, K, xs, lane, xq, a, b); break;
    case PK_Q4_K: kind_part2<Q4_K>(A, ra, B, rb, K, xs, lane, xq, a, b); break;
    default: kind_part2<Q6_K>(A, ra, B, rb, K, xs, lane, xq, a, b); break;
    }
}

/* x's int8 copy for a matvec stage with PF_I8 (past the staged x and the merge weights), or null */
__device__ __forceinline__ const XQ *p_quantize(const PStage &S, float *xs, const float *xv, int n_split, int hd,
                                                int flags) {
    if (!(flags & PF_I8)) return nullptr;
    XQ *xq = (XQ *)(xs + xq_offset(S.K, S.merge ? S.K / hd * n_split : 0));
    quantize_x(xv, S.K, xq);
    return xq;
}

/* stage row r -> its matrix (index into S.mat) and its row there */
__device__ __forceinline__ int locate(const PStage &S, int &row) {
    int m = 0;
    while (row >= S.mat[m].rows) row -= S.mat[m++].rows;
    return m;
}

/* y[r] (+)= M(r) . x for this block's rows r, a warp two rows at a time; x normalized or
 * merged while staged (and quantized with PF_I8) */
__device__ void p_matvec(const PStage &S, float *xs, const float *part, int n_split, int n_live, int hd, float eps,
                         int flags) {
    int r0, r1;
    block_rows(S.rows, r0, r1);
    if (r0 >= r1) return;                    /* block-uniform */
    const float *xv = stage_x<Q4_0>(S.x, S.nw, eps, S.K, xs, S.merge ? part : nullptr, n_split, n_live, hd);
    const XQ *xq = p_quantize(S, xs, xv, n_split, hd, flags);
    const int lane = threadIdx.x % WARP;
    for (int r = r0 + threadIdx.x / WARP; r < r1; r += 2 * NWARPS) {
        const int r2 = r + NWARPS;
        int ra = r, rb = r2 < r1 ? r2 : r;
        const int ma = locate(S, ra), mb = locate(S, rb);
        float a, b;
        pmat_part2(S.mat[ma], ra, S.mat[mb], rb, S.K, xv, lane, xq, a, b);
        a = warp_sum(a);
        b = warp_sum(b);
        if (lane == 0) {
            S.y[r] = S.accumulate ? S.y[r] + a : a;
            if (r2 < r1) S.y[r2] = S.accumulate ? S.y[r2] + b : b;
        }
    }
}

/* y[r] = silu(gate(r) . x) * (up(r) . x), x normalized while staged */
__device__ void p_swiglu(const PStage &S, float *xs, float eps, int flags) {
    int r0, r1;
    block_rows(S.rows, r0, r1);
    if (r0 >= r1) return;
    const float *xv = stage_x<Q4_0>(S.x, S.nw, eps, S.K, xs, nullptr, 0, 0, 1);
    const XQ *xq = p_quantize(S, xs, xv, 0, 1, flags);
    const int lane = threadIdx.x % WARP;
    for (int r = r0 + threadIdx.x / WARP; r < r1; r += NWARPS) {
        float g, u;
        pmat_part2(S.mat[0], r, S.mat[1], r, S.K, xv, lane, xq, g, u);
        g = warp_sum(g);
        u = warp_sum(u);
        if (lane == 0) S.y[r] = g / (1.0f + expf(-g)) * u;
    }
}

/* y = row `token` of the embedding table, a thread per unit */
__device__ void p_embed(const PStage &S, int token) {
    const PMat &M = S.mat[0];
    const int unit = M.kind == PK_Q4_0 || M.kind == PK_Q8_0 ? 32 : M.kind <= PK_Q6_K ? 64 : 1;
    for (int u = blockIdx.x * BLOCK + threadIdx.x; u < S.K / unit; u += gridDim.x * BLOCK) {
        switch (M.kind) {
        case PK_Q4_0: dequant_unit<Q4_0>(M.w, M.d, token, u, S.K, 0, nullptr, S.y); break;
        case PK_Q8_0: dequant_unit<Q8_0>(M.w, M.d, token, u, S.K, 0, nullptr, S.y); break;
        case PK_Q4_K: dequant_unit<Q4_K>(M.w, M.d, token, u, S.K, 0, nullptr, S.y); break;
        case PK_Q6_K: dequant_unit<Q6_K>(M.w, M.d, token, u, S.K, 0, nullptr, S.y); break;
        case PK_F16: dequant_unit<F16>(M.w, M.d, token, u, S.K, 0, nullptr, S.y); break;
        default: dequant_unit<F32>(M.w, M.d, token, u, S.K, 0, nullptr, S.y); break;
        }
    }
}

/* grid: the resident blocks (cooperative launch); block: BLOCK threads; dynamic shared memory:
 * the padded x copy of the widest matvec input, then (tab_off > 0: at that float offset) the stage
 * table, copied once. io: (pos, token); part: the attention splits;
 * pf_cap: L2 prefetch bytes a block may ask for per stage (0: none); flags: PF_*; trace: null,
 * or n_st + 1 clocks. */
extern "C" __global__ void __launch_bounds__(BLOCK, 1) decode_persistent(
        const PStage *stages, int n_st, int tab_off, u32 *count, const int *io, float *part, const float *cs,
        int n_head, int n_kv, int hd, int rope_dim, int neox, float eps, int chunk, int n_split,
        float scale, i64 pf_cap, int flags, i64 *trace) {
    extern __shared__ __align__(16) float pxs[];
    __shared__ PStage one;
    const int pos = io[0], token = io[1];
    const int n_live = min(n_split, pos / chunk + 1);   /* splits holding a key: the rest are skipped */
    PStage *tab = tab_off ? (PStage *)(pxs + tab_off) : nullptr;
    if (tab)                                 /* the whole table once (tab_off: past x and wsc) */
        for (int i = threadIdx.x; i < n_st * (int)(sizeof(PStage) / 8); i += BLOCK)
            ((i64 *)tab)[i] = ((const i64 *)stages)[i];
    for (int s = 0; s < n_st; s++) {
        if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[s] = stage_clock();
        if (!tab && threadIdx.x < sizeof(PStage) / 8)
            ((i64 *)&one)[threadIdx.x] = ((const i64 *)(stages + s))[threadIdx.x];
        __syncthreads();
        const PStage &S = tab ? tab[s] : one;
        if (s + 1 < n_st) prefetch_stage(tab ? tab[s + 1] : stages[s + 1], pf_cap, flags & ~PF_L1);
        switch (S.op) {
        case P_EMBED: p_embed(S, token); break;
        case P_MATVEC: p_matvec(S, pxs, part, n_split, n_live, hd, eps, flags); break;
        case P_SWIGLU: p_swiglu(S, pxs, eps, flags); break;
        default:
            for (int it = blockIdx.x; it < n_head * n_live; it += gridDim.x)
                attention_rope_body(it / n_live, it % n_live, n_split, S.x, S.bias, S.q_norm, S.k_norm, cs,
                                    S.kc, S.vc, pos, part, n_head, n_kv, hd, rope_dim, neox, eps, chunk, scale);
        }
        if (s + 1 < n_st) {
            if (flags & PF_L1) prefetch_stage(tab ? tab[s + 1] : stages[s + 1], L1_PF_BYTES, flags);
            grid_barrier(count, (u32)(s + 1) * gridDim.x, flags);
        }
    }
    if (grid_exit(count, (u32)n_st * gridDim.x) && trace) trace[n_st] = stage_clock();
}
#endif

/* ---- prefill attention on the tensor cores (CUDA only) -------------------------------------- */

#if EMBER_WMMA
#include <mma.h>

#define FA_Q 64                 /* queries per block, 16 per warp */
#define FA_K 64                 /* keys per tile */
#define FA_WARPS 4
#define FA_LS (FA_K + 4)        /* row stride of a warp's scores S (floats) */
#define FA_LP (FA_K + 8)        /* row stride of a warp's probabilities P (halves) */

/* Prefill attention, flash style: grid (n_head, ceil(n_tokens / FA_Q)), FA_WARPS warps. A block
 * holds FA_Q consecutive queries of head h (positions io[0] + t) as half in shared memory and
 * walks the keys 0..its last position in tiles of FA_K: the K and V tiles are loaded once into
 * shared memory for the whole block, then each warp takes its 16 query rows through
 *   S = Q K^T (wmma, f32 accumulate) -> online softmax on S (two lanes a row: max, rescale of
 *   the running output O, probabilities P as half) -> O += P V (wmma).
 * O lives in shared memory as f32 (the accumulator fragments' layout is opaque, so the
 * per-row rescale is done on the stored copy). head_dim must be a multiple of 16; dynamic
 * shared memory is fa_smem_bytes(hd) in plugins/cuda.py:
 *   Q, K, V (FA_Q|FA_K, hd + 8) half + FA_WARPS x [S (16, FA_LS) f32, P (16, FA_LP) half,
 *   O (16, hd + 4) f32]; every part's size is a multiple of 128 bytes, so every fragment
 *   pointer is 32-byte aligned as wmma requires. */
extern "C" __global__ void __launch_bounds__(FA_WARPS * WARP) attention_flash(
        const float *qkv, int ld, const __half *k_cache, const __half *v_cache, const int *io,
        float *out, int ld_out, int n_tok, int n_head, int n_kv, int hd, float scale) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    const int lh = hd + 8, lo = hd + 4;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    __half *Qs = (__half *)fa_smem;
    __half *Ks = Qs + FA_Q * lh;
    __half *Vs = Ks + FA_K * lh;
    float *S = (float *)(Vs + FA_K * lh) + warp * 16 * FA_LS;
    __half *P = (__half *)((float *)(Vs + FA_K * lh) + FA_WARPS * 16 * FA_LS) + warp * 16 * FA_LP;
    float *O = (float *)((__half *)((float *)(Vs + FA_K * lh) + FA_WARPS * 16 * FA_LS) + FA_WARPS * 16 * FA_LP)
               + warp * 16 * lo;
    const int h = blockIdx.x, t0 = blockIdx.y * FA_Q, p0 = io[0];
    const int kv_dim = n_kv * hd, kvh = h / (n_head / n_kv);
    const __half *kc = k_cache + kvh * hd, *vc = v_cache + kvh * hd;
    const int key_end = p0 + min(t0 + FA_Q, n_tok) - 1;            /* the block's last key */
    const int warp_end = p0 + min(t0 + 16 * warp + 15, n_tok - 1);  /* this warp's last key */
    for (int i = threadIdx.x; i < FA_Q * hd; i += FA_WARPS * WARP) {
        const int r = i / hd, c = i % hd, t = t0 + r;
        Qs[r * lh + c] = __float2half(t < n_tok ? qkv[(i64)t * ld + h * hd + c] * scale : 0.0f);
    }
    for (int i = lane; i < 16 * lo; i += WARP) O[i] = 0.0f;
    /* lanes 2r and 2r+1 own row r of the warp's 16: keys [half * FA_K/2, +FA_K/2) of each tile,
     * output columns [half * hd/2, +hd/2) */
    const int r = lane >> 1, hf = lane & 1, t = t0 + 16 * warp + r, qpos = p0 + t;
    const bool row_ok = t < n_tok;
    float m = NEG_BIG, l = 0.0f;
    for (int k0 = 0; k0 <= key_end; k0 += FA_K) {
        __syncthreads();                     /* the last tile is consumed (and Q, O are ready) */
        const int nv = hd / 8;               /* 16-byte pieces a row */
        for (int i = threadIdx.x; i < FA_K * nv; i += FA_WARPS * WARP) {
            const int kr = i / nv, c = 8 * (i % nv), key = k0 + kr;
            uint4 kq = make_uint4(0u, 0u, 0u, 0u), vq = kq;
            if (key <= key_end) {            /* rows past the block's keys: zeros, never NaN */
                kq = *(const uint4 *)(kc + (i64)key * kv_dim + c);
                vq = *(const uint4 *)(vc + (i64)key * kv_dim + c);
            }
            *(uint4 *)(Ks + kr * lh + c) = kq;
            *(uint4 *)(Vs + kr * lh + c) = vq;
        }
        __syncthreads();
        if (k0 > warp_end) continue;         /* warp-uniform: all keys of the tile are masked */
        {   /* S = Q K^T for the warp's 16 rows */
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> qa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> kb;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sc;
#pragma unroll
            for (int j = 0; j < FA_K / 16; j++) {
                wmma::fill_fragment(sc, 0.0f);
                for (int kk = 0; kk < hd / 16; kk++) {
                    wmma::load_matrix_sync(qa, Qs + 16 * warp * lh + 16 * kk, lh);
                    wmma::load_matrix_sync(kb, Ks + 16 * j * lh + 16 * kk, lh);
                    wmma::mma_sync(sc, qa, kb, sc);
                }
                wmma::store_matrix_sync(S + 16 * j, sc, FA_LS, wmma::mem_row_major);
            }
        }
        SYNCWARP();
        {   /* online softmax of row r over this tile; P = exp(S - m) as half */
            const float *srow = S + r * FA_LS + hf * (FA_K / 2);
            const int key0 = k0 + hf * (FA_K / 2);
            float mx = NEG_BIG;
#pragma unroll 8
            for (int c = 0; c < FA_K / 2; c++)
                if (row_ok && key0 + c <= qpos) mx = fmaxf(mx, srow[c]);
            mx = fmaxf(mx, SHFL_XOR(mx, 1));
            const float mn = fmaxf(m, mx), corr = expf(m - mn);
            __half *prow = P + r * FA_LP + hf * (FA_K / 2);
            float sum = 0.0f;
#pragma unroll 8
            for (int c = 0; c < FA_K / 2; c++) {
                const __half p = __float2half(row_ok && key0 + c <= qpos ? expf(srow[c] - mn) : 0.0f);
                sum += __half2float(p);   /* the rounded p, as P V will use it */
                prow[c] = p;
            }
            l = l * corr + sum + SHFL_XOR(sum, 1);
            m = mn;
            float *orow = O + r * lo + hf * (hd / 2);
            for (int c = 0; c < hd / 2; c++) orow[c] *= corr;
        }
        SYNCWARP();
        {   /* O += P V */
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> pa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> vb;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> oc;
            for (int n = 0; n < hd / 16; n++) {
                wmma::load_matrix_sync(oc, O + 16 * n, lo, wmma::mem_row_major);
#pragma unroll
                for (int kk = 0; kk < FA_K / 16; kk++) {
                    wmma::load_matrix_sync(pa, P + 16 * kk, FA_LP);
                    wmma::load_matrix_sync(vb, Vs + 16 * kk * lh + 16 * n, lh);
                    wmma::mma_sync(oc, pa, vb, oc);
                }
                wmma::store_matrix_sync(O + 16 * n, oc, lo, wmma::mem_row_major);
            }
        }
        SYNCWARP();
    }
    if (row_ok) {
        const float inv = 1.0f / l;
        float *o = out + (i64)t * ld_out + h * hd + hf * (hd / 2);
        const float *orow = O + r * lo + hf * (hd / 2);
        for (int c = 0; c < hd / 2; c++) o[c] = orow[c] * inv;
    }
}
#endif
