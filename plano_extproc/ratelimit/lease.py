"""Leases: budget a worker reserves in Redis ahead of a busy tenant's requests (pure logic).

Why: with budgets in Redis, every limited request paid a round trip to Redis before dispatch
(about 0.15 ms of worker CPU and 0.07 ms of redis-server CPU each, docs/benchmarks.md "Rate
limits"). When one group of buckets (one tenant on one model) is busy in a worker, the take
script also charges a lease: tokens for the next few requests like this one, which the worker
then hands out without asking Redis. The tokens of a lease are charged in Redis like any
other, so the replicas together never admit more than the budget; the cost of leasing is that
tokens reserved by one worker and not yet used are unavailable to the others for a while.
These rules keep that small and short:

- **Only busy groups lease.** A group asks for a lease only from its second request within a
  second in this worker; a quiet tenant pays one round trip per request, as without leases,
  and holds nothing. One call per group asks at a time.
- **Sized by demand.** A lease covers the group's requests of the next ``horizon`` seconds at
  its recent rate (the last second's, or this second's so far), in estimates of the request
  that asks: at least 2, at most ``max_requests``.
- **Renewed ahead.** When a lease is down to half of what was last granted, the request that
  takes it there is still answered from it, and the store asks for the next lease in the
  background (``due``): a busy tenant's requests do not wait for Redis at all. Requests that
  find the lease spent while a call is asking for the next one wait for that call's answer
  instead of each asking Redis (a burst costs one round trip).
- **Only from the top half of a bucket.** The script grants a lease only while every bucket of
  the group stays at least half full after it (``_TAKE_LUA``): near the end of a budget, every
  request is checked in Redis, one by one.
- **Given back.** The leftover of a lease goes back to Redis with the group's next call (that
  call's check counts it), and a lease older than ``ttl`` is given back by the store's sweep.

So while a worker holds a lease it does not use, another worker's request can be refused
although the budget as a whole could take it: at most one lease per worker and group, for at
most ``ttl`` seconds, and only after more than half the bucket was spent since it was granted.

Memory is bounded: at most ``max_groups`` groups are tracked; beyond that, new groups are
checked in Redis on every request until idle groups are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from plano_extproc.ratelimit.budget import Bucket

MAX_REQUESTS = 64  # a lease covers at most this many estimates of the request asking
HORIZON = 0.1  # a lease covers about this many seconds of the group's recent requests
TTL = 1.0  # seconds a lease may be held before it is given back
MAX_GROUPS = 4096


@dataclass(slots=True)
class _Group:
    buckets: tuple[Bucket, ...]
    tokens: float = 0.0  # charged in Redis, not yet handed out
    granted_at: float = 0.0  # when ``tokens`` were last granted (monotonic seconds)
    second: float = 0.0  # start of the current counting second
    count: int = 0  # requests in the current second
    last: int = 0  # requests in the second before it
    asking: bool = False  # a call asking for a lease is in flight
    size: float = 0.0  # what the last grant brought


class Leases:
    """The leases of one worker, keyed by a group's bucket keys (see the module docstring).
    Callers pass ``now`` (monotonic seconds) so that tests need no clock."""

    def __init__(
        self,
        max_requests: int = MAX_REQUESTS,
        ttl: float = TTL,
        max_groups: int = MAX_GROUPS,
        horizon: float = HORIZON,
    ) -> None:
        self.max_requests = max_requests
        self.horizon = horizon
        self.ttl = ttl
        self.max_groups = max_groups
        self._groups: dict[tuple[str, ...], _Group] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def held(self) -> float:
        """Tokens held in all leases (for /ready)."""
        return sum(g.tokens for g in self._groups.values())

    @staticmethod
    def _count(g: _Group, now: float) -> None:
        elapsed = now - g.second
        if elapsed >= 1.0:
            g.last = g.count if elapsed < 2.0 else 0
            g.count = 0
            g.second = now
        g.count += 1

    def use(self, key: tuple[str, ...], cost: float, now: float) -> bool:
        """Hand out ``cost`` from the group's lease; False when it does not hold that much."""
        g = self._groups.get(key)
        if g is None or g.tokens < cost or now - g.granted_at >= self.ttl:
            return False
        g.tokens -= cost
        self._count(g, now)
        return True

    def ask(
        self, key: tuple[str, ...], buckets: Sequence[Bucket], cost: float, now: float
    ) -> tuple[float, float]:
        """Before a call to Redis for this group: (tokens given back, lease wanted). The
        leftover of the group's lease leaves it (the call gives it back to Redis)."""
        g = self._groups.get(key)
        if g is None:
            if len(self._groups) >= self.max_groups:
                return 0.0, 0.0
            g = self._groups[key] = _Group(tuple(buckets))
        self._count(g, now)
        back, g.tokens = g.tokens, 0.0
        return back, self._want(g, cost, now)

    def _want(self, g: _Group, cost: float, now: float) -> float:
        """The lease to ask for (0.0: none), marking the group as asking."""
        if g.asking or max(g.count, g.last) < 2 or cost <= 0.0 or self.max_requests < 2:
            return 0.0
        g.asking = True
        # Requests a second: the last second's, or this second's so far (a burst that just
        # started doubles its lease each time it asks).
        rate = max(g.last, g.count / max(now - g.second, self.horizon))
        return cost * min(self.max_requests, max(2, math.ceil(rate * self.horizon)))

    def due(self, key: tuple[str, ...], cost: float, now: float) -> float:
        """After ``use``: the lease to ask for in the background when the group's lease is
        down to half its last grant (0.0: not due, or a call is already asking). The
        leftover stays and keeps answering meanwhile."""
        g = self._groups.get(key)
        if g is None or g.asking or g.tokens >= g.size / 2:
            return 0.0
        return self._want(g, cost, now)

    def buckets(self, key: tuple[str, ...]) -> tuple[Bucket, ...]:
        g = self._groups.get(key)
        return g.buckets if g is not None else ()

    def granted(self, key: tuple[str, ...], tokens: float, now: float) -> None:
        """The call that asked has answered: ``tokens`` were charged for this worker."""
        g = self._groups.get(key)
        if g is None:  # cannot happen (groups are dropped only when idle); be safe
            return
        g.asking = False
        if tokens > 0.0:
            g.tokens += tokens
            g.size = tokens
            g.granted_at = now

    def failed(self, key: tuple[str, ...]) -> None:
        """The call that asked failed: nothing was granted (or nothing is known to be)."""
        g = self._groups.get(key)
        if g is not None:
            g.asking = False

    def asking(self, key: tuple[str, ...]) -> bool:
        g = self._groups.get(key)
        return g is not None and g.asking

    def expired(self, now: float, every: bool = False) -> list[tuple[Bucket, float]]:
        """Leases older than ``ttl`` (all of them with ``every``) leave their groups: the
        (bucket, tokens) to give back to Redis. Idle groups are dropped."""
        back: list[tuple[Bucket, float]] = []
        idle: list[tuple[str, ...]] = []
        for key, g in self._groups.items():
            if g.tokens > 0.0 and (every or now - g.granted_at >= self.ttl):
                back += [(b, g.tokens) for b in g.buckets]
                g.tokens = 0.0
            if g.tokens <= 0.0 and not g.asking and now - g.second >= 2.0:
                idle.append(key)
        for key in idle:
            del self._groups[key]
        return back
