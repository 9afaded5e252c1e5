"""Token budgets shared by every worker of one gateway: a fixed table in a mapped file.

The supervisor creates the file (``BUDGET_FILE_ENV``) and every worker maps it; a lone
``serve`` keeps the table in its own memory. Workers are separate OS processes, so every
read-modify-write of the file holds an exclusive ``flock`` on it: two workers taking at once
never admit more than the budget. Times are ``CLOCK_MONOTONIC``, which all processes of a host
share.

A slot is a bucket key's 64-bit hash (0: empty), ``used``, ``stamp`` and the bucket's ``rate``,
so any process can tell when an entry has drained (is a full bucket again) without knowing the
config. A key lives in a window of ``PROBE`` slots from its hash; lookups scan the whole window
(never stop at a hole), so an entry can be freed anywhere in it.

Memory is fixed whatever clients send (selector values are client-controlled and each distinct
value is its own bucket): when a new entry finds no free slot in its window, it takes one that
has drained to zero, else the one that would be full soonest (smallest ``ttl``). Evicting an
entry forgets its spending: that bucket reads as full, so its tenant gets budget back early. No
tenant can be starved by eviction; the cost is over-admission, and only once the window is
full of entries further from full than the evicted one (a client able to keep more long-lived
entries alive than the table holds can make short-lived ones be forgotten).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Collection, Sequence

from plano_extproc.ratelimit.budget import Bucket, Verdict, drained, take, ttl, wait

BUDGET_FILE_ENV = "PLANO_EXTPROC_BUDGET_FILE"
_SLOT = struct.Struct("<Qddd")  # key hash, used, stamp (monotonic seconds), rate
_KEY = struct.Struct("<Q")  # a slot's first field alone: read while probing
PROBE = 16  # slots a key may live in, from its hash on
_TAKEN = Verdict(0, (0.0,))  # one group, charged


@functools.lru_cache(maxsize=16384)  # the same few keys recur on every request
def key_hash(key: str) -> int:
    """The slot key of a bucket key: never 0, which marks an empty slot."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h or 1


class SharedBudgets:
    """A ``BudgetStore`` in a fixed table of ``slots`` entries (a file every worker maps, or
    this process's memory). Every process on one file must use the same ``slots``."""

    def __init__(
        self,
        path: str | None = None,
        slots: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.clock = clock
        self.path = path
        self._probe = min(PROBE, slots)
        size = slots * _SLOT.size
        self._fd = -1
        self._pid = os.getpid()
        self._table: mmap.mmap | bytearray
        if path is None:
            self._table = bytearray(size)
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(self._fd).st_size < size:
                    os.ftruncate(self._fd, size)
                self._table = mmap.mmap(self._fd, size)
            except BaseException:
                os.close(self._fd)
                raise

    @classmethod
    def from_env(cls) -> SharedBudgets:
        """The table the supervisor made for its workers, else one in this process."""
        return cls(os.environ.get(BUDGET_FILE_ENV) or None)

    # ------------------------------------------------------------------ BudgetStore

    async def take(self, groups: Sequence[Sequence[Bucket]], cost: float) -> Verdict:
        return self.take_now(groups, cost)

    async def adjust_many(self, items: Sequence[tuple[Bucket, float]]) -> None:
        self.adjust_many_now(items)

    async def adjust(self, buckets: Sequence[Bucket], delta: float) -> None:
        self.adjust_now(buckets, delta)

    # ------------------------------------------------------------------ sync API

    def take_now(self, groups: Sequence[Sequence[Bucket]], cost: float) -> Verdict:
        """``take`` without awaiting (other stores fall back to it when theirs is down)."""
        if not cost >= 0.0:  # also refuses NaN, which would poison the table
            raise ValueError(f"cost must be a number >= 0, not {cost!r}")
        fd = self._lock()
        try:
            now = self.clock()
            if len(groups) == 1 and len(groups[0]) == 1:  # one model, one limit: most requests
                b = groups[0][0]
                h, i = self._locate(b.key)
                used = self._used(i, b.rate, now)
                w = wait(used, b, cost)
                if w > 0.0:
                    return Verdict(None, (w,))
                if i >= 0 and used + cost > 0.0:  # its own slot: no victim to look for
                    _SLOT.pack_into(self._table, i * _SLOT.size, h, used + cost, now, b.rate)
                else:
                    self._write((b,), {b.key: (h, i)}, {b.key: used + cost}, now)
                return _TAKEN
            state: dict[str, float] = {}
            where: dict[str, tuple[int, int]] = {}
            for group in groups:
                for b in group:
                    if b.key not in where:
                        where[b.key] = found = self._locate(b.key)
                        state[b.key] = self._used(found[1], b.rate, now)
            verdict = take(state, groups, cost)
            if verdict.taken is not None:
                charged = {b.key: b for b in groups[verdict.taken]}.values()
                self._write(charged, where, state, now)
            return verdict
        finally:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def adjust_now(self, buckets: Sequence[Bucket], delta: float) -> None:
        """``adjust`` without awaiting: drain, add ``delta``, floor at 0, write."""
        self.adjust_many_now([(b, delta) for b in buckets])

    def adjust_many_now(self, items: Sequence[tuple[Bucket, float]]) -> None:
        """``adjust_many`` without awaiting: each bucket by its own delta, under one lock."""
        # A usage report that is not a number changes nothing.
        items = [(b, d) for b, d in items if math.isfinite(d)]
        if not items:
            return
        fd = self._lock()
        try:
            now = self.clock()
            state: dict[str, float] = {}
            where: dict[str, tuple[int, int]] = {}
            for b, delta in items:
                if b.key not in where:
                    where[b.key] = found = self._locate(b.key)
                    state[b.key] = self._used(found[1], b.rate, now)
                state[b.key] = max(0.0, state[b.key] + delta)  # a bucket listed twice: twice
            self._write({b.key: b for b, _ in items}.values(), where, state, now)
        finally:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def entries(self) -> int:
        """Entries not yet drained (for health): how full the table is."""
        fd = self._lock()
        try:
            snapshot = bytes(self._table)
        finally:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)
        now = self.clock()
        return sum(
            1
            for h, used, stamp, rate in _SLOT.iter_unpack(snapshot)
            if h and drained(used, stamp, rate, now) > 0.0
        )

    def close(self) -> None:
        if isinstance(self._table, mmap.mmap) and not self._table.closed:
            self._table.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------ table

    def _lock(self) -> int:
        """Take the lock that is exclusive over every process mapping the file; the
        descriptor to unlock (-1: in-process memory, one asyncio thread, no lock). Plain
        calls, not a context manager: this runs twice per limited request."""
        if self.path is None:
            return -1
        if os.getpid() != self._pid:
            # A forked child shares the parent's open file, hence its flock: reopen so the
            # two exclude each other.
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_RDWR)
            self._pid = os.getpid()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self._fd

    def _locate(self, key: str) -> tuple[int, int]:
        """The key's hash and its slot (-1: not in the table, a full bucket)."""
        h = key_hash(key)
        table, slots, start = self._table, self.slots, h % self.slots
        for j in range(self._probe):
            i = start + j
            if i >= slots:
                i -= slots
            if _KEY.unpack_from(table, i * _SLOT.size)[0] == h:
                return h, i
        return h, -1

    def _used(self, i: int, rate: float, now: float) -> float:
        """``used`` at ``now`` of the entry in slot ``i`` (0.0 for none), drained at the
        bucket's ``rate``."""
        if i < 0:
            return 0.0
        _, used, stamp, _ = _SLOT.unpack_from(self._table, i * _SLOT.size)
        return drained(used, stamp, rate, now)

    def _write(
        self,
        buckets: Collection[Bucket],
        where: dict[str, tuple[int, int]],
        state: dict[str, float],
        now: float,
    ) -> None:
        """Write each bucket's ``used`` from ``state`` (0 frees its slot). A new entry never
        evicts another of the same write."""
        keep = {i for b in buckets if (i := where[b.key][1]) >= 0}
        for b in buckets:
            h, i = where[b.key]
            used = state[b.key]
            if used <= 0.0:
                if i >= 0:
                    _SLOT.pack_into(self._table, i * _SLOT.size, 0, 0.0, 0.0, 0.0)
                continue
            if i < 0:
                i = self._victim(h, now, keep)
                keep.add(i)
            _SLOT.pack_into(self._table, i * _SLOT.size, h, used, now, b.rate)

    def _victim(self, h: int, now: float, keep: set[int]) -> int:
        """A free slot in the window, else a drained one, else the one full soonest. Slots in
        ``keep`` only when the window holds nothing else (a group wider than the window)."""
        best, best_ttl = -1, math.inf
        start = h % self.slots
        for j in range(self._probe):
            i = (start + j) % self.slots
            other, used, stamp, rate = _SLOT.unpack_from(self._table, i * _SLOT.size)
            if other == 0 and i not in keep:
                return i
            left = _ttl(drained(used, stamp, rate, now), rate)
            if i in keep:
                left = math.inf  # evicted only when nothing else is left
            if best < 0 or left < best_ttl:
                best, best_ttl = i, left
        return best


def _ttl(used: float, rate: float) -> float:
    """``budget.ttl``, with a slot that has no rate (corrupt or foreign) never full again."""
    if rate > 0.0:
        return ttl(used, rate)
    return math.inf if used > 0.0 else 0.0
