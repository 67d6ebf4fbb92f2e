#!/usr/bin/env bash
# Sets up kvd on a fresh machine and runs the daemon with a small demo workload:
#   1. builds kvd, kvd-ctl and kvd-bench (release),
#   2. starts kvd on a private socket (.kvd-run/kvd.sock) with a 512 MiB arena and a 1 GiB disk
#      tier in .kvd-run/disk,
#   3. drives it from a separate process (kvd-bench: put/get verified byte for byte, lookups),
#   4. drains DRAM to disk (kvd-ctl drain, with a progress bar),
#   5. shows `kvd-ctl status` (tiers, disk, and the cluster index: a private redis-server on
#      127.0.0.1 that kvd publishes its blocks to) and `kvd-ctl where` for a stored block,
#      then stops the daemon with SIGTERM (graceful shutdown); the blocks on disk are still
#      there for the next start.
# Pass --keep to leave the daemon running afterwards (stop it with: kill $(cat .kvd-run/kvd.pid)).
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvd/target}"
mkdir -p "$CARGO_TARGET_DIR"
command -v cargo >/dev/null || {
  echo "cargo not found: install Rust (rustup) first; rust-toolchain.toml pins the version" >&2
  exit 1
}

scripts/system-deps.sh
echo "==> building kvd (release; the first build takes ~40 minutes on 2 cores, RocksDB most of it)"
cargo build --release --workspace --bins
bin="$CARGO_TARGET_DIR/release"

run=.kvd-run
mkdir -p "$run"
sock="$PWD/$run/kvd.sock"
if [ -S "$sock" ] && "$bin/kvd-ctl" --socket "$sock" status >/dev/null 2>&1; then
  echo "a demo kvd is already running on $sock; stop it first: kill \$(cat $run/kvd.pid)" >&2
  exit 1
fi

# The cluster index: a private redis-server on the first free port from 16390.
redis_port=16390
while (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; do
  redis_port=$((redis_port + 1))
  [ "$redis_port" -lt 16450 ] || { echo "no free port for redis-server in 16390..16449" >&2; exit 1; }
done
echo "==> starting redis-server on 127.0.0.1:$redis_port (the cluster index)"
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --dir "$PWD/$run" \
  >"$run/redis.log" 2>&1 &
redis_pid=$!

start_kvd() {
  echo "==> starting kvd on $sock (log: $run/kvd.log)"
  "$bin/kvd" --config config/kvd.toml --socket "$sock" \
    --set dram.arena_bytes=512MiB --set dram.max_namespaces=2 --set dram.max_block_bytes=4MiB \
    --set disk.path="$PWD/$run/disk" --set disk.capacity_bytes=1GiB --set disk.region_bytes=64MiB \
    --set index.redis_urls="redis://127.0.0.1:$redis_port" --set index.node_id=demo \
    >"$run/kvd.log" 2>&1 &
  pid=$!
  echo "$pid" >"$run/kvd.pid"
  for _ in $(seq 1 200); do
    "$bin/kvd-ctl" --socket "$sock" status >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}
cleanup() {
  if [ "$keep" = 0 ]; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    kill -TERM "$redis_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
if ! start_kvd; then
  # The demo's disk tier from an older kvd (another on-disk format) is only demo data: set it
  # aside and start again. Anything else is a real failure.
  if grep -q "was written by kvd disk format" "$run/kvd.log"; then
    old="$run/disk.old-format-$(date +%s)"
    echo "==> $run/disk holds an older disk format; moved to $old" >&2
    mv "$run/disk" "$old"
    start_kvd || { cat "$run/kvd.log"; echo "kvd failed to start" >&2; exit 1; }
  else
    cat "$run/kvd.log"; echo "kvd failed to start" >&2; exit 1
  fi
fi

echo "==> demo workload: kvd-bench dram from a separate process (every byte verified)"
"$bin/kvd-bench" dram --socket "$sock" --total 128MiB --rounds 2

echo "==> storing a few blocks that stay, draining them to disk, then kvd-ctl status"
"$bin/kvd-bench" dram --socket "$sock" --total 8MiB --rounds 1 --sizes 1MiB --lookups 10 --keep-blocks >/dev/null
"$bin/kvd-ctl" --socket "$sock" drain
"$bin/kvd-ctl" --socket "$sock" status
echo
"$bin/kvd-ctl" --socket "$sock" ls --limit 5
# The first listed block: which nodes of the cluster hold it (here: this one, in DRAM and disk).
first=$("$bin/kvd-ctl" --socket "$sock" --json ls --limit 1)
ns=$(printf '%s' "$first" | grep -o '"namespace":"[0-9a-f]*"' | head -1 | cut -d'"' -f4 || true)
key=$(printf '%s' "$first" | grep -o '"key":"[0-9a-f]*"' | head -1 | cut -d'"' -f4 || true)
if [ -n "$ns" ] && [ -n "$key" ]; then
  echo
  "$bin/kvd-ctl" --socket "$sock" where --ns "$ns" "$key"
fi

if [ "$keep" = 1 ]; then
  echo
  echo "kvd keeps running (pid $pid). Try: $bin/kvd-ctl --socket $sock status"
  echo "Stop it with: kill $pid $redis_pid  (kvd, then its redis-server)"
else
  echo
  echo "==> stopping kvd (SIGTERM, graceful)"
fi
