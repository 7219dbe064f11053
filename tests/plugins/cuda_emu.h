/* Runs ember's CUDA kernels on the CPU, for tests where no GPU is: the kernel source compiled
 * by g++ as plain C++, each block's threads run as fibers (started with makecontext, switched
 * with _setjmp/_longjmp, which skip swapcontext's signal-mask system call) that switch only at
 * barriers, so warp-synchronous code (shuffles, __syncwarp) and __syncthreads behave as on a
 * GPU for a race-free kernel. Blocks run one after another (a persistent kernel therefore
 * runs with a grid of one block: its grid barrier is then immediate). Shared memory: a
 * kernel's static __shared__ variables become function statics (one block at a time, so one
 * copy serves), its dynamic shared memory the block's buffer (emu::B->smem).
 * tests/plugins/test_cuda.py builds it with the source and calls kernels by name. */
#pragma once
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <setjmp.h>
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace emu {

struct Fiber {
    ucontext_t ctx;                   /* its start */
    jmp_buf env;                      /* where it left off */
    uint3 tid;
    bool started = false, done = false;
    const unsigned *wait = nullptr;   /* a barrier's generation this fiber waits to change */
    unsigned wait_gen = 0;
};

struct Block {
    jmp_buf sched;
    std::vector<Fiber> f;
    int cur = 0, warp = 32;
    uint3 bid, bdim, gdim;
    int live = 0, arrived = 0;        /* __syncthreads */
    unsigned gen = 0;
    std::vector<int> wlive, warrived; /* __syncwarp and the shuffles, per warp */
    std::vector<unsigned> wgen;
    std::vector<unsigned long long> xch;   /* shuffle exchange, a slot per thread */
    char *smem = nullptr;
    void (*body)(void *) = nullptr;
    void *arg = nullptr;
};

inline Block *B = nullptr;            /* the block running now */
constexpr size_t STACK = 256 << 10;   /* a fiber's stack: the kernels' local arrays fit easily */
inline std::vector<char *> stacks;    /* reused block after block (allocated once, never cleared) */

inline Fiber &me() { return B->f[B->cur]; }
inline int lin() { return (int)me().tid.x; }   /* ember's blocks are one-dimensional */

inline void yield() {
    if (!_setjmp(me().env)) _longjmp(B->sched, 1);
}

inline void wait_for(const unsigned *gen) {
    me().wait = gen;
    me().wait_gen = *gen;
    yield();
}

inline void block_barrier() {
    if (++B->arrived == B->live) { B->arrived = 0; B->gen++; return; }
    wait_for(&B->gen);
}

inline void warp_barrier() {
    const int w = lin() / B->warp;
    if (++B->warrived[w] == B->wlive[w]) { B->warrived[w] = 0; B->wgen[w]++; return; }
    wait_for(&B->wgen[w]);
}

template <class T> T exchange(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    const int t = lin(), w = t / B->warp;
    std::memcpy(&B->xch[t], &v, sizeof(T));
    warp_barrier();
    T r;
    std::memcpy(&r, &B->xch[w * B->warp + (src_lane & (B->warp - 1))], sizeof(T));
    warp_barrier();
    return r;
}

/* a finished fiber no longer counts at the barriers (as an exited thread on the GPU) */
inline void leave() {
    const int w = lin() / B->warp;
    me().done = true;
    if (--B->live > 0 && B->arrived == B->live) { B->arrived = 0; B->gen++; }
    if (--B->wlive[w] > 0 && B->warrived[w] == B->wlive[w]) { B->warrived[w] = 0; B->wgen[w]++; }
}

inline void entry() {
    B->body(B->arg);
    leave();
    _longjmp(B->sched, 1);            /* never resumed */
}

/* Run body(arg) as every thread of block bid: round robin over the fibers that can run. */
inline void run_block(uint3 bid, uint3 bdim, uint3 gdim, int warp, char *smem, void (*body)(void *), void *arg) {
    Block blk;
    const int n = (int)(bdim.x * bdim.y * bdim.z);
    blk.bid = bid; blk.bdim = bdim; blk.gdim = gdim; blk.warp = warp; blk.smem = smem;
    blk.body = body; blk.arg = arg; blk.live = n;
    blk.f.resize(n);
    const int nw = (n + warp - 1) / warp;
    blk.wlive.assign(nw, 0); blk.warrived.assign(nw, 0); blk.wgen.assign(nw, 0);
    blk.xch.assign(nw * warp, 0);
    for (int i = 0; i < n; i++) blk.wlive[i / warp]++;
    B = &blk;
    while ((int)stacks.size() < n) stacks.push_back(new char[STACK]);
    for (int i = 0; i < n; i++) {
        Fiber &f = blk.f[i];
        f.tid = make_uint3(i, 0, 0);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[i];
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, (void (*)())entry, 0);
    }
    for (int left = n; left > 0;) {
        bool ran = false;
        for (int i = 0; i < n; i++) {
            Fiber &f = blk.f[i];
            if (f.done || (f.wait && *f.wait == f.wait_gen)) continue;
            f.wait = nullptr;
            blk.cur = i;
            if (!_setjmp(blk.sched)) {
                if (f.started) _longjmp(f.env, 1);
                f.started = true;
                setcontext(&f.ctx);
            }
            ran = true;
            left -= f.done;
        }
        if (!ran) {
            std::fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u): every live thread waits at a barrier\n",
                         bid.x, bid.y, bid.z);
            std::abort();
        }
    }
    B = nullptr;
}

}  // namespace emu

/* ---- the CUDA built-ins the kernels use ------------------------------------------------- */
#define threadIdx (emu::me().tid)
#define blockIdx (emu::B->bid)
#define blockDim (emu::B->bdim)
#define gridDim (emu::B->gdim)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m, int = 32) { return emu::exchange(v, emu::lin() ^ m); }
template <class T> T __shfl_sync(unsigned, T v, int src, int = 32) { return emu::exchange(v, src); }
template <class T> T __shfl_xor(T v, int m, int = 64) { return emu::exchange(v, emu::lin() ^ m); }   /* HIP */
template <class T> T __shfl(T v, int src, int = 64) { return emu::exchange(v, src); }
#define __builtin_amdgcn_wave_barrier() emu::warp_barrier()
inline unsigned atomicAdd(unsigned *p, unsigned v) { const unsigned o = *p; *p = o + v; return o; }
inline unsigned atomicExch(unsigned *p, unsigned v) { const unsigned o = *p; *p = v; return o; }
inline void __threadfence() {}
inline void __nanosleep(unsigned) {}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <class A, class C> auto min(A a, C c) { using T = std::common_type_t<A, C>; return (T)a < (T)c ? (T)a : (T)c; }
template <class A, class C> auto max(A a, C c) { using T = std::common_type_t<A, C>; return (T)a > (T)c ? (T)a : (T)c; }
