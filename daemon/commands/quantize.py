"""`ember quantize IN.gguf OUT.gguf TYPE`: convert a model to another quant type.

Which tensors change, and their order in the output, follow llama.cpp's
`llama-quantize --pure`: every weight matrix becomes TYPE; 1-D tensors
(norms, biases) and a few special tensors are copied as they are (F32 in
practice). A matrix whose row length does not fit TYPE's block takes
llama.cpp's fallback (a K-quant steps down to a 32-block type, then F16).
Metadata is copied with its exact types; `general.file_type` and
`general.quantization_version` are set as llama.cpp sets them. Together, an
F32 file converts to the very bytes llama.cpp's quantizer writes.

Memory: tensors are quantized one at a time while the output is written
(the writer pulls each tensor lazily), and the input stays mapped, so peak
memory is about one tensor in float32 plus its quantized bytes. The output
appears atomically when complete. A progress bar goes to stderr only when it
is a terminal.
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np
from tqdm import tqdm

from ember.formats import gguf, quant_blocks
from ember.formats.errors import UserError


# ---------------------------------------------------------------------------
# llama.cpp's rules
# ---------------------------------------------------------------------------

# target type -> llama_ftype written to general.file_type (pure K-quants map to
# their "_S" ftype, as llama.cpp labels them)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "IQ4_NL": 25,
              "BF16": 32}
QUANTIZATION_VERSION = 2        # GGML_QNT_VERSION

# llama.cpp's convert_incompatible_tensor: where a K-quant's 256-block does not
# divide a row, step down to a 32-block type; if that does not fit either, F16.
ROW_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
                "Q6_K": "Q8_0"}

# tensors llama.cpp never quantizes, whatever their rank
KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d.weight",
                   "attn_rel_b.weight")
KEEP_NAMES = ("position_embd.weight", "token_types.weight")

FLOAT_SOURCES = ("F32", "F16", "BF16")   # anything else is requantization
INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # data, not weights: never converted


def target_type(t: gguf.GGUFTensor, wanted: str) -> str | None:
    """The type tensor t becomes, or None to copy it unchanged."""
    if (len(t.shape) < 2 or not t.name.endswith("weight") or t.name in KEEP_NAMES
            or t.type in INTEGER_TYPES or any(s in t.name for s in KEEP_SUBSTRINGS)):
        return None
    row = t.shape[-1]
    new = wanted
    if row % quant_blocks.BLOCKS[new][0]:
        new = ROW_FALLBACK.get(new, "F16")
        if row % quant_blocks.BLOCKS[new][0]:
            new = "F16"
    return None if new == t.type else new


def llama_order(names) -> list[str]:
    """llama.cpp's weight_name_comparer: non-block tensors first, then by layer, then by name."""
    def key(name: str):
        m = _LAYER.match(name)
        return (int(m.group(1)) if m else -1, name)
    return sorted(names, key=key)


_LAYER = re.compile(r"blk\.([+-]?\d+)\.")


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN.gguf", help="the model to convert")
    parser.add_argument("output", metavar="OUT.gguf", help="where to write the result")
    parser.add_argument("type", metavar="TYPE", help="target quant type, e.g. Q8_0, Q4_0, Q4_K, F16")
    parser.add_argument("--allow-requantize", action="store_true",
                        help="allow converting tensors that are already quantized (loses quality)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _check_type(name: str) -> str:
    wanted = name.upper()
    if wanted not in quant_blocks.BLOCKS:
        raise UserError(f"unknown quant type {name!r}")
    try:  # one block of zeros tells whether ember can produce this type
        quant_blocks.quantize(wanted, np.zeros((1, quant_blocks.BLOCKS[wanted][0]), np.float32))
    except quant_blocks.QuantError as e:
        raise UserError(f"cannot quantize to {wanted}: {e}") from None
    return wanted


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def run(args) -> int:
    wanted = _check_type(args.type)
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise UserError("OUT.gguf is the input file; write to another path")
    with gguf.open(args.input) as src:
        plan = {name: target_type(src.tensors[name], wanted) for name in llama_order(src.tensors)}
        _check_requantize(src, plan, args.allow_requantize)
        with tqdm(total=len(plan), unit="tensor", file=sys.stderr, dynamic_ncols=True,
                  disable=True if args.quiet else None) as bar:   # None: off when not a TTY
            tensors = {name: _lazy(src.tensors[name], new, bar) for name, new in plan.items()}
            metadata, types = _metadata(src, wanted)
            gguf.write(args.output, metadata, tensors, types=types, version=3)
        os.chmod(args.output, 0o444)      # emberd maps models: read-only, like `ember pull`'s
        before = sum(t.nbytes for t in src.tensors.values())
    with gguf.open(args.output) as out:   # re-read: the result passes the validating reader
        after = sum(t.nbytes for t in out.tensors.values())
    changed = sum(new is not None for new in plan.values())
    print(f"{args.output}: {wanted}, {changed} of {len(plan)} tensors converted, "
          f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
    return 0


def _check_requantize(src: gguf.GGUFFile, plan: dict, allowed: bool) -> None:
    for name, new in plan.items():
        old = src.tensors[name].type
        if new is not None and old not in FLOAT_SOURCES and not allowed:
            raise UserError(f"tensor {name!r} is already {old}; requantizing loses quality — "
                            "pass --allow-requantize to do it anyway")


def _lazy(t: gguf.GGUFTensor, new: str | None, bar: tqdm) -> gguf.TensorData:
    """A tensor the writer produces when it gets there: copied or converted."""
    def produce():
        bar.set_postfix_str(t.name, refresh=False)
        bar.update()
        if new is None:
            return t.data                              # the mapped bytes, unchanged
        try:
            x = t.numpy()                              # (..., row) float32; F32 is a view
        except quant_blocks.QuantError as e:
            raise UserError(f"tensor {t.name!r}: cannot read {t.type} to convert it ({e})") from None
        return quant_blocks.quantize(new, x)                 # (..., row bytes) uint8
    return gguf.TensorData(new or t.type, t.shape, produce)


def _metadata(src: gguf.GGUFFile, wanted: str) -> tuple[dict, dict]:
    """Source metadata with exact types; the two keys llama.cpp sets move to the end, as there."""
    md, types = dict(src.metadata), dict(src.metadata_types)
    for key in ("general.quantization_version", "general.file_type"):
        if key in md and (key != "general.file_type" or wanted in FILE_TYPES):
            del md[key], types[key]
    md["general.quantization_version"] = QUANTIZATION_VERSION
    types["general.quantization_version"] = gguf.UINT32
    if wanted in FILE_TYPES:
        md["general.file_type"], types["general.file_type"] = FILE_TYPES[wanted], gguf.UINT32
    return md, types
