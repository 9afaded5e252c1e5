"""Two replicas racing to pin the same session: the first writer wins for everybody."""

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

RACES = 50
CALLERS_PER_REPLICA = 3


@pytest.mark.parametrize("atomic_put", ["lua", "set-nx+get"])
async def test_first_writer_wins_across_two_replicas(
    redis_server: RedisServer, redis_admin: redis.Redis, atomic_put: str
) -> None:
    # Generous timeouts: this checks atomicity, and a timeout would make a caller answer
    # with its own value (by design) on a busy machine.
    replica_a = RedisSessionCache(redis_server.url, connect_timeout=1, op_timeout=1)
    replica_b = RedisSessionCache(redis_server.url, connect_timeout=1, op_timeout=1)
    await replica_a.start()
    await replica_b.start()
    if atomic_put == "set-nx+get":
        replica_a._use_script = replica_b._use_script = False
    try:
        for i in range(RACES):
            key = f"race-{i}"
            calls = []
            for n in range(CALLERS_PER_REPLICA):
                calls.append(replica_a.put_if_absent(key, PinnedDecision(f"a/model-{n}", "r")))
                calls.append(replica_b.put_if_absent(key, PinnedDecision(f"b/model-{n}", None)))
            answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
            stored = redis_admin.get(f"plano:affinity:{key}")
            assert stored is not None
            doc = json.loads(stored)
            winner = PinnedDecision(doc["model_name"], doc["route_name"])
            assert set(answers) == {winner}, f"race {i}: callers disagree: {answers}"
            assert await replica_a.get(key) == winner
            assert await replica_b.get(key) == winner
        for replica in (replica_a, replica_b):
            h = replica.health()
            assert h["errors"] == 0
            assert h["malformed"] == 0
    finally:
        await replica_a.close()
        await replica_b.close()
