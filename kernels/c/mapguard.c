/* mapguard.c: a model file truncated under its read-only map must not kill the process.
 *
 * Touching a mapped page past the new end of a truncated file raises SIGBUS,
 * which no Python code can catch, and the touch happens deep inside the C
 * forward pass, often on a pool thread. Unwinding with siglongjmp would only
 * work on the thread that called in (the pool's workers have no frame to jump
 * to) and would leave the pool's barriers half-passed. Instead the handler
 * repairs the fault where it happens: it maps an anonymous zero page over the
 * faulting page (MAP_FIXED replaces that one page of the file mapping), counts
 * the fault against the guarded region, and returns, so the faulting load is
 * retried and reads zeros. The pass then finishes with garbage logits that
 * nobody sees: the caller checks the region's fault count after each call and
 * turns a non-zero count into a typed error (the daemon answers
 * `model_changed` and stops serving that map).
 *
 * Only addresses inside a registered region are repaired. Any other SIGBUS
 * (a real bug, another mapped file) restores the disposition that was there
 * before the first guard and returns, so the fault repeats and the previous
 * handler (Python's faulthandler, or the default: die with a core) sees it.
 *
 * The handler uses only async-signal-safe calls (mmap and sigaction are plain
 * system calls) and lock-free atomics on a fixed table of regions.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ember_mapguard.h"

typedef struct {
    _Atomic uintptr_t lo, hi;        /* [lo, hi): empty when hi == 0 */
    _Atomic uint64_t faults;         /* pages repaired in this region */
} guard_region;

static guard_region regions[EMBER_MAPGUARD_SLOTS];
static struct sigaction previous;    /* the SIGBUS disposition before the first guard */
static atomic_int installed;
static uintptr_t page_size;          /* cached: sysconf is not async-signal-safe */

/* ------------------------------------------------------------------------- */
/* The handler                                                                 */
/* ------------------------------------------------------------------------- */

static void on_sigbus(int sig, siginfo_t *si, void *uctx) {
    (void)sig; (void)uctx;
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < EMBER_MAPGUARD_SLOTS; i++) {
        uintptr_t lo = atomic_load(&regions[i].lo), hi = atomic_load(&regions[i].hi);
        if (a < lo || a >= hi)
            continue;
        void *page = (void *)(a & ~(page_size - 1));
        if (mmap(page, page_size, PROT_READ,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
            break;                   /* cannot repair: fall through to the old disposition */
        atomic_fetch_add(&regions[i].faults, 1);
        return;                      /* the load retries and reads zeros */
    }
    sigaction(SIGBUS, &previous, NULL);
}

static int install(void) {
    if (atomic_load(&installed))
        return 0;
    page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) != 0)
        return -1;
    atomic_store(&installed, 1);
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Regions                                                                     */
/* ------------------------------------------------------------------------- */

int ember_mapguard_add(const void *p, size_t n) {
    if (n == 0 || install() != 0)
        return -1;
    uintptr_t lo = (uintptr_t)p;
    for (int i = 0; i < EMBER_MAPGUARD_SLOTS; i++) {
        uintptr_t empty = 0;
        /* claim a free slot by its lo; hi published last makes it live */
        if (atomic_load(&regions[i].hi) == 0 && atomic_compare_exchange_strong(&regions[i].lo, &empty, lo)) {
            atomic_store(&regions[i].faults, 0);
            atomic_store(&regions[i].hi, lo + n);
            return i;
        }
    }
    return -1;
}

void ember_mapguard_remove(int slot) {
    if (slot < 0 || slot >= EMBER_MAPGUARD_SLOTS)
        return;
    atomic_store(&regions[slot].hi, 0);      /* dead first, then free */
    atomic_store(&regions[slot].lo, 0);
}

uint64_t ember_mapguard_faults(int slot) {
    if (slot < 0 || slot >= EMBER_MAPGUARD_SLOTS)
        return 0;
    return atomic_load(&regions[slot].faults);
}
