"""In-process session cache: LRU with a fixed TTL from insertion (Plano's memory backend).

Single-replica only: pins are not shared across gateway replicas and vanish on restart.
All methods run on the event loop without awaiting inside a critical section, so no lock
is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from plano_extproc.affinity.base import PinnedDecision

log = logging.getLogger("plano_extproc.affinity")

MAX_CAPACITY = 10_000
"""Hard cap on entries, as in Plano (``min(session_max_entries, 10000)``)."""

DEFAULT_SWEEP_INTERVAL = 300.0


class MemorySessionCache:
    """LRU session cache; ``get`` promotes, TTL counts from insertion (hits do not extend it).

    ``clock`` returns monotonic seconds; tests inject a fake one instead of sleeping.
    """

    def __init__(
        self,
        ttl_seconds: float = 600,
        max_entries: int = MAX_CAPACITY,
        *,
        sweep_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = max(1.0, float(ttl_seconds))
        self._capacity = max(1, min(int(max_entries), MAX_CAPACITY))
        if max_entries > MAX_CAPACITY:
            log.info("session cache max_entries %d clamped to %d", max_entries, MAX_CAPACITY)
        # Sweep at least as often as entries expire so memory of idle sessions is reclaimed.
        default_interval = min(DEFAULT_SWEEP_INTERVAL, self._ttl)
        self._sweep_interval = max(0.01, sweep_interval or default_interval)
        self._clock = clock
        self._entries: OrderedDict[str, tuple[PinnedDecision, float]] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expired = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._entries)

    async def start(self) -> None:
        """Start the background sweep (idempotent)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="affinity-memory-sweep")

    async def close(self) -> None:
        """Stop the sweep; entries are kept (a closed cache is not used again anyway)."""
        task, self._sweeper = self._sweeper, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _expired_at(self, inserted: float, now: float) -> bool:
        return now - inserted >= self._ttl

    def _lookup(self, key: str) -> PinnedDecision | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, inserted = entry
        if self._expired_at(inserted, self._clock()):
            del self._entries[key]
            self._expired += 1
            return None
        self._entries.move_to_end(key)
        return value

    async def get(self, key: str, *, near: bool = True) -> PinnedDecision | None:
        value = self._lookup(key)
        if value is None:
            self._misses += 1
        else:
            self._hits += 1
        return value

    async def put_if_absent(self, key: str, value: PinnedDecision) -> PinnedDecision:
        """Pin ``value`` unless an unexpired pin exists; return the pin now in force."""
        existing = self._lookup(key)
        if existing is not None:
            return existing
        await self.put(key, value)
        return value

    async def put(self, key: str, value: PinnedDecision) -> None:
        self._entries[key] = (value, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
            self._evictions += 1

    def sweep(self) -> int:
        """Drop every expired entry now; return how many were removed."""
        now = self._clock()
        stale = [k for k, (_, inserted) in self._entries.items() if self._expired_at(inserted, now)]
        for k in stale:
            del self._entries[k]
        self._expired += len(stale)
        return len(stale)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                removed = self.sweep()
            except Exception:  # never let the sweeper die silently and leak memory
                log.exception("session cache sweep failed")
                continue
            if removed:
                log.debug("session cache sweep removed %d expired entries", removed)

    @property
    def healthy(self) -> bool:
        return True

    @property
    def failures(self) -> int:
        return 0

    def health(self) -> dict[str, Any]:
        return {
            "backend": "memory",
            "healthy": True,
            "entries": len(self._entries),
            "capacity": self._capacity,
            "ttl_seconds": self._ttl,
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "expired": self._expired,
        }
