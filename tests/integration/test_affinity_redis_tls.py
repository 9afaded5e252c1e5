"""rediss:// against a real redis-server behind a TLS terminator (the bundled redis-server is
built without TLS): the CA from overrides.upstream_tls_ca_path is trusted, and a server the
cache cannot verify leaves it failing open, never raising."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from plano_extproc.affinity.base import PinnedDecision
from plano_extproc.affinity.redis_cache import RedisSessionCache
from tests.integration.conftest_affinity import *  # noqa: F403  (pytest fixtures)
from tests.redis_server import RedisServer
from tests.tls_certs import CertificateAuthority

pytestmark = pytest.mark.integration

A = PinnedDecision("openai/gpt-4o", "code_generation")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tls_terminator(
    ca: CertificateAuthority, tmp: Path, backend_port: int
) -> AsyncIterator[int]:
    ctx = ca.server_context(tmp, "localhost")
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", backend_port)
        except OSError:
            writer.close()
            return
        for t in (_pipe(reader, w2), _pipe(r2, writer)):
            task = asyncio.create_task(t)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_rediss_with_the_configured_ca(
    tmp_path: Path, redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    ca = CertificateAuthority.create(tmp_path)
    async with tls_terminator(ca, tmp_path, redis_server.port) as port:
        cache = RedisSessionCache(
            f"rediss://localhost:{port}/0",
            connect_timeout=2,
            op_timeout=2,
            ca_file=str(ca.pem_path),
        )
        await cache.start()
        try:
            assert cache.health()["healthy"] is True
            assert await cache.put_if_absent("tls-session", A) == A
            assert await cache.get("tls-session", near=False) == A
        finally:
            await cache.close()
    assert redis_admin.get("plano:affinity:tls-session") is not None  # went through TLS


async def test_rediss_server_that_cannot_be_verified_fails_open(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    ca = CertificateAuthority.create(tmp_path)
    async with tls_terminator(ca, tmp_path, redis_server.port) as port:
        cache = RedisSessionCache(
            f"rediss://localhost:{port}/0", connect_timeout=2, op_timeout=2
        )  # no ca_file: the system store does not know this CA
        await cache.start()
        try:
            health = cache.health()
            assert health["healthy"] is False
            assert "certificate" in str(health.get("last_error", "")).lower()
            assert await cache.get("x") is None
            assert await cache.put_if_absent("x", A) == A  # served without affinity
        finally:
            await cache.close()


async def test_rate_limit_budgets_over_rediss_with_the_configured_ca(
    tmp_path: Path, redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    """The budget store opens its own connections (not the session cache's client): they
    verify the same CA, and an unverifiable server leaves budgets per gateway, not failing."""
    from plano_extproc.ratelimit.budget import Bucket
    from plano_extproc.ratelimit.memory import SharedBudgets
    from plano_extproc.ratelimit.redis_store import RedisBudgets

    ca = CertificateAuthority.create(tmp_path)
    bucket = Bucket("tls-tenant", capacity=5, rate=0.001)
    async with tls_terminator(ca, tmp_path, redis_server.port) as port:
        url = f"rediss://localhost:{port}/0"
        store = RedisBudgets(url, SharedBudgets(), op_timeout=2, ca_file=str(ca.pem_path))
        unverified = RedisBudgets(url, SharedBudgets(), op_timeout=2)  # system CAs only
        await store.start()
        await unverified.start()
        try:
            assert store.healthy and (await store.take([[bucket]], 5)).taken == 0
            assert (await store.take([[bucket]], 1)).taken is None
            assert unverified.healthy is False
            assert "certificate" in str(unverified.health()["last_error"]).lower()
            assert (await unverified.take([[bucket]], 5)).taken == 0  # its own budget
        finally:
            await store.close()
            await unverified.close()
    assert redis_admin.exists("plano:budget:tls-tenant") == 1  # went through TLS
