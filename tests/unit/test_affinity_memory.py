"""In-memory session cache: LRU order, TTL from insertion, sweep, capacity clamp."""

from __future__ import annotations

import asyncio

import pytest

from plano_extproc.affinity.base import PinnedDecision
from plano_extproc.affinity.memory import MemorySessionCache

A = PinnedDecision("openai/gpt-4o", "code")
B = PinnedDecision("anthropic/claude-sonnet", None)
C = PinnedDecision("openai/gpt-4o-mini", "chat")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_put_then_get() -> None:
    cache = MemorySessionCache()
    assert await cache.get("k") is None
    assert await cache.put_if_absent("k", A) == A
    assert await cache.get("k") == A


async def test_first_writer_wins() -> None:
    cache = MemorySessionCache()
    assert await cache.put_if_absent("k", A) == A
    assert await cache.put_if_absent("k", B) == A
    assert await cache.get("k") == A


async def test_lru_evicts_oldest_at_capacity() -> None:
    cache = MemorySessionCache(max_entries=2)
    await cache.put_if_absent("a", A)
    await cache.put_if_absent("b", B)
    await cache.put_if_absent("c", C)
    assert await cache.get("a") is None
    assert await cache.get("b") == B
    assert await cache.get("c") == C
    assert len(cache) == 2


async def test_get_promotes() -> None:
    cache = MemorySessionCache(max_entries=2)
    await cache.put_if_absent("a", A)
    await cache.put_if_absent("b", B)
    assert await cache.get("a") == A  # "a" is now most recently used
    await cache.put_if_absent("c", C)
    assert await cache.get("b") is None
    assert await cache.get("a") == A
    assert await cache.get("c") == C


async def test_re_put_of_existing_key_does_not_evict() -> None:
    cache = MemorySessionCache(max_entries=2)
    await cache.put_if_absent("a", A)
    await cache.put_if_absent("b", B)
    assert await cache.put_if_absent("b", C) == B
    assert await cache.put_if_absent("a", C) == A
    assert len(cache) == 2
    assert await cache.get("a") == A
    assert await cache.get("b") == B
    assert cache.health()["evictions"] == 0


async def test_ttl_counts_from_insertion_and_hits_do_not_extend() -> None:
    clock = FakeClock()
    cache = MemorySessionCache(ttl_seconds=10, clock=clock)
    await cache.put_if_absent("k", A)
    clock.now += 9
    assert await cache.get("k") == A  # a hit ...
    clock.now += 1
    assert await cache.get("k") is None  # ... does not refresh the TTL
    assert len(cache) == 0


async def test_expired_entry_can_be_repinned() -> None:
    clock = FakeClock()
    cache = MemorySessionCache(ttl_seconds=5, clock=clock)
    await cache.put_if_absent("k", A)
    clock.now += 5
    assert await cache.put_if_absent("k", B) == B
    assert await cache.get("k") == B


async def test_sweep_removes_only_expired() -> None:
    clock = FakeClock()
    cache = MemorySessionCache(ttl_seconds=10, clock=clock)
    await cache.put_if_absent("old1", A)
    await cache.put_if_absent("old2", B)
    clock.now += 6
    await cache.put_if_absent("new", C)
    clock.now += 5
    assert cache.sweep() == 2
    assert len(cache) == 1
    assert await cache.get("new") == C
    assert cache.health()["expired"] == 2


async def test_background_sweep_runs_and_stops_on_close() -> None:
    clock = FakeClock()
    cache = MemorySessionCache(ttl_seconds=10, clock=clock, sweep_interval=0.01)
    await cache.start()
    try:
        await cache.put_if_absent("k", A)
        clock.now += 11
        for _ in range(200):  # bounded: at most ~2 s
            if len(cache) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(cache) == 0
    finally:
        await cache.close()
    assert cache._sweeper is None


def test_default_sweep_interval_follows_ttl() -> None:
    assert MemorySessionCache(ttl_seconds=60)._sweep_interval == 60
    assert MemorySessionCache(ttl_seconds=600)._sweep_interval == 300


@pytest.mark.parametrize(
    ("requested", "expected"), [(50_000, 10_000), (10_000, 10_000), (3, 3), (0, 1), (-5, 1)]
)
def test_capacity_clamped(requested: int, expected: int) -> None:
    assert MemorySessionCache(max_entries=requested).capacity == expected


async def test_capacity_clamp_enforced() -> None:
    cache = MemorySessionCache(max_entries=20_000)
    for i in range(10_050):
        await cache.put_if_absent(f"k{i}", A)
    assert len(cache) == 10_000
    assert await cache.get("k0") is None
    assert await cache.get("k10049") == A


async def test_health() -> None:
    cache = MemorySessionCache(ttl_seconds=30, max_entries=5)
    await cache.put_if_absent("k", A)
    await cache.get("k")
    await cache.get("missing")
    h = cache.health()
    assert h["backend"] == "memory"
    assert h["healthy"] is True
    assert (h["entries"], h["capacity"], h["hits"], h["misses"]) == (1, 5, 1, 1)


async def test_put_replaces_and_restarts_the_ttl() -> None:
    clock = FakeClock()
    cache = MemorySessionCache(ttl_seconds=10, clock=clock)
    await cache.put_if_absent("k", A)
    clock.now += 8
    await cache.put("k", B)  # replaces, unlike put_if_absent
    assert await cache.get("k") == B
    clock.now += 8  # 16 s after the first write, 8 after the replacement
    assert await cache.get("k", near=False) == B
    clock.now += 3
    assert await cache.get("k") is None
