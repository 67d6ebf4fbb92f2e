#!/usr/bin/env bash
# Creates (once) the Python virtual environment the Kubernetes/Helm checks run in
# (tests/deploy): Helm's own Go SDK through helm-python-sdk (renders and lints the chart; no helm
# binary or Go toolchain needed), kubernetes-validate (the Kubernetes OpenAPI schemas of each
# release, strict mode) and cloudcoil's Prometheus Operator and cert-manager models
# (PodMonitor/ServiceMonitor, Certificate: CRDs the Kubernetes schemas do not know), plus pytest. All pinned; ~450 MB from
# PyPI. Prints the venv's path on the last line of stdout.
#
#   KVD_DEPLOY_VENV   where the venv lives (default ~/.cache/kvd/deploy-venv)
#   KVD_PYTHON        interpreter to base it on (default: python3.11, else python3)
set -euo pipefail

venv="${KVD_DEPLOY_VENV:-$HOME/.cache/kvd/deploy-venv}"
stamp="$venv/.kvd-ready-v2"
if [[ -f "$stamp" ]]; then
    echo "$venv"
    exit 0
fi

py="${KVD_PYTHON:-$(command -v python3.11 || command -v python3)}"
export SSL_CERT_FILE="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
echo "deploy-env: creating $venv (helm-python-sdk, kubernetes-validate, ~450 MB)" >&2
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0" \
    "cloudcoil.models.prometheus_operator==0.80.1.0" "cloudcoil.models.cert_manager==1.17.1.0" \
    "PyYAML>=6" "pytest>=8" >&2
"$venv/bin/python" -c 'import helm_python; print("deploy-env: Helm SDK", helm_python.helm_sdk_version())' >&2
touch "$stamp"
echo "$venv"
