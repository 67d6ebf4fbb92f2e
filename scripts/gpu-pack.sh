#!/usr/bin/env bash
# Packs what the GPU verification (scripts/gpu-verify.sh) needs into .gpu/, a folder git
# ignores (.gitignore), for the `device` tool to carry to a machine with an NVIDIA GPU (which has no Rust
# toolchain and no network): kvd, kvd-ctl and kvd-bench built with the CUDA backend (no CUDA
# toolkit is needed to build; libcuda is loaded at run time), kvd-gpu's test binary with its
# CUDA test, and the Python wheel. Binaries are stripped to stay well under the tool's 64 MiB.
# Run here, then on the device: `bash scripts/gpu-verify.sh` with `.gpu` carried.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvd/target}"
rel="$CARGO_TARGET_DIR/release"

echo "gpu-pack: building kvd, kvd-ctl, kvd-bench with --features cuda (release)" >&2
cargo build --release -p kvd -p kvd-client -p kvd-benches --features kvd/cuda,kvd-benches/cuda --bins
echo "gpu-pack: building kvd-gpu's tests with --features cuda" >&2
tests=$(cargo test --release -p kvd-gpu --features cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kvd_gpu":
        print(m["executable"])')
[[ -n "$tests" ]] || { echo "gpu-pack: kvd-gpu test binary not found" >&2; exit 1; }
echo "gpu-pack: building the Python wheel" >&2
wheel=$(bash scripts/python-wheel.sh | tail -n 1)

rm -rf .gpu
mkdir -p .gpu/bin
cp "$rel/kvd" "$rel/kvd-ctl" "$rel/kvd-bench" .gpu/bin/
cp "$tests" .gpu/bin/kvd-gpu-tests
strip .gpu/bin/*
cp "$wheel" .gpu/
size=$(du -sm .gpu | cut -f1)
echo "gpu-pack: .gpu is ${size} MiB" >&2
if (( size > 56 )); then
    echo "gpu-pack: over 56 MiB; the device tool carries 64 MiB with the working tree" >&2
    exit 1
fi
echo "run on the device (carry .gpu): bash scripts/gpu-verify.sh"
