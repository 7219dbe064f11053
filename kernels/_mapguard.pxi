# Bindings of kernels/c/mapguard.c: a model file truncated under its map reads
# as zeros and is counted, instead of killing the process with SIGBUS.
# Included at the end of _native.pyx.
from libc.stdint cimport uint64_t


cdef extern from "ember_mapguard.h":
    int ember_mapguard_add(const void *p, size_t n) nogil
    void ember_mapguard_remove(int slot) nogil
    uint64_t ember_mapguard_faults(int slot) nogil


cdef class MapGuard:
    """Guards one mapped buffer while open; `faults` > 0 means its file shrank under it.

    The guard holds the buffer, so the map cannot be unmapped (and its
    addresses reused by another mapping) while the handler may repair it.
    """

    cdef int slot
    cdef object _buf

    def __cinit__(self, const uint8_t[::1] buf):
        self.slot = -1
        if buf.shape[0] == 0:
            raise ValueError("nothing to guard: the buffer is empty")
        self.slot = ember_mapguard_add(&buf[0], buf.shape[0])
        if self.slot < 0:
            raise RuntimeError("no free map-guard slot (or SIGBUS handler refused); "
                               "close models that are no longer used")
        self._buf = buf

    @property
    def faults(self):
        """Pages of the buffer that faulted (read past the file's end) and now read as zeros."""
        return ember_mapguard_faults(self.slot) if self.slot >= 0 else 0

    def close(self):
        if self.slot >= 0:
            ember_mapguard_remove(self.slot)
            self.slot = -1
        self._buf = None

    def __dealloc__(self):
        if self.slot >= 0:
            ember_mapguard_remove(self.slot)
