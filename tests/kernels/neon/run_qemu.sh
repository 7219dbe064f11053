#!/usr/bin/env bash
# Cross-compile the C kernels + driver.c for aarch64 and run the driver under
# qemu-user: NEON (with and without dotprod) against the portable C kernels.
#
#   tests/kernels/neon/run_qemu.sh          (from anywhere; ~1 minute)
#
# Needs Debian's gcc-aarch64-linux-gnu and qemu-user-static. Runs the driver
# on two emulated CPUs: `max` (has dotprod: the neon+dotprod build) and
# `cortex-a72` (Raspberry Pi 4: no dotprod, the plain NEON build). Exit 0 only
# if every comparison passed on both.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../../../kernels/c"
CC="${CC:-aarch64-linux-gnu-gcc}"
QEMU="${QEMU:-qemu-aarch64-static}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# Only the quantized-product sources: they must build alone on any arch.
"$CC" -O2 -std=c11 -ffp-contract=off -Wall -Werror -static -I"$src" \
    "$here/driver.c" "$src/quants_generic.c" "$src/quants_neon.c" "$src/quants_avx2.c" \
    "$src/quants_avx512.c" "$src/repack.c" "$src/repack_avx2.c" "$src/repack_avx512.c" "$src/repack_neon.c" \
    "$src/dispatch.c" -lm -o "$out/driver"

status=0
for cpu in max cortex-a72; do
    echo "== qemu-aarch64 -cpu $cpu"
    "$QEMU" -cpu "$cpu" "$out/driver" || status=1
done
exit $status
