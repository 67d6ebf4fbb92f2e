#!/usr/bin/env bash
# Regenerates kvd-gpu/kernels/copy_runs.ptx from copy_runs.cu beside it: clang's CUDA front end
# (Debian's clang-14; no CUDA toolkit, no CUDA headers), PTX for sm_70 and newer, which the
# NVIDIA driver compiles for the GPU it runs on. The PTX's first line records the SHA-256 of
# the source; a kvd-gpu unit test fails when the two disagree (source edited, PTX not rebuilt).
# Set PTXAS to a ptxas binary (e.g. from PyPI's nvidia-cuda-nvcc-cu12) to check the PTX
# assembles for sm_90 and print its register use.
set -euo pipefail
cd "$(dirname "$0")/../kvd-gpu/kernels"
clang="${CLANG:-$(command -v clang-14 || command -v clang || true)}"
[[ -n "$clang" ]] || { echo "gpu-kernels: needs clang (apt-get install clang-14)" >&2; exit 1; }
sum=$(sha256sum copy_runs.cu | cut -d' ' -f1)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$clang" --cuda-device-only --cuda-gpu-arch=sm_70 -nocudainc -nocudalib -O3 -S -x cuda \
    -o "$tmp" copy_runs.cu
{ echo "// source sha256: $sum (scripts/gpu-kernels.sh from copy_runs.cu; do not edit)"; cat "$tmp"; } \
    > copy_runs.ptx
if [[ -n "${PTXAS:-}" ]]; then
    "$PTXAS" -arch=sm_90 -v copy_runs.ptx -o /dev/null
fi
echo "gpu-kernels: wrote kvd-gpu/kernels/copy_runs.ptx" >&2
