#!/bin/bash
# The GPU-machine run of the cuda backend (issue 17) in a few device calls: the GPU tests, every
# ../shared/conformance case on cuda, and ember cuda's variants vs llama.cpp CUDA
# (bench/compare_cuda.py). Nothing reaches the GPU machine but the checkout and what it carries
# (64 MiB), so this machine stages each call's share into .dev/cudadev (git-ignored), and the
# call runs this script there:
#
#   here:   bash bench/cuda_device.sh stage PART [LLAMA_BENCH_PARTS_DIR]
#   there:  bash bench/cuda_device.sh run           (device tool: carry [".dev/cudadev"])
#
# PART 0: llama-bench (llama.cpp 0.3.36's CUDA build for sm_90, gzipped in pieces: how it was
#         built is in bench/results/cuda-h200.md; without it the bench runs ember alone), the
#         conformance models the GPU tests read, then the GPU tests, those conformance cases
#         and the bench (about 6 minutes; the three synthetic 1.1B models are written there).
# PART 1..: the rest of ../shared/conformance (models with their refs, arch/ too), packed
#         first-fit by size under the carry limit; their calls run the conformance tests only.
# `stage list` prints the parts. Results land in $OUT (log.txt, table.md).
set -u
MODE=${1:-run}
D=.dev/cudadev
CARRY_MB=54              # the carry's 64 MiB less the checkout (~4 MiB) and headroom
BENCH_MODELS="s512-llama-Q4_0 s512-llama-Q8_0 s512-llama-Q4_K_M s512-qwen2-Q4_K_M s512-qwen3-Q4_K_M"

parts() {   # "PART FILE" lines, FILE relative to ../shared/conformance
    python3 - "$CARRY_MB" "$BENCH_MODELS" <<'EOF'
import sys
from pathlib import Path
root, cap, bench = Path("../shared/conformance"), float(sys.argv[1]) * 2**20, set(sys.argv[2].split())
items = []                                   # (bytes, [files]) a model with its refs
for sub in ("", "arch/"):
    for m in sorted((root / sub / "models").glob("*.gguf")):
        files = [m] + sorted((root / sub / "refs").glob(m.stem + ".*"))
        items.append((sum(f.stat().st_size for f in files), sub, m.stem, [str(f.relative_to(root)) for f in files]))
shared = [str(p.relative_to(root)) for sub in ("", "arch/") for p in (root / sub).glob("*")
          if p.is_file()] + [str(p.relative_to(root)) for p in root.rglob("refs/manifest.json")]
bins = [[0.0, []]]
for size, sub, stem, files in sorted(items, key=lambda i: -i[0]):
    if not sub and stem in bench:
        bins[0][0] += size; bins[0][1] += files
        continue
    for b in bins[1:]:
        if b[0] + size <= cap:
            b[0] += size; b[1] += files
            break
    else:
        bins.append([size, files])
for i, (_, files) in enumerate(bins):
    for f in sorted(set(shared + files)):
        print(i, f)
EOF
}

if [ "$MODE" = stage ]; then
    P=${2:?part number}; LB=${3:-/work/.device/1}
    [ "$P" = list ] && { parts | awk '{n[$1]++} END {for (p in n) print "part", p, n[p], "files"}'; exit 0; }
    rm -rf "$D" && mkdir -p "$D/conformance"
    parts | awk -v p="$P" '$1 == p {print $2}' | (cd ../shared/conformance && xargs cp --parents -t "$OLDPWD/$D/conformance")
    [ "$P" = 0 ] && cp "$LB"/llama-bench.gz.part-* "$D/" 2>/dev/null
    du -sh "$D"; exit 0
fi

# ---- on the GPU machine ----------------------------------------------------------------------
OUT=${OUT:-/tmp/cuda-out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 EMBER_CACHE_DIR=/tmp/ember-cache
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
python3 -c "import cupy; print('cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())"
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1 || tail -20 /tmp/pip.log
if [ -e ../shared/conformance ] && [ ! -L ../shared/conformance ]; then
    echo "../shared/conformance is a real folder here: run mode is for the GPU machine"; exit 2
fi
mkdir -p ../shared && ln -sfn "$PWD/$D/conformance" ../shared/conformance
BENCH=0; ls "$D"/conformance/models/s512-llama-Q4_0.gguf > /dev/null 2>&1 && BENCH=1
TESTS=$BENCH; [ "${SKIP_BENCH:-0}" = 1 ] && BENCH=0      # SKIP_BENCH=1: the tests of part 0 only
if [ $BENCH = 1 ]; then        # the synthetic models take ~150 s: written while the tests run
    python3 -c "import runpy; runpy.run_path('bench/compare_cuda.py')['write_models']('tinyllama-1.1b', \
        ['Q4_0', 'Q8_0', 'Q4_K_M'])" > /tmp/synth.log 2>&1 &
    SYN=$!
fi
t installed
if [ $TESTS = 1 ]; then
    # the GPU tests only (the CPU emulator's and the compilers' ran in CI)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/plugins/test_cuda.py -rf -k "gpu or runner_matches \
        or persistent_decode_matches or fused_rope or truncate or errors_and" 2>&1 | tail -15
    t gpu-tests
fi
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/plugins/test_conformance.py \
    tests/plugins/test_arch_conformance.py -k cuda -rf 2>&1 | grep -v "conformance data not found" | tail -12
t conformance
[ $BENCH = 1 ] || exit 0
wait $SYN; tail -3 /tmp/synth.log; t synthetic
LBOPT=""
if ls "$D"/llama-bench.gz.part-* > /dev/null 2>&1; then
    cat "$D"/llama-bench.gz.part-* | gunzip > /tmp/llama-bench && chmod +x /tmp/llama-bench && LBOPT="--llama-bench /tmp/llama-bench"
fi
V="graph:;dp4a:dp4a=1;p:persistent=1;p-dp4a:persistent=1,dp4a=1;p-l1:persistent=1,p_flags=16;p-l1-dp4a:persistent=1,dp4a=1,p_flags=16"
timeout $(( 590 - $(date +%s) + T0 )) python3 bench/compare_cuda.py $LBOPT --quants Q4_0,Q8_0,Q4_K_M --reps 2 \
    --profile --trace --out "$OUT/table.md" --variants "$V" 2>&1 | grep -v "^Q" | tail -80
t end
