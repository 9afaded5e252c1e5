"""Build the configured session-cache backend (one place that knows the backend names)."""

from __future__ import annotations

from plano_extproc.affinity.base import SessionCache
from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.affinity.redis_cache import RedisSessionCache

SESSION_CACHE_KINDS = ("memory", "redis")


def build_session_cache(
    kind: str,
    *,
    url: str | None,
    ttl_seconds: int,
    max_entries: int,
    near_cache_seconds: float = 30.0,
    ca_file: str | None = None,
) -> SessionCache:
    """Return an unstarted cache; the caller awaits ``start()``.

    Raises ``ValueError`` for an unknown kind or a Redis backend without a URL: these are
    configuration errors and should stop startup, unlike Redis being unreachable.
    """
    normalized = kind.strip().lower()
    if normalized == "memory":
        return MemorySessionCache(ttl_seconds=ttl_seconds, max_entries=max_entries)
    if normalized == "redis":
        if not url:
            raise ValueError("session cache type 'redis' requires a url (redis:// or rediss://)")
        return RedisSessionCache(
            url, ttl_seconds=ttl_seconds, near_cache_seconds=near_cache_seconds, ca_file=ca_file
        )
    raise ValueError(
        f"unknown session cache type {kind!r}; expected one of {', '.join(SESSION_CACHE_KINDS)}"
    )
