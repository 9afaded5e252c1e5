"""One proxied response as the usage filter sees it, free of gRPC and Envoy types.

The usage filter (``envoy_config._usage_filter``) runs in observability mode on the proxy
routes: Envoy sends the response headers and every body chunk as the client receives them
(after any translation) and never waits for an answer. Its first message carries the
routing stream's ``plano`` metadata: the client's API, the model that served (the last
attempt's), the route, the model the client asked for and when the gateway got the request.
From there this reads the provider's reported usage and the stream timing, and at the end
hands one ``Exchange`` to the metrics and, when enabled, one access-log line.
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
    MODEL_KEY,
    PINNED_KEY,
    REQUEST_ID_KEY,
    REQUESTED_KEY,
    ROUTE_KEY,
    STARTED_KEY,
)
from plano_extproc.providers import ClientApi
from plano_extproc.usage import Usage, UsageMeter

_APIS = {api.value: api for api in ClientApi}


class Observation:
    """Usage and timing of one response; ``finish`` ends it (once)."""

    __slots__ = (
        "api",
        "attempts",
        "exchange",
        "first_token_at",
        "hidden",
        "meter",
        "pinned",
        "request_id",
        "started",
        "stream",
    )

    def __init__(
        self,
        fields: Mapping[str, Any],
        status: int,
        headers: Mapping[str, str],
        now: float,
    ) -> None:
        """``fields``: the ``plano`` metadata as plain values; ``now``: epoch seconds."""
        api_name = fields.get(API_KEY)
        api = _APIS.get(api_name) if isinstance(api_name, str) else None
        self.api = api
        started = fields.get(STARTED_KEY)
        self.started = (
            float(started)
            if isinstance(started, (int, float)) and math.isfinite(started) and started <= now
            else None
        )
        route = fields.get(ROUTE_KEY)
        self.exchange = Exchange(
            client_api=api.value if api is not None else "other",
            request_model=_text(fields.get(REQUESTED_KEY)),
            model=_text(fields.get(MODEL_KEY)),
            route=route if isinstance(route, str) else None,
            status=status,
        )
        self.request_id = _text(fields.get(REQUEST_ID_KEY))
        pinned = fields.get(PINNED_KEY)
        self.pinned = pinned if isinstance(pinned, bool) else None
        self.attempts = headers.get("x-plano-attempts", "")
        content_type = headers.get("content-type", "").strip().lower()
        encoding = headers.get("content-encoding", "").strip().lower()
        self.stream = content_type.startswith("text/event-stream")
        self.meter: UsageMeter | None = None
        if api is not None and 200 <= status < 300 and encoding in ("", "identity"):
            self.meter = UsageMeter(api, self.stream)
        self.first_token_at: float | None = None
        self.hidden: Usage | None = None

    def chunk(self, data: bytes, now: float) -> None:
        meter = self.meter
        if meter is not None and data and meter.feed(data) and self.first_token_at is None:
            self.first_token_at = now

    def hidden_usage(self, text: str) -> None:
        """The usage a stream before us took out of a Chat client's stream (``u``)."""
        self.hidden = Usage.decode(text)

    def finish(self, now: float) -> Exchange:
        ex = self.exchange
        if self.started is not None:
            ex.seconds = max(0.0, now - self.started)
        if self.meter is not None:
            ex.usage = self.meter.finish()
        if ex.usage is None and self.hidden is not None:
            ex.usage = self.hidden
        first = self.first_token_at
        if first is not None and self.started is not None:
            ex.ttft = max(0.0, first - self.started)
            if ex.usage is not None and ex.usage.output > 1:
                ex.tpot = max(0.0, now - first) / (ex.usage.output - 1)
        return ex

    def log_line(self, ex: Exchange) -> str:
        """The access-log record: no prompt text, no credentials, only what the gateway chose
        and measured (client-chosen strings are JSON-escaped by the encoder)."""
        usage = ex.usage
        record = {
            "time": round(time.time(), 3),
            "request_id": self.request_id,
            "client_api": ex.client_api,
            "requested_model": ex.request_model,
            "model": ex.model,
            "route": ex.route,
            "pinned": self.pinned,
            "attempts": int(self.attempts) if self.attempts.isdigit() else None,
            "status": ex.status,
            "stream": self.stream,
            "input_tokens": usage.input if usage is not None else None,
            "output_tokens": usage.output if usage is not None else None,
            "cached_input_tokens": usage.cached_input if usage is not None else None,
            "duration_ms": _ms(ex.seconds),
            "ttft_ms": _ms(ex.ttft),
        }
        return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)
