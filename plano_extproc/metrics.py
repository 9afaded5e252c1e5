"""Process-local counters, rendered in Prometheus text format on the admin port."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plano_extproc.gateway import Upstream


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (kind, status class)
        self.routes: Counter[tuple[str, str]] = Counter()  # (route, model)
        self.router_errors = 0
        self.pinned = 0
        self.replayed = 0
        self.decision_seconds = 0.0

    def count_immediate(self, status: int, kind: str | None = None) -> None:
        self.requests[(kind or "other", f"{status // 100}xx")] += 1

    def count_routed(self, up: Upstream, seconds: float) -> None:
        self.requests[("proxy", "routed")] += 1
        self.routes[(up.route or "none", up.provider.name)] += 1
        self.decision_seconds += seconds
        if up.router_error:
            self.router_errors += 1
        if up.pinned:
            self.pinned += 1
        if up.replayed:
            self.replayed += 1

    def render(self, cache_health: dict[str, Any] | None) -> str:
        lines = [
            "# TYPE plano_extproc_requests_total counter",
            *(
                f'plano_extproc_requests_total{{kind="{k}",outcome="{s}"}} {n}'
                for (k, s), n in sorted(self.requests.items())
            ),
            "# TYPE plano_extproc_route_decisions_total counter",
            *(
                f'plano_extproc_route_decisions_total{{route="{r}",model="{m}"}} {n}'
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
        ]
        if cache_health is not None:
            lines += [
                "# TYPE plano_extproc_session_cache_errors_total counter",
                f"plano_extproc_session_cache_errors_total {int(cache_health.get('errors', 0))}",
                "# TYPE plano_extproc_session_cache_healthy gauge",
                f"plano_extproc_session_cache_healthy {int(bool(cache_health.get('healthy')))}",
            ]
        return "\n".join(lines) + "\n"
