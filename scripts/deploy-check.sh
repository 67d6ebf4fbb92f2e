#!/usr/bin/env bash
# Checks the Helm chart (config/helm/kvd) and the plain manifests (config/kubernetes): renders
# the chart with Helm's Go SDK, validates every object against the Kubernetes OpenAPI schemas
# (strict) and the Prometheus Operator CRDs, refuses bad values with clear errors, loads the
# rendered kvd.toml into the real kvd and probes a daemon started from it. (cloudcoil ships a
# pytest plugin for live clusters that is not wanted here, hence -p no:cloudcoil.)
# KVD_DEPLOY_BLESS=1 regenerates config/kubernetes/*.yaml from the chart first.
# Needs the kvd binary (cargo build --workspace --bins); the venv is made by deploy-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvd/target}"
venv=$(scripts/deploy-env.sh | tail -n 1)
KVD_BIN_DIR="${KVD_BIN_DIR:-$CARGO_TARGET_DIR/debug}" \
    "$venv/bin/pytest" -p no:cacheprovider -p no:cloudcoil -q -rs tests/deploy "$@"
