"""The request pipeline: what to do with one HTTP request, free of gRPC and Envoy types.

``Gateway.on_headers`` answers what can be answered from headers alone (unknown paths,
``GET /v1/models``, bad affinity ids); ``Gateway.on_body`` parses the body, resolves the
model, applies affinity, routes, and returns either an upstream rewrite or an immediate
response. The ext_proc servicer only translates these results into Envoy messages.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from plano_extproc.affinity.base import PinnedDecision, SessionCache
from plano_extproc.affinity.keys import (
    AFFINITY_HEADER,
    InvalidAffinityId,
    cache_key,
    implicit_key,
    validate_affinity_id,
)
from plano_extproc.body import JsonBody
from plano_extproc.catalog import Catalog
from plano_extproc.config import Config, Provider
from plano_extproc.conversation import extract, is_user_turn, tool_names
from plano_extproc.cooldown import Cooldowns
from plano_extproc.dispatch import (
    Translation,
    dispatch_api,
    hides_usage,
    native_request,
    pair_for,
    refuses,
    translated_request,
    usage_asked,
)
from plano_extproc.errors import GatewayError, bad_request, body_limit_message, not_found
from plano_extproc.failover import MAX_PLAN_CHARS, FailoverPlan
from plano_extproc.failover import plan as failover_plan
from plano_extproc.identifiers import header_safe, traceparent
from plano_extproc.model_metrics import ModelMetrics
from plano_extproc.names import MAX_SLOTS, ROUTE_HEADER
from plano_extproc.providers import ClientApi
from plano_extproc.ratelimit.estimate import estimate
from plano_extproc.ratelimit.limiter import RateLimiter, Refused
from plano_extproc.rewrite import HeaderPlan
from plano_extproc.routing.base import NullRouter, RoutePreference, Router, RouterResult
from plano_extproc.routing.preferences import INLINE_KEYS, parse_inline
from plano_extproc.translate.base import PairTranslator

if TYPE_CHECKING:
    from plano_extproc.metrics import Metrics

log = logging.getLogger("plano_extproc.gateway")

PROXY_PATHS = {
    "/v1/chat/completions": ClientApi.CHAT,
    "/v1/messages": ClientApi.MESSAGES,
    "/v1/responses": ClientApi.RESPONSES,
}
DECISION_PREFIX = "/routing/v1/"
DECISION_PATHS = {
    "/routing/v1/chat/completions": ClientApi.CHAT,
    "/routing/v1/messages": ClientApi.MESSAGES,
    "/routing/v1/responses": ClientApi.RESPONSES,
}
JSON_HEADERS = (("content-type", "application/json"),)


@dataclass(slots=True)
class RequestInfo:
    method: str
    path: str  # without query string
    query: str
    headers: Mapping[str, str]  # lower-case names
    request_id: str
    end_of_stream: bool = False
    # Filled by on_headers for requests that will send a body.
    kind: Literal["proxy", "decision"] | None = None
    api: ClientApi | None = None
    affinity_key: str | None = None
    affinity_id: str | None = None
    request_model: str = ""  # the client's `model` (metrics and the access log)

    @classmethod
    def build(cls, headers: Mapping[str, str], end_of_stream: bool = False) -> RequestInfo:
        full = headers.get(":path", "/")
        path, _, query = full.partition("?")
        return cls(
            method=headers.get(":method", "GET").upper(),
            path=path,
            query=query,
            headers=headers,
            request_id=headers.get("x-request-id") or os.urandom(16).hex(),
            end_of_stream=end_of_stream,
        )


@dataclass(slots=True)
class Immediate:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = JSON_HEADERS
    details: str = "plano_extproc"

    @classmethod
    def error(cls, err: GatewayError, info: RequestInfo | None = None) -> Immediate:
        """The error in the client's format: Anthropic's for proxied Messages requests."""
        anthropic = info is not None and info.kind == "proxy" and info.api is ClientApi.MESSAGES
        return cls(err.status, err.body(anthropic=anthropic), details=f"plano_{err.type}")


@dataclass(slots=True)
class Upstream:
    provider: Provider
    headers: HeaderPlan
    body: bytes | None  # None: body unchanged
    route: str | None = None
    router_error: str | None = None
    pinned: bool | None = None
    replayed: bool = False  # route_on_user_only: a non-user turn reused the session's choice
    translation: Translation | None = None  # None: native pair, the response is untouched
    # Two or more models to try in order (the body then keeps the client's API); None: one.
    failover: FailoverPlan | None = None
    api: ClientApi | None = None  # the client's: Envoy's own error replies take its format
    # The provider was asked for usage the client did not ask for: Envoy hides it again.
    hide_usage: bool = False
    # The budgets this request was charged, for the usage record to settle (ratelimit).
    ratelimit: str | None = None

    @classmethod
    def of(
        cls,
        decision: Decision,
        info: RequestInfo,
        provider: Provider,
        headers: HeaderPlan,
        body: bytes | None,
        *,
        translation: Translation | None = None,
        failover: FailoverPlan | None = None,
        hide_usage: bool = False,
        ratelimit: str | None = None,
    ) -> Upstream:
        return cls(
            provider=provider,
            headers=headers,
            body=body,
            route=decision.route,
            router_error=decision.router_error,
            pinned=decision.pinned,
            replayed=decision.replayed,
            translation=translation,
            failover=failover,
            api=info.api,
            hide_usage=hide_usage,
            ratelimit=ratelimit,
        )


@dataclass(slots=True)
class Decision:
    """The outcome of model selection, shared by the proxy and the decision endpoint."""

    models: list[str]
    route: str | None
    dispatch: Provider | None  # proxy path: where the request goes
    router_error: str | None = None
    pinned: bool | None = None
    scores: dict[str, float] = field(default_factory=dict)
    replayed: bool = False
    router_seconds: float | None = None  # set when the router model was asked

    @property
    def outcome(self) -> str | None:
        """For the decision metrics: None when nothing was decided (no routes, no messages)."""
        if self.pinned:
            return "pinned"
        if self.replayed:
            return "replayed"
        if self.router_seconds is None:
            return None
        if self.router_error:
            return "router_error"
        return "matched" if self.route is not None else "no_match"


def trace_id_from(headers: Mapping[str, str]) -> str:
    parsed = traceparent(headers.get("traceparent", ""))
    if parsed is not None and parsed[0] != "0" * 32:
        return parsed[0]
    return os.urandom(16).hex()


def _utf8(header_value: str, what: str) -> str:
    """Header values arrive as bytes-in-latin-1; ids are UTF-8 text (so "€" is not a C1 control)."""
    try:
        return header_value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise InvalidAffinityId(f"{what} is not valid UTF-8") from None


class BodyBudget:
    """Bytes of unfinished request bodies one worker holds. With the routing filter in
    FULL_DUPLEX_STREAMED, Envoy streams bodies through and the worker gathers them, so the
    bound Envoy's overload manager kept on buffered bodies is kept here: past ``limit``,
    a body larger than ``SMALL`` that grows is refused (503); smaller ones always pass (they
    add at most max_concurrent_requests x SMALL)."""

    SMALL = 64 * 1024
    # Each piece Envoy forwards is a message the worker handles: a client sending 1-byte
    # HTTP/2 DATA frames would cost a worker ~100x what its bytes cost Envoy. Past the first
    # FREE_PIECES, pieces must average MIN_PIECE_AVERAGE bytes (Envoy's own reads and frames
    # are KiB-sized; 32 MiB arrive in ~2,000 of them).
    FREE_PIECES = 4096
    MIN_PIECE_AVERAGE = 256

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def add(self, n: int, total: int) -> bool:
        """``n`` more bytes for a body now ``total`` long; False: refuse that body."""
        self.held += n
        return total <= self.SMALL or self.held <= self.limit

    @classmethod
    def crumbs(cls, pieces: int, total: int) -> bool:
        """True: ``pieces`` pieces making ``total`` bytes are a flood of tiny ones."""
        return pieces > cls.FREE_PIECES and total < cls.MIN_PIECE_AVERAGE * pieces


class Gateway:
    def __init__(
        self,
        config: Config,
        router: Router,
        cache: SessionCache | None,
        metrics: ModelMetrics | None = None,
        cooldowns: Cooldowns | None = None,
        telemetry: Metrics | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.config = config
        # Unfinished full-duplex bodies: a quarter of max_heap_bytes per worker, which the
        # config keeps at >= 4 x max_request_bytes, so one largest body always fits.
        self.bodies = BodyBudget(config.listener.max_heap_bytes // 4)
        # Token budgets (Plano ratelimits); None or inactive: no request is limited.
        self.limiter = limiter if limiter is not None and limiter.active else None
        # Counts decisions, router latency and session-cache lookups (None: not counted).
        self.telemetry = telemetry
        self.catalog = Catalog(config)
        self.router = router
        # router: {type: none} classifies nothing: no call, and no router latency to record.
        self._classifies = type(router) is not NullRouter
        self.cache = cache
        self.metrics = metrics
        self.cooldowns = cooldowns
        # (client API, candidate names) -> the configured models among them that can serve
        # that API, in order: the same few lists recur on every routed request.
        self._servable: dict[
            tuple[ClientApi, tuple[str, ...]], list[tuple[Provider, PairTranslator | None]]
        ] = {}
        self._model_ids = {p.name: p.model_id for p in config.providers}
        self._models_body = json.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "plano-extproc"}
                    for name in self.catalog.names()
                ],
            }
        ).encode()

    # ------------------------------------------------------------------ headers phase

    def on_headers(self, info: RequestInfo) -> Immediate | None:
        """Classify the request; answer now when the body is not needed."""
        try:
            return self._on_headers(info)
        except GatewayError as e:
            return Immediate.error(e, info)

    def _on_headers(self, info: RequestInfo) -> Immediate | None:
        path = info.path.rstrip("/") or "/"
        if path in ("/v1/models", "/models"):
            if info.method not in ("GET", "HEAD"):
                raise GatewayError(405, "method_not_allowed", f"{info.method} {path}: use GET")
            return Immediate(200, self._models_body)
        api = PROXY_PATHS.get(path)
        kind: Literal["proxy", "decision"] = "proxy"
        if api is None:
            api = DECISION_PATHS.get(path)
            kind = "decision"
        if api is None:
            if path.startswith("/routing/"):
                raise not_found(
                    f"unknown routing endpoint {path}; use one of {', '.join(DECISION_PATHS)}"
                )
            raise not_found(
                f"unknown path {path}; this gateway serves {', '.join(PROXY_PATHS)}, "
                f"{', '.join(DECISION_PATHS)} and GET /v1/models"
            )
        info.kind = kind
        info.api = api
        if info.method != "POST":
            raise GatewayError(405, "method_not_allowed", f"{info.method} {path}: use POST")
        if info.end_of_stream:
            raise bad_request("request body is empty; send a JSON object")
        raw_id = info.headers.get(AFFINITY_HEADER)
        if raw_id is not None and self.cache is not None:
            tenant = None
            if self.config.session_cache.tenant_header:
                tenant = info.headers.get(self.config.session_cache.tenant_header)
            try:
                info.affinity_id = validate_affinity_id(_utf8(raw_id, "X-Model-Affinity"))
                info.affinity_key = cache_key(
                    info.affinity_id, _utf8(tenant, "tenant header") if tenant else None
                )
            except InvalidAffinityId as e:
                raise bad_request(str(e)) from None
        return None

    def body_too_large(self, info: RequestInfo) -> Immediate:
        """The 413 for a body over the listener's limit, in the client's format (the words of
        Envoy's own 413, which answers when Envoy buffers the body)."""
        limit = self.config.listener.max_request_bytes
        err = GatewayError(413, "request_too_large", body_limit_message(limit))
        return Immediate.error(err, info)

    def body_in_crumbs(self, info: RequestInfo) -> Immediate:
        """The 400 for a body sent as a flood of tiny pieces (BodyBudget.crumbs)."""
        err = bad_request(
            f"request body arrived in over {BodyBudget.FREE_PIECES} pieces of under "
            f"{BodyBudget.MIN_PIECE_AVERAGE} bytes on average; send it in larger writes"
        )
        return Immediate.error(err, info)

    def bodies_full(self, info: RequestInfo) -> Immediate:
        """The 503 for a body refused by ``BodyBudget``, in the client's format."""
        err = GatewayError(
            503,
            "overloaded_error",
            "the gateway holds too many unfinished request bodies (listener max_heap_bytes); "
            "retry later",
        )
        return Immediate.error(err, info)

    # ------------------------------------------------------------------ body phase

    async def on_body(self, info: RequestInfo, raw: bytes) -> Upstream | Immediate:
        try:
            if info.api is None:  # on_headers was not called (defensive)
                early = self._on_headers(info)
                if early is not None:
                    return early
            assert info.api is not None
            if info.kind == "decision":
                return await self._decide_endpoint(info, raw)
            return await self._proxy(info, raw)
        except GatewayError as e:
            # The message may quote client text (a model name): no CR/LF may forge log lines.
            reason = header_safe(e.message)
            log.info("request_id=%s rejected %s: %s", info.request_id, e.status, reason)
            return Immediate.error(e, info)

    async def _proxy(self, info: RequestInfo, raw: bytes) -> Upstream | Immediate:
        assert info.api is not None
        body = await JsonBody.parse_async(raw)
        model = body.values.get("model")
        info.request_model = model if isinstance(model, str) else ""
        requested = self.catalog.resolve(model)
        inline = parse_inline(body.values, self.catalog)
        messages = extract(info.api, body.values)
        decision = await self._select(info, requested, inline, messages, body.values)
        self._count(info, decision)
        served = self._candidates(decision, inline, info.api, body.values)
        settlement = None
        if self.limiter is not None:
            within = await self._within_budget(info, decision, inline, raw, body.values, served)
            if isinstance(within, Immediate):
                await body.release()
                return within
            served, settlement = within
        candidates = [p for p, _ in served]
        if len(candidates) > 1:
            first_native = served[0][1] is None
            fo = failover_plan(info.api, info.query, info.headers, candidates, first_native)
            if len(fo.metadata) <= MAX_PLAN_CHARS:
                if self.cooldowns is not None:
                    self.cooldowns.attempted(candidates[0].name)
                return await self._failover(info, body, decision, fo, settlement)
            # A huge query string or credential: served, without failover, not refused.
            log.warning(
                "request_id=%s failover plan of %d characters exceeds %d: one attempt only",
                info.request_id,
                len(fo.metadata),
                MAX_PLAN_CHARS,
            )
        provider = candidates[0] if candidates else decision.dispatch
        assert provider is not None
        target, pair = dispatch_api(provider, info.api)
        translation: Translation | None = None
        hide_usage = pair is None and hides_usage(info.api, body.values)
        if pair is None:
            plan, new_body = await native_request(
                info.api, info.query, info.headers, body, provider, ask_usage=hide_usage
            )
        else:
            plan, new_body, translation = await translated_request(
                info.api, info.query, info.headers, body, provider, target, pair, info.request_id
            )
        log.debug(
            "request_id=%s dispatch model=%s route=%s translate=%s",
            info.request_id,
            provider.name,
            decision.route,
            translation.pair if translation is not None else None,
        )
        return Upstream.of(
            decision,
            info,
            provider,
            plan,
            new_body,
            translation=translation,
            hide_usage=hide_usage,
            ratelimit=settlement,
        )

    async def _within_budget(
        self,
        info: RequestInfo,
        decision: Decision,
        inline: tuple[RoutePreference, ...] | None,
        raw: bytes,
        values: dict[str, Any],
        served: list[tuple[Provider, PairTranslator | None]],
    ) -> tuple[list[tuple[Provider, PairTranslator | None]], str | None] | Immediate:
        """Token budgets before dispatch: the first candidate whose budgets hold the prompt's
        estimate serves (without failover, a routed request still moves on to its route's
        next model); none: a 429 in the client's format with Retry-After."""
        limiter = self.limiter
        assert limiter is not None and info.api is not None
        options = served
        if not options:
            if decision.dispatch is None:
                return served, None
            options = [(decision.dispatch, None)]
            if decision.route is not None:
                alternatives = self._candidates(decision, inline, info.api, values, MAX_SLOTS)
                if alternatives and alternatives[0][0].name == decision.dispatch.name:
                    options = alternatives
        names = [p.name for p, _ in options]
        if not any(map(limiter.applies_to, names)):
            return served, None
        result = await limiter.admit(names, info.headers, estimate(raw, values))
        if isinstance(result, Refused):
            log.info(
                "request_id=%s rate limited (%s): %s",
                info.request_id,
                ", ".join(result.limits),
                f"retry after {result.retry_after}s" if result.retry_after else "never fits",
            )
            reply = Immediate.error(result.error, info)
            if result.retry_after is not None:
                reply.headers += (("retry-after", str(result.retry_after)),)
            else:  # the OpenAI and Anthropic SDKs honour this: retrying cannot help
                reply.headers += (("x-should-retry", "false"),)
            return reply
        if result.index and names[result.index] != names[0]:
            log.info(
                "request_id=%s %s over its token budget: %s serves",
                info.request_id,
                names[0],
                names[result.index],
            )
        if served:
            served = [o for o, keep in zip(options, result.keep, strict=True) if keep]
        elif result.index:
            served = [options[result.index]]
        return served, result.settlement

    async def _failover(
        self,
        info: RequestInfo,
        body: JsonBody,
        decision: Decision,
        fo: FailoverPlan,
        settlement: str | None = None,
    ) -> Upstream:
        """Several models to try. A native first model's request is built here, as for a
        single model (its attempt opens no ext_proc stream); later attempts' streams rebuild
        from that body, still in the client's API. Otherwise every attempt's stream builds
        its model's request from the client's body, which only loses our own fields here."""
        assert info.api is not None
        candidates = fo.candidates
        hp = fo.headers
        # A Chat stream without usage: every attempt asks for it (translated ones emit it), and
        # Envoy's Lua filter takes it out of the client's stream again, whoever served.
        hide = hides_usage(info.api, body.values)
        if fo.first_built:
            first = candidates[0]
            own, new_body = await native_request(
                info.api, info.query, info.headers, body, first, ask_usage=hide
            )
            own.set.append((":authority", first.authority))  # the route has no host rewrite
            own.set = [h for h in own.set if h[0] != ROUTE_HEADER]
            mine = {k for k, _ in own.set}
            hp = HeaderPlan(
                set=hp.set + own.set,
                remove=[h for h in dict.fromkeys(hp.remove + own.remove) if h not in mine],
            )
        else:
            remove = tuple(k for k in INLINE_KEYS if k in body.values)
            edits = usage_asked(body.values) if hide else {}
            new_body = body.edited(remove=remove, set_values=edits) if remove or edits else None
            await body.release()
            if new_body is not None:
                hp.set.append(("content-length", str(len(new_body))))
            if hide:
                hp.set.append(("accept-encoding", "identity"))
        log.debug(
            "request_id=%s dispatch models=%s route=%s",
            info.request_id,
            ",".join(c.name for c in candidates),
            decision.route,
        )
        return Upstream.of(
            decision,
            info,
            candidates[0],
            hp,
            new_body,
            failover=fo,
            hide_usage=hide,
            ratelimit=settlement,
        )

    def _candidates(
        self,
        decision: Decision,
        inline: tuple[RoutePreference, ...] | None,
        api: ClientApi,
        values: dict[str, Any],
        most: int | None = None,
    ) -> list[tuple[Provider, PairTranslator | None]]:
        """The models a routed request tries, in order: the chosen one, then the rest of its
        route; those that cannot serve the client's API or would refuse this body left out,
        resting ones skipped (all kept when all rest), at most ``max_attempts``. Empty: a
        single attempt at ``decision.dispatch`` (failover off, the request was not routed,
        or no model takes it: the first one's refusal is the answer). Each with its
        translator (None: native). ``most``: that many, whether failover is on or not."""
        fo = self.config.failover
        if decision.route is None:
            return []
        if most is None:
            if not fo.enabled or fo.max_attempts < 2:
                return []
            most = fo.max_attempts
        prefs = inline if inline is not None else self.config.preferences
        pref = next((p for p in prefs if p.name == decision.route), None)
        names = [decision.dispatch.name] if decision.dispatch is not None else []
        names += decision.models
        if pref is not None:
            names += pref.models
        key = (api, tuple(names))
        found = self._servable.get(key)
        if found is None:
            found = self._servable_models(names, api)
            if len(self._servable) < 4096:  # inline routes may name many models: bounded
                self._servable[key] = found
        if self.cooldowns is not None:
            found = self.cooldowns.available(found, lambda served: served[0].name)
        taken: list[tuple[Provider, PairTranslator | None]] = []
        for p, pair in found:
            if len(taken) == most:
                break
            if not refuses(pair, values, p.model_id):
                taken.append((p, pair))
        return taken

    def _servable_models(
        self, names: list[str], api: ClientApi
    ) -> list[tuple[Provider, PairTranslator | None]]:
        seen: set[str] = set()
        found: list[tuple[Provider, PairTranslator | None]] = []
        for name in dict.fromkeys(names):  # the same names recur: look each up once
            p = self.catalog.lookup(name)
            if p is None or p.name in seen:
                continue
            can, pair = pair_for(p, api)
            if can:
                seen.add(p.name)
                found.append((p, pair))
        return found

    async def _decide_endpoint(self, info: RequestInfo, raw: bytes) -> Immediate:
        assert info.api is not None
        trace_id = trace_id_from(info.headers)
        if info.affinity_key is not None and self.cache is not None:
            hit = await self._lookup(info.affinity_key)
            if hit is not None:  # pinned: answer without reading the body (Plano semantics)
                pinned = Decision([hit.model], hit.route, None, pinned=True)
                self._count(info, pinned)
                return self._decision_response(pinned, trace_id, info)
        body = await JsonBody.parse_async(raw)
        requested = None
        model_value = body.values.get("model")
        if model_value is not None and not isinstance(model_value, str):
            raise bad_request("'model' must be a string")
        if isinstance(model_value, str) and model_value:
            requested = self.catalog.lookup(model_value)
        inline = parse_inline(body.values, self.catalog)
        messages = extract(info.api, body.values)
        decision = await self._select(info, requested, inline, messages, body.values)
        await body.release()
        self._count(info, decision)
        return self._decision_response(decision, trace_id, info)

    def _decision_response(self, d: Decision, trace_id: str, info: RequestInfo) -> Immediate:
        out: dict[str, Any] = {"models": d.models, "route": d.route, "trace_id": trace_id}
        if info.affinity_id is not None and d.pinned is not None:
            out["session_id"] = info.affinity_id
            out["pinned"] = d.pinned
        if d.router_error:
            out["router_error"] = d.router_error
        return Immediate(200, json.dumps(out).encode(), details="plano_routing_decision")

    # ------------------------------------------------------------------ selection

    async def _select(
        self,
        info: RequestInfo,
        requested: Provider | None,
        inline: tuple[RoutePreference, ...] | None,
        messages: list[Any],
        body: dict[str, Any],
    ) -> Decision:
        """Affinity lookup, then routing, then pin the outcome (first writer wins)."""
        key = info.affinity_key if self.cache is not None else None
        if key is None and self.cache is not None and self.config.route_on_user_only:
            return await self._select_by_turn(info, requested, inline, messages, body)
        if key is not None and info.kind == "proxy":
            hit = await self._lookup(key)
            if hit is not None:
                pinned = self.catalog.lookup(hit.model)
                if pinned is not None:  # whatever the client's API: translated if needed
                    return Decision([pinned.name], hit.route, pinned, pinned=True)
                log.warning(
                    "request_id=%s pinned model %s is no longer configured; routing again",
                    info.request_id,
                    hit.model,
                )
        decision = await self._route(info, requested, inline, messages)
        if key is None:
            return decision
        assert self.cache is not None
        if decision.dispatch is not None:
            mine = PinnedDecision(decision.dispatch.name, decision.route)
        else:
            mine = PinnedDecision(decision.models[0], decision.route)
        winner = await self.cache.put_if_absent(key, mine)
        if winner == mine:
            decision.pinned = False
            return decision
        # Another replica pinned this session first: follow its decision.
        provider = self.catalog.lookup(winner.model)
        return Decision([winner.model], winner.route, provider or decision.dispatch, pinned=True)

    async def _select_by_turn(
        self,
        info: RequestInfo,
        requested: Provider | None,
        inline: tuple[RoutePreference, ...] | None,
        messages: list[Any],
        body: dict[str, Any],
    ) -> Decision:
        """route_on_user_only without X-Model-Affinity: route user turns; replay the last
        decision of the same conversation for tool results and other non-user turns."""
        prefs = inline if inline is not None else self.config.preferences
        if not prefs or not messages:
            return await self._route(info, requested, inline, messages)
        assert self.cache is not None
        tenant_header = self.config.session_cache.tenant_header
        key = implicit_key(
            info.headers.get(tenant_header) if tenant_header else None,
            requested.name if requested is not None else "",
            "\n".join(m.content for m in messages if m.role in ("system", "developer")),
            tool_names(body),
            next((m.content for m in messages if m.role == "user"), ""),
        )
        if not is_user_turn(messages[-1]):
            hit = await self._lookup(key, near=False)
            provider = self.catalog.lookup(hit.model) if hit is not None else None
            if hit is not None and provider is not None:
                return Decision([provider.name], hit.route, provider, replayed=True)
        decision = await self._route(info, requested, inline, messages)
        chosen = decision.dispatch.name if decision.dispatch is not None else decision.models[0]
        await self.cache.put(key, PinnedDecision(chosen, decision.route))
        return decision

    async def _route(
        self,
        info: RequestInfo,
        requested: Provider | None,
        inline: tuple[RoutePreference, ...] | None,
        messages: list[Any],
    ) -> Decision:
        prefs = inline if inline is not None else self.config.preferences
        result = RouterResult(route=None)
        router_seconds = None
        if prefs and messages and self._classifies:
            started = time.perf_counter()
            result = await self.router.route(messages, prefs, request_id=info.request_id)
            router_seconds = time.perf_counter() - started
            if result.error:
                log.warning(
                    "request_id=%s router failed, serving the requested model: %s",
                    info.request_id,
                    result.error,
                )
        pref = next((p for p in prefs if p.name == result.route), None) if result.route else None
        if pref is None:
            return Decision(
                ["none"],
                None,
                requested,
                router_error=result.error,
                scores=result.scores,
                router_seconds=router_seconds,
            )
        ranked = list(pref.models)
        if pref.prefer != "none" and self.metrics is not None:
            ranked = self.metrics.ranked(ranked, pref.prefer, self._model_ids)
        # The route's first model serves the request whatever API the client speaks (translated
        # when needed), so the proxy and /routing/v1/* name the same model.
        candidates = [c for c in map(self.catalog.lookup, ranked) if c is not None]
        dispatch = candidates[0] if candidates else requested
        return Decision(
            ranked,
            pref.name,
            dispatch,
            router_error=result.error,
            scores=result.scores,
            router_seconds=router_seconds,
        )

    # ------------------------------------------------------------------ telemetry

    async def _lookup(self, key: str, near: bool = True) -> PinnedDecision | None:
        """A session-cache lookup, counted as hit, miss or error."""
        cache = self.cache
        assert cache is not None
        before = cache.failures
        hit = await cache.get(key, near=near)
        if self.telemetry is not None:
            failed = cache.failures != before
            result = "error" if failed else "hit" if hit is not None else "miss"
            self.telemetry.count_cache(result, cache.healthy)
        return hit

    def _count(self, info: RequestInfo, decision: Decision) -> None:
        outcome = decision.outcome
        if self.telemetry is not None and outcome is not None:
            endpoint = info.kind or "proxy"
            self.telemetry.count_decision(
                endpoint, decision.route, outcome, decision.router_seconds
            )
