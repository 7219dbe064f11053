"""Assembles the GPU kernel source (kernels/cuda/ember_cuda.cu) for CUDA or ROCm.

Design: there is one kernel source. What differs between an NVIDIA GPU
(NVRTC through CuPy) and an AMD one (hipRTC through CuPy's ROCm build, or
hipcc) is a handful of macros, prepended here: EMBER_HIP, the warp width
WARP (32 lanes on NVIDIA; 64 on AMD's wave64 GCN/CDNA parts, 32 on RDNA's
wave32), the threads per block of the row kernels, the widest attention
head, and EMBER_WMMA: whether the tensor-core prefill attention (CUDA's
<mma.h>, which hipRTC lacks) is compiled in. A CUDA build whose compiler
cannot find <mma.h> is retried without it (plugins/cuda.py), and the
prefill then uses the portable attention kernel. Nothing here needs a GPU, so CI checks the assembly and, where hipcc
is installed, compiles the ROCm variant (tests/plugins/test_cuda.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ember.formats.errors import UserError

SOURCE_PATH = Path(__file__).with_name("cuda") / "ember_cuda.cu"
PLATFORMS = ("cuda", "hip")
HD_MAX = 256            # widest head: llama/qwen use 64..128, gemma-style heads 256
BLOCK_WARPS = {32: 8, 64: 4}   # 256 threads either way
# weight types with native kernels; the suffix of matvec_<t>, matvec_swiglu_<t>, dequant_<t>
TYPES = ("q4_0", "q8_0", "q4_k", "q6_k", "f16", "f32")
TYPED_MACROS = ("EMBER_TYPED", "EMBER_TYPED_I8")   # the source's per-type kernel macros
ROW_KERNELS = ("rmsnorm", "swiglu", "to_half", "rope_kv", "attention", "attention_rope", "attention_rows")
WMMA_KERNELS = ("attention_flash",)     # only where EMBER_WMMA is 1
PERSISTENT_KERNELS = ("decode_persistent",)   # CUDA only (inline PTX barrier and L2 prefetch)


class SourceError(UserError, ValueError):
    """An unknown platform or an impossible warp width."""


@dataclass(frozen=True)
class Variant:
    platform: str   # "cuda" | "hip"
    warp: int       # lanes per warp / wavefront
    block: int      # threads per block of the row kernels
    wmma: bool = False   # tensor-core prefill attention (CUDA only)

    @property
    def macros(self) -> dict[str, int]:
        return {"EMBER_HIP": int(self.platform == "hip"), "WARP": self.warp,
                "BLOCK": self.block, "HD_MAX": HD_MAX, "EMBER_WMMA": int(self.wmma)}


def variant(platform: str = "cuda", warp: int | None = None, wmma: bool | None = None) -> Variant:
    """The macro set for a platform; warp defaults to 32 on CUDA, 64 on HIP (wave64); the
    tensor-core kernels default on for CUDA and are refused on HIP."""
    if platform not in PLATFORMS:
        raise SourceError(f"unknown GPU platform {platform!r} (known: {', '.join(PLATFORMS)})")
    warp = warp or (64 if platform == "hip" else 32)
    if warp not in BLOCK_WARPS or (platform == "cuda" and warp != 32):
        raise SourceError(f"warp width {warp} is not possible on {platform}")
    if wmma and platform != "cuda":
        raise SourceError(f"the wmma kernels need CUDA, not {platform}")
    return Variant(platform, warp, warp * BLOCK_WARPS[warp], platform == "cuda" if wmma is None else wmma)


# ---------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------

def raw_source() -> str:
    return SOURCE_PATH.read_text()


def source(v: Variant) -> str:
    """The compilable text: the variant's #defines, then the kernel file."""
    head = "".join(f"#define {k} {val}\n" for k, val in v.macros.items())
    return f"/* ember kernels for {v.platform}, warp {v.warp} */\n{head}#line 1 \"ember_cuda.cu\"\n{raw_source()}"


def kernel_names(v: Variant | None = None) -> list[str]:
    """Every extern "C" kernel the source defines, by name (for variant v: those compiled
    into it; without v: all of them)."""
    text = raw_source()
    names = re.findall(r'^extern "C" __global__ void(?: __launch_bounds__\([\w *,]+\))? (?!__launch_bounds__)(\w+)\(', text, flags=re.M)
    for macro in TYPED_MACROS:      # the per-type kernels: each macro's stems x the types it is used for
        typed = re.findall(rf"^{macro}\((\w+),", text, flags=re.M)
        body = re.search(rf"#define {macro}\(NAME, Q\)(.*?)\n\n", text, flags=re.S).group(1)
        stems = re.findall(r"void __launch_bounds__\([\w, ]+\) (\w+)##NAME", body)
        names += [s + t for t in typed for s in stems]
    names = sorted(names)
    if v is not None and not v.wmma:
        names = [n for n in names if n not in WMMA_KERNELS]
    if v is not None and v.platform != "cuda":
        names = [n for n in names if n not in PERSISTENT_KERNELS]
    return names


def compile_options(v: Variant, include: str | None = None) -> tuple[str, ...]:
    """NVRTC / hipRTC options (C++17: `if constexpr` on the unit decoders' constant RUN);
    include: the CUDA toolkit's include folder, where <mma.h> lives for the wmma kernels."""
    if v.platform == "hip":
        return ("-std=c++17", "-O3")
    return ("--std=c++17",) + ((f"-I{include}",) if include and v.wmma else ())
