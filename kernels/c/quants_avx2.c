/* AVX2 quantized kernels (placeholder table: falls back to generic). */
#include "quants_internal.h"

#if defined(__x86_64__) || defined(__i386__)
void ember_fill_kernels_avx2(ember_type_kernels *k) { (void)k; }
#endif
