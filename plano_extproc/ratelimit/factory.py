"""Build the budget store the configuration asks for (one place that knows the kinds).

Budgets follow the session cache: with ``routing.session_cache.type: redis`` they live in that
Redis (every replica and worker shares one budget per selector); otherwise in a table every
worker of this gateway maps (``memory.SharedBudgets``). The Redis store falls back to that
table while Redis cannot be used (fail open) and returns to Redis when it answers again.
"""

from __future__ import annotations

from plano_extproc.config import Config
from plano_extproc.ratelimit.memory import SharedBudgets
from plano_extproc.ratelimit.redis_store import RedisBudgets


def build_budget_store(config: Config) -> SharedBudgets | RedisBudgets:
    """An unstarted store (a Redis one needs ``await start()``)."""
    local = SharedBudgets.from_env()
    cache = config.session_cache
    if cache.type == "redis" and cache.url:
        return RedisBudgets(cache.url, local, ca_file=config.tls_ca_path)
    return local
