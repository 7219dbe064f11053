"""ember's CUDA kernels run on the CPU, for the kernel tests where no GPU is.

cuda_emu.h turns the kernel source into plain C++ (g++ with the CUDA toolkit's headers, for
the vector and half types): a block's threads become fibers switched at barriers, blocks run
one after another. This module builds it into a shared library and offers the few CuPy calls
the kernel tests make (asarray / zeros / full, an array's .data.ptr and .get(), a module's
get_function, a kernel called with grid, block, args, shared_mem), on numpy arrays. It checks
what the kernels compute, not how fast or how they schedule: a race or a missing fence on a
GPU is invisible here, which is why the GPU tests stay.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ember.kernels import cuda_source

HEADER = Path(__file__).with_name("cuda_emu.h")


def cuda_include() -> str | None:
    """A CUDA toolkit include folder g++ can use (crt/host_defines.h and cuda_fp16.h), or None."""
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if nvcc := shutil.which("nvcc"):
        roots.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "crt" / "host_defines.h").is_file() and (inc / "cuda_fp16.h").is_file():
            return str(inc)
    return None


def unavailable() -> str | None:
    """Why the emulator cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if cuda_include() is None:
        return "no CUDA toolkit headers (crt/host_defines.h, cuda_fp16.h) for g++"
    return None


def _registry(names: list[str]) -> str:
    """emu_launch(name, ...): each kernel called with its arguments unpacked from void *[]."""
    entries = ",\n".join(f'    {{"{n}", [](void **a) {{ call(&{n}, a); }}}}' for n in names)
    return f"""
#include <utility>
template <class... A, size_t... I>
static void call_impl(void (*f)(A...), void **a, std::index_sequence<I...>) {{
    f(*(std::remove_cv_t<std::remove_reference_t<A>> *)a[I]...);
}}
template <class... A> static void call(void (*f)(A...), void **a) {{ call_impl(f, a, std::index_sequence_for<A...>{{}}); }}
struct EmuLaunch {{ void (*fn)(void **); void **args; }};
static void emu_body(void *p) {{ EmuLaunch *l = (EmuLaunch *)p; l->fn(l->args); }}
static const std::pair<const char *, void (*)(void **)> EMU_KERNELS[] = {{
{entries}
}};
extern "C" int emu_launch(const char *name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          size_t smem, void **args) {{
    for (const auto &k : EMU_KERNELS) {{
        if (std::strcmp(k.first, name)) continue;
        std::vector<float4> buf(smem / 16 + 1);
        EmuLaunch l{{k.second, args}};
        for (unsigned z = 0; z < gz; z++)
            for (unsigned y = 0; y < gy; y++)
                for (unsigned x = 0; x < gx; x++)
                    emu::run_block(make_uint3(x, y, z), make_uint3(bx, 1, 1), make_uint3(gx, gy, gz), WARP,
                                   (char *)buf.data(), emu_body, &l);
        return 0;
    }}
    return 1;
}}
"""


def build(folder: Path, platform: str = "cuda") -> "Module":
    """Compile a variant of the source for the CPU into folder: CUDA's (warp 32, no
    tensor-core kernels) or ROCm's (wave64, the HIP intrinsics; <hip/hip_fp16.h> stands in
    as CUDA's half type, the same IEEE binary16)."""
    v = cuda_source.variant(platform, wmma=False)
    (folder / "hip").mkdir(exist_ok=True)
    (folder / "hip" / "hip_fp16.h").write_text("#include <cuda_fp16.h>\n")
    text = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];",
                  r"\1 *\2 = (\1 *)emu::B->smem;", cuda_source.source(v))
    names = cuda_source.kernel_names(v)
    src = folder / "ember_emu.cpp"
    src.write_text('#include "cuda_emu.h"\n' + text + _registry(names))
    lib = folder / "ember_emu.so"
    r = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-D__HIPCC_RTC__",
                        f"-I{cuda_include()}", f"-I{HEADER.parent}", f"-I{folder}", str(src), "-o", str(lib)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{r.stderr[-4000:]}")
    return Module(ctypes.CDLL(str(lib)), v)


# ---------------------------------------------------------------------------
# The CuPy calls the kernel tests make, on numpy
# ---------------------------------------------------------------------------

class _Data:
    def __init__(self, a: np.ndarray):
        self.ptr = a.ctypes.data


class Array:
    """A "device" array: a numpy array the kernels read and write in place."""

    def __init__(self, a: np.ndarray):
        self.a = np.ascontiguousarray(a)
        self.data = _Data(self.a)

    def get(self) -> np.ndarray:
        return self.a.copy()


class Numpy:
    """The cp.* functions the tests call."""
    float16, float32 = np.float16, np.float32

    @staticmethod
    def asarray(a) -> Array:
        return Array(np.array(a, copy=True))

    @staticmethod
    def zeros(shape, dtype) -> Array:
        return Array(np.zeros(shape, dtype))

    @staticmethod
    def full(shape, value, dtype) -> Array:
        return Array(np.full(shape, value, dtype))


def _c_arg(a):
    """An argument as CuPy would pass it: arrays as their address, numpy scalars as they are."""
    if isinstance(a, Array):
        return np.array(a.data.ptr, np.uint64)
    if a is None:
        return np.array(0, np.uint64)
    if isinstance(a, np.generic):
        return np.array(a)
    raise TypeError(f"pass kernel arguments as numpy scalars or arrays, not {type(a).__name__}")


class Kernel:
    def __init__(self, lib, name: str):
        self.lib, self.name = lib, name
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        grid = tuple(grid) + (1,) * (3 - len(grid))
        vals = [_c_arg(a) for a in args]                    # kept alive through the call
        ptrs = (ctypes.c_void_p * len(vals))(*[v.ctypes.data for v in vals])
        rc = self.lib.emu_launch(self.name.encode(), *[ctypes.c_uint(g) for g in grid], ctypes.c_uint(block[0]),
                                 ctypes.c_size_t(shared_mem), ptrs)
        assert rc == 0, f"no kernel {self.name} in the emulator"


class Module:
    def __init__(self, lib, variant):
        self.lib, self.variant = lib, variant

    def get_function(self, name: str) -> Kernel:
        return Kernel(self.lib, name)
