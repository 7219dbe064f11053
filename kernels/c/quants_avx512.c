/* AVX-512 quantized kernels (placeholder table: falls back to AVX2). */
#include "quants_internal.h"

#if defined(__x86_64__) || defined(__i386__)
void ember_fill_kernels_avx512(ember_type_kernels *k) { (void)k; }
#endif
