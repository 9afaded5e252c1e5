"""Fixtures for the Redis session-cache tests (imported explicitly by those test modules)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from plano_extproc.affinity.redis_cache import RedisSessionCache
from tests.redis_server import RedisServer, RedisServerError, find_redis_server

__all__ = ["redis_admin", "redis_cache", "redis_server"]


def _binary() -> str:
    try:
        return find_redis_server()
    except RedisServerError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, stopped after the test."""
    server = RedisServer(binary=_binary())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain synchronous client to inspect what the cache wrote."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def redis_cache(redis_server: RedisServer) -> AsyncIterator[RedisSessionCache]:
    # Generous timeouts: these tests check behaviour, not latency, on a possibly busy machine.
    cache = RedisSessionCache(redis_server.url, ttl_seconds=600, connect_timeout=1, op_timeout=1)
    await cache.start()
    try:
        yield cache
    finally:
        await cache.close()
