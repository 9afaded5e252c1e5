"""Failover across a routed request's models inside one client request, free of gRPC.

Three parts:

- the routing stream (``plan``) orders the candidates and hands Envoy one slot header per
  attempt (``x-plano-try-<k>`` = the provider cluster of attempt k+1), the attempt count
  ``0`` (so the first route resolution reads slot 0), the per-request retry cap, and the plan
  as dynamic metadata ``plano.fo``; Envoy replays the body it sends to every attempt;
- when the first model speaks the client's API, the routing stream builds its request itself
  (as for a single model) and sends it to that provider's ``__first`` cluster: no attempt
  stream for a first attempt (one ext_proc stream per request, as for a single model); a Lua
  filter there records a failing status and Retry-After as metadata;
- every other attempt goes to a ``__failover`` cluster, whose upstream ext_proc opens the
  attempt's stream (``Attempt``): it picks candidate ``attempt - 1``, records the previous
  attempt's failure (cooldowns), and builds that model's request (path, host, credentials,
  body, translated when its API is not the client's) from the replayed body, which is in the
  client's API either way; then it sees that attempt's response: a failing status is passed
  on as metadata and left to Envoy's retry when another candidate remains; the final response
  is recorded and translated when needed in the same stream.

Measured on Envoy 1.40 (../shared/reference/translation-failover.md §A6-A9, G): header
mutations persist across attempts (so every attempt sets every header it owns and removes
what an earlier attempt may have set), the body is replayed from the router's buffer, a
connection that fails is retried without opening an attempt stream, and dynamic metadata an
attempt writes is merged (last write wins), which is how ``x-plano-model`` names the model
that served. The plan carries model names, never prompt text; stateless across streams, so
any worker can serve any attempt.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from plano_extproc.body import JsonBody
from plano_extproc.catalog import Catalog
from plano_extproc.config import FailoverConfig, Provider
from plano_extproc.cooldown import Cooldowns, retry_after_seconds
from plano_extproc.dispatch import (
    compact_json,
    dispatch_api,
    native_request,
    translated_request,
)
from plano_extproc.names import (
    ATTEMPT_COUNT_HEADER,
    MAX_RETRIES_HEADER,
    ROUTE_HEADER,
    TRANSLATE_HEADER,
    failover_cluster,
    failure_key,
    first_cluster,
    retry_after_key,
    slot_header,
)
from plano_extproc.providers import ClientApi
from plano_extproc.response_phase import HeadersPlan, ResponseTranslation
from plano_extproc.rewrite import CREDENTIAL_HEADERS, HeaderPlan, client_credential

log = logging.getLogger("plano_extproc.failover")

NO_RESPONSE = "no_response"  # refused, reset or timed out: the attempt saw no status
MAX_PLAN_CHARS = 16384


@dataclass(frozen=True, slots=True)
class FailoverPlan:
    candidates: tuple[Provider, ...]
    headers: HeaderPlan
    metadata: str  # plano.fo
    first_built: bool  # attempt 1's request is the routing stream's (see ``plan``)


def plan(
    client: ClientApi,
    query: str,
    headers: Mapping[str, str],
    candidates: Sequence[Provider],
    first_built: bool = False,
) -> FailoverPlan:
    """The routing stream's part for ``candidates`` (two or more, in attempt order).
    ``first_built``: the routing stream builds attempt 1's request itself (a native first
    model: no attempt stream for it, the cost of a single-model request when it succeeds);
    otherwise the first model's attempt stream does, from the client's body."""
    hp = HeaderPlan(remove=list(CREDENTIAL_HEADERS))
    hp.set = [(slot_header(k), failover_cluster(c.cluster)) for k, c in enumerate(candidates)]
    if first_built:
        hp.set[0] = (slot_header(0), first_cluster(candidates[0].cluster))
    hp.set.append((ATTEMPT_COUNT_HEADER, "0"))
    hp.set.append((MAX_RETRIES_HEADER, str(len(candidates) - 1)))
    names = tuple(c.name for c in candidates)
    configured = {k for c in candidates for k, _ in c.headers}
    passthrough = any(c.passthrough_auth for c in candidates)
    plain = (
        not query
        and not passthrough
        and "anthropic-version" not in headers
        and not any(k in headers for k in configured)
    )
    if plain:  # the common case: the same few plans over and over
        return FailoverPlan(tuple(candidates), hp, _plain_plan(client, names), first_built)
    ctx: dict[str, object] = {"api": client.value, "q": query, "c": list(names)}
    if passthrough:
        # Attempts may each rewrite the credential headers: the client's own credential
        # travels in the plan (dynamic metadata, never a header or a log) for the models
        # configured to forward it, and reaches no other model.
        credential = client_credential(headers)
        if credential:
            ctx["cred"] = credential
    if "anthropic-version" in headers:
        ctx["av"] = headers["anthropic-version"]  # the client's own: kept for every attempt
    # A header some candidate's config sets overwrites the client's copy in that attempt, and
    # Envoy keeps the overwrite for the next: the client's values travel in the plan.
    kept = {k: headers[k] for k in sorted(configured) if k in headers}
    if kept:
        ctx["h"] = kept
    return FailoverPlan(tuple(candidates), hp, compact_json(ctx), first_built)


@functools.lru_cache(maxsize=1024)  # bounded: inline routes may name wildcard models
def _plain_plan(client: ClientApi, names: tuple[str, ...]) -> str:
    return compact_json({"api": client.value, "q": "", "c": list(names)})


def _string_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


class PlanError(ValueError):
    """The plan metadata is missing or does not fit this attempt."""


@dataclass(slots=True)
class AttemptRequest:
    headers: HeaderPlan
    body: bytes | None
    model: str


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed (its status) and the provider's Retry-After, in seconds."""

    status: str
    retry_after: str | None


@dataclass(slots=True)
class Switch:
    """A failover, for logs and metrics: ``from_model`` failed (``reason``), ``to_model`` next."""

    from_model: str
    to_model: str
    reason: str


@dataclass(slots=True)
class Attempt:
    """One attempt's stream: its candidate, its request, its response."""

    policy: FailoverConfig
    cooldowns: Cooldowns | None
    client: ClientApi
    query: str
    names: list[str]
    index: int  # 0-based: candidate index and attempt number - 1
    provider: Provider
    credential: str | None
    client_av: str | None  # the client's anthropic-version
    client_headers: dict[str, str] = field(default_factory=dict)
    switch: Switch | None = None
    response: ResponseTranslation | None = None
    other_header_names: set[str] = field(default_factory=set)

    @classmethod
    def start(
        cls,
        catalog: Catalog,
        policy: FailoverConfig,
        cooldowns: Cooldowns | None,
        raw_plan: str,
        headers: Mapping[str, str],
        failures: Mapping[str, str],
    ) -> Attempt:
        """At the attempt's request headers: which candidate, and what happened before."""
        if len(raw_plan) > MAX_PLAN_CHARS:
            raise PlanError("failover plan too large")
        try:
            value = json.loads(raw_plan)
            client = ClientApi(value["api"])
            names = [str(n) for n in value["c"]]
            query = str(value.get("q", ""))
        except (ValueError, KeyError, TypeError):
            raise PlanError("failover plan unreadable") from None
        try:
            attempt = int(headers.get(ATTEMPT_COUNT_HEADER, ""))
        except ValueError:
            raise PlanError("attempt count missing") from None
        if not 1 <= attempt <= len(names):
            raise PlanError(f"attempt {attempt} outside a plan of {len(names)} models")
        index = attempt - 1
        provider = catalog.lookup(names[index])
        if provider is None:
            raise PlanError(f"model {names[index]!r} of the plan is not configured")
        credential = value.get("cred")
        self = cls(
            policy=policy,
            cooldowns=cooldowns,
            client=client,
            query=query,
            names=names,
            index=index,
            provider=provider,
            credential=credential if isinstance(credential, str) else None,
            client_av=av if isinstance(av := value.get("av"), str) else None,
            client_headers=_string_map(value.get("h")),
        )
        if index > 0:
            # The previous attempt failed: its status and Retry-After came as metadata (from
            # its stream, or from the Lua filter of a first attempt that had none); none: it
            # never answered (refused, reset, timed out). Its cooldown is recorded here, once.
            previous = names[index - 1]
            reason = failures.get(failure_key(attempt - 1)) or NO_RESPONSE
            if cooldowns is not None:
                cooldowns.attempted(provider.name)  # (the routing stream counted the first)
                if reason == "429":
                    wait = failures.get(retry_after_key(attempt - 1))
                    cooldowns.rate_limited(
                        previous, retry_after_seconds({"retry-after": wait} if wait else {})
                    )
                else:
                    cooldowns.failed(previous)
            self.switch = Switch(previous, provider.name, reason)
        for name in names:
            other = catalog.lookup(name)
            if other is not None and other.name != provider.name:
                self.other_header_names.update(k for k, _ in other.headers)
        return self

    @property
    def attempt(self) -> int:
        return self.index + 1

    @property
    def last(self) -> bool:
        return self.index + 1 >= len(self.names)

    async def on_body(self, raw: bytes, request_id: str) -> AttemptRequest:
        """This candidate's request. What it needs of the client's headers comes from the
        plan: the request's current headers hold whatever earlier attempts set."""
        provider = self.provider
        view: dict[str, str] = {}
        if self.client_av is not None:
            view["anthropic-version"] = self.client_av
        if self.credential is not None and provider.passthrough_auth:
            view["authorization"] = f"Bearer {self.credential}"
        target, pair = dispatch_api(provider, self.client)
        body = await JsonBody.parse_async(raw)
        new_body: bytes | None
        if pair is None:
            hp, new_body = await native_request(
                self.client, self.query, view, body, provider, unchanged_size=len(raw)
            )
        else:
            hp, new_body, translation = await translated_request(
                self.client, self.query, view, body, provider, target, pair, request_id
            )
            self.response = ResponseTranslation.from_metadata(translation.metadata)
        # Routing headers of the single-attempt routes: this route is taken already, and
        # nothing would strip them before the provider.
        hp.set = [h for h in hp.set if h[0] not in (ROUTE_HEADER, TRANSLATE_HEADER)]
        hp.set.append((":authority", provider.authority))
        mine = {k for k, _ in hp.set}
        # What an earlier attempt set and this one does not: its credentials, its
        # provider's configured headers, an anthropic-version the client never sent.
        stale = set(CREDENTIAL_HEADERS) | self.other_header_names
        if self.client_av is None:
            stale.add("anthropic-version")
        restore = [(k, v) for k, v in self.client_headers.items() if k in stale and k not in mine]
        hp.set.extend(restore)
        mine.update(k for k, _ in restore)
        hp.remove = sorted(h for h in stale if h not in mine)
        return AttemptRequest(hp, new_body, provider.name)

    def on_response_headers(
        self, status: int, headers: Mapping[str, str], end_of_stream: bool
    ) -> tuple[HeadersPlan | None, Failure | None]:
        """The attempt's response: (what to do with it, why it failed when Envoy will try the
        next candidate: the next attempt's stream records it). None as the plan: pass it
        through untouched."""
        name = self.provider.name
        failing = self.policy.retries_on(status)
        wait = retry_after_seconds(headers)
        if failing and not self.last:  # Envoy retries with the next slot
            return None, Failure(str(status), None if wait is None else f"{wait:g}")
        if self.cooldowns is not None:  # the final answer: nobody after us records it
            if status == 429:
                self.cooldowns.rate_limited(name, wait)
            elif failing:
                self.cooldowns.failed(name)
            elif 200 <= status < 300:
                self.cooldowns.succeeded(name)
        if self.response is None:
            return None, None
        return self.response.on_headers(status, headers, end_of_stream), None
