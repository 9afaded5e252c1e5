"""The session-cache interface the gateway core uses for model affinity.

Backends never raise to the caller: a failing backend behaves as a miss on ``get`` and as
"nothing stored" on ``put_if_absent`` (the request is served without affinity) and records
the failure in its health/counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class PinnedDecision:
    """What a session is pinned to: the dispatched ``provider/model`` and the route (or None)."""

    model: str
    route: str | None


class SessionCache(Protocol):
    async def start(self) -> None: ...

    async def get(self, key: str, *, near: bool = True) -> PinnedDecision | None:
        """The value under ``key``; ``near=False`` skips any process-local copy (needed for
        values that ``put`` may replace on another replica)."""
        ...

    async def put_if_absent(self, key: str, value: PinnedDecision) -> PinnedDecision:
        """Store ``value`` unless the key exists; return the value that is now pinned
        (the first writer's), or ``value`` itself when the backend is unavailable."""
        ...

    async def put(self, key: str, value: PinnedDecision) -> None:
        """Store or replace ``value`` with a fresh TTL (route_on_user_only bindings, which
        follow every routed user turn, unlike first-writer-wins pins)."""
        ...

    @property
    def healthy(self) -> bool:
        """False while the backend is known to be unreachable (lookups are then skipped)."""
        ...

    @property
    def failures(self) -> int:
        """Calls so far that failed or were skipped while unhealthy: a change across one
        lookup tells the metrics that this lookup was an error, not a miss."""
        ...

    def health(self) -> dict[str, Any]:
        """State for readiness/metrics, e.g. {"backend": "redis", "healthy": True, "errors": 0}."""
        ...

    async def close(self) -> None: ...
