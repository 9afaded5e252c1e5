"""Token budgets as token buckets: the arithmetic every store shares, free of I/O.

A limit of ``tokens`` per ``unit`` is a bucket holding at most ``tokens`` that refills at
``tokens / unit`` per second (the same quota Plano's ``governor`` limiter applies: a full
window's worth may be spent at once). A bucket is kept as ``used`` (tokens spent and not yet
refilled) and ``stamp`` (when ``used`` was last written): ``used`` drains by ``rate`` per
second, so a bucket that is not in the store is a full one and an entry can be dropped once
``used`` has drained to zero.

A request may be charged several buckets at once (every limit on the model that serves it):
a group is taken only if each of its buckets holds the cost, and then all are charged. A
routed request offers one group per candidate model, in order; the store charges the first
group that can take the cost, atomically, and tells how long every group would have to wait.
After the reply, the estimate is corrected by what the provider reported (``adjust``): a
bucket may then go into debt (``used`` above ``capacity``) and later requests wait it off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

NEVER = math.inf  # the wait of a cost larger than a bucket's capacity


@dataclass(frozen=True, slots=True)
class Bucket:
    """One budget: ``key`` names it in the store (a limit's id and a digest of the selector
    value, never the value itself), ``capacity`` tokens refilled at ``rate`` per second."""

    key: str
    capacity: float
    rate: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``take`` did: the group it charged (None: none could take the cost) and, for every
    group in the order given, the seconds until it could (0.0: now; ``NEVER``: a cost above
    one of its capacities). Waits of the groups after the charged one count that charge."""

    taken: int | None
    waits: tuple[float, ...]


class BudgetStore(Protocol):
    """Where budgets live: one process, every worker of a gateway, or every replica (Redis)."""

    async def take(self, groups: Sequence[Sequence[Bucket]], cost: float) -> Verdict:
        """Charge ``cost`` to every bucket of the first group that holds it, atomically."""
        ...

    async def adjust(self, buckets: Sequence[Bucket], delta: float) -> None:
        """Charge ``delta`` more (negative: give back), without any check."""
        ...

    async def adjust_many(self, items: Sequence[tuple[Bucket, float]]) -> None:
        """``adjust`` for several buckets, each by its own delta, in one store operation
        (the settlements of one batch of usage records)."""
        ...


def drained(used: float, stamp: float, rate: float, now: float) -> float:
    """``used`` at ``now``: what refilled since ``stamp`` given back (never below zero)."""
    if used <= 0.0:
        return 0.0
    return max(0.0, used - rate * max(0.0, now - stamp))


def wait(used_now: float, bucket: Bucket, cost: float) -> float:
    """Seconds until ``bucket`` (``used_now`` spent) can take ``cost``."""
    if cost > bucket.capacity:
        return NEVER
    over = used_now + cost - bucket.capacity
    return over / bucket.rate if over > 0.0 else 0.0


def ttl(used: float, rate: float) -> float:
    """Seconds until a bucket with ``used`` spent is full again (then it can be forgotten)."""
    return used / rate if used > 0.0 else 0.0


def take(
    state: dict[str, float],
    groups: Sequence[Sequence[Bucket]],
    cost: float,
) -> Verdict:
    """The decision ``take`` makes on ``state`` (bucket key -> ``used`` now, already drained),
    updating ``state`` for the charged group. Stores drain, call this and write back."""
    taken: int | None = None
    waits: list[float] = []
    for i, group in enumerate(groups):
        longest = 0.0
        for b in group:
            longest = max(longest, wait(state.get(b.key, 0.0), b, cost))
        if taken is None and longest == 0.0:
            taken = i
            for b in group:
                state[b.key] = state.get(b.key, 0.0) + cost
        waits.append(longest)
    return Verdict(taken, tuple(waits))
