"""`ember quantize IN.gguf OUT.gguf TYPE`: convert a model to another quant type.

TYPE is one of llama-quantize's names (case-insensitive): the plain types
(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the mixes (Q2_K, Q2_K_S,
Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, IQ4_NL, IQ4_XS; Q3_K, Q4_K and Q5_K are
llama.cpp's aliases of the _M mixes). A mix gives each matrix the type
llama.cpp's llama_tensor_get_type (llama-quant.cpp) gives it: attention V,
FFN down and the output matrix get more bits by layer and model shape.
`--pure` gives every matrix the mix's base type, like `llama-quantize --pure`.
1-D tensors (norms, biases) and a few special tensors are copied as they are.
A matrix whose row length does not fit its type's block takes llama.cpp's
fallback (a 256-block type steps down to a 32-block type, then F16).
Tensors are written in llama.cpp's order, metadata copied with its exact
types, `general.file_type` and `general.quantization_version` set as
llama.cpp sets them. Together, a float file converts to the very bytes
llama.cpp's quantizer writes (tests/daemon/test_cli_quantize.py runs it).

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
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ember.formats import gguf, quant_blocks
from ember.formats.errors import UserError


# ---------------------------------------------------------------------------
# llama.cpp's names (tools/quantize/quantize.cpp) and ftypes (llama.h)
# ---------------------------------------------------------------------------

# name -> (llama_ftype written to general.file_type, the mix's base type)
FTYPES = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q8_0": (7, "Q8_0"),
    "Q2_K": (10, "Q2_K"), "Q2_K_S": (21, "Q2_K"),
    "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"), "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"), "IQ4_NL": (25, "IQ4_NL"), "IQ4_XS": (30, "IQ4_XS"),
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
QUANTIZATION_VERSION = 2        # GGML_QNT_VERSION

# tensor_type_fallback: where a 256-block type does not divide a row, step down
# to a 32-block type; if that does not fit either (or the type was one), F16
ROW_FALLBACK = {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0",
                "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# tensor_allows_quantization: tensors llama.cpp never quantizes, whatever their rank
KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
) + tuple(f"time_mix_{k}.weight" for k in (
    "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
    "decay_w1", "decay_w2", "lerp_fused"))
KEEP_NAMES = ("position_embd.weight", "token_types.weight")

FLOAT_SOURCES = ("F32", "F16", "BF16")   # anything else is requantization
INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # data, not weights: never converted


def parse_type(name: str) -> str:
    """A llama-quantize type name, any case -> its canonical FTYPES key; UserError otherwise."""
    wanted = ALIASES.get(name.upper(), name.upper())
    if wanted not in FTYPES:
        valid = ", ".join(list(FTYPES) + list(ALIASES))
        raise UserError(f"unknown quant type {name!r}; valid types: {valid}")
    return wanted


# ---------------------------------------------------------------------------
# llama.cpp's per-tensor type choice (llama-quant.cpp: llama_tensor_get_type)
# ---------------------------------------------------------------------------

def _n_dims(shape) -> int:
    """ggml_n_dims: rank without trailing ne of 1 (numpy's leading 1s), at least 1."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def allows_quantization(t: gguf.GGUFTensor) -> bool:
    """tensor_allows_quantization with llama-quantize's defaults."""
    return (_n_dims(t.shape) >= 2 and t.name.endswith("weight") and t.name not in KEEP_NAMES
            and not any(s in t.name for s in KEEP_SUBSTRINGS))


def category(name: str) -> str:
    """tensor_get_category: the first matching role, by substring as in llama.cpp."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for role in ("attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{role}.weight" in name:
            return role
    for role in ("ffn_up", "ffn_gate", "ffn_down"):
        if role in name:
            return role
    return "other"


ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")   # category_is_attn_v
# the loaders that call a model LLM_TYPE_70B, by block count (llama: only with GQA,
# an 80-layer llama without it is the 65B); the attn_v rule below keys on it
LAYERS_70B = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class MixState:
    """quantize_state_impl: model facts plus the per-role counters, which advance
    in llama.cpp's tensor order as each role's tensors get their types."""
    arch: str
    n_layer: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    tied_embeddings: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0

    @classmethod
    def of(cls, src: gguf.GGUFFile) -> "MixState":
        md = src.metadata
        arch = str(md.get("general.architecture", ""))

        def first(key, default=0):
            v = md.get(f"{arch}.{key}", default)
            return int(v[0] if isinstance(v, (list, tuple, np.ndarray)) else v)

        n_head = first("attention.head_count")
        n_head_kv = first("attention.head_count_kv", n_head)
        n_layer = first("block_count")
        return cls(arch=arch, n_layer=n_layer, n_gqa=n_head // n_head_kv if n_head_kv else 0,
                   n_expert=first("expert_count"),
                   is_70b=LAYERS_70B.get(arch) == n_layer and (arch != "llama" or n_head != n_head_kv),
                   tied_embeddings="output.weight" not in src.tensors,
                   n_attention_wv=sum(category(n) in ATTN_V_LIKE for n in src.tensors))

    def layer(self, counter: int, name: str) -> tuple[int, int]:
        """layer_info: the counter, or with experts the layer in the name."""
        if self.n_expert > 1:
            m = re.match(r"blk\.(\d+)\.", name)
            if not m or not 0 <= int(m.group(1)) < self.n_layer:
                raise UserError(f"tensor {name!r}: cannot tell its layer (of {self.n_layer})")
            return int(m.group(1)), self.n_layer
        return counter, self.n_layer


def mix_type(st: MixState, t: gguf.GGUFTensor, ftype: str, new: str) -> str:
    """llama_tensor_get_type_impl for the mixes ember offers (no imatrix, no overrides)."""
    cat, falcon = category(t.name), st.arch == "falcon"
    if cat == "output" or (st.tied_embeddings and cat == "token_embd"):
        if falcon or t.shape[-1] % quant_blocks.BLOCKS[new][0]:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat in ATTN_V_LIKE:
        i = st.i_attention_wv
        if ftype == "Q2_K":
            new = "Q4_K" if st.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q2_K_S" and st.n_gqa >= 4:
            new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and st.n_gqa >= 4:
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, st.n_attention_wv):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if st.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"       # 8 heads share attn_v: more bits cost little
        if st.n_expert == 8:
            new = "Q8_0"
        st.i_attention_wv += 1
    elif cat == "attn_k":
        if st.n_expert == 8:
            new = "Q8_0"
    elif cat == "ffn_down":
        i, n = st.layer(st.i_ffn_down, t.name)
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q2_K_S":
            if i < n // 8:
                new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = ("Q5_K" if i < n // 16 else
                   "Q4_K" if not falcon or use_more_bits(i, n) else "Q3_K")
        elif ftype == "Q3_K_L":
            new = "Q4_K" if falcon else "Q5_K"
        elif ftype == "Q4_K_M":
            if falcon:
                new = "Q6_K" if i < n // 16 else "Q5_K" if use_more_bits(i, n) else "Q4_K"
            elif use_more_bits(i, n):
                new = "Q6_K"
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS"):
            new = "Q5_K"
        elif ftype == "Q5_K_M" and use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and not falcon and i < n // 8:
            new = "Q5_K"
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if falcon:
            if ftype == "Q3_K_L":
                new = "Q4_K"
        elif st.n_expert == 8:
            if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                new = "Q5_K"
        else:
            new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, new)
    return new


def fallback(t: gguf.GGUFTensor, new: str) -> str:
    """tensor_type_fallback: a type whose block does not divide the row steps down."""
    row = t.shape[-1]
    if row % quant_blocks.BLOCKS[new][0]:
        new = ROW_FALLBACK.get(new, new)
        if row % quant_blocks.BLOCKS[new][0]:
            new = "F16"
    return new


def plan(src: gguf.GGUFFile, ftype: str, pure: bool = False) -> dict[str, str | None]:
    """Every tensor in llama.cpp's order -> the type it becomes, or None to copy it."""
    base = FTYPES[ftype][1]
    st = MixState.of(src)
    out = {}
    for name in llama_order(src.tensors):
        t = src.tensors[name]
        new = t.type
        if allows_quantization(t) and t.type not in INTEGER_TYPES:
            new = base
            if base not in FLOAT_SOURCES:          # ggml_is_quantized(default_type)
                if not pure:
                    new = mix_type(st, t, ftype, new)
                new = fallback(t, new)
        out[name] = None if new == t.type else new
    return out


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
    parser.add_argument("type", metavar="TYPE",
                        help="llama-quantize's type names, any case: a plain type (Q8_0, Q4_0, F16, ...) "
                             "or a mix (Q4_K_M, Q5_K_S, Q3_K_L, Q2_K, Q6_K, IQ4_XS, ...)")
    parser.add_argument("--pure", action="store_true",
                        help="every matrix gets the mix's base type (llama-quantize --pure)")
    parser.add_argument("--allow-requantize", action="store_true",
                        help="allow converting tensors that are already quantized (loses quality)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def run(args) -> int:
    ftype = parse_type(args.type)
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise UserError("OUT.gguf is the input file; write to another path")
    with gguf.open(args.input) as src:
        types = plan(src, ftype, pure=args.pure)
        _check_requantize(src, types, args.allow_requantize)
        with tqdm(total=len(types), unit="tensor", file=sys.stderr, dynamic_ncols=True,
                  disable=True if args.quiet else None) as bar:   # None: off when not a TTY
            tensors = {name: _lazy(src.tensors[name], new, bar) for name, new in types.items()}
            metadata, kinds = _metadata(src, ftype)
            gguf.write(args.output, metadata, tensors, types=kinds, version=3)
        os.chmod(args.output, 0o444)      # emberd maps models: read-only, like `ember pull`'s
        before = sum(t.nbytes for t in src.tensors.values())
    with gguf.open(args.output) as out:   # re-read: the result passes the validating reader
        after = sum(t.nbytes for t in out.tensors.values())
    changed = sum(new is not None for new in types.values())
    print(f"{args.output}: {ftype}{' (pure)' if args.pure else ''}, {changed} of {len(types)} "
          f"tensors converted, {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
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
        return quant_blocks.quantize(new, x)           # (..., row bytes) uint8
    return gguf.TensorData(new or t.type, t.shape, produce)


def _metadata(src: gguf.GGUFFile, ftype: str) -> tuple[dict, dict]:
    """Source metadata with exact types; the two keys llama.cpp sets move to the end, as there."""
    md, types = dict(src.metadata), dict(src.metadata_types)
    for key in ("general.quantization_version", "general.file_type",
                "split.no", "split.count", "split.tensors.count"):   # the output is one file
        if key in md:
            del md[key], types[key]
    md["general.quantization_version"] = QUANTIZATION_VERSION
    types["general.quantization_version"] = gguf.UINT32
    md["general.file_type"], types["general.file_type"] = FTYPES[ftype][0], gguf.UINT32
    return md, types
