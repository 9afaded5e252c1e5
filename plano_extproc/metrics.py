"""The gateway's Prometheus series, kept with ``prometheus_client``.

Each worker records into its own registry. Under ``plano-extproc up`` the supervisor gives
every worker a ``PROMETHEUS_MULTIPROC_DIR``: prometheus_client then keeps the values in
memory-mapped files there and the supervisor's one ``/metrics`` sums all workers
(``metrics_server.py``); ``serve`` keeps the values in memory for its own ``/metrics``.

Token and latency series follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration``,
``gen_ai.server.time_to_first_token``, ``gen_ai.server.time_per_output_token``), with their
recommended bucket boundaries.

Route names and model ids can come from clients (inline routes, ``provider/*`` wildcards, the
``model`` a client asks for), so label values are bounded: inline routes share ``inline``, and
at most ``MAX_WILDCARD_MODELS`` model ids outside the configuration get a series of their own
(the rest: ``other``). The library escapes what remains: a client can neither forge series nor
grow ``/metrics`` without bound.

The hot path keeps each labelled child in a dict, so a request pays a dict lookup and one
value update per series, not prometheus_client's label validation and lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

if TYPE_CHECKING:
    from plano_extproc.usage import Usage

# No ``*_created`` series: a sample per series that dashboards do not use and that the
# multiprocess mode (``up``) does not have either, so both endpoints show the same names.
disable_created_metrics()

MAX_WILDCARD_MODELS = 100
INLINE_ROUTE = "inline"
OTHER_MODEL = "other"
NONE = "none"

# OpenTelemetry GenAI metric conventions: recommended explicit bucket boundaries.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)  # fmt: skip
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
ROUTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

GENAI_LABELS = (
    "gen_ai_request_model",
    "gen_ai_response_model",
    "gen_ai_provider_name",
    "route",
    "client_api",
)


@dataclass(slots=True)
class Exchange:
    """One proxied request, as its response ended (the usage stream's view)."""

    client_api: str
    request_model: str  # what the client asked for ("" when absent)
    model: str  # the configured model that served ("" when none did)
    route: str | None
    status: int
    seconds: float | None = None  # from the gateway holding the request to the last byte
    usage: Usage | None = None
    ttft: float | None = None  # streams: to the first token-bearing event
    tpot: float | None = None  # streams: per output token after the first


def observe_all(child: Any, values: list[float]) -> None:
    """``child.observe(v) for v in values`` as one update of the sum and one per bucket hit.

    prometheus_client has no observe-many; this writes the same values ``observe`` would,
    through the histogram child's own value objects (``_sum``, ``_buckets``,
    ``_upper_bounds``: private, so ``tests/unit/test_metrics.py`` checks the result against
    ``observe`` sample by sample and fails if a release changes them).
    """
    if len(values) == 1:
        child.observe(values[0])
        return
    bounds = child._upper_bounds
    hits: dict[int, int] = {}
    for v in values:
        if v == v:  # observe() counts a NaN in no bucket (only in the sum)
            i = bisect_left(bounds, v)  # the first bucket with v <= bound, as observe() finds
            hits[i] = hits.get(i, 0) + 1
    child._sum.inc(sum(values))
    buckets = child._buckets
    for i, n in hits.items():
        buckets[i].inc(n)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "5xx"


class Metrics:
    """All series of one process. ``routes``/``models``: the configured names (labelled as
    they are); ``router``: the configured router kind."""

    def __init__(
        self,
        routes: Iterable[str] = (),
        models: Iterable[str] = (),
        router: str = NONE,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.known_routes = frozenset(routes)
        self.known_models = frozenset(models)
        self.router = router
        self.wildcard_models: set[str] = set()
        self.registry = reg = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[Any, ...], Any] = {}
        self.requests = Counter(
            "plano_requests",
            "Client requests by endpoint, client API, serving model, route and status class.",
            ("endpoint", "client_api", "model", "route", "status_class"),
            registry=reg,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request as the provider reported them (input includes cached_input).",
            ("gen_ai_token_type", *GENAI_LABELS),
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Proxied request duration, from the gateway holding the request to its last byte.",
            GENAI_LABELS,
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streams: time to the first token-bearing event.",
            GENAI_LABELS,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Streams: time per output token after the first.",
            GENAI_LABELS,
            buckets=TPOT_BUCKETS,
            registry=reg,
        )
        self.decisions = Counter(
            "plano_routing_decisions",
            "Routing decisions by endpoint, router kind, route and outcome.",
            ("endpoint", "router", "route", "outcome"),
            registry=reg,
        )
        self.router_seconds = Histogram(
            "plano_router_duration_seconds",
            "Time the router model took per decision (only when it was called).",
            ("router",),
            buckets=ROUTER_BUCKETS,
            registry=reg,
        )
        self.cache = Counter(
            "plano_session_cache_requests",
            "Session-cache lookups by result.",
            ("result",),
            registry=reg,
        )
        self.cache_healthy = Gauge(
            "plano_session_cache_healthy",
            "1 while the session cache answers (the lowest of all workers).",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.failovers = Counter(
            "plano_failovers",
            "Failovers from one model to the next, by reason (status, reset, timeout, ...).",
            ("from_model", "to_model", "reason"),
            registry=reg,
        )
        self.ratelimit_rejections = Counter(
            "plano_ratelimit_rejections",
            "Requests a token rate limit refused (429 before dispatch), per limit.",
            ("limit",),
            registry=reg,
        )
        self.ratelimit_tokens = Counter(
            "plano_ratelimit_tokens",
            "Tokens charged to each rate limit: the provider's input + output (else the estimate).",
            ("limit",),
            registry=reg,
        )
        self.ratelimit_fail_open = Counter(
            "plano_ratelimit_fail_open",
            "Budget checks served from this gateway's own budgets while Redis was unusable.",
            registry=reg,
        )
        self.ratelimit_store_healthy = Gauge(
            "plano_ratelimit_store_healthy",
            "0 while a worker cannot use the Redis that holds the shared token budgets (the "
            "lowest of all workers; 1 otherwise, also without Redis).",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.ratelimit_store_healthy.set(1)
        self._healthy: bool | None = None

    # ------------------------------------------------------------------ recording

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_immediate(self, status: int, kind: str | None = None, api: str | None = None) -> None:
        """A reply the gateway made itself (decision endpoint, errors)."""
        labels = (kind or "other", api or "other", NONE, NONE, status_class(status))
        self._child(self.requests, labels).inc()

    def count_decision(
        self, endpoint: str, route: str | None, outcome: str, router_seconds: float | None
    ) -> None:
        labels = (endpoint, self.router, self._route_label(route), outcome)
        self._child(self.decisions, labels).inc()
        if router_seconds is not None:
            self._child(self.router_seconds, (self.router,)).observe(router_seconds)

    def count_cache(self, result: str, healthy: bool) -> None:
        self._child(self.cache, (result,)).inc()
        if healthy is not self._healthy:
            self._healthy = healthy
            self.cache_healthy.set(1 if healthy else 0)

    def set_cache_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        self.cache_healthy.set(1 if healthy else 0)

    def count_failover(self, from_model: str, to_model: str, reason: str) -> None:
        key = (self._model_label(from_model), self._model_label(to_model), reason)
        self._child(self.failovers, key).inc()

    def count_ratelimit_rejection(self, limit: str) -> None:
        self._child(self.ratelimit_rejections, (limit,)).inc()

    def count_ratelimit_tokens(self, limit: str, tokens: int) -> None:
        self._child(self.ratelimit_tokens, (limit,)).inc(tokens)

    def set_ratelimit_store(self, healthy: bool, fail_open: int = 0) -> None:
        """The budget store's health, and checks served locally since the last call."""
        self.ratelimit_store_healthy.set(1 if healthy else 0)
        if fail_open:
            self.ratelimit_fail_open.inc(fail_open)

    def record(self, ex: Exchange) -> None:
        """A proxied request whose response ended: requests, duration, tokens, stream timing."""
        self.record_all((ex,))

    def record_all(self, exchanges: Iterable[Exchange]) -> None:
        """Requests whose responses ended (a batch of usage records): their observations are
        grouped by series first, so each series is updated once per batch. In multiprocess
        mode every update is a locked write to a memory-mapped file; per request that was
        most of what a usage record cost the worker (bench/usage_record.py)."""
        counts: dict[tuple[str, ...], int] = {}
        observed: dict[tuple[Any, tuple[str, ...]], list[float]] = {}

        def observe(metric: Any, labels: tuple[str, ...], value: float) -> None:
            values = observed.get((metric, labels))
            if values is None:
                observed[(metric, labels)] = [value]
            else:
                values.append(value)

        for ex in exchanges:
            model = self._model_label(ex.model) if ex.model else NONE
            route = self._route_label(ex.route)
            labels = ("proxy", ex.client_api, model, route, status_class(ex.status))
            counts[labels] = counts.get(labels, 0) + 1
            provider = ex.model.split("/", 1)[0] if "/" in ex.model else NONE
            requested = self._model_label(ex.request_model) if ex.request_model else NONE
            genai = (requested, model, provider, route, ex.client_api)
            if ex.seconds is not None:
                observe(self.duration, genai, ex.seconds)
            usage = ex.usage
            if usage is not None:
                observe(self.tokens, ("input", *genai), usage.input)
                observe(self.tokens, ("output", *genai), usage.output)
                if usage.cached_input:
                    observe(self.tokens, ("cached_input", *genai), usage.cached_input)
            if ex.ttft is not None:
                observe(self.ttft, genai, ex.ttft)
            if ex.tpot is not None:
                observe(self.tpot, genai, ex.tpot)
        for series, n in counts.items():
            self._child(self.requests, series).inc(n)
        for (metric, series), values in observed.items():
            observe_all(self._child(metric, series), values)

    # ------------------------------------------------------------------ labels

    def _route_label(self, route: str | None) -> str:
        if route is None:
            return NONE
        return route if route in self.known_routes else INLINE_ROUTE

    def _model_label(self, model: str) -> str:
        if model in self.known_models or model in self.wildcard_models:
            return model
        if len(self.wildcard_models) < MAX_WILDCARD_MODELS:
            self.wildcard_models.add(model)
            return model
        return OTHER_MODEL

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        """This process's series in the Prometheus text format (``serve``'s ``/metrics``)."""
        return generate_latest(self.registry)
