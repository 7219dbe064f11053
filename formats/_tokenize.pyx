# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""BPE merging over token ids, in C: the hot loop of tokenizer_models' BpeModel and SpmModel.

Same algorithm as tokenizer_models.bpe_merge (a linked list of symbols and a
binary heap of candidate pairs ordered by (rank, left position)), but every
symbol is a token id, so a pair's rank is one probe in an open-addressing
table keyed by (left id, right id) instead of building strings and hashing
them. That needs every symbol to be a token: every byte's stand-in character
and every merge's result. formats/tokenizer_vocab.py checks both at load
and uses the pure-Python loop otherwise (and wherever this module is not
built), so results never depend on which path ran.

SentencePiece merges fit the same loop: a pair (left, right) may merge when
left+right is a token, best score first; ranking the scores densely (equal
scores, equal rank) turns "best score, then leftmost" into "lowest rank, then
leftmost". Symbols there are tokens or single characters, which get ids too.

A stale heap entry is recognised by the ids it was queued with: a symbol
only changes by absorbing its right neighbour (which then dies), so
"both ends still hold the queued ids" is exactly llama.cpp's test that the
pair's text is unchanged.
"""
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

cdef uint64_t EMPTY = 0xFFFFFFFFFFFFFFFFULL


cdef struct Entry:      # one candidate pair in the heap
    int32_t rank
    int32_t left        # symbol positions
    int32_t right
    int32_t ltok        # token ids at push time
    int32_t rtok
    int32_t merged      # id of the merge result


cdef inline bint entry_less(Entry* a, Entry* b) noexcept nogil:
    return a.rank < b.rank or (a.rank == b.rank and a.left < b.left)


cdef inline void heap_push(Entry* heap, Py_ssize_t* n, Entry e) noexcept nogil:
    cdef Py_ssize_t i = n[0], parent
    n[0] += 1
    while i > 0:
        parent = (i - 1) >> 1
        if not entry_less(&e, &heap[parent]):
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = e


cdef inline Entry heap_pop(Entry* heap, Py_ssize_t* n) noexcept nogil:
    cdef Entry top = heap[0], last
    cdef Py_ssize_t i = 0, child, size
    n[0] -= 1
    size = n[0]
    if size == 0:
        return top
    last = heap[size]
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and entry_less(&heap[child + 1], &heap[child]):
            child += 1
        if not entry_less(&heap[child], &last):
            break
        heap[i] = heap[child]
        i = child
    heap[i] = last
    return top


cdef class PairTable:
    """(left id, right id) -> (rank, merged id); the first occurrence of a pair keeps its rank."""
    cdef uint64_t* keys      # (capacity,) EMPTY or (left << 32 | right)
    cdef int32_t* ranks      # (capacity,)
    cdef int32_t* merged     # (capacity,)
    cdef uint64_t mask
    cdef int shift

    def __cinit__(self, const int32_t[::1] left, const int32_t[::1] right, const int32_t[::1] merged,
                  const int32_t[::1] ranks=None):
        """One entry per pair; its rank is `ranks[i]`, or its position i when ranks is None
        (BPE: the merge list's order). Lower rank merges first, ties leftmost."""
        cdef Py_ssize_t n = left.shape[0], i
        cdef uint64_t cap = 16
        self.shift = 60
        if right.shape[0] != n or merged.shape[0] != n or (ranks is not None and ranks.shape[0] != n):
            raise ValueError("left, right, merged (and ranks) must have the same length")
        while cap < <uint64_t>(2 * n + 2):     # load factor <= 1/2
            cap <<= 1
            self.shift -= 1
        self.mask = cap - 1
        self.keys = <uint64_t*> malloc(cap * sizeof(uint64_t))
        self.ranks = <int32_t*> malloc(cap * sizeof(int32_t))
        self.merged = <int32_t*> malloc(cap * sizeof(int32_t))
        if not self.keys or not self.ranks or not self.merged:
            raise MemoryError()
        for i in range(<Py_ssize_t> cap):
            self.keys[i] = EMPTY
        for i in range(n):
            self._insert((<uint64_t> <uint32_t> left[i] << 32) | <uint32_t> right[i],
                         <int32_t> i if ranks is None else ranks[i], merged[i])

    def __dealloc__(self):
        free(self.keys)
        free(self.ranks)
        free(self.merged)

    cdef inline uint64_t _slot(self, uint64_t key) noexcept nogil:
        return (key * 0x9E3779B97F4A7C15ULL) >> self.shift

    cdef void _insert(self, uint64_t key, int32_t rank, int32_t merged) noexcept nogil:
        cdef uint64_t s = self._slot(key)
        while self.keys[s] != EMPTY:
            if self.keys[s] == key:
                return
            s = (s + 1) & self.mask
        self.keys[s] = key
        self.ranks[s] = rank
        self.merged[s] = merged

    cdef inline bint find(self, int32_t a, int32_t b, int32_t* rank, int32_t* merged) noexcept nogil:
        cdef uint64_t key = (<uint64_t> <uint32_t> a << 32) | <uint32_t> b
        cdef uint64_t s = self._slot(key)
        while self.keys[s] != EMPTY:
            if self.keys[s] == key:
                rank[0] = self.ranks[s]
                merged[0] = self.merged[s]
                return True
            s = (s + 1) & self.mask
        return False

    def merge(self, const int32_t[::1] ids):
        """Token ids of the initial symbols -> token ids after all merges (a list)."""
        cdef Py_ssize_t n = ids.shape[0], i
        if n < 2:
            return [ids[i] for i in range(n)]
        cdef int32_t* sym = <int32_t*> malloc(n * sizeof(int32_t))
        cdef int32_t* nxt = <int32_t*> malloc(n * sizeof(int32_t))
        cdef int32_t* prv = <int32_t*> malloc(n * sizeof(int32_t))
        # pushes <= (n-1 seeds) + 2 per merge, and every merge pops one: size <= n-1 + merges < 2n
        cdef Entry* heap = <Entry*> malloc(2 * n * sizeof(Entry))
        if not sym or not nxt or not prv or not heap:
            free(sym); free(nxt); free(prv); free(heap)
            raise MemoryError()
        try:
            with nogil:
                self._run(ids, n, sym, nxt, prv, heap)
            out = []
            i = 0
            while i != -1:
                out.append(sym[i])
                i = nxt[i]
            return out
        finally:
            free(sym); free(nxt); free(prv); free(heap)

    cdef void _run(self, const int32_t[::1] ids, Py_ssize_t n, int32_t* sym, int32_t* nxt,
                   int32_t* prv, Entry* heap) noexcept nogil:
        cdef Py_ssize_t i, n_heap = 0
        cdef Entry e
        cdef int32_t rank, merged, left, right, r2, l0
        for i in range(n):
            sym[i] = ids[i]
            nxt[i] = <int32_t> (i + 1) if i + 1 < n else -1
            prv[i] = <int32_t> (i - 1)
        for i in range(n - 1):
            if self.find(sym[i], sym[i + 1], &rank, &merged):
                e.rank, e.left, e.right, e.ltok, e.rtok, e.merged = rank, <int32_t> i, <int32_t> (i + 1), sym[i], sym[i + 1], merged
                heap_push(heap, &n_heap, e)
        while n_heap > 0:
            e = heap_pop(heap, &n_heap)
            left, right = e.left, e.right
            if sym[left] != e.ltok or sym[right] != e.rtok:
                continue    # outdated pair (a dead symbol holds -1)
            sym[left] = e.merged
            sym[right] = -1
            r2 = nxt[right]
            nxt[left] = r2
            if r2 >= 0:
                prv[r2] = left
                if self.find(e.merged, sym[r2], &rank, &merged):
                    e.rank, e.left, e.right, e.ltok, e.rtok, e.merged = rank, left, r2, sym[left], sym[r2], merged
                    heap_push(heap, &n_heap, e)
            l0 = prv[left]
            if l0 >= 0:
                if self.find(sym[l0], sym[left], &rank, &merged):
                    e.rank, e.left, e.right, e.ltok, e.rtok, e.merged = rank, l0, left, sym[l0], sym[left], merged
                    heap_push(heap, &n_heap, e)
