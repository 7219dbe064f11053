"""The cuda backend: CPU-side parts everywhere, GPU parts where a GPU is.

CPU (CI): kernel source assembly and its CUDA/HIP macro variants, the step
plans (decode is graph-capturable: launches and copies only, the position
read from device memory; prefill GEMMs stay inside the scratch), the memory
plan, the probe. Where hipcc (Debian's `hipcc`) or nvcc is installed, the
assembled source is compiled for a gfx / sm target.

CPU emulation (tests/plugins/cuda_emu.py; where g++ and the CUDA toolkit's
headers are, as in CI): the same kernel source run on the CPU, a block's
threads as fibers. Each weight type's matvec (float, prefetching, int8) and
dequantize kernels and the prefill attention against numpy, and whole decoded
tokens through both decode paths (the graph's launches; the persistent kernel
as one block) against the reference backend, for CUDA's variant and ROCm's
wave64 one. What it cannot show: speed, and races or fences that only a GPU's
concurrency exposes.

GPU (skipped with the probe's reason when none): the same kernel tests on the
device, and the whole runner against the reference backend on synthetic
llama-tiny models (prefill, graph-replayed decode, the persistent kernel, no
device-memory growth). The conformance suite (test_conformance.py) holds the
backend to llama.cpp's logits.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from ember.daemon import synthetic
from ember.formats import gguf, quant_blocks
from ember.kernels import cuda_source
from ember.plugins import cuda, reference
from ember.plugins.features import features
from ember.formats.model_config import UnsupportedModel, config_from_gguf
from ember.plugins.types import ContextOverflow, Probe
from tests.conftest import (CONFORMANCE, assert_matches_oracle, conformance_cases, conformance_path, kl_rows,
                            oracle_params)
from tests.plugins import cuda_emu

PROBE = cuda.probe()
gpu = pytest.mark.skipif(not PROBE.available, reason=f"no GPU: {PROBE.reason}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """quant -> path of a synthetic llama-tiny model (dim 256, 2 layers, vocab 1024)."""
    d = tmp_path_factory.mktemp("cuda-models")
    paths = {}

    def get(quant: str):
        if quant not in paths:
            paths[quant] = synthetic.write_model("llama-tiny", quant, d / f"tiny-{quant}.gguf")
        return paths[quant]
    return get


def _config(path):
    with gguf.open(path) as f:
        return config_from_gguf(f)


# ---------------------------------------------------------------------------
# Kernel source assembly
# ---------------------------------------------------------------------------

def test_variants_set_the_warp_width_per_platform():
    c, h = cuda_source.variant("cuda"), cuda_source.variant("hip")
    assert (c.warp, c.block, h.warp, h.block) == (32, 256, 64, 256)
    assert cuda_source.variant("hip", 32).warp == 32          # RDNA wave32
    src = cuda_source.source(h)
    assert "#define EMBER_HIP 1\n#define WARP 64\n" in src and src.endswith(cuda_source.raw_source())
    assert "#define EMBER_HIP 0\n#define WARP 32\n" in cuda_source.source(c)


def test_bad_variants_are_refused():
    with pytest.raises(cuda_source.SourceError, match="metal"):
        cuda_source.variant("metal")
    with pytest.raises(cuda_source.SourceError, match="warp width 64"):
        cuda_source.variant("cuda", 64)


def test_the_source_never_assumes_32_lanes():
    """Lane math goes through WARP and shuffles through SHFL_XOR, so wave64 works."""
    body = cuda_source.raw_source().split("#define NWARPS", 1)[1]
    assert "__shfl" not in body and "__syncwarp" not in body
    assert not re.search(r"(threadIdx\.x|lane)\s*[%/&]\s*(32|31)\b", body)
    assert not re.search(r"0xffffffff", body)


def test_kernel_names_cover_every_type():
    names = set(cuda_source.kernel_names())
    for t in cuda_source.TYPES:
        assert {f"matvec_{t}", f"matvec_swiglu_{t}", f"dequant_{t}"} <= names
    assert set(cuda_source.ROW_KERNELS) <= names


def _compile(cmd: list[str], v, tmp_path, env: dict | None = None) -> None:
    src = tmp_path / "ember.cu"
    src.write_text(cuda_source.source(v))
    r = subprocess.run(cmd + [str(src), "-o", str(tmp_path / "ember.o")], capture_output=True,
                       text=True, timeout=300, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(shutil.which("hipcc") is None, reason="hipcc is not installed")
@pytest.mark.parametrize("arch,warp", [("gfx90a", 64), ("gfx1030", 32)])   # CDNA2 wave64, RDNA2 wave32
def test_hipcc_compiles_the_hip_variant(arch, warp, tmp_path):
    # HIP_PLATFORM=amd: Debian's hipcc hands the file to nvcc when it finds one
    _compile(["hipcc", f"--offload-arch={arch}", "-std=c++17", "-O2", "-c", "-x", "hip"],
             cuda_source.variant("hip", warp), tmp_path, {"HIP_PLATFORM": "amd"})


def _nvcc_archs() -> set[str]:
    r = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    return set(r.stdout.split())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["90", "87", "72"])    # H100/H200, Jetson Orin, Jetson Xavier
def test_nvcc_compiles_the_cuda_variant_for_hopper_and_jetson(arch, tmp_path):
    """The persistent decode's Hopper-only bulk L2 prefetch and the programmatic-launch
    controls sit behind __CUDA_ARCH__; the rest (grid barrier, wmma) is sm_70+. CUDA 13's
    nvcc no longer targets sm_72 (Xavier's JetPack 5 ships CUDA 11.4): skipped there."""
    if f"compute_{arch}" not in _nvcc_archs():
        pytest.skip(f"this nvcc does not target sm_{arch}")
    _compile(["nvcc", "-std=c++17", f"-arch=sm_{arch}", "-c"], cuda_source.variant("cuda"), tmp_path)


def _nvrtc():
    """NVRTC 12 as ember[cuda]'s cupy-cuda12x loads it (the nvidia-cuda-nvrtc-cu12 wheel) and the
    CUDA headers of the nvidia-cuda-runtime-cu12 wheel; skips where they are not installed."""
    try:
        import nvidia.cuda_nvrtc
        import nvidia.cuda_runtime
    except ImportError:
        pytest.skip("NVRTC 12 is not installed (pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12)")
    lib = ctypes.CDLL(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib", "libnvrtc.so.12"))
    return lib, os.path.join(list(nvidia.cuda_runtime.__path__)[0], "include")


def _nvrtc_compile(lib, src: str, options: list[str]) -> tuple[int, str, int]:
    """(nvrtcResult, the compile log, cubin bytes) of one program, through NVRTC's C API."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"ember_cuda.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    n = ctypes.c_size_t(0)
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(max(n.value, 1))
    lib.nvrtcGetProgramLog(prog, log)
    size = ctypes.c_size_t(0)
    if rc == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace"), size.value


@pytest.mark.parametrize("arch", ["90", "87", "72"])    # H100/H200, Jetson Orin, Jetson Xavier
def test_nvrtc_compiles_the_cuda_variant_for_hopper_and_jetson(arch):
    """The path the backend takes at load (CuPy's RawModule hands the source to NVRTC 12),
    to a cubin for each target, Xavier's sm_72 included (nvcc 13 no longer has it, NVRTC 12
    does). The wheel's headers lack crt/mma.h, so the wmma kernels fail to compile there and
    the backend's fallback, the plain variant, is what runs: both outcomes are checked."""
    lib, include = _nvrtc()
    for wmma in (True, False):
        v = cuda_source.variant("cuda", wmma=wmma)
        opts = [*cuda_source.compile_options(v, include), f"-I{include}", f"--gpu-architecture=sm_{arch}"]
        rc, log, size = _nvrtc_compile(lib, cuda_source.source(v), opts)
        if wmma and not os.path.isfile(os.path.join(include, "crt", "mma.h")):
            assert rc != 0 and "mma.h" in log, log[-2000:]      # the fallback's trigger, as on a wheel-only host
            continue
        assert rc == 0 and size > 0, log[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["90", "87"])
def test_decode_kernels_spill_no_registers(arch, tmp_path):
    """ptxas's own count, no GPU needed: the kernels a decoded token runs keep every value in
    registers. (Capped at 128 registers by two blocks an SM, the persistent kernel spilled
    128 bytes a thread: 2.3 M local-memory requests a token under ncu on the H200.)"""
    if f"compute_{arch}" not in _nvcc_archs():
        pytest.skip(f"this nvcc does not target sm_{arch}")
    src = tmp_path / "ember.cu"
    src.write_text(cuda_source.source(cuda_source.variant("cuda")))
    r = subprocess.run(["nvcc", "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", str(src),
                        "-o", str(tmp_path / "ember.cubin")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = dict(re.findall(r"Function properties for (\w+)\n\s+\d+ bytes stack frame, (\d+ bytes spill stores)",
                             r.stdout + r.stderr))
    decode = [k for k in spills if k == "decode_persistent" or "_pf_" in k or k.startswith("attention_rope")]
    assert len(decode) >= 1 + 2 * len(cuda_source.TYPES), sorted(spills)
    assert {k: spills[k] for k in decode if not spills[k].startswith("0 ")} == {}


HOST_HARNESS = r"""
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
/* argv: type rows cols w.bin d.bin out.bin -> out = the decoded (rows, cols) float32 matrix */
template <class Q>
static void decode_all(const u8 *w, const __half *d, int rows, int K, float *out) {
    float v[Q::UNIT];
    for (int row = 0; row < rows; row++)
        for (int u = 0; u < K / Q::UNIT; u++) {
            load_unit<Q>(w, d, row, u, K, v);
            for (int r = 0; r < Q::UNIT / Q::RUN; r++)
                for (int e = 0; e < Q::RUN; e++) out[(long)row * K + Q::col(u, r) + e] = v[r * Q::RUN + e];
        }
}
/* out[row] = W[row] . x through the dp4a path: each unit's Q::dot8 against x's int8 blocks */
template <class Q>
static void dot8_all(const u8 *w, const __half *d, int rows, int K, const XQ *xq, float *out) {
    for (int row = 0; row < rows; row++) {
        float acc = 0.0f;
        for (int u = 0; u < K / Q::UNIT; u++) {
            typename Q::Raw r;
            Q::fetch(w, d, row, u, K, r);
            acc += Q::dot8(r, u, xq);
        }
        out[row] = acc;
    }
}
static void *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *p = aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (fread(p, 1, n, f) != (size_t)n) exit(3);
    fclose(f);
    return p;
}
int main(int argc, char **argv) {
    const std::string t = argv[1];
    if (t == "layout") {       /* struct PStage as plugins/cuda.py's ctypes mirror must see it */
        printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(PStage), offsetof(PStage, x),
               offsetof(PStage, nw), offsetof(PStage, accumulate), offsetof(PStage, mat),
               offsetof(PStage, bias), offsetof(PStage, vc), sizeof(PMat), offsetof(PMat, kind));
        for (int k = PK_Q4_0; k <= PK_F32; k++) printf("%lld ", kind_row_bytes(k, 2048));
        return 0;
    }
    const int rows = atoi(argv[2]), K = atoi(argv[3]);
    const u8 *w = (const u8 *)slurp(argv[4]);
    const __half *d = (const __half *)slurp(argv[5]);
    if (t.rfind("dot8_", 0) == 0) {   /* argv[6]: x's XQ blocks, argv[7]: out (rows floats) */
        const XQ *xq = (const XQ *)slurp(argv[6]);
        float *y = (float *)calloc(rows, sizeof(float));
        if (t == "dot8_q4_0") dot8_all<Q4_0>(w, d, rows, K, xq, y);
        else if (t == "dot8_q8_0") dot8_all<Q8_0>(w, d, rows, K, xq, y);
        else if (t == "dot8_q4_k") dot8_all<Q4_K>(w, d, rows, K, xq, y);
        else return 2;
        FILE *f = fopen(argv[7], "wb");
        fwrite(y, sizeof(float), rows, f);
        fclose(f);
        return 0;
    }
    float *out = (float *)calloc((size_t)rows * K, sizeof(float));
    if (t == "q4_0") decode_all<Q4_0>(w, d, rows, K, out);
    else if (t == "q8_0") decode_all<Q8_0>(w, d, rows, K, out);
    else if (t == "q4_k") decode_all<Q4_K>(w, d, rows, K, out);
    else if (t == "q6_k") decode_all<Q6_K>(w, d, rows, K, out);
    else return 2;
    FILE *f = fopen(argv[6], "wb");
    fwrite(out, sizeof(float), (size_t)rows * K, f);
    fclose(f);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_unit_decoders_match_numpy_on_the_host(tmp_path):
    """The unit decoders every matvec and the dequantizer use (fetch, scales, quad), compiled
    for the CPU by nvcc (EMBER_HOST_TEST), against ember's numpy dequantization, on the
    device layout the runner uploads: a check of the bit unpacking that needs no GPU."""
    v = cuda_source.variant("cuda", wmma=False)
    src = tmp_path / "harness.cu"
    src.write_text(cuda_source.source(v) + HOST_HARNESS)
    exe = tmp_path / "harness"
    r = subprocess.run(["nvcc", "-std=c++17", "-DEMBER_HOST_TEST", "-arch=sm_90", str(src), "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rng = np.random.default_rng(7)
    for ttype in ("Q4_0", "Q8_0", "Q4_K", "Q6_K"):
        rows, cols = 5, 768
        w = rng.standard_normal((rows, cols), dtype=np.float32) * rng.uniform(0.01, 3.0, (rows, 1)).astype(np.float32)
        gguf.write(tmp_path / "w.gguf", {"general.architecture": "llama"},
                   [("w", gguf.TensorData(ttype, (rows, cols), quant_blocks.quantize(ttype, w)))])
        with gguf.open(tmp_path / "w.gguf") as f:
            t = f.tensors["w"]
            want = t.numpy()
            parts = cuda._host_layout(t)
            (tmp_path / "w.bin").write_bytes(parts[0].tobytes())
            (tmp_path / "d.bin").write_bytes(parts[1].tobytes() if len(parts) > 1 else b"\0" * 16)
        out = tmp_path / "out.bin"
        r = subprocess.run([str(exe), cuda.kind_of(ttype), str(rows), str(cols), str(tmp_path / "w.bin"),
                            str(tmp_path / "d.bin"), str(out)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (ttype, r.stderr)
        got = np.fromfile(out, np.float32).reshape(rows, cols)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=ttype)
    _check_dot8(exe, tmp_path, rng)
    # the persistent decode's stage table: the ctypes mirror has the C layout
    r = subprocess.run([str(exe), "layout"], capture_output=True, text=True, timeout=60)
    P, M = cuda._PStage, cuda._PMat
    layout_line, row_bytes = r.stdout.split("\n")
    assert [int(v) for v in layout_line.split()] == [
        ctypes.sizeof(P), P.x.offset, P.nw.offset, P.accumulate.offset, P.mat.offset, P.bias.offset,
        P.vc.offset, ctypes.sizeof(M), M.kind.offset]
    assert ctypes.sizeof(P) == cuda.P_STAGE_BYTES
    # the kernel's row sizes (its L2 prefetch ranges) are the upload's, kind by kind (PKIND order)
    kinds = sorted(cuda.PKIND, key=cuda.PKIND.get)
    assert [int(v) for v in row_bytes.split()] == [cuda._row_bytes(k, 2048) for k in kinds]


def _quantize_x8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (K float32) as the kernels' int8 blocks of 32 (llama.cpp's q8_1 rule: d = max|x| / 127,
    q = roundf(x / d)): (the XQ records' bytes, the int8 values dequantized, float64)."""
    xb = x.reshape(-1, 32)
    d = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(d == 0, np.float32(1), d)
    v = (xb / safe[:, None]).astype(np.float64)
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)
    q[d == 0] = 0
    rec = np.zeros((xb.shape[0], 48), np.uint8)
    rec[:, :32] = q.view(np.uint8)
    rec[:, 32:40] = np.stack([d, (d * q.astype(np.float32).sum(axis=1)).astype(np.float32)], 1).view(np.uint8)
    return rec, (q.astype(np.float64) * d[:, None]).reshape(-1)


def _check_dot8(exe, tmp_path, rng) -> None:
    """The dp4a unit dot products (Q::dot8, the matvec_i8 kernels' arithmetic) on the host:
    W . x for x's int8 blocks equals sum_i W[i] * d_b * q[i] (the same sum in float64) for
    every row, and stays near the float dot product (int8 activations' error)."""
    rows, cols = 7, 1024
    for ttype in ("Q4_0", "Q8_0", "Q4_K"):
        w = rng.standard_normal((rows, cols), dtype=np.float32) * rng.uniform(0.01, 3.0, (rows, 1)).astype(np.float32)
        x = rng.standard_normal(cols, dtype=np.float32) * rng.uniform(0.1, 4.0, cols // 32).repeat(32).astype(np.float32)
        x[64:96] = 0.0                                    # an all-zero block: d = 0
        gguf.write(tmp_path / "w8.gguf", {"general.architecture": "llama"},
                   [("w", gguf.TensorData(ttype, (rows, cols), quant_blocks.quantize(ttype, w)))])
        with gguf.open(tmp_path / "w8.gguf") as f:
            t = f.tensors["w"]
            wd = t.numpy().astype(np.float64)
            parts = cuda._host_layout(t)
            (tmp_path / "w.bin").write_bytes(parts[0].tobytes())
            (tmp_path / "d.bin").write_bytes(parts[1].tobytes() if len(parts) > 1 else b"\0" * 16)
        rec, xq = _quantize_x8(x)
        (tmp_path / "xq.bin").write_bytes(rec.tobytes())
        out = tmp_path / "y.bin"
        r = subprocess.run([str(exe), "dot8_" + cuda.kind_of(ttype), str(rows), str(cols), str(tmp_path / "w.bin"),
                            str(tmp_path / "d.bin"), str(tmp_path / "xq.bin"), str(out)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (ttype, r.stderr)
        got = np.fromfile(out, np.float32).astype(np.float64)
        scale = np.abs(wd * xq).sum(axis=1)
        np.testing.assert_array_less(np.abs(got - wd @ xq), 1e-5 * scale, err_msg=ttype)
        np.testing.assert_array_less(np.abs(got - wd @ x.astype(np.float64)), 0.02 * scale, err_msg=ttype)


# ---------------------------------------------------------------------------
# Step plans (no GPU)
# ---------------------------------------------------------------------------

def test_decode_plan_is_one_capturable_graph(tiny):
    c = _config(tiny("Q4_K_M"))
    lay = cuda.layout(c, n_ctx=300)
    steps = cuda.decode_steps(lay)
    assert all(isinstance(s, (cuda.Launch, cuda.Copy)) for s in steps)      # no cuBLAS, no host sync
    assert steps[0] == cuda.Copy(cuda.Buf("io"), cuda.Buf("io_h"), 8, "h2d")
    assert steps[-1] == cuda.Copy(cuda.Buf("logits_h"), cuda.Buf("logits"), 4 * c.n_vocab, "d2h")
    names = set(cuda_source.kernel_names())
    launches = [s for s in steps if isinstance(s, cuda.Launch)]
    assert {s.kernel for s in launches} <= names
    # the position is never baked in: kernels that need it read the io buffer
    for s in launches:
        if s.kernel in ("rope_kv", "attention", "attention_rope"):
            assert cuda.Buf("io") in s.args
    attn = [s for s in launches if s.kernel == "attention"]
    assert len(attn) == c.n_layer and all(s.grid == (c.n_head, 1, lay.n_split) for s in attn)
    assert lay.n_split * lay.chunk >= 300 and lay.chunk >= cuda.MIN_CHUNK


def test_decode_plan_fuses_per_layer(tiny):
    """Per layer: norm+q|k|v (one launch per run of one type), rope, attention, merge+o,
    norm+gate|up+SwiGLU, down; the Q4_K_M mix puts attn_v in Q6_K on some layers."""
    c = _config(tiny("Q4_K_M"))
    lay = cuda.layout(c, n_ctx=64)
    steps = [s for s in cuda.forward_steps(lay, 1) if isinstance(s, cuda.Launch)]
    split_v = [lay.mats[f"{i}.k"].kind != lay.mats[f"{i}.v"].kind for i in range(c.n_layer)]
    assert any(split_v)                                     # the mix has a Q6_K attn_v layer
    assert len(steps) == 1 + sum(6 + s for s in split_v) + 1  # embed ... norm + output
    assert not any(s.kernel == "attn_reduce" for s in steps)  # merged by the o projection
    assert not any(s.kernel == "rmsnorm" for s in steps)     # fused into the matvecs
    qkv = [s for s in steps if s.kernel.startswith("matvec_") and "swiglu" not in s.kernel
           and s.args[10].name == "qkv"]
    assert len(qkv) == c.n_layer + sum(split_v)
    for s in qkv:   # each launch writes its rows at its column offset of q|k|v
        rows = s.args[2] + s.args[5] + s.args[8]
        assert s.args[10].offset // 4 + rows <= lay.qkv_dim and s.grid[0] * lay.nwarps >= rows
    assert sum(s.kernel.startswith("matvec_swiglu_") for s in steps) == c.n_layer


def test_fused_rope_decode_plan_has_five_launches_a_layer(tiny):
    """fuse_rope: decode's attention_rope replaces rope_kv + attention; prefill keeps rope_kv;
    the position still comes from the io buffer."""
    c = _config(tiny("Q8_0"))
    lay = cuda.layout(c, n_ctx=300, fuse_rope=True, prefetch=True)
    dec = [s for s in cuda.forward_steps(lay, 1) if isinstance(s, cuda.Launch)]
    assert len(dec) == 1 + 5 * c.n_layer + 1
    names = [s.kernel for s in dec]
    assert "rope_kv" not in names and "attention" not in names
    rope = [s for s in dec if s.kernel == "attention_rope"]
    assert len(rope) == c.n_layer and all(cuda.Buf("io") in s.args and s.grid == (c.n_head, 1, lay.n_split)
                                          for s in rope)
    assert all(s.kernel.startswith(("matvec_pf_", "matvec_swiglu_pf_")) for s in dec
               if s.kernel.startswith("matvec"))
    pre = [s.kernel for s in cuda.forward_steps(lay, 20) if isinstance(s, cuda.Launch)]
    assert pre.count("rope_kv") == c.n_layer and "attention_rope" not in pre


def test_int8_decode_plan_uses_dp4a_matvecs_where_a_type_has_them(tiny):
    """dp4a: the Q4_K matvecs of a Q4_K_M model become matvec_i8_q4_k (and the SwiGLU one),
    the mix's Q6_K rows keep the float _pf kernels; each i8 launch has room for x's int8
    blocks (48 bytes a 32 columns) past the padded float copy and the merge weights, at the
    16-byte aligned offset the kernel computes; prefill's GEMMs are unchanged."""
    c = _config(tiny("Q4_K_M"))
    base = cuda.layout(c, n_ctx=300, fuse_rope=True, prefetch=True)
    lay = cuda.layout(c, n_ctx=300, fuse_rope=True, prefetch=True)
    lay.int8 = True
    plain = [s for s in cuda.forward_steps(base, 1) if isinstance(s, cuda.Launch)]
    dec = [s for s in cuda.forward_steps(lay, 1) if isinstance(s, cuda.Launch)]
    assert len(dec) == len(plain) and set(s.kernel for s in dec) <= set(cuda_source.kernel_names())
    i8 = [(a, b) for a, b in zip(plain, dec) if a.kernel != b.kernel]
    assert i8 and all(b.kernel == a.kernel.replace("_pf_", "_i8_") and b.kernel.endswith("q4_k") for a, b in i8)
    assert any(s.kernel == "matvec_pf_q6_k" for s in dec)      # the mix's Q6_K rows stay float
    for a, b in i8:
        K = b.args[11] if "swiglu" not in b.kernel else b.args[7]
        merge = b.args[-3] is not None if "swiglu" not in b.kernel else False
        floats = cuda._xpad(K) + (c.n_head * lay.n_split if merge else 0)
        assert b.smem == 4 * ((floats + 3) // 4 * 4) + K // 32 * cuda.XQ_BYTES
        assert b.smem > a.smem and b.args == a.args and b.grid == a.grid
    assert cuda.forward_steps(lay, 20) == cuda.forward_steps(base, 20)


def test_persistent_decode_plan_is_one_cooperative_launch(tiny):
    """p_grid > 0: decode is copy in, one cooperative decode_persistent launch, copy out; its
    stage table walks the same matrices, norms and buffers as the graph's launches; prefill
    is unchanged."""
    c = _config(tiny("Q4_K_M"))
    lay = cuda.layout(c, n_ctx=300, fuse_rope=True, prefetch=True, p_grid=132, pf_cap=1 << 16)
    assert lay.persistent
    steps = cuda.decode_steps(lay)
    assert len(steps) == 3 and isinstance(steps[0], cuda.Copy) and isinstance(steps[2], cuda.Copy)
    k = steps[1]
    assert k.kernel == "decode_persistent" and k.coop and k.grid == (132, 1, 1)
    assert cuda.Buf("io") in k.args and cuda.Buf("ptab") in k.args and k.args[-1] is None   # no trace
    assert k.kernel in cuda_source.kernel_names(cuda_source.variant("cuda"))
    assert k.kernel not in cuda_source.kernel_names(cuda_source.variant("hip"))
    st = cuda.persistent_stages(lay)
    assert len(st) == lay.n_stages == 2 + 5 * c.n_layer
    assert lay.buffers()["ptab"] == cuda.P_STAGE_BYTES * len(st)
    ops = [s.op for s in st]
    assert ops == [cuda.P_EMBED] + [cuda.P_MATVEC, cuda.P_ATTN, cuda.P_MATVEC, cuda.P_SWIGLU,
                                    cuda.P_MATVEC] * c.n_layer + [cuda.P_MATVEC]
    # every matrix but the embedding table is multiplied exactly once, the table read once
    used = [m for s in st[1:] for m in s.mats]
    assert sorted((m.tensor, m.row0) for m in used) == sorted(
        (m.tensor, m.row0) for r, m in lay.mats.items() if r != "token_embd")
    for i in range(c.n_layer):
        qkv, att, o, ffn, down = st[1 + 5 * i: 6 + 5 * i]
        assert qkv.rows == lay.qkv_dim == sum(m.rows for m in qkv.mats) and qkv.y == cuda.Buf("qkv")
        assert qkv.nw == cuda.Buf(lay.vecs[f"{i}.attn_norm"]) and not qkv.accumulate
        assert att.kc == cuda.Buf("kc", 2 * i * 300 * lay.kv_dim) and att.x == cuda.Buf("qkv")
        assert o.merge and o.accumulate and o.y == cuda.Buf("x") and o.K == lay.q_dim
        assert ffn.op == cuda.P_SWIGLU and ffn.rows == c.n_ff and ffn.nw == cuda.Buf(lay.vecs[f"{i}.ffn_norm"])
        assert down.x == cuda.Buf("ffn") and down.accumulate and down.K == c.n_ff
    assert st[-1].y == cuda.Buf("logits") and st[-1].rows == c.n_vocab
    smem, xs, tab = cuda.persistent_smem(lay)           # x copy (+ merge weights), then the table
    assert xs >= cuda._xpad(c.n_ff) and xs >= cuda._xpad(lay.q_dim) + c.n_head * lay.n_split
    assert tab == xs and smem == 4 * xs + cuda.P_STAGE_BYTES * len(st) and k.args[2] == tab
    pre = [s for s in cuda.forward_steps(lay, 20) if isinstance(s, cuda.Launch)]
    assert not any(s.coop for s in pre)
    # the table resolves every address (fake ones here) into the kernel's 160-byte records
    addr = {}
    table = cuda.stage_table(st, lambda b: 0 if b is None else addr.setdefault((b.name, b.offset), 4096 * (1 + len(addr))))
    assert len(table) == cuda.P_STAGE_BYTES * len(st)
    rec = cuda._PStage.from_buffer_copy(table, cuda.P_STAGE_BYTES * 1)
    assert (rec.op, rec.n_mat, rec.rows, rec.K) == (cuda.P_MATVEC, len(st[1].mats), lay.qkv_dim, c.n_embd)
    assert rec.mat[0].kind == cuda.PKIND[st[1].mats[0].kind] and rec.mat[0].w != 0


def test_persistent_decode_refuses_float_matrices(tiny):
    """A model with f16/f32 matrices keeps the graph of launches (the kernel's matvec stages
    read quantized kinds only), and says why."""
    c = _config(tiny("Q8_0"))
    t = c.tensors["blk.1.ffn_down.weight"]
    odd = dataclasses.replace(c, tensors={**c.tensors, t.name: dataclasses.replace(t, type="F16")})
    lay = cuda.layout(odd, n_ctx=64, p_grid=132)
    assert not lay.persistent and "f16" in cuda.persistent_refusal(lay)
    assert any(s.kernel == "matvec_f16" for s in cuda.decode_steps(lay) if isinstance(s, cuda.Launch))
    assert cuda.layout(c, n_ctx=64, p_grid=132).persistent


def test_prefill_plan_gemms_stay_inside_the_scratch(tiny):
    c = _config(tiny("Q8_0"))
    lay = cuda.layout(c, n_ctx=512, max_batch=128)
    steps = cuda.forward_steps(lay, 100, all_logits=True)
    gemms = [s for s in steps if isinstance(s, cuda.Gemm)]
    assert gemms and all(g.n == 100 and g.half for g in gemms)
    wscr = lay.buffers()["wscr"]
    assert all(g.m * g.k * 2 <= wscr for g in gemms)
    # every output row of every matrix is produced exactly once
    assert sum(g.m for g in gemms) == sum(m.rows for k, m in lay.mats.items() if k != "token_embd")


def test_prefill_beyond_max_batch_is_refused_by_the_plan(tiny):
    lay = cuda.layout(_config(tiny("Q4_0")), n_ctx=64, max_batch=16)
    with pytest.raises(ValueError, match="T=17"):
        cuda.forward_steps(lay, 17)


def test_wide_heads_are_refused(tiny):
    c = dataclasses.replace(_config(tiny("Q4_0")), head_dim=512)
    with pytest.raises(UnsupportedModel, match="head_dim 512"):
        cuda.layout(c, 64)


@pytest.mark.parametrize("arch,refusal", [
    ("gemma2", "cuda: gemma2 GELU-gated feed-forward is not implemented"),
    ("gemma3", "cuda: gemma3 GELU-gated feed-forward is not implemented"),
    ("smollm3", "cuda: smollm3 layers without rope is not implemented"),
    ("granite", "cuda: granite embedding scale is not implemented"),
    ("olmo2", "cuda: olmo2 post-attention / post-feed-forward norms is not implemented"),
    ("lfm2", "cuda: lfm2 short-convolution layers is not implemented"),
    ("phi3", None),    # LongRoPE and YaRN are in the rope table (rope.rope_cos_sin)
    ("qwen2", None),
])
def test_architecture_features_are_computed_or_refused_by_name(arch, refusal):
    c = _config(conformance_path("arch", "models", f"s512-{arch}-Q8_0.gguf"))
    if refusal is None:
        assert cuda.layout(c, 64).c is c
    else:
        with pytest.raises(UnsupportedModel, match=f"^{re.escape(refusal)}$"):
            cuda.layout(c, 64)


# ---------------------------------------------------------------------------
# Memory plan and probe (no GPU)
# ---------------------------------------------------------------------------

def test_memory_plan_counts_the_device_layout(tiny):
    c = _config(tiny("Q4_K_M"))
    dev = cuda.device_plan(c, 256)
    q6 = sum(t.nbytes for t in c.tensors.values() if t.type == "Q6_K")
    assert q6 > 0
    assert dev["weights"] == c.weights_bytes + q6 // 210 * 14        # Q6_K padded to 224
    assert dev["kv_cache"] == c.kv_cache_bytes(256, bytes_per_value=2)
    p = cuda.plan(c, 256, {})
    assert p.device == sum(dev.values()) and p.host_total < c.weights_bytes + (1 << 30)
    assert "KV cache" in p.notes[0]


def test_memory_plan_names_types_dequantized_at_load(tiny):
    c = _config(tiny("Q4_0"))
    t = c.tensors["blk.0.ffn_up.weight"]
    odd = dataclasses.replace(c, tensors={**c.tensors, t.name: dataclasses.replace(t, type="Q5_0")})
    assert any("Q5_0 matrices are dequantized to f16" in n for n in cuda.plan(odd, 64, {}).notes)
    n = int(np.prod(t.shape))
    assert cuda.device_plan(odd, 64)["weights"] - cuda.device_plan(c, 64)["weights"] == 2 * n - t.nbytes


def test_launch_structs_match_cuda_h():
    """The ctypes mirrors of CUlaunchAttribute / CUlaunchConfig that the programmatic launches
    hand to cuLaunchKernelEx: cuda.h's sizes and field offsets (x86-64 and aarch64 alike)."""
    import ctypes
    assert ctypes.sizeof(cuda._LaunchAttr) == 72 and cuda._LaunchAttr.value.offset == 8
    c = cuda._LaunchConfig
    assert (c.smem.offset, c.stream.offset, c.attrs.offset, c.n_attrs.offset, ctypes.sizeof(c)) == \
        (24, 32, 40, 48, 56)
    vals = [cuda._c_value(v) for v in (np.uint64(2**40 + 3), np.int32(-5), np.float32(0.25), np.int64(-7))]
    assert [type(v) for v in vals] == [ctypes.c_uint64, ctypes.c_int32, ctypes.c_float, ctypes.c_int64]
    assert [v.value for v in vals] == [2**40 + 3, -5, 0.25, -7]


def test_probe_never_raises_and_names_the_platform():
    p = cuda.probe()
    assert isinstance(p, Probe) and p.reason
    if p.available:
        assert p.isa in ("CUDA", "HIP") and p.devices and p.memory_bytes > 0
        assert cuda.decode_note(p.isa) in p.reason
    else:
        assert "CuPy" in p.reason or "GPU" in p.reason
    # `ember backends` says that ROCm keeps the graph and where the persistent kernel runs
    assert "CUDA-only" in cuda.decode_note("HIP") and "persistent=1" in cuda.decode_note("CUDA")


# ---------------------------------------------------------------------------
# GPU: kernels against numpy
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["gpu", "emu"])
def mod(request, tmp_path_factory):
    """(array module, kernel module, variant): CuPy on the GPU, or the same kernels run on the
    CPU (tests/plugins/cuda_emu.py) where no GPU is; each kernel test runs on both."""
    if request.param == "gpu":
        if not PROBE.available:
            pytest.skip(f"no GPU: {PROBE.reason}")
        import cupy
        m, _, v = cuda.compile_kernels(cupy, "hip" if cupy.cuda.runtime.is_hip else "cuda",
                                       cupy.cuda.runtime.getDeviceProperties(0)["warpSize"])
        return cupy, m, v
    if why := cuda_emu.unavailable():
        pytest.skip(f"no CPU emulation of the kernels: {why}")
    m = cuda_emu.build(tmp_path_factory.mktemp("cuda-emu"))
    return cuda_emu.Numpy, m, m.variant


def _typed_file(tmp_path, ttype: str, rows: int, cols: int):
    rng = np.random.default_rng(len(ttype) + rows)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    data = (w if ttype == "F32" else w.astype(np.float16) if ttype == "F16"
            else quant_blocks.quantize(ttype, w))
    gguf.write(tmp_path / "w.gguf", {"general.architecture": "llama"},
               [("w", gguf.TensorData(ttype, (rows, cols), data))])
    return gguf.open(tmp_path / "w.gguf")


@pytest.mark.parametrize("stem", ["matvec", "matvec_pf", "matvec_i8"])
@pytest.mark.parametrize("ttype", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "F16", "F32"])
def test_matvec_and_dequant_match_numpy(ttype, stem, mod, tmp_path):
    """The matvec variants (x staged first; the first row's units fetched before it; x as
    int8 and dp4a, for the types that have it), and a K wide enough that the prefetching
    kernels also run units past the fetched ones."""
    cp, m, v = mod
    if stem == "matvec_i8" and cuda.kind_of(ttype) not in cuda.I8_KINDS:
        pytest.skip(f"{ttype} has no int8 matvec")
    rows, cols, T = 77, 512 if stem == "matvec" else 3072, 3
    with _typed_file(tmp_path, ttype, rows, cols) as f:
        t = f.tensors["w"]
        ref = t.numpy()                                             # (rows, cols) float32
        dev = [cp.asarray(a.reshape(-1).view(np.uint8)) for a in cuda._host_layout(t)]
    w, d = dev[0], (dev[1] if len(dev) > 1 else None)
    k = cuda.kind_of(ttype)
    x = np.random.default_rng(1).standard_normal((T, cols), dtype=np.float32)
    y = cp.full((T, rows), 7.0, cp.float32)
    nw = v.block // v.warp
    ptr = lambda a: np.uint64(0 if a is None else a.data.ptr)  # noqa: E731
    norm_w = (1.0 + 0.1 * np.random.default_rng(2).standard_normal(cols)).astype(np.float32)
    m.get_function(f"{stem}_{k}")(((rows + nw - 1) // nw, T), (v.block,),
                                  (ptr(w), ptr(d), np.int32(rows), ptr(None), ptr(None), np.int32(0),
                                   ptr(None), ptr(None), np.int32(0), cp.asarray(x), y,
                                   np.int32(cols), np.int32(cols), np.int32(rows), np.int32(1),
                                   cp.asarray(norm_w), np.float32(1e-5), np.int32(1),
                                   ptr(None), np.int32(0), np.int32(1)),
                                  shared_mem=_matvec_smem(stem, k, cols))
    xn = reference.rmsnorm(x, norm_w, 1e-5)                       # the fused RMSNorm
    if stem == "matvec_i8":   # x's int8 blocks: the same sums as numpy's int8 copy of x, up to a flipped rounding
        x8 = np.stack([_quantize_x8(row)[1] for row in xn])
        err = np.abs(y.get() - 7.0 - x8 @ ref.T.astype(np.float64)) / (np.abs(x8) @ np.abs(ref.T)).astype(np.float64)
        assert err.max() < 1e-3, err.max()
        assert np.linalg.norm(y.get() - 7.0 - xn @ ref.T) < 2e-2 * np.linalg.norm(xn @ ref.T)
        return
    np.testing.assert_allclose(y.get(), 7.0 + xn @ ref.T, rtol=1e-4, atol=2e-3)   # accumulate=1
    out = cp.zeros((rows, cols), cp.float16)
    unit = {"q4_0": 32, "q8_0": 32, "q4_k": 64, "q6_k": 64}.get(k, 1)
    m.get_function(f"dequant_{k}")(((rows * cols // unit + 255) // 256,), (256,),
                                   (ptr(w), ptr(d), ptr(None), np.int32(0), np.int32(rows),
                                    np.int32(cols), out, ptr(None)))
    np.testing.assert_allclose(out.get().astype(np.float32), ref, rtol=1e-3, atol=1e-3)


def _matvec_smem(stem: str, kind: str, cols: int) -> int:
    """A single matvec launch's dynamic shared memory (no split merge), as the plan sizes it."""
    lay = cuda.Layout(None, 1, 1, int8=stem.endswith("_i8"))
    return cuda._mv_smem(lay, kind, cols)


def _causal_attention(qkv, kc, vc, p0, n_head, n_kv, hd):
    """float64 numpy: token t (position p0 + t) attends keys 0..p0 + t of its kv head."""
    T, q_dim = qkv.shape[0], n_head * hd
    q = qkv[:, :q_dim].astype(np.float64).reshape(T, n_head, hd) / np.sqrt(hd)
    K = kc.astype(np.float64).reshape(-1, n_kv, hd)
    V = vc.astype(np.float64).reshape(-1, n_kv, hd)
    out = np.zeros((T, n_head, hd))
    masked = np.arange(K.shape[0])[None, :] > (p0 + np.arange(T))[:, None]     # (T, keys)
    for h in range(n_head):
        g = h // (n_head // n_kv)
        s = np.where(masked, -np.inf, q[:, h] @ K[:, g].T)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ V[:, g]
    return out.reshape(T, q_dim)


@pytest.mark.parametrize("kernel", ["attention_flash", "attention_rows"])
@pytest.mark.parametrize("hd,n_head,n_kv,T,p0", [(64, 8, 2, 100, 0), (32, 4, 4, 70, 37),
                                                 (128, 4, 1, 130, 5), (16, 2, 1, 1, 200)])
def test_prefill_attention_matches_numpy(kernel, hd, n_head, n_kv, T, p0, mod):
    """Causal attention of T new tokens after p0 cached ones: partial query blocks and key
    tiles, GQA, a long cached prefix, fresh random data (poisoned output first)."""
    cp, m, v = mod
    if kernel == "attention_flash" and not v.wmma:
        pytest.skip("the wmma kernels did not compile here (no <mma.h> for NVRTC, or ROCm)")
    rng = np.random.default_rng(hd * 1000 + T + p0)
    q_dim, kv_dim = n_head * hd, n_kv * hd
    n_ctx = p0 + T + 3
    qkv = rng.standard_normal((T, q_dim + 2 * kv_dim), dtype=np.float32)
    kc = rng.standard_normal((n_ctx, kv_dim)).astype(np.float16)
    vc = rng.standard_normal((n_ctx, kv_dim)).astype(np.float16)
    out = cp.full((T, q_dim), np.nan, cp.float32)
    args = (cp.asarray(qkv), np.int32(qkv.shape[1]), cp.asarray(kc), cp.asarray(vc),
            cp.asarray(np.array([p0], np.int32)), out, np.int32(q_dim), np.int32(T),
            np.int32(n_head), np.int32(n_kv), np.int32(hd), np.float32(1.0 / np.sqrt(hd)))
    f = m.get_function(kernel)
    if kernel == "attention_flash":
        smem = cuda.fa_smem_bytes(hd)
        f.max_dynamic_shared_size_bytes = smem
        f((n_head, -(-T // cuda.FA_Q)), (cuda.FA_WARPS * v.warp,), args, shared_mem=smem)
    else:
        f((n_head, -(-T // (v.block // v.warp))), (v.block,), args)
    want = _causal_attention(qkv, kc, vc, p0, n_head, n_kv, hd)
    got = out.get()
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < (5e-3 if kernel == "attention_flash" else 1e-5), err   # half Q and P on the tensor cores


# ---------------------------------------------------------------------------
# CPU emulation: whole decoded tokens through the kernels, against the reference
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emu_builds(tmp_path_factory):
    """platform -> the kernels built for the CPU emulator (once per module)."""
    if why := cuda_emu.unavailable():
        pytest.skip(f"no CPU emulation of the kernels: {why}")
    built = {}

    def get(platform: str):
        if platform not in built:
            built[platform] = cuda_emu.build(tmp_path_factory.mktemp(f"cuda-emu-{platform}"), platform)
        return built[platform]
    return get


@pytest.fixture(params=["cuda", "hip"])
def emu(request, emu_builds):
    """CUDA's variant, and ROCm's (wave64), which no GPU of ours runs."""
    return emu_builds(request.param)


class _EmuDevice:
    """The runner's buffers as numpy arrays, named and sized as CudaRunner allocates them
    (host_tensors + Layout.buffers + the KV cache), and its step plans run on the emulator:
    launches as emulated kernels, copies as numpy copies, cuBLAS's GEMMs as numpy matmuls in
    float32 (cuBLAS's compute type) from the same operands."""

    def __init__(self, emu, f, c, lay):
        self.emu, self.lay = emu, lay
        self.bufs = {n: np.zeros(nb, np.uint8) for n, nb in lay.buffers().items() if n != "cs"}
        for n, a in cuda.host_tensors(f, c, lay).items():
            self.bufs[n] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        for n in ("kc", "vc", "io_h", "logits_h"):
            self.bufs[n] = np.zeros(lay.kv_bytes() // 2 if n in ("kc", "vc") else
                                    4 * (1 + lay.max_batch) if n == "io_h" else 4 * c.n_vocab, np.uint8)
        if lay.persistent:
            table = cuda.stage_table(cuda.persistent_stages(lay), self.addr)
            self.bufs["ptab"][:len(table)] = np.frombuffer(table, np.uint8)
        self.steps = cuda.decode_steps(lay)

    def addr(self, b) -> int:
        return 0 if b is None else self.bufs[b.name].ctypes.data + b.offset

    def decode(self, pos: int, token: int) -> np.ndarray:
        self.bufs["io_h"].view(np.int32)[:2] = pos, token
        self.run(self.steps)
        return self.bufs["logits_h"].view(np.float32).copy()

    def prefill(self, pos: int, tokens: list[int]) -> np.ndarray:
        """Logits of every token (T, n_vocab), T <= max_batch, as the runner's prefill chunk."""
        T = len(tokens)
        self.bufs["io_h"].view(np.int32)[:1 + T] = [pos, *tokens]
        self.run([cuda.Copy(cuda.Buf("io"), cuda.Buf("io_h"), 4 * (1 + T), "h2d")]
                 + cuda.forward_steps(self.lay, T, True))
        return self.bufs["logits"].view(np.float32)[:T * self.lay.c.n_vocab].reshape(T, -1).copy()

    def run(self, steps: list) -> None:
        for s in steps:
            if isinstance(s, cuda.Copy):
                self.bufs[s.dst.name][s.dst.offset:s.dst.offset + s.nbytes] = \
                    self.bufs[s.src.name][s.src.offset:s.src.offset + s.nbytes]
            elif isinstance(s, cuda.Gemm):
                self.gemm(s)
            else:
                self.emu.get_function(s.kernel)(s.grid, s.block, [cuda.launch_value(a, self.addr) for a in s.args],
                                                shared_mem=s.smem)

    def rows(self, b, n: int, k: int, ld: int, dtype) -> np.ndarray:
        """n rows of k elements, ld apart, at Buf b (a view: writes land in the buffer)."""
        it = np.dtype(dtype).itemsize
        flat = self.bufs[b.name][b.offset:b.offset + ((n - 1) * ld + k) * it].view(dtype)
        return np.lib.stride_tricks.as_strided(flat, (n, k), (ld * it, it))

    def gemm(self, g) -> None:
        """Row-major C (n x m, ldc) = B (n x k, ldb) A^T (A: m rows of k) (+ C with beta)."""
        dt = np.float16 if g.half else np.float32
        a = self.rows(g.a, g.m, g.k, g.k, dt).astype(np.float32)
        b = self.rows(g.b, g.n, g.k, g.ldb, dt).astype(np.float32)
        c = self.rows(g.c, g.n, g.m, g.ldc, np.float32)
        c[...] = b @ a.T + (c if g.beta else 0.0)


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("dp4a", [False, True])
def test_decode_on_the_cpu_emulation_matches_the_reference(quant, dp4a, emu, tiny, monkeypatch):
    """Decoded tokens through the real kernels on the CPU emulator, both decode paths: the
    graph's launches (fused rope, prefetching or int8 matvecs; attention split every 8 keys
    here, so 10 tokens cross a split boundary and most splits lie past the newest key,
    written empty by the graph and skipped by the persistent kernel) and, on CUDA, the
    persistent kernel as one block (with the L1 prefetch flag on: a hint, no effect here),
    each against the reference backend (KL < 1e-3), and the persistent kernel against the
    graph (KL <= 1e-6, as on the GPU). ROCm's wave64 variant runs the graph's launches."""
    warp = emu.variant.warp
    monkeypatch.setattr(cuda, "MIN_CHUNK", 8)
    with gguf.open(tiny(quant)) as f:
        c = config_from_gguf(f)
        graph = cuda.layout(c, 300, 1, warp, fuse_rope=True, prefetch=True)
        graph.int8 = dp4a
        assert graph.chunk == 8 and graph.n_split == 38
        runs = [_EmuDevice(emu, f, c, graph)]
        if emu.variant.platform == "cuda":
            pers = cuda.layout(c, 300, 1, fuse_rope=True, prefetch=True, p_grid=1)
            assert cuda.persistent_refusal(pers) is None
            pers.persistent, pers.p_flags, pers.int8 = True, cuda.PF_L1 | (cuda.PF_I8 if dp4a else 0), dp4a
            runs.append(_EmuDevice(emu, f, c, pers))
        ref = reference.ReferenceRunner(f, c, 300)
        for pos, tok in enumerate(np.random.default_rng(3).integers(3, c.n_vocab, 10).tolist()):
            want = ref.decode(tok)
            g, *p = (r.decode(pos, tok) for r in runs)
            assert kl_rows(want[None], g[None])[0] < 1e-3, pos
            for q in p:
                assert kl_rows(g[None], q[None])[0] <= 1e-6, pos
        assert any(s.kernel.startswith("matvec_i8") for s in runs[0].steps if isinstance(s, cuda.Launch)) == dp4a


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_K_M"])
def test_prefill_on_the_cpu_emulation_matches_the_reference(quant, emu, tiny):
    """A prompt after 3 cached tokens through the prefill plan on the CPU emulator: rope_kv,
    the row attention, the dequantizers into the GEMM scratch (cuBLAS's GEMM as numpy's), the
    RMSNorm and SwiGLU kernels; every token's logits against the reference (KL < 1e-3), then
    a decoded token on top of that cache. CUDA's variant and ROCm's wave64."""
    with gguf.open(tiny(quant)) as f:
        c = config_from_gguf(f)
        lay = cuda.layout(c, 64, 16, emu.variant.warp, fuse_rope=True, prefetch=True)
        dev, ref = _EmuDevice(emu, f, c, lay), reference.ReferenceRunner(f, c, 64)
        toks = np.random.default_rng(4).integers(3, c.n_vocab, 17).tolist()
        assert kl_rows(ref.prefill(toks[:3], all_logits=True), dev.prefill(0, toks[:3])).max() < 1e-3
        got = dev.prefill(3, toks[3:16])                 # 13 tokens: the GEMM path (> MATVEC_MAX_T)
        assert any(isinstance(s, cuda.Gemm) for s in cuda.forward_steps(lay, 13, True))
        assert kl_rows(ref.prefill(toks[3:16], all_logits=True), got).max() < 1e-3
        assert kl_rows(ref.decode(toks[16])[None], dev.decode(16, toks[16])[None])[0] < 1e-3


def _emu_cases() -> list:
    """(folder, case): every base case, and the arch/ decoder cases whose features the cuda
    backend implements (the rest it refuses by name: test_arch_conformance.py)."""
    out = [pytest.param("", c, id=c["ref"].removesuffix(".npz")) for c in conformance_cases()]
    for c in conformance_cases("arch"):
        path = CONFORMANCE / "arch" / "models" / c["model"]
        if c.get("kind") == "embedding":
            continue
        if not path.is_file():        # a partial copy (the GPU machine's): the test says it is absent
            out.append(pytest.param("arch", c, id="arch-" + c["ref"].removesuffix(".npz")))
            continue
        with gguf.open(path) as f:
            if set(features(config_from_gguf(f))) <= cuda.IMPLEMENTED:
                out.append(pytest.param("arch", c, id="arch-" + c["ref"].removesuffix(".npz")))
    return out


@pytest.mark.parametrize("folder,case", oracle_params(_emu_cases(), 2))
def test_conformance_on_the_cpu_emulation(folder, case, emu):
    """Every ../shared/conformance case the cuda backend computes through its prefill plan and
    kernels on the CPU emulator, CUDA's variant and ROCm's, held to llama.cpp's logits with
    the README's thresholds as test_conformance.py holds a GPU. (v128k / v151k included,
    which the GPU runs could not carry.)"""
    sub = (folder,) if folder else ()
    z = np.load(conformance_path(*sub, "refs", case["ref"]))
    tokens = z["tokens"].tolist()
    with gguf.open(conformance_path(*sub, "models", case["model"])) as f:
        c = config_from_gguf(f)
        lay = cuda.layout(c, case.get("n_ctx", 128), len(tokens), emu.variant.warp, fuse_rope=True, prefetch=True)
        logits = _EmuDevice(emu, f, c, lay).prefill(0, tokens)
    assert_matches_oracle(f"cuda ({emu.variant.platform}, CPU emulation)", case, z, logits)


@pytest.mark.parametrize("case", oracle_params([pytest.param(c, id=c["ref"].removesuffix(".npz"))
                                                 for c in conformance_cases() if c["model"].startswith("stories260K")]))
def test_greedy_text_on_the_cpu_emulation(case, emu):
    """stories260K's greedy continuation (F32 and Q8_0) token for token as llama.cpp made it:
    the prompt through the prefill plan, then each token decoded through the graph's
    launches, on the CPU emulator. (Both files hold float matrices, which the persistent
    kernel refuses; the llama-tiny decode test above covers it.)"""
    z = np.load(conformance_path("refs", case["ref"]))
    want, tokens = z["greedy"].tolist(), z["tokens"].tolist()
    with gguf.open(conformance_path("models", case["model"])) as f:
        c = config_from_gguf(f)
        lay = cuda.layout(c, 128, len(tokens), emu.variant.warp, fuse_rope=True, prefetch=True)
        dev = _EmuDevice(emu, f, c, lay)
        got = [int(np.argmax(dev.prefill(0, tokens)[-1]))]
        while len(got) < len(want):
            got.append(int(np.argmax(dev.decode(len(tokens) + len(got) - 1, got[-1]))))
    assert got == want


# ---------------------------------------------------------------------------
# GPU: the runner against the reference backend
# ---------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("quant,opts", [("Q4_0", {}), ("Q8_0", {}), ("Q4_K_M", {}),
                                        ("Q4_K_M", {"flash": 0, "prefetch": 0, "pdl": 0, "fuse_rope": 0}),
                                        ("Q4_0", {"dp4a": 1}), ("Q8_0", {"dp4a": 1}), ("Q4_K_M", {"dp4a": 1})])
def test_runner_matches_the_reference_prefill_and_graph_decode(quant, opts, tiny):
    """Defaults (flash prefill attention, _pf matvecs, rope fused into decode attention,
    programmatic dependent launch where the GPU has them), the plain kernels, and the int8
    (dp4a) matvecs."""
    with gguf.open(tiny(quant)) as f:
        c = config_from_gguf(f)
        ref = reference.ReferenceRunner(f, c, 96)
        run = cuda.CudaRunner(f, c, 96, {"max_batch": 32, **opts})     # 40 tokens = two prefill chunks
        toks = np.random.default_rng(0).integers(3, c.n_vocab, 40).tolist()
        want, got = ref.prefill(toks, all_logits=True), run.prefill(toks, all_logits=True)
        assert got.shape == (40, c.n_vocab) and got.dtype == np.float32
        assert kl_rows(want, got).max() < 1e-3
        for tok in toks[:12]:                                  # eager first, then the graph
            a, b = ref.decode(tok), run.decode(tok)
            assert kl_rows(a[None], b[None])[0] < 1e-3
        assert run.graph is not None and run.n_past == 52
        run.close()


@gpu
@pytest.mark.parametrize("model", ["s512-qwen2-Q4_K_M.gguf", "s512-qwen3-Q4_K_M.gguf"])
def test_fused_rope_decode_with_biases_qk_norms_and_neox_rope(model):
    """Decode through attention_rope on the conformance qwen2 (q/k/v biases, NEOX rope) and
    qwen3 (per-head q/k RMSNorm) models: each decoded token's logits against the reference
    backend, and the same with rope_kv as a launch of its own."""
    from tests.conftest import conformance_path
    with gguf.open(conformance_path("models", model)) as f:
        c = config_from_gguf(f)
        ref = reference.ReferenceRunner(f, c, 64)
        runs = [cuda.CudaRunner(f, c, 64, {"fuse_rope": fr}) for fr in (1, 0)]
        toks = np.random.default_rng(3).integers(3, c.n_vocab, 14).tolist()
        ref.prefill(toks[:6])
        for r in runs:
            r.prefill(toks[:6])
        for tok in toks[6:]:
            want = ref.decode(tok)
            fused, plain = (r.decode(tok) for r in runs)
            assert kl_rows(want[None], fused[None])[0] < 1e-3
            np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)
        for r in runs:
            r.close()


@gpu
@pytest.mark.parametrize("model", ["Q4_0", "Q8_0", "Q4_K_M", "s512-qwen2-Q4_K_M.gguf", "s512-qwen3-Q4_K_M.gguf"])
def test_persistent_decode_matches_the_graph(model, tiny):
    """The persistent kernel against the graph of launches (its yardstick): KL <= 1e-6 for
    each decoded token, across a split boundary of the attention (chunk 256), on llama
    (Q4_K_M: Q4_K and Q6_K in one q|k|v stage), qwen2 (biases, NEOX rope) and qwen3 (q/k
    norms); with and without the L2 and L1 weight prefetches; and with int8 activations (dp4a) in both paths,
    the persistent kernel against the graph with the same option."""
    from tests.conftest import conformance_path
    path = tiny(model) if model.startswith("Q") else conformance_path("models", model)
    with gguf.open(path) as f:
        c = config_from_gguf(f)
        runs = [cuda.CudaRunner(f, c, 300), cuda.CudaRunner(f, c, 300, {"persistent": 1}),
                cuda.CudaRunner(f, c, 300, {"persistent": 1, "l2_prefetch": 1, "p_flags": cuda.PF_L1}),
                cuda.CudaRunner(f, c, 300, {"dp4a": 1}), cuda.CudaRunner(f, c, 300, {"persistent": 1, "dp4a": 1})]
        assert [r.lay.persistent for r in runs] == [False, True, True, False, True]
        assert runs[4].lay.p_flags & cuda.PF_I8 and not runs[1].lay.p_flags & cuda.PF_I8
        toks = np.random.default_rng(5).integers(3, c.n_vocab, 270).tolist()
        for r in runs:
            r.prefill(toks[:250])
        for tok in toks[250:]:                       # positions 250..269 cross the split at 256
            out = [r.decode(tok) for r in runs]
            for want, got in ((0, 1), (0, 2), (3, 4)):
                assert kl_rows(out[want][None], out[got][None])[0] <= 1e-6, (want, got)
        for r in (runs[1], runs[2], runs[4]):        # still the persistent kernel after decoding
            assert r.lay.persistent and r.persistent_error is None, r.persistent_error
            assert len(r._decode_plan) == 3                # copy in, the cooperative launch, copy out
        for r in runs:
            r.close()


@gpu
def test_decode_after_truncate_reproduces_logits(tiny):
    with gguf.open(tiny("Q4_0")) as f:
        c = config_from_gguf(f)
        run = cuda.CudaRunner(f, c, 64)
        run.prefill([5, 6, 7, 8])
        first = [run.decode(t) for t in (9, 10, 11)]
        run.truncate(4)
        again = [run.decode(t) for t in (9, 10, 11)]
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
        run.reset()
        np.testing.assert_allclose(run.prefill([5, 6, 7, 8, 9, 10, 11]), again[-1], rtol=1e-3, atol=1e-3)
        run.close()


@gpu
def test_errors_and_no_device_memory_growth(tiny):
    import cupy
    with gguf.open(tiny("Q8_0")) as f:
        c = config_from_gguf(f)
        run = cuda.CudaRunner(f, c, 300)
        with pytest.raises(ContextOverflow):
            run.prefill(list(range(3, 304)))
        with pytest.raises(cuda.TokenOutOfRange):
            run.decode(c.n_vocab)
        tok = int(np.argmax(run.prefill([1, 2, 3])))
        tok = int(np.argmax(run.decode(tok)))
        used = cupy.get_default_memory_pool().used_bytes()
        for _ in range(250):
            tok = int(np.argmax(run.decode(tok)))
        assert cupy.get_default_memory_pool().used_bytes() == used
        assert run.n_past == 254
        run.close()
