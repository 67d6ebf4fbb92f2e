#!/usr/bin/env bash
# Installs the Debian packages kvd's build and tests need, if any is missing:
#   libclang-dev  — bindgen for RocksDB (the disk tier's catalog) at build time
#   fio           — the reference kvd-bench disk compares against
#   redis-server  — the cluster index's tests run a private one on 127.0.0.1 (with redis-cli)
#   tmux          — `kvd-ctl top` is tested live in a tmux pane
#   gcc           — the C ABI's test program (ffi/tests/c)
# Runs apt-get as root (or through sudo); otherwise prints the command to run and fails.
set -euo pipefail
need=()
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1 \
  || need+=(libclang-dev)
command -v fio >/dev/null || need+=(fio)
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || need+=(redis-server)
command -v tmux >/dev/null || need+=(tmux)
command -v cc >/dev/null || need+=(gcc)
[ ${#need[@]} -eq 0 ] && exit 0
echo "==> installing system packages: ${need[*]}"
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "missing system packages; install them first: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
