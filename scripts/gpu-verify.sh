#!/usr/bin/env bash
# The GPU tier's verification, run ON a machine with an NVIDIA GPU from what
# scripts/gpu-pack.sh packed into .gpu/ (carried there by the `device` tool):
#   1. kvd-gpu's CUDA tests (open device 0; every copy method — one driver copy per page,
#      cuMemcpyBatchAsync, kvd's copy kernel, auto — scatters, copies and gathers 1024 pages
#      bit for bit, pinned and unpinned; checksums computed on the GPU equal twox-hash's),
#   2. kvd-bench gpu --backend cuda: kvd's daemon-driven D2H/H2D beside the same copies made
#      in-process with the same method, 1 and 32 layer buffers per block; paged gathers and
#      scatters beside one contiguous cuMemcpyAsync of the same bytes; a T0 pool; one driver
#      copy per page at 32 layers,
#   3. python/tests/test_gpu_engines.py on CUDA: 1000 rounds saved by one process and loaded
#      bit for bit by another through CUDA IPC, and engines killed mid-transfer.
# Every step is bounded by `timeout`; the whole run takes about 5 minutes on an H200. Logs go
# to $OUT (or /tmp/kvd-gpu-out): verify.log (everything) and logs.tgz (one file per step).
#   GPU_VERIFY_STEPS   which steps to run (default "tests engines bench")
#   GPU_VERIFY_BENCH   bench configurations, ';'-separated kvd-bench gpu arguments (default below)
#   GPU_VERIFY_BUDGET  seconds the whole run may take (default 480); a step that would pass it
#                      is cut short (and fails), later ones are skipped
# (Not KVD_*: kvd reads every KVD_<SECTION>_<KEY> variable as configuration.)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/kvd-gpu-out}"
logs=/tmp/kvd-gpu-logs
rm -rf "$logs"
mkdir -p "$out" "$logs"
exec > >(tee "$out/verify.log") 2>&1
[[ -x .gpu/bin/kvd ]] || { echo "no .gpu/bin/kvd: run scripts/gpu-pack.sh here and carry .gpu"; exit 1; }
export KVD_BIN_DIR="$PWD/.gpu/bin" KVD_BIN="$PWD/.gpu/bin/kvd" PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
steps="${GPU_VERIFY_STEPS:-tests engines bench}"
sizes="64KiB,256KiB,1MiB,4MiB"
# What each figure is for: auto (the default) at 1 and 32 layers per block against the issue's
# targets; the T0 pool; one driver copy per page at 32 layers, beside auto (kvd's kernel there).
default_bench="--layers 1;--layers 32;--layers 1 --pool-bytes 4GiB;--layers 32 --copy-method memcpy --sizes 256KiB,4MiB"
status=0
deadline=$((SECONDS + ${GPU_VERIFY_BUDGET:-480}))
step() { echo; echo "==> $* ($(date +%T), ${SECONDS}s)"; }
failed() { echo "FAILED: $*"; status=1; }
# `bounded SECS CMD...`: CMD under `timeout`, at most SECS and never past the deadline.
bounded() {
    local left=$((deadline - SECONDS)) limit=$1
    shift
    (( left < limit )) && limit=$left
    if (( limit < 5 )); then
        echo "SKIPPED (out of time): $*"
        return 124
    fi
    timeout "$limit" "$@"
}

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv 2>&1 \
    | tee "$logs/gpu.txt"
echo "cpus: $(nproc)"

step "Python package"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kvd-site .gpu/kvd-*.whl || failed "installing the wheel"
export PYTHONPATH=/tmp/kvd-site

if [[ " $steps " == *" tests "* ]]; then
    step "kvd-gpu CUDA tests"
    bounded 90 .gpu/bin/kvd-gpu-tests --nocapture --test-threads 1 2>&1 | tee "$logs/kvd-gpu-tests.txt"
    [[ ${PIPESTATUS[0]} == 0 ]] || failed "kvd-gpu tests"
    grep -q SKIPPED "$logs/kvd-gpu-tests.txt" && failed "a CUDA test skipped on a GPU machine"
fi

if [[ " $steps " == *" engines "* ]]; then
    step "engines across processes on CUDA (1000 rounds; killed mid-transfer)"
    (cd python/tests && bounded 180 python3 -m pytest -p no:cacheprovider -q -rs test_gpu_engines.py -k cuda) \
        2>&1 | tee "$logs/pytest.txt"
    [[ ${PIPESTATUS[0]} == 0 ]] || failed "engine tests"
    grep -q "passed" "$logs/pytest.txt" && ! grep -qi "skipped" "$logs/pytest.txt" \
        || failed "engine tests did not all run"
fi

if [[ " $steps " == *" bench "* ]]; then
    IFS=';' read -ra configs <<< "${GPU_VERIFY_BENCH:-$default_bench}"
    for args in "${configs[@]}"; do
        name=$(echo "$args" | tr -d ' -' | tr -c 'a-zA-Z0-9_\n' '_')
        [[ "$args" == *--sizes* ]] || args+=" --sizes $sizes"
        step "kvd-bench gpu $args"
        # shellcheck disable=SC2086  # $args is a list of arguments
        bounded 90 .gpu/bin/kvd-bench gpu --backend cuda --total 512MiB --rounds 3 $args \
            2>&1 | tee "$logs/bench-$name.txt"
        [[ ${PIPESTATUS[0]} == 0 ]] || failed "kvd-bench gpu $args"
        pkill -x kvd 2>/dev/null || true  # a daemon left by a bench cut short
    done
fi

step "summary"
grep -h "ratio\|^test result\|passed\|FAILED" "$logs"/*.txt 2>/dev/null
tar -C "$logs" -czf "$out/logs.tgz" .
echo
echo "gpu-verify: exit $status after ${SECONDS}s; logs in $out"
exit "$status"
