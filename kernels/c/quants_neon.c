/* NEON quantized kernels (placeholder table: falls back to generic). */
#include "quants_internal.h"

#if defined(__aarch64__)
void ember_fill_kernels_neon(ember_type_kernels *k) { (void)k; }
#endif
