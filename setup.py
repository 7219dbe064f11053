"""Cython extensions. Everything else about the package lives in pyproject.toml."""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# -ffp-contract=off: dequantization must round like the numpy reference (no fused
# multiply-adds in scalar code); SIMD kernels call their FMAs explicitly.
C_FLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-ffp-contract=off"]


def native_extension():
    # Per-ISA sources are compiled with their own target attributes inside the
    # C files (__attribute__((target(...)))), so one binary serves every x86
    # CPU and dispatch happens at import, not at build time.
    sources = ["kernels/_native.pyx"] + sorted(
        os.path.join("kernels/c", f) for f in os.listdir("kernels/c") if f.endswith(".c")
    )
    return Extension(
        "ember.kernels._native",
        sources=sources,
        include_dirs=["kernels/c", numpy.get_include()],
        # headers: a change to a block layout or kernel signature rebuilds everything
        depends=sorted(os.path.join("kernels/c", f) for f in os.listdir("kernels/c") if f.endswith(".h")),
        extra_compile_args=C_FLAGS,
    )


def tokenize_extension():
    # formats/_tokenize.pyx: the byte-level BPE merge loop over token ids (tokenizer owner).
    # Optional at run time: ember.formats.tokenizer_models falls back to Python without it.
    return Extension("ember.formats._tokenize", sources=["formats/_tokenize.pyx"],
                     extra_compile_args=["-O3"])


setup(ext_modules=cythonize([native_extension(), tokenize_extension()], language_level=3))
