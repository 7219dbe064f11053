/* Thread pool for the decoder: the caller plus n-1 pthreads run one function
 * together (ggml-style: the whole forward pass of a token batch is ONE run),
 * and ops inside it are separated by ember_pool_barrier.
 *
 * Why this shape: a decode step is ~10 ops per layer, each a few tens of
 * microseconds on a small model, so waking threads per op (mutex + condvar,
 * ~5-50 us) would cost as much as the op. Instead a run wakes the workers
 * once, and barriers are a shared counter the threads spin on (~0.1-1 us).
 * Idle workers spin for a short while after a run (the next token usually
 * follows within microseconds of Python) and then sleep on a condvar, so an
 * idle daemon burns no CPU. Spinners yield the CPU after a while, because on
 * an oversubscribed machine the thread they wait for may be descheduled. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "ember_ops.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define IDLE_SPIN_NS   2000000LL  /* workers spin this long after a run before sleeping */
#define YIELD_AFTER    4096       /* barrier spins before each sched_yield */

/* ---- the pool -------------------------------------------------------------------- */

struct ember_pool {
    int n;                          /* threads, the caller included */
    pthread_t *threads;             /* (n - 1) workers */
    _Atomic uint64_t gen;           /* bumped once per run */
    _Atomic int n_done;             /* workers finished with the current run */
    _Atomic int bar_count;          /* threads arrived at the current barrier */
    _Atomic int bar_phase;          /* bumped when a barrier opens */
    ember_pool_fn fn;
    void *ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_sleeping;                 /* guarded by mu */
    int stop;                       /* guarded by mu */
    int ran;                        /* a run was started (its workers may be finishing) */
};

typedef struct { ember_pool *p; int ith; } worker_arg;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- waiting ------------------------------------------------------------------------ */

/* spin until gen moves past seen, or IDLE_SPIN_NS passes; returns the new gen or seen */
static uint64_t spin_for_run(ember_pool *p, uint64_t seen) {
    const int64_t deadline = now_ns() + IDLE_SPIN_NS;
    for (int i = 1;; i++) {
        uint64_t g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen) return g;
        CPU_RELAX();
        if ((i & 255) == 0 && now_ns() > deadline) return seen;
        if ((i & (YIELD_AFTER - 1)) == 0) sched_yield();
    }
}

/* block until a new run (returns 1) or stop (returns 0) */
static int wait_for_run(ember_pool *p, uint64_t *seen) {
    uint64_t g = spin_for_run(p, *seen);
    if (g == *seen) {
        pthread_mutex_lock(&p->mu);
        p->n_sleeping++;
        while (!p->stop && (g = atomic_load(&p->gen)) == *seen) pthread_cond_wait(&p->cv, &p->mu);
        p->n_sleeping--;
        int stop = p->stop;
        pthread_mutex_unlock(&p->mu);
        if (stop) return 0;
    }
    *seen = g;
    return 1;
}

static void *worker_main(void *arg) {
    worker_arg *wa = arg;
    ember_pool *p = wa->p;
    const int ith = wa->ith;
    free(wa);
    uint64_t seen = 0;
    while (wait_for_run(p, &seen)) {
        p->fn(p->ctx, ith, p->n);
        atomic_fetch_add_explicit(&p->n_done, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* ---- public API -------------------------------------------------------------------- */

ember_pool *ember_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    ember_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) { free(p); return NULL; }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) { wa->p = p; wa->ith = i; }
        if (!wa || pthread_create(&p->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            p->n = i;               /* free() joins the workers that did start */
            ember_pool_free(p);
            return NULL;
        }
    }
    return p;
}

void ember_pool_free(ember_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    /* a worker still spinning sees no new gen and goes to sleep, where stop finds it */
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i - 1], NULL);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}

int ember_pool_size(const ember_pool *p) { return p->n; }

void ember_pool_wait(ember_pool *p) {
    if (!p->ran) return;
    for (int i = 1; atomic_load_explicit(&p->n_done, memory_order_acquire) != p->n - 1; i++) {
        CPU_RELAX();
        if ((i & (YIELD_AFTER - 1)) == 0) sched_yield();
    }
}

void ember_pool_run(ember_pool *p, ember_pool_fn fn, void *ctx) {
    if (p->n == 1) { fn(ctx, 0, 1); return; }
    ember_pool_wait(p);
    p->ran = 1;
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->n_done, 0, memory_order_relaxed);
    pthread_mutex_lock(&p->mu);   /* under mu: a worker about to sleep cannot miss it */
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    if (p->n_sleeping) pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    fn(ctx, 0, p->n);
}

void ember_pool_barrier(ember_pool *p) {
    if (p->n == 1) return;
    const int phase = atomic_load_explicit(&p->bar_phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) == p->n - 1) {
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->bar_phase, 1, memory_order_release);
        return;
    }
    for (int i = 1; atomic_load_explicit(&p->bar_phase, memory_order_acquire) == phase; i++) {
        CPU_RELAX();
        if ((i & (YIELD_AFTER - 1)) == 0) sched_yield();
    }
}

/* ---- measuring the pool's own cost -------------------------------------------------- */

typedef struct { ember_pool *p; int64_t n_ops; } bench_ctx;

static void bench_barriers(void *ctx, int ith, int nth) {
    (void)ith; (void)nth;
    bench_ctx *b = ctx;
    for (int64_t i = 0; i < b->n_ops; i++) ember_pool_barrier(b->p);
}

static void bench_nothing(void *ctx, int ith, int nth) { (void)ctx; (void)ith; (void)nth; }

double ember_pool_bench_barrier(ember_pool *p, int64_t n_ops) {
    bench_ctx b = { p, n_ops };
    const int64_t t0 = now_ns();
    ember_pool_run(p, bench_barriers, &b);
    ember_pool_wait(p);
    return (double)(now_ns() - t0) * 1e-9 / (double)(n_ops > 0 ? n_ops : 1);
}

/* the machine's read bandwidth: every thread sums its slice of buf (8-byte words;
 * the compiler vectorizes the loop), so the time is the memory system's, not ours.
 * On x86 the loop is also built for the widest vectors the CPU has (an ifunc picks
 * the clone): with the baseline's 16-byte loads two threads read ~17-20 GB/s here
 * where 64-byte loads read ~21-29, and decode itself beat the smaller figure. */
typedef struct { const uint64_t *buf; size_t n; _Atomic uint64_t sink; } read_ctx;

#if defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static uint64_t sum_words(const uint64_t *p, size_t n) {
    uint64_t s[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += p[i + k];
    for (; i < n; i++) s[0] += p[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static void bench_read_slice(void *ctx, int ith, int nth) {
    read_ctx *r = ctx;
    const size_t per = r->n / (size_t)nth, i0 = per * (size_t)ith, i1 = ith == nth - 1 ? r->n : i0 + per;
    atomic_fetch_add(&r->sink, sum_words(r->buf + i0, i1 - i0));   /* keeps the loads alive */
}

double ember_pool_bench_read(ember_pool *p, const void *buf, size_t nbytes) {
    read_ctx r = { buf, nbytes / sizeof(uint64_t), 0 };
    const int64_t t0 = now_ns();
    ember_pool_run(p, bench_read_slice, &r);
    ember_pool_wait(p);
    return (double)(now_ns() - t0) * 1e-9;
}

double ember_pool_bench_run(ember_pool *p, int64_t n_runs) {
    const int64_t t0 = now_ns();
    for (int64_t i = 0; i < n_runs; i++) ember_pool_run(p, bench_nothing, NULL);
    ember_pool_wait(p);
    return (double)(now_ns() - t0) * 1e-9 / (double)(n_runs > 0 ? n_runs : 1);
}
