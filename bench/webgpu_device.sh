#!/bin/bash
# The GPU-machine run of the webgpu backend (issue 18), as one device call: conformance on
# NVIDIA's Vulkan driver, `pytest tests -k cuda`, then webgpu vs ember cuda vs llama.cpp CUDA
# on the synthetic TinyLlama-1.1B shape. Written for the lent H200 (../shared/docs/
# DEVICE-WEBGPU.md is the Vulkan recipe it follows); nothing can be installed there, so the
# caller stages, in a git-ignored folder D of the checkout that travels (carry it):
#   $D/wheels/  wgpu==0.32.0 cffi pycparser sniffio rendercanvas pyzmq, cp312 manylinux
#   $D/debs/    libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 (amd64)
#   $D/conformance/  a copy of ../shared/conformance (models, refs; what fits the 64 MiB)
#   $D/llama-bench   optional: llama.cpp's CUDA llama-bench (see bench/results/cuda-h200.md)
# and runs `bash bench/webgpu_device.sh $D` in the checkout's root; results land in $OUT.
set -u
D=${1:-.dev/webgpu}
OUT=${OUT:-/tmp/webgpu-out}; mkdir -p "$OUT"
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
for f in "$D"/debs/*.deb; do dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$D"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 EMBER_CACHE_DIR=/tmp/ember-cache
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
mkdir -p ../shared && ln -sfn "$PWD/$D/conformance" ../shared/conformance
t installed
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"
python3 -c "import ember.daemon.cli as c; c.main(['backends', '--json'])" | tee "$OUT/backends.json"
EMBER_REQUIRE_WEBGPU=1 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_wgsl_source.py \
    tests/plugins/test_webgpu.py 2>&1 | tail -4
t webgpu-tests
python3 -m pytest -q -p no:cacheprovider tests/plugins/test_conformance.py tests/plugins/test_arch_conformance.py \
    -k webgpu -rs 2>&1 | tail -12
t webgpu-conformance
python3 -m pytest -q -p no:cacheprovider tests -k cuda 2>&1 | grep -v "conformance data not found" | tail -8
t cuda-tests
LB=""
if [ -f "$D/llama-bench" ]; then chmod +x "$D/llama-bench"; LB="--llama-bench $D/llama-bench"; fi
python3 bench/compare_webgpu.py $LB --quants Q4_0,Q8_0,Q4_K_M --variants "one:;split32:submit_every=32" \
    --profile --out "$OUT/table.md" 2>&1 | tee "$OUT/bench.log"
t bench
