"""One proxied request as Envoy's usage record reports it, free of gRPC and protobuf.

Envoy reads the token usage itself (``envoy_config._usage_extractors``: json_to_metadata for
JSON answers, sse_to_metadata for streams, both on the bytes the client receives) and, when the
request ends, its OpenTelemetry access logger sends one record whose body has a line per field
(``envoy_config._usage_log``): the routing stream's facts (client API, served and requested
model, route, pin), the provider's counters under their own names, and Envoy's timings. This
turns a record into an ``Exchange`` for the metrics, an access-log line and span attributes.

The counters mean different things per client API (OpenTelemetry GenAI accounting):
Chat's ``prompt_tokens`` include cached tokens; Anthropic's ``input_tokens`` exclude cache
reads and writes (added back here); Responses' ``input_tokens`` include them. A Chat client that
did not ask for usage has none in its stream: the response filter that took it out hands it
over as ``u`` (``translate/chat_usage.py``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from plano_extproc.metrics import Exchange
from plano_extproc.names import (
    API_KEY,
    CACHE_READ,
    CACHE_WRITE,
    CACHED_TOKENS,
    COMPLETION_TOKENS,
    INPUT_CACHED,
    INPUT_TOKENS,
    LOG_ATTEMPTS,
    LOG_BODY_US,
    LOG_CONTENT_TYPE,
    LOG_DURATION_MS,
    LOG_DURATION_US,
    LOG_REQUEST_ID,
    LOG_STATUS,
    LOG_USAGE,
    MODEL_KEY,
    OUTPUT_TOKENS,
    PINNED_KEY,
    PROMPT_TOKENS,
    REQUESTED_KEY,
    ROUTE_KEY,
    USAGE_KEY,
)
from plano_extproc.providers import ClientApi
from plano_extproc.usage import MAX_COUNT, Usage

_APIS = {api.value: api for api in ClientApi}
ABSENT = "-"  # how Envoy's formatter writes a value it does not have
MAX_TEXT = 256


def _text(attrs: Mapping[str, str], key: str) -> str:
    value = attrs.get(key, ABSENT)
    return "" if value == ABSENT else value[:MAX_TEXT]


def _count(values: Mapping[str, Any], key: str) -> int | None:
    """A counter (a JSON number, or a number as Envoy printed it: "37", "37.0"); None when
    absent or not a bounded non-negative whole number."""
    raw: Any = values.get(key)
    kind = type(raw)
    # The usual shapes first: a JSON integer, or digits as Envoy printed them.
    if kind is int:
        return min(raw, MAX_COUNT) if raw >= 0 else None
    if kind is str and raw.isdigit() and raw.isascii() and len(raw) <= 24:
        return min(int(raw), MAX_COUNT)
    if isinstance(raw, bool) or raw is None or raw == ABSENT:
        return None
    if isinstance(raw, str):
        if len(raw) > 24:
            return None
        try:
            raw = float(raw)
        except ValueError:
            return None
    if not isinstance(raw, (int, float)):
        return None
    if not math.isfinite(raw) or raw < 0 or raw != int(raw):
        return None
    return min(int(raw), MAX_COUNT)


def _counters(raw: str | None) -> dict[str, Any]:
    """The ``plano.usage`` namespace as Envoy wrote it (a JSON object; "-" when empty)."""
    if not raw or raw == ABSENT or len(raw) > 4096:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _micros(attrs: Mapping[str, str], key: str) -> float | None:
    """A COMMON_DURATION in microseconds, as seconds (absent when Envoy never reached a point)."""
    raw = attrs.get(key)
    if raw is None or not raw.isdigit() or len(raw) > 15:
        return None
    return int(raw) / 1e6


def usage_of(
    api: ClientApi | None, attrs: Mapping[str, Any], hidden: str | None = None
) -> Usage | None:
    """The provider's usage in OpenTelemetry terms, from the counters of the client's API
    (``attrs``); ``hidden``: the usage a response filter took out of a Chat stream."""
    if api is ClientApi.CHAT:
        inp, out = _count(attrs, PROMPT_TOKENS), _count(attrs, COMPLETION_TOKENS)
        cached = _count(attrs, CACHED_TOKENS) or 0
    elif api is ClientApi.MESSAGES:
        base, out = _count(attrs, INPUT_TOKENS), _count(attrs, OUTPUT_TOKENS)
        cached = _count(attrs, CACHE_READ) or 0
        inp = None if base is None else base + cached + (_count(attrs, CACHE_WRITE) or 0)
    elif api is ClientApi.RESPONSES:
        inp, out = _count(attrs, INPUT_TOKENS), _count(attrs, OUTPUT_TOKENS)
        cached = _count(attrs, INPUT_CACHED) or 0
    else:
        return None
    if inp is None and out is None:
        return Usage.decode(hidden) if hidden and hidden != ABSENT else None
    inp = min(inp or 0, MAX_COUNT)
    return Usage(inp, out or 0, min(cached, inp))


class Observation:
    """One usage record: the exchange for the metrics, the access-log line."""

    __slots__ = ("attempts", "exchange", "pinned", "request_id", "stream")

    def __init__(self, attrs: Mapping[str, str]) -> None:
        api = _APIS.get(attrs.get(API_KEY, ""))
        status = _count(attrs, LOG_STATUS)
        counters = _counters(attrs.get(LOG_USAGE))
        self.stream = (
            attrs.get(LOG_CONTENT_TYPE, "").strip().lower().startswith("text/event-stream")
        )
        route = _text(attrs, ROUTE_KEY)
        ex = Exchange(
            client_api=api.value if api is not None else "other",
            request_model=_text(attrs, REQUESTED_KEY),
            model=_text(attrs, MODEL_KEY),
            route=route or None,
            status=status if status is not None and status <= 999 else 0,
        )
        ex.seconds = _micros(attrs, LOG_DURATION_US)
        if ex.seconds is None:
            millis = _count(attrs, LOG_DURATION_MS)
            ex.seconds = millis / 1000 if millis is not None and millis < 10**9 else None
        if 200 <= ex.status < 300:
            ex.usage = usage_of(api, counters, attrs.get(USAGE_KEY))
            body = _micros(attrs, LOG_BODY_US)
            if self.stream and body is not None:
                ex.ttft = body
                usage = ex.usage
                if usage is not None and usage.output > 1 and ex.seconds is not None:
                    ex.tpot = max(0.0, ex.seconds - body) / (usage.output - 1)
        self.exchange = ex
        self.request_id = _text(attrs, LOG_REQUEST_ID)
        attempts = _count(attrs, LOG_ATTEMPTS)
        self.attempts = attempts if attempts is not None and attempts <= 64 else None
        pinned = attrs.get(PINNED_KEY)
        self.pinned = {"true": True, "false": False}.get(pinned or "")

    def log_line(self) -> str:
        """The access-log record: no prompt text, no credentials, only what the gateway chose
        and measured (client-chosen strings are JSON-escaped by the encoder)."""
        ex = self.exchange
        usage = ex.usage
        record = {
            "time": round(time.time(), 3),
            "request_id": self.request_id,
            "client_api": ex.client_api,
            "requested_model": ex.request_model,
            "model": ex.model,
            "route": ex.route,
            "pinned": self.pinned,
            "attempts": self.attempts,
            "status": ex.status,
            "stream": self.stream,
            "input_tokens": usage.input if usage is not None else None,
            "output_tokens": usage.output if usage is not None else None,
            "cached_input_tokens": usage.cached_input if usage is not None else None,
            "duration_ms": _ms(ex.seconds),
            "ttft_ms": _ms(ex.ttft),
        }
        return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)
