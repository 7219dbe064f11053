/* ember CPU kernels: one declaration per (op, format). Per-ISA variants share
 * these signatures; dispatch picks one at import (see kernels/dispatch.py). */
#ifndef EMBER_KERNELS_H
#define EMBER_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ---- block layouts (must agree with formats/quants.py BLOCKS) ---------- */

typedef uint16_t ember_fp16_t;

#define QK8_0 32
typedef struct {
    ember_fp16_t d;       /* scale */
    int8_t qs[QK8_0];     /* quants */
} block_q8_0;
_Static_assert(sizeof(block_q8_0) == 2 + QK8_0, "block_q8_0 size");

/* ---- dequantization ----------------------------------------------------- */

void ember_dequantize_row_q8_0(const block_q8_0 *x, float *y, int64_t k);

#endif
