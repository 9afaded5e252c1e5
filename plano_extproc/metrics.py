"""Process-local counters, rendered in Prometheus text format on the admin port.

Route names and model ids can come from clients (inline routes, ``provider/*`` wildcards), so
their label values are escaped, inline routes share the label ``inline``, and at most
``MAX_WILDCARD_MODELS`` wildcard model ids get a series of their own (the rest: ``other``):
a client can neither forge series nor grow ``/metrics`` without bound.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plano_extproc.gateway import Upstream


MAX_WILDCARD_MODELS = 100
INLINE_ROUTE = "inline"
OTHER_MODEL = "other"


def label(value: str) -> str:
    """A Prometheus text-format label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, routes: Iterable[str] = (), models: Iterable[str] = ()) -> None:
        """``routes`` and ``models``: the configured names, which are labelled as they are."""
        self.known_routes = frozenset(routes)
        self.known_models = frozenset(models)
        self.wildcard_models: set[str] = set()
        self.requests: Counter[tuple[str, str]] = Counter()  # (kind, status class)
        self.routes: Counter[tuple[str, str]] = Counter()  # (route, model)
        self.router_errors = 0
        self.pinned = 0
        self.replayed = 0
        self.decision_seconds = 0.0
        self.failovers: Counter[tuple[str, str, str]] = Counter()  # (from, to, reason)

    def count_immediate(self, status: int, kind: str | None = None) -> None:
        self.requests[(kind or "other", f"{status // 100}xx")] += 1

    def count_routed(self, up: Upstream, seconds: float) -> None:
        self.requests[("proxy", "routed")] += 1
        self.routes[(self._route_label(up.route), self._model_label(up.provider.name))] += 1
        self.decision_seconds += seconds
        if up.router_error:
            self.router_errors += 1
        if up.pinned:
            self.pinned += 1
        if up.replayed:
            self.replayed += 1

    def count_failover(self, from_model: str, to_model: str, reason: str) -> None:
        key = (self._model_label(from_model), self._model_label(to_model), reason)
        self.failovers[key] += 1

    def _route_label(self, route: str | None) -> str:
        if route is None:
            return "none"
        return route if route in self.known_routes else INLINE_ROUTE

    def _model_label(self, model: str) -> str:
        if model in self.known_models or model in self.wildcard_models:
            return model
        if len(self.wildcard_models) < MAX_WILDCARD_MODELS:
            self.wildcard_models.add(model)
            return model
        return OTHER_MODEL

    def render(self, cache_health: dict[str, Any] | None) -> str:
        lines = [
            "# TYPE plano_extproc_requests_total counter",
            *(
                f'plano_extproc_requests_total{{kind="{k}",outcome="{s}"}} {n}'
                for (k, s), n in sorted(self.requests.items())
            ),
            "# TYPE plano_extproc_route_decisions_total counter",
            *(
                f'plano_extproc_route_decisions_total{{route="{label(r)}",model="{label(m)}"}} {n}'
                for (r, m), n in sorted(self.routes.items())
            ),
            "# TYPE plano_extproc_router_errors_total counter",
            f"plano_extproc_router_errors_total {self.router_errors}",
            "# TYPE plano_extproc_pinned_requests_total counter",
            f"plano_extproc_pinned_requests_total {self.pinned}",
            "# TYPE plano_extproc_router_skips_total counter",
            f'plano_extproc_router_skips_total{{reason="not_user_turn"}} {self.replayed}',
            "# TYPE plano_extproc_decision_seconds_total counter",
            f"plano_extproc_decision_seconds_total {self.decision_seconds:.6f}",
            "# TYPE plano_extproc_failovers_total counter",
            *(
                f'plano_extproc_failovers_total{{from="{label(a)}",to="{label(b)}",'
                f'reason="{label(r)}"}} {n}'
                for (a, b, r), n in sorted(self.failovers.items())
            ),
        ]
        if cache_health is not None:
            lines += [
                "# TYPE plano_extproc_session_cache_errors_total counter",
                f"plano_extproc_session_cache_errors_total {int(cache_health.get('errors', 0))}",
                "# TYPE plano_extproc_session_cache_healthy gauge",
                f"plano_extproc_session_cache_healthy {int(bool(cache_health.get('healthy')))}",
            ]
        return "\n".join(lines) + "\n"
