"""Redis session cache against a real redis-server: stored format, TTL, malformed values, auth."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis

from plano_extproc.affinity.base import PinnedDecision
from plano_extproc.affinity.redis_cache import RedisSessionCache
from tests.integration.conftest_affinity import *  # noqa: F403  (pytest fixtures)
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

A = PinnedDecision("openai/gpt-4o", "code_generation")
B = PinnedDecision("anthropic/claude-sonnet-4", None)


async def test_stored_key_value_and_ttl(
    redis_cache: RedisSessionCache, redis_admin: redis.Redis
) -> None:
    assert await redis_cache.get("acme:sess-1") is None
    assert await redis_cache.put_if_absent("acme:sess-1", A) == A
    raw = redis_admin.get("plano:affinity:acme:sess-1")
    assert raw is not None
    assert json.loads(raw) == {"model_name": "openai/gpt-4o", "route_name": "code_generation"}
    ttl = redis_admin.ttl("plano:affinity:acme:sess-1")
    assert 590 <= ttl <= 600
    assert await redis_cache.get("acme:sess-1") == A


async def test_null_route_and_hits_do_not_refresh_ttl(
    redis_cache: RedisSessionCache, redis_admin: redis.Redis
) -> None:
    await redis_cache.put_if_absent("s", B)
    assert json.loads(redis_admin.get("plano:affinity:s")) == {  # type: ignore[arg-type]
        "model_name": "anthropic/claude-sonnet-4",
        "route_name": None,
    }
    redis_admin.expire("plano:affinity:s", 100)
    assert await redis_cache.get("s") == B
    assert await redis_cache.put_if_absent("s", A) == B
    assert redis_admin.ttl("plano:affinity:s") <= 100


async def test_reads_values_written_by_plano(
    redis_cache: RedisSessionCache, redis_admin: redis.Redis
) -> None:
    redis_admin.set("plano:affinity:p", '{"model_name":"groq/llama","route_name":null}', ex=60)
    assert await redis_cache.get("p") == PinnedDecision("groq/llama", None)
    assert await redis_cache.put_if_absent("p", A) == PinnedDecision("groq/llama", None)


async def test_ttl_expiry(redis_server: RedisServer) -> None:
    cache = RedisSessionCache(redis_server.url, ttl_seconds=1)
    await cache.start()
    try:
        await cache.put_if_absent("short", A)
        assert await cache.get("short") == A
        for _ in range(60):  # bounded: at most ~3 s
            if await cache.get("short") is None:
                break
            await asyncio.sleep(0.05)
        assert await cache.get("short") is None
        assert await cache.put_if_absent("short", B) == B
    finally:
        await cache.close()


async def test_malformed_values_are_misses_and_get_replaced(
    redis_cache: RedisSessionCache, redis_admin: redis.Redis
) -> None:
    redis_admin.set("plano:affinity:bad", "not json", ex=300)
    redis_admin.set("plano:affinity:bad2", '{"model_name": 7}', ex=300)
    assert await redis_cache.get("bad") is None
    assert await redis_cache.get("bad2") is None
    assert redis_cache.health()["malformed"] == 2
    # a put replaces the garbage instead of leaving it pinned until its TTL runs out
    assert await redis_cache.put_if_absent("bad", A) == A
    assert await redis_cache.get("bad") == A
    assert redis_admin.ttl("plano:affinity:bad") > 300
    assert redis_cache.health()["healthy"] is True


async def test_wrong_type_key_is_an_error_not_an_outage(
    redis_cache: RedisSessionCache, redis_admin: redis.Redis
) -> None:
    redis_admin.hset("plano:affinity:hash", "a", "b")
    assert await redis_cache.get("hash") is None
    assert await redis_cache.put_if_absent("hash", A) == A
    h = redis_cache.health()
    assert h["errors"] == 2
    assert h["healthy"] is True
    assert "WRONGTYPE" in (h["last_error"] or "")
    assert await redis_cache.put_if_absent("other", A) == A


async def test_set_nx_fallback_when_scripting_is_forbidden(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    # An ACL user without EVAL/EVALSHA gets NOPERM; the cache must switch to SET NX + GET.
    redis_admin.execute_command(
        "ACL", "SETUSER", "noscript", "on", ">pw", "~*", "+@all", "-eval", "-evalsha", "-script"
    )
    url = f"redis://noscript:pw@127.0.0.1:{redis_server.port}/0"
    cache = RedisSessionCache(url)
    await cache.start()
    try:
        assert await cache.put_if_absent("fb", A) == A
        assert cache.health()["atomic_put"] == "set-nx+get"
        assert await cache.put_if_absent("fb", B) == A
        raw = redis_admin.get("plano:affinity:fb")
        assert raw is not None and json.loads(raw)["model_name"] == A.model
        assert redis_admin.ttl("plano:affinity:fb") > 590
        assert cache.health()["healthy"] is True
    finally:
        await cache.close()


async def test_password_and_db_index_honoured() -> None:
    with RedisServer(password="s3cr:et/") as server:
        cache = RedisSessionCache(server.url_for(db=3))
        await cache.start()
        try:
            assert cache.health()["healthy"] is True
            assert "s3cr" not in cache.health()["url"]
            await cache.put_if_absent("k", A)
            admin3 = redis.Redis(port=server.port, password="s3cr:et/", db=3)
            admin0 = redis.Redis(port=server.port, password="s3cr:et/", db=0)
            try:
                assert admin3.get("plano:affinity:k") is not None
                assert admin0.get("plano:affinity:k") is None
            finally:
                admin3.close()
                admin0.close()
        finally:
            await cache.close()

        wrong = RedisSessionCache(server.url_for(db=3, password="nope"), retry_interval=0.05)
        await wrong.start()
        try:
            h = wrong.health()
            assert h["healthy"] is False
            assert "nope" not in h["url"]
            assert await wrong.get("k") is None
        finally:
            await wrong.close()


async def test_put_replaces_with_a_fresh_ttl_and_bypasses_the_near_cache(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    # Two replicas with near caches: a binding replaced on one must be seen by the other.
    one = RedisSessionCache(redis_server.url, ttl_seconds=600, near_cache_seconds=30)
    two = RedisSessionCache(redis_server.url, ttl_seconds=600, near_cache_seconds=30)
    await one.start()
    await two.start()
    try:
        await one.put("implicit:abc", A)
        assert await two.get("implicit:abc", near=False) == A
        redis_admin.expire("plano:affinity:implicit:abc", 100)
        await one.put("implicit:abc", B)
        assert 590 <= redis_admin.ttl("plano:affinity:implicit:abc") <= 600
        assert await two.get("implicit:abc", near=False) == B
        await two.put("implicit:abc", A)
        assert await one.get("implicit:abc", near=False) == A
    finally:
        await one.close()
        await two.close()
