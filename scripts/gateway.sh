#!/usr/bin/env bash
# Runs the gateway (ext_proc server + Envoy) in the foreground on http://127.0.0.1:12000 with the
# quick-start config and the embedded router. No API keys are needed for /routing/v1/*.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh router
exec .venv/bin/plano-extproc up "${1:-examples/quickstart.yaml}" "${@:2}"
