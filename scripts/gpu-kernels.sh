#!/usr/bin/env bash
# Regenerates kvd-gpu/kernels/kvd.ptx from kvd.cu beside it: clang's CUDA front end
# (Debian's clang-14; no CUDA toolkit, no CUDA headers), PTX for sm_70 and newer, which the
# NVIDIA driver compiles for the GPU it runs on. The PTX's first line records the SHA-256 of
# the source; a kvd-gpu unit test fails when the two disagree (source edited, PTX not rebuilt).
# Then the checksum kernel's arithmetic runs on the host (kernels/host_check.cpp, g++) against
# Python's xxhash (pip install xxhash); on a GPU, kvd-gpu's CUDA tests check the kernel itself.
# Set PTXAS to a ptxas binary (e.g. from PyPI's nvidia-cuda-nvcc-cu12) to check the PTX
# assembles for sm_90 and print its register use.
set -euo pipefail
cd "$(dirname "$0")/../kvd-gpu/kernels"
clang="${CLANG:-$(command -v clang-14 || command -v clang || true)}"
[[ -n "$clang" ]] || { echo "gpu-kernels: needs clang (apt-get install clang-14)" >&2; exit 1; }
sum=$(sha256sum kvd.cu | cut -d' ' -f1)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$clang" --cuda-device-only --cuda-gpu-arch=sm_70 -nocudainc -nocudalib -O3 -S -x cuda \
    -Xclang -target-feature -Xclang +ptx60 \
    -o "$tmp" kvd.cu
{ echo "// source sha256: $sum (scripts/gpu-kernels.sh from kvd.cu; do not edit)"; cat "$tmp"; } \
    > kvd.ptx
if [[ -n "${PTXAS:-}" ]]; then
    "$PTXAS" -arch=sm_90 -v kvd.ptx -o /dev/null
fi
echo "gpu-kernels: wrote kvd-gpu/kernels/kvd.ptx" >&2
python3 -c 'import xxhash' 2>/dev/null || {
    echo "gpu-kernels: the host check needs Python's xxhash (pip install xxhash)" >&2
    exit 1
}
g++ -O2 -Wall -Wextra -Wno-unknown-pragmas -o "$tmp.check" host_check.cpp
trap 'rm -f "$tmp" "$tmp.check"' EXIT
"$tmp.check" | python3 -c '
import sys, xxhash
buf = bytes(((i * 2654435761) >> 13) & 0xFF for i in range(1 << 21))
rows = [line.split() for line in sys.stdin]
bad = [r for r in rows if int(r[2], 16) != xxhash.xxh3_64_intdigest(buf[: int(r[0])])]
assert rows and not bad, f"checksum kernel differs from XXH3-64: {bad[:5]}"
print(f"gpu-kernels: host check: {len(rows)} blocks, every checksum equals xxhash.xxh3_64", file=sys.stderr)
'

