#!/usr/bin/env bash
# Builds the kvd Python wheel (abi3, release) with maturin and installs it into the vLLM test
# venv (scripts/vllm-env.sh). Prints the wheel's path on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvd/target}"
venv=$(scripts/vllm-env.sh | tail -n 1)
out="$CARGO_TARGET_DIR/wheels"
rm -f "$out"/kvd-*.whl
"$venv/bin/maturin" build --release --quiet -m python/Cargo.toml -i "$venv/bin/python" -o "$out" >&2
wheel=$(ls "$out"/kvd-*.whl)
# --no-cache: the wheel's name does not change between builds, and a cached copy must not win.
uv=$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")
"$uv" pip install --quiet --no-cache --python "$venv/bin/python" --reinstall --no-deps "$wheel" >&2
echo "$wheel"
