"""Types shared by every router back-end (embedded, orchestrator LLM).

The gateway core hands a router the normalised conversation and the effective preferences;
the router answers with a route name or ``None``. Routers never raise for model failures:
they report them in ``RouterResult.error`` so the request fails open.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One conversation turn flattened to text. ``role`` is as the client sent it
    (user, assistant, system, developer, tool); routers decide which roles count."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class RoutePreference:
    """A natural-language route: ``models`` is the ordered candidate pool (``provider/model``)."""

    name: str
    description: str
    models: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    prefer: str = "none"


@dataclass(frozen=True, slots=True)
class RouterResult:
    """``route`` is a name from the preferences or ``None`` (no match). ``error`` is set when
    the router failed and the caller must fail open; ``scores`` is optional detail for --explain."""

    route: str | None
    error: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    no_match: float | None = None  # the embedded router's "none of these" score, for --explain


class Router(Protocol):
    """A router back-end. ``start`` loads models / opens clients before the server is ready."""

    async def start(self) -> None: ...

    async def route(
        self,
        messages: Sequence[ChatMessage],
        preferences: Sequence[RoutePreference],
        *,
        request_id: str,
    ) -> RouterResult: ...

    async def close(self) -> None: ...


class NullRouter:
    """Used when no router is configured: routes nothing, so requests keep their model."""

    async def start(self) -> None:
        return None

    async def route(
        self,
        messages: Sequence[ChatMessage],
        preferences: Sequence[RoutePreference],
        *,
        request_id: str,
    ) -> RouterResult:
        return RouterResult(route=None)

    async def close(self) -> None:
        return None
