#!/usr/bin/env bash
# Installs the S3-compatible servers the S3 tier's tests run against, once, under ~/.cache/kvd:
#   s3s-fs 0.14.1  — Rust, filesystem-backed, checks SigV4 signatures (cargo install, ~2 min
#                    cold; newer versions need a newer rustc)   -> tools/bin/s3s-fs
#   moto[server]   — Python, closest to AWS's error behaviour (pip, a few seconds)
#                                                               -> s3-venv/bin/moto_server
# Both bind 127.0.0.1 on ports the tests pick. Idempotent: prints nothing when both exist.
set -euo pipefail
home="${KVD_CACHE:-$HOME/.cache/kvd}"
mkdir -p "$home"
if [ ! -x "$home/tools/bin/s3s-fs" ]; then
  echo "==> installing s3s-fs 0.14.1 into $home/tools (cargo install, about 2 minutes)"
  cargo install s3s-fs@0.14.1 --locked --features binary --root "$home/tools" --quiet
fi
if [ ! -x "$home/s3-venv/bin/moto_server" ]; then
  echo "==> installing moto[server] into $home/s3-venv"
  python3 -m venv "$home/s3-venv"
  "$home/s3-venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5'
fi
