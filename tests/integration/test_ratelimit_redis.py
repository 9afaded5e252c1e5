"""RedisBudgets on a real redis-server: one budget for every replica, refill on Redis's clock,
adjust, key expiry, and outages (served by the in-process fallback, healed without restart).

No wall-clock asserts: calls are wrapped in a generous ``wait_for`` so a hang fails the test,
and waiting for refill or recovery polls a bounded number of times.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
from collections.abc import AsyncIterator

import pytest
import redis

from plano_extproc.ratelimit.budget import Bucket, Verdict
from plano_extproc.ratelimit.lease import MAX_REQUESTS
from plano_extproc.ratelimit.memory import SharedBudgets
from plano_extproc.ratelimit.redis_store import RedisBudgets
from tests.integration.conftest_affinity import *  # noqa: F403  (pytest fixtures)
from tests.redis_server import RedisServer, evalsha_calls, find_redis_server, free_port

pytestmark = pytest.mark.integration

CALL_LIMIT = 5.0  # far above the ~1 s worst case of one call; only catches hangs
PREFIX = "plano:budget:"
SLOW = 0.001  # tokens per second: no visible refill during a test


def _store(url: str, **kw: float) -> RedisBudgets:
    # Generous timeouts: these tests check behaviour, not latency, on a possibly busy machine.
    opts: dict[str, float] = {"connect_timeout": 1.0, "op_timeout": 1.0, "retry_interval": 0.1}
    opts.update(kw)
    return RedisBudgets(url, SharedBudgets(), **opts)


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[RedisBudgets, RedisBudgets]]:
    """Two stores on one Redis, each with its own fallback: two gateway replicas."""
    a, b = _store(redis_server.url), _store(redis_server.url)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def take(store: RedisBudgets, groups: list[list[Bucket]], cost: float) -> Verdict:
    return await asyncio.wait_for(store.take(groups, cost), CALL_LIMIT)


def used(admin: redis.Redis, key: str) -> float:
    """A bucket's ``used`` field in Redis (0 when the key is gone)."""
    return float(admin.hget(PREFIX + key, "u") or 0)


async def wait_healthy(store: RedisBudgets, healthy: bool = True, rounds: int = 150) -> None:
    """Poll for at most rounds x 0.05 s."""
    for _ in range(rounds):
        if store.healthy is healthy:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"store never became healthy={healthy}: {store.health()}")


async def test_two_stores_enforce_one_budget(pair: tuple[RedisBudgets, RedisBudgets]) -> None:
    a, b = pair
    bucket = Bucket("lim1:tenant", capacity=10, rate=SLOW)
    admitted = 0
    for i in range(10):
        v = await take(a if i % 2 else b, [[bucket]], 1)
        assert v == Verdict(0, (0.0,))
        admitted += 1
    assert admitted == 10
    for store in (a, b):
        v = await take(store, [[bucket]], 1)
        assert v.taken is None
        assert 0.0 < v.waits[0] < math.inf
    # A routed request: the first candidate is spent, the second takes it; the wait of the
    # first is told, and the second's wait (0) is the one it was charged at.
    other = Bucket("lim2:tenant", capacity=5, rate=SLOW)
    v = await take(a, [[bucket], [other]], 5)
    assert v.taken == 1 and v.waits[0] > 0.0 and v.waits[1] == 0.0
    v = await take(b, [[other]], 1)
    assert v.taken is None  # b sees what a charged
    assert a.fallbacks == b.fallbacks == 0 and a.errors == b.errors == 0
    assert a.healthy and b.healthy


async def test_concurrent_takes_admit_exactly_the_budget(
    pair: tuple[RedisBudgets, RedisBudgets],
) -> None:
    a, b = pair
    bucket = Bucket("burst", capacity=20, rate=SLOW)
    calls = [take(a if i % 2 else b, [[bucket]], 1) for i in range(60)]
    verdicts = await asyncio.gather(*calls)
    assert sum(v.taken == 0 for v in verdicts) == 20
    assert a.fallbacks == b.fallbacks == 0


async def test_a_group_is_charged_all_or_nothing(pair: tuple[RedisBudgets, RedisBudgets]) -> None:
    a, b = pair
    model = Bucket("model", capacity=100, rate=SLOW)
    tenant = Bucket("tenant", capacity=3, rate=SLOW)
    assert (await take(a, [[model, tenant]], 3)).taken == 0
    v = await take(b, [[model, tenant]], 1)
    assert v.taken is None and v.waits[0] > 0.0
    # The refused group charged nothing: the model bucket still holds 97.
    assert (await take(b, [[model]], 97)).taken == 0
    assert (await take(a, [[model]], 1)).taken is None


async def test_cost_above_capacity_waits_forever(pair: tuple[RedisBudgets, RedisBudgets]) -> None:
    a, _ = pair
    small = Bucket("small", capacity=10, rate=1)
    big = Bucket("big", capacity=1000, rate=1)
    v = await take(a, [[small]], 11)
    assert v == Verdict(None, (math.inf,))
    v = await take(a, [[small], [big]], 11)
    assert v == Verdict(1, (math.inf, 0.0))


async def test_budget_refills_on_redis_clock(pair: tuple[RedisBudgets, RedisBudgets]) -> None:
    a, b = pair
    bucket = Bucket("refill", capacity=2, rate=2)  # full again within a second
    assert (await take(a, [[bucket]], 2)).taken == 0
    v = await take(b, [[bucket]], 2)
    assert v.taken is None
    assert 0.0 < v.waits[0] <= 1.0
    for _ in range(20):
        await asyncio.sleep(v.waits[0] + 0.05)
        v = await take(b, [[bucket]], 2)
        if v.taken == 0:
            break
    assert v.taken == 0


async def test_partial_refill_is_credited(
    pair: tuple[RedisBudgets, RedisBudgets], redis_admin: redis.Redis
) -> None:
    a, b = pair
    bucket = Bucket("partial", capacity=10, rate=10)  # the key lives 1.1 s after this take
    assert (await take(a, [[bucket]], 10)).taken == 0
    await asyncio.sleep(0.3)  # at least 3 tokens back, long before the key expires
    assert (await take(b, [[bucket]], 1)).taken == 0
    assert used(redis_admin, "partial") < 10


async def test_adjust_charges_and_refunds(
    pair: tuple[RedisBudgets, RedisBudgets], redis_admin: redis.Redis
) -> None:
    a, b = pair
    bucket = Bucket("adj", capacity=10, rate=SLOW)
    assert (await take(a, [[bucket]], 5)).taken == 0
    await asyncio.wait_for(b.adjust([bucket], 10), CALL_LIMIT)  # the reply was larger: debt
    v = await take(a, [[bucket]], 1)
    assert v.taken is None and v.waits[0] > 0.0
    assert used(redis_admin, "adj") == pytest.approx(15, abs=0.01)
    await asyncio.wait_for(a.adjust([bucket], -12), CALL_LIMIT)
    assert (await take(b, [[bucket]], 7)).taken == 0
    assert (await take(b, [[bucket]], 1)).taken is None
    await asyncio.wait_for(a.adjust([bucket], -100), CALL_LIMIT)  # floored at 0, key gone
    assert redis_admin.exists(PREFIX + "adj") == 0
    assert (await take(a, [[bucket]], 10)).taken == 0
    assert (await take(a, [[bucket]], 1)).taken is None
    assert a.errors == b.errors == 0


async def test_adjust_many_applies_each_delta_in_one_call(
    pair: tuple[RedisBudgets, RedisBudgets], redis_admin: redis.Redis
) -> None:
    a, _ = pair
    x, y = Bucket("many-x", capacity=10, rate=SLOW), Bucket("many-y", capacity=10, rate=SLOW)
    assert (await take(a, [[x, y]], 4)).taken == 0
    warm = Bucket("many-warm", capacity=10, rate=SLOW)  # the script loaded (NOSCRIPT once)
    await asyncio.wait_for(a.adjust_many([(warm, 1.0)]), CALL_LIMIT)
    before = evalsha_calls(redis_admin)
    await asyncio.wait_for(a.adjust_many([(x, 3.0), (y, -4.0), (x, 1.0)]), CALL_LIMIT)
    after = evalsha_calls(redis_admin)
    assert after - before == 1
    assert used(redis_admin, "many-x") == pytest.approx(8, abs=0.01)
    assert redis_admin.exists(PREFIX + "many-y") == 0  # refunded to full: gone
    assert a.errors == 0


async def test_keys_expire_when_drained(
    pair: tuple[RedisBudgets, RedisBudgets], redis_admin: redis.Redis
) -> None:
    a, _ = pair
    slow = Bucket("slow", capacity=100, rate=SLOW)
    fast = Bucket("fast", capacity=4, rate=8)  # full again in 0.5 s
    assert (await take(a, [[slow, fast]], 4)).taken == 0
    assert set(redis_admin.hkeys(PREFIX + "fast")) == {b"u", b"t"}
    assert 0 < redis_admin.pttl(PREFIX + "fast") <= 500 + 100
    # 4 tokens at 0.001/s: 4000 s.
    assert 3_900_000 < redis_admin.pttl(PREFIX + "slow") <= 4_000_000 + 100
    for _ in range(100):
        if redis_admin.exists(PREFIX + "fast") == 0:
            break
        await asyncio.sleep(0.05)
    assert redis_admin.exists(PREFIX + "fast") == 0
    assert redis_admin.exists(PREFIX + "slow") == 1


async def test_hostile_key_is_just_a_key(
    pair: tuple[RedisBudgets, RedisBudgets], redis_admin: redis.Redis
) -> None:
    a, b = pair
    key = "x" * 20000 + "\r\n*3\r\n$3\r\nDEL\r\n{tag}}{" + "é🦀\x00 ' \" -- ]]" + "\n"
    bucket = Bucket(key, capacity=3, rate=SLOW)
    assert (await take(a, [[bucket]], 2)).taken == 0
    assert (await take(b, [[bucket]], 2)).taken is None
    assert (await take(b, [[bucket]], 1)).taken == 0
    assert redis_admin.exists((PREFIX + key).encode()) == 1
    assert redis_admin.dbsize() == 1
    assert a.errors == b.errors == 0


async def test_redis_killed_mid_run_falls_back_then_heals(redis_server: RedisServer) -> None:
    a, b = _store(redis_server.url), _store(redis_server.url)
    await a.start()
    await b.start()
    try:
        bucket = Bucket("outage", capacity=4, rate=SLOW)
        assert (await take(a, [[bucket]], 4)).taken == 0
        assert (await take(b, [[bucket]], 1)).taken is None

        redis_server.kill()
        # Served by a's own fallback (an empty in-process budget): no exception, and the
        # budget is per gateway for the outage.
        for _ in range(4):
            v = await take(a, [[bucket]], 1)
            assert v == Verdict(0, (0.0,))
        assert (await take(a, [[bucket]], 1)).taken is None
        await asyncio.wait_for(a.adjust([bucket], -1), CALL_LIMIT)  # no exception either
        assert a.healthy is False
        assert a.fallbacks == 5
        assert 1 <= a.errors <= 2  # only the call that met the outage went to Redis
        h = a.health()
        assert h["healthy"] is False and h["fallbacks"] == 5 and h["last_error"]

        redis_server.restart()  # same port, empty data set
        await wait_healthy(a)
        errors = a.errors
        # Enforcement is back on Redis: what a charges, b is refused. b saw no traffic
        # during the outage: its first call meets a socket from before the restart, which
        # is replaced on the spot (no fallback, no breaker trip).
        assert (await take(a, [[bucket]], 4)).taken == 0
        v = await take(b, [[bucket]], 1)
        assert v.taken is None and v.waits[0] > 0.0
        assert b.healthy and b.fallbacks == 0
        assert a.fallbacks == 5 and a.errors == errors
    finally:
        await a.close()
        await b.close()


async def test_down_at_start_then_heals() -> None:
    server = RedisServer(binary=find_redis_server(), port=free_port())
    store = _store(server.url)
    try:
        await asyncio.wait_for(store.start(), CALL_LIMIT)  # must not raise
        assert store.healthy is False and store.errors == 1
        bucket = Bucket("k", capacity=1, rate=SLOW)
        assert (await take(store, [[bucket]], 1)).taken == 0
        assert (await take(store, [[bucket]], 1)).taken is None
        assert store.fallbacks == 2 and store.errors == 1  # the breaker skipped Redis

        server.start()
        await wait_healthy(store)
        assert (await take(store, [[bucket]], 1)).taken == 0  # Redis: a fresh budget
        assert store.fallbacks == 2
        with redis.Redis.from_url(server.url, socket_timeout=5) as admin:
            assert admin.exists(PREFIX + "k") == 1
    finally:
        await store.close()
        server.stop()


async def test_paused_redis_is_bounded_by_timeouts(redis_server: RedisServer) -> None:
    """A server that accepts but never answers (SIGSTOP) must not hang calls."""
    store = _store(redis_server.url, connect_timeout=0.2, op_timeout=0.1)
    await store.start()
    proc = redis_server._proc
    assert proc is not None
    bucket = Bucket("paused", capacity=5, rate=SLOW)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert (await take(store, [[bucket]], 1)).taken == 0
        assert (await take(store, [[bucket]], 1)).taken == 0
        assert store.healthy is False and store.errors == 1 and store.fallbacks == 2
        assert "Timeout" in (store.health()["last_error"] or "")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        await wait_healthy(store)
        # The timed-out call may still have been run once Redis resumed (its charge is then
        # in Redis: a reply lost, not a command): 4 fit either way.
        assert (await take(store, [[bucket]], 4)).taken == 0
    finally:
        await store.close()


async def test_scripting_forbidden_uses_fallback_and_stays_off_redis() -> None:
    acl = "plano on >s3cret ~* &* +@all -@scripting".split()
    server = RedisServer(binary=find_redis_server(), extra_args=["--user", *acl])
    server.start()
    url = f"redis://plano:s3cret@127.0.0.1:{server.port}/0"
    store = _store(url)
    try:
        await store.start()  # the start check runs the script: refused
        bucket = Bucket("noscript", capacity=2, rate=SLOW)
        assert (await take(store, [[bucket]], 2)).taken == 0
        assert (await take(store, [[bucket]], 1)).taken is None
        await asyncio.sleep(0.3)  # a few probe rounds: PING would answer, the script does not
        h = store.health()
        assert h["healthy"] is False and h["fallbacks"] == 2 and h["scripting_refused"]
        assert "permission" in (h["last_error"] or "")
        assert "s3cret" not in repr(h) and "***" in h["url"]
    finally:
        await store.close()
        server.stop()


async def test_close_stops_probe_task() -> None:
    store = _store(f"redis://127.0.0.1:{free_port()}/0", retry_interval=0.05)
    await store.start()
    assert store._breaker.probing
    await store.close()
    assert not store._breaker.probing


def test_health_masks_password() -> None:
    store = RedisBudgets("redis://:hunter2@127.0.0.1:1/0", SharedBudgets())
    h = store.health()
    assert "hunter2" not in repr(h)
    assert h["backend"] == "redis" and h["healthy"] is False


async def test_connections_are_capped_and_shared_under_concurrency(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    """More concurrent checks than ``max_connections``: they wait for a connection instead of
    opening more, none fails over to the fallback, and checks cancelled while waiting (a
    request's timeout) leave no connection behind."""
    store = RedisBudgets(redis_server.url, SharedBudgets(), max_connections=2, op_timeout=1.0)
    await store.start()
    try:
        base = int(redis_admin.info("clients")["connected_clients"])
        bucket = Bucket("capped", capacity=1000, rate=SLOW)
        verdicts = await asyncio.wait_for(
            asyncio.gather(*(store.take([[bucket]], 1) for _ in range(40))), 10
        )
        assert all(v.taken == 0 for v in verdicts)
        assert int(redis_admin.info("clients")["connected_clients"]) <= base + 2
        tasks = [asyncio.create_task(store.take([[bucket]], 1)) for _ in range(20)]
        await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        again = await asyncio.wait_for(
            asyncio.gather(*(store.take([[bucket]], 1) for _ in range(10))), 10
        )
        assert all(v.taken == 0 for v in again)
        assert store.fallbacks == 0 and store.errors == 0
        assert int(redis_admin.info("clients")["connected_clients"]) <= base + 2
    finally:
        await store.close()


# --------------------------------------------------------------------------- leases


async def test_a_busy_tenant_leases_and_goes_to_redis_less(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    """Sequential requests of one tenant: after the first two, a lease answers most of them;
    Redis holds what was admitted plus the lease, and closing the store gives the lease back."""
    store = _store(redis_server.url)
    await store.start()
    try:
        bucket = Bucket("busy", capacity=100_000, rate=SLOW)
        before = evalsha_calls(redis_admin)
        for _ in range(64):
            assert (await take(store, [[bucket]], 10)) == Verdict(0, (0.0,))
        calls = evalsha_calls(redis_admin) - before
        assert calls <= 8, calls  # without leases: 64
        held = store.health()["lease_tokens"]
        assert 0 <= held <= MAX_REQUESTS * 10
        assert used(redis_admin, "busy") == pytest.approx(640 + held, abs=0.05)
        admitted = 640
        # The synchronous path answers from the lease too (the limiter tries it first).
        while store.take_now([[bucket]], 10) is not None:
            admitted += 10
        assert store.health()["lease_tokens"] < 10
    finally:
        await store.close()
    assert used(redis_admin, "busy") == pytest.approx(admitted, abs=0.05)  # the rest given back


async def test_an_unused_lease_goes_back_after_its_ttl(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    store = _store(redis_server.url)
    await store.start()
    try:
        bucket = Bucket("idle-after", capacity=100_000, rate=SLOW)
        for _ in range(8):
            await take(store, [[bucket]], 10)
        for _ in range(20):  # a renewal may still be on its way
            if store.health()["lease_tokens"] > 0:
                break
            await asyncio.sleep(0.01)
        assert store.health()["lease_tokens"] > 0
        admitted = 80
        for _ in range(100):  # the sweep runs every half ttl; poll at most 5 s
            if used(redis_admin, "idle-after") == pytest.approx(admitted, abs=0.05):
                break
            await asyncio.sleep(0.05)
        assert used(redis_admin, "idle-after") == pytest.approx(admitted, abs=0.05)
        assert store.health()["lease_tokens"] == 0
    finally:
        await store.close()


async def test_leases_come_only_from_the_top_half_of_a_bucket(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    """Once half the bucket is spent, every request is checked in Redis, one by one: the
    end of a budget is exact whatever the replicas hold."""
    store = _store(redis_server.url)
    await store.start()
    try:
        bucket = Bucket("halves", capacity=200, rate=SLOW)
        for _ in range(10):
            assert (await take(store, [[bucket]], 10)).taken == 0
        # Whatever was leased ended at or below half the capacity.
        assert used(redis_admin, "halves") <= 100 + 10
        spent = 100 + 0.0
        while store.health()["lease_tokens"] >= 10:  # use up what is held
            assert (await take(store, [[bucket]], 10)).taken == 0
            spent += 10
        before = evalsha_calls(redis_admin)
        n = 0
        while (await take(store, [[bucket]], 10)).taken == 0:
            n += 1
            assert store.health()["lease_tokens"] < 10
        assert evalsha_calls(redis_admin) - before == n + 1  # one script call each
        assert used(redis_admin, "halves") == pytest.approx(200, abs=10)
    finally:
        await store.close()


async def test_a_lease_never_lets_two_replicas_overspend(
    pair: tuple[RedisBudgets, RedisBudgets], redis_admin: redis.Redis
) -> None:
    """a leases while busy; b then bursts: together they never admit more than the budget.
    What a holds is still a's to hand out, and what a does not use is b's after the ttl."""
    a, b = pair
    bucket = Bucket("shared-lease", capacity=1000, rate=SLOW)
    for _ in range(20):
        assert (await take(a, [[bucket]], 10)).taken == 0
    held = a.health()["lease_tokens"]
    assert held >= 10, "a busy replica was expected to hold a lease"
    burst = await asyncio.gather(*(take(b, [[bucket]], 10) for _ in range(150)))
    by_b = sum(v.taken == 0 for v in burst)
    assert 20 * 10 + by_b * 10 + held <= 1000 + 1e-6
    assert by_b * 10 == pytest.approx(1000 - 200 - held)
    # The tokens a holds are not lost: after the ttl they go back, and b gets them.
    got = 0
    for _ in range(100):
        if (await take(b, [[bucket]], 10)).taken == 0:
            got += 1
            if got * 10 >= held:
                break
        else:
            await asyncio.sleep(0.05)
    assert got * 10 == pytest.approx(held)
    assert (await take(b, [[bucket]], 10)).taken is None
    assert used(redis_admin, "shared-lease") == pytest.approx(1000, abs=0.05)


async def test_a_busy_tenant_with_a_lease_rides_out_a_redis_outage(
    redis_server: RedisServer,
) -> None:
    """Redis dies while a busy tenant holds a lease and renews it in the background: every
    check is still answered (the lease, then the fallback), nothing raises, and once Redis is
    back the tenant leases from Redis again."""
    store = _store(redis_server.url, connect_timeout=0.2, op_timeout=0.2)
    await store.start()
    try:
        bucket = Bucket("outage-lease", capacity=1_000_000, rate=SLOW)
        for _ in range(40):
            assert (await take(store, [[bucket]], 10)).taken == 0
        assert store.health()["lease_groups"] == 1
        redis_server.kill()
        for _ in range(200):  # the lease, renewals failing, then the fallback: all admitted
            assert (await take(store, [[bucket]], 10)).taken == 0
        assert not store.healthy and store.fallbacks >= 1
        redis_server.restart()
        await wait_healthy(store)
        with redis.Redis.from_url(redis_server.url, socket_timeout=5) as admin:
            before = evalsha_calls(admin)
            for _ in range(64):
                assert (await take(store, [[bucket]], 10)).taken == 0
            assert 1 <= evalsha_calls(admin) - before <= 10  # Redis again, with leases
            assert used(admin, "outage-lease") > 0
        fallbacks = store.fallbacks
        assert (await take(store, [[bucket]], 10)).taken == 0
        assert store.fallbacks == fallbacks
    finally:
        await store.close()
