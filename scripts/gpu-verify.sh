#!/usr/bin/env bash
# The GPU tier's verification, run ON a machine with an NVIDIA GPU from what
# scripts/gpu-pack.sh packed into .gpu/ (carried there by the `device` tool):
#   1. kvd-gpu's CUDA test (open device 0, pin, 1 MiB round trip),
#   2. kvd-bench gpu --backend cuda: kvd's daemon-driven D2H/H2D beside the same copies made
#      in-process with cudaMemcpyAsync-equivalent driver calls, 1 and 32 layer buffers per
#      block, and with a T0 pool; paged gather beside one contiguous copy,
#   3. python/tests/test_gpu_engines.py on CUDA: 1000 rounds saved by one process and loaded
#      bit for bit by another through CUDA IPC, and engines killed mid-transfer.
# Everything is written under $OUT (or /tmp/kvd-gpu-out). Each step is bounded by `timeout`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/kvd-gpu-out}"
mkdir -p "$out"
[[ -x .gpu/bin/kvd ]] || { echo "no .gpu/bin/kvd: run scripts/gpu-pack.sh here and carry .gpu" >&2; exit 1; }
export KVD_BIN_DIR="$PWD/.gpu/bin" KVD_BIN="$PWD/.gpu/bin/kvd" PYTHONUNBUFFERED=1 RUST_BACKTRACE=0
status=0
step() { echo; echo "==> $*"; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"

step "Python package"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kvd-site .gpu/kvd-*.whl || status=1
export PYTHONPATH=/tmp/kvd-site

step "kvd-gpu CUDA test"
timeout 120 .gpu/bin/kvd-gpu-tests --nocapture 2>&1 | tee "$out/kvd-gpu-tests.txt" || status=1

step "kvd-bench gpu (daemon-driven copies vs the same copies in-process)"
for args in "--layers 1" "--layers 32" "--layers 1 --pool-bytes 8GiB"; do
    name=$(echo "$args" | tr -d ' -' )
    echo "-- $args"
    timeout 240 .gpu/bin/kvd-bench gpu --backend cuda $args --total 1GiB --rounds 3 2>&1 \
        | tee "$out/bench-$name.txt" || status=1
done

step "engines across processes on CUDA (1000 rounds; killed mid-transfer)"
(cd python/tests && timeout 300 python3 -m pytest -p no:cacheprovider -q -rs test_gpu_engines.py -k cuda) \
    2>&1 | tee "$out/pytest.txt" || status=1
grep -q "passed" "$out/pytest.txt" && ! grep -q "skipped\|SKIPPED" "$out/pytest.txt" || status=1

echo
echo "gpu-verify: exit $status; logs in $out"
exit "$status"
