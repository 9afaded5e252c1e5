"""Redis outages: start without Redis, Redis crashing mid-traffic, and self-healing.

No wall-clock asserts: every call is wrapped in a generous ``wait_for`` so a hang fails the
test instead of stalling it, and "skipped Redis" is checked through the counters.
"""

from __future__ import annotations

import asyncio

import pytest

from plano_extproc.affinity.base import PinnedDecision
from plano_extproc.affinity.redis_cache import RedisSessionCache
from tests.integration.conftest_affinity import *  # noqa: F403  (pytest fixtures)
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.integration

A = PinnedDecision("openai/gpt-4o", "code")
B = PinnedDecision("anthropic/claude-sonnet-4", None)
CALL_LIMIT = 5.0  # far above the ~0.75 s worst case; only catches hangs


async def wait_healthy(cache: RedisSessionCache, healthy: bool = True, rounds: int = 150) -> None:
    """Poll health() for at most rounds x 0.05 s."""
    for _ in range(rounds):
        if cache.health()["healthy"] is healthy:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"cache never became healthy={healthy}: {cache.health()}")


async def test_down_at_start_then_heals_without_restart() -> None:
    server = RedisServer(port=free_port())
    cache = RedisSessionCache(server.url, retry_interval=0.1)
    try:
        await asyncio.wait_for(cache.start(), CALL_LIMIT)  # must not raise
        h = cache.health()
        assert h["healthy"] is False
        assert h["errors"] == 1
        assert h["last_error"]
        assert await asyncio.wait_for(cache.get("k"), CALL_LIMIT) is None
        assert await asyncio.wait_for(cache.put_if_absent("k", A), CALL_LIMIT) == A
        assert cache.health()["skipped"] == 2

        server.start()
        await wait_healthy(cache)
        assert await cache.put_if_absent("k", A) == A
        assert await cache.put_if_absent("k", B) == A
        assert await cache.get("k") == A
    finally:
        await cache.close()
        server.stop()


async def test_killed_mid_traffic_stays_prompt_then_recovers(redis_server: RedisServer) -> None:
    cache = RedisSessionCache(redis_server.url, retry_interval=0.1)
    await cache.start()
    try:
        assert await cache.put_if_absent("before", A) == A
        assert await cache.get("before") == A

        redis_server.kill()
        # Sequential traffic: the first call sees the outage, the rest skip Redis entirely.
        for i in range(100):
            assert await asyncio.wait_for(cache.get(f"s{i}"), CALL_LIMIT) is None
            got = await asyncio.wait_for(cache.put_if_absent(f"s{i}", B), CALL_LIMIT)
            assert got == B
        h = cache.health()
        assert h["healthy"] is False
        assert 1 <= h["errors"] <= 2  # only the call(s) in flight when Redis died paid for it
        assert h["skipped"] >= 198

        # Concurrent burst while down: all answered, none waits on Redis.
        burst = [cache.get(f"c{i}") for i in range(50)]
        assert await asyncio.wait_for(asyncio.gather(*burst), CALL_LIMIT) == [None] * 50

        redis_server.restart()  # same port, empty data set
        await wait_healthy(cache)
        assert await cache.get("before") is None
        assert await cache.put_if_absent("after", A) == A
        assert await cache.put_if_absent("after", B) == A
        assert await cache.get("after") == A
        assert cache.health()["errors"] == h["errors"]  # no stale-socket errors after recovery
    finally:
        await cache.close()


async def test_concurrent_traffic_when_redis_dies(redis_server: RedisServer) -> None:
    # No near cache: every get must go to Redis, so the outage is seen on this path.
    cache = RedisSessionCache(redis_server.url, retry_interval=0.1, near_cache_seconds=0)
    await cache.start()
    try:
        # Open several pooled connections so the kill hits in-flight and idle sockets.
        await asyncio.gather(*(cache.put_if_absent(f"w{i}", A) for i in range(20)))
        redis_server.kill()
        for _ in range(5):
            results = await asyncio.wait_for(
                asyncio.gather(*(cache.get(f"w{i}") for i in range(20))), CALL_LIMIT
            )
            assert all(r in (None, A) for r in results)
        assert cache.health()["healthy"] is False
        assert cache.health()["errors"] <= 20
        redis_server.restart()
        await wait_healthy(cache)
        assert await cache.put_if_absent("w0", B) == B
    finally:
        await cache.close()


async def test_paused_redis_is_bounded_by_timeouts(redis_server: RedisServer) -> None:
    """A server that accepts but never answers (SIGSTOP) must not hang requests."""
    import os
    import signal

    cache = RedisSessionCache(redis_server.url, op_timeout=0.1, retry_interval=0.1)
    await cache.start()
    proc = redis_server._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert await asyncio.wait_for(cache.get("k"), CALL_LIMIT) is None
        assert await asyncio.wait_for(cache.put_if_absent("k", A), CALL_LIMIT) == A
        h = cache.health()
        assert h["healthy"] is False
        assert h["errors"] == 1
        assert h["skipped"] == 1
        assert "Timeout" in (h["last_error"] or "")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        await wait_healthy(cache)
        assert await cache.put_if_absent("k", B) == B
    finally:
        await cache.close()


async def test_close_stops_probe_task() -> None:
    cache = RedisSessionCache(f"redis://127.0.0.1:{free_port()}/0", retry_interval=0.05)
    await cache.start()
    assert cache._breaker.probing
    await cache.close()
    assert not cache._breaker.probing


async def test_near_cache_serves_known_pins_and_is_dropped_when_redis_fails(
    redis_server: RedisServer,
) -> None:
    cache = RedisSessionCache(redis_server.url, retry_interval=0.1, near_cache_seconds=30)
    await cache.start()
    try:
        assert await cache.put_if_absent("hot", A) == A
        other = RedisSessionCache(redis_server.url, near_cache_seconds=30)
        await other.start()
        assert await other.get("hot") == A  # read through Redis, then kept locally
        redis_server.kill()
        # Known pins are served from memory without touching Redis.
        assert await other.get("hot") == A
        assert other.health()["errors"] == 0 and other.health()["near_cache_hits"] == 1
        # A miss goes to Redis, trips the breaker and drops the local copies: after an
        # outage Redis may come back empty and this replica must follow it again.
        assert await asyncio.wait_for(other.get("cold"), CALL_LIMIT) is None
        assert other.health()["healthy"] is False
        assert await other.get("hot") is None
        await other.close()
    finally:
        await cache.close()


async def test_near_cache_expires_with_the_key(redis_server: RedisServer) -> None:
    cache = RedisSessionCache(redis_server.url, ttl_seconds=1, near_cache_seconds=30)
    await cache.start()
    try:
        assert await cache.put_if_absent("short", A) == A
        assert await cache.get("short") == A
        await asyncio.sleep(1.2)
        assert await cache.get("short") is None
    finally:
        await cache.close()
