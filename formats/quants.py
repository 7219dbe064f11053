"""GGML quantization block layouts: one table, numpy reference codecs.

Every quant type stores a tensor row as a run of fixed-size blocks. BLOCKS is
the single source of truth for (elements per block, bytes per block); the C
structs in kernels/c assert the same sizes and a test checks the two agree.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

# GGML type id -> name, for every type a GGUF file may name. Only the types in
# BLOCKS can be read; the rest are known so that errors can name them.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}
GGML_TYPE_IDS: dict[str, int] = {name: i for i, name in GGML_TYPE_NAMES.items()}

QK_K = 256  # super-block size of the K-quants

# name -> (elements per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "F64": (1, 8),
    "I8": (1, 1),
    "I16": (1, 2),
    "I32": (1, 4),
    "I64": (1, 8),
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q8_1": (32, 4 + 32),
    "Q2_K": (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    "Q3_K": (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    "Q4_K": (QK_K, 2 + 2 + 12 + QK_K // 2),
    "Q5_K": (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    "Q8_K": (QK_K, 4 + QK_K + QK_K // 16 * 2),
    "IQ4_NL": (32, 2 + 16),
}


def block_size(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a readable type; KeyError otherwise."""
    return BLOCKS[type_name]


def row_bytes(type_name: str, n_elements: int) -> int:
    """Bytes that n_elements of type_name occupy (n_elements a multiple of the block)."""
    elems, nbytes = BLOCKS[type_name]
    return n_elements // elems * nbytes
