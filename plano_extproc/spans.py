"""A GenAI span per traced request, with the token usage Envoy's own span cannot carry.

Envoy's request span gets the model and route as tags from the routing stream's metadata
(``envoy_config._tracing``). The token usage is known only when the answer ends, after Envoy
has settled its span's tags, and reaches a worker in Envoy's usage record
(``server/usage_log.py``). So the worker exports one more span into the same trace, as
OpenTelemetry's GenAI conventions describe a model call: named ``"{operation} {requested
model}"``, kind CLIENT, with ``gen_ai.*`` attributes (models, provider, token usage) and the
route, status and attempts. Its parent is the span Envoy forwarded the request under (the
record carries Envoy's ``traceparent``); only sampled traces are exported.

Export is OTLP/gRPC to the ``tracing`` block's collector, batched (at most ``MAX_BATCH`` per call,
one call per ``FLUSH_SECONDS``) from a bounded queue: a slow or absent collector drops spans
(counted, logged once per outage) and never slows a request. The messages are the OTLP protobuf
classes that xds-protos ships; only the batching is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from plano_extproc.identifiers import traceparent
from plano_extproc.metrics import Exchange

log = logging.getLogger("plano_extproc.spans")

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MAX_QUEUE = 4096
MAX_BATCH = 512
FLUSH_SECONDS = 1.0
EXPORT_TIMEOUT_SECONDS = 2.0
SCOPE = "plano-extproc"

# The bundled OTLP schema may be older (instrumentation_library_spans) or newer (scope_spans):
# the same field number, so the same bytes on the wire.
_GROUP_FIELD = (
    "scope_spans"
    if "scope_spans" in trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name
    else "instrumentation_library_spans"
)
_OPERATION = {"chat_completions": "chat", "messages": "chat", "responses": "chat"}


def parse_traceparent(value: str) -> tuple[bytes, bytes] | None:
    """(trace id, parent span id) of a sampled W3C traceparent, else None."""
    parsed = traceparent(value)
    if parsed is None or not parsed[2] & 1:
        return None
    trace_id, span_id = bytes.fromhex(parsed[0]), bytes.fromhex(parsed[1])
    if not any(trace_id) or not any(span_id):
        return None
    return trace_id, span_id


def _attr(key: str, value: str | int) -> common_pb2.KeyValue:
    kv = common_pb2.KeyValue(key=key)
    if isinstance(value, int):
        kv.value.int_value = value
    else:
        kv.value.string_value = value
    return kv


def genai_span(
    parent: tuple[bytes, bytes], ex: Exchange, started: float, ended: float, attempts: str
) -> trace_pb2.Span:
    """The span of one model call (times in epoch seconds)."""
    operation = _OPERATION.get(ex.client_api, "chat")
    requested = ex.request_model or ex.model or "unknown"
    span = trace_pb2.Span(
        trace_id=parent[0],
        span_id=os.urandom(8),
        parent_span_id=parent[1],
        name=f"{operation} {requested}"[:256],
        kind=trace_pb2.Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=int(started * 1e9),
        end_time_unix_nano=int(max(ended, started) * 1e9),
    )
    attrs = [
        _attr("gen_ai.operation.name", operation),
        _attr("plano.client_api", ex.client_api),
        _attr("http.response.status_code", ex.status),
    ]
    if ex.request_model:
        attrs.append(_attr("gen_ai.request.model", ex.request_model[:256]))
    if ex.model:
        attrs.append(_attr("gen_ai.response.model", ex.model))
        if "/" in ex.model:
            attrs.append(_attr("gen_ai.provider.name", ex.model.split("/", 1)[0]))
    if ex.route is not None:
        attrs.append(_attr("plano.route.name", ex.route[:256]))
    if attempts.isdigit():
        attrs.append(_attr("plano.attempts", int(attempts)))
    usage = ex.usage
    if usage is not None:
        attrs.append(_attr("gen_ai.usage.input_tokens", usage.input))
        attrs.append(_attr("gen_ai.usage.output_tokens", usage.output))
        attrs.append(_attr("gen_ai.usage.cache_read.input_tokens", usage.cached_input))
    if ex.status >= 400 or ex.status < 100:
        attrs.append(_attr("error.type", str(ex.status)))
        span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
    span.attributes.extend(attrs)
    return span


class SpanExporter:
    """Batches GenAI spans and sends them to one OTLP/gRPC collector."""

    def __init__(self, host: str, port: int, service_name: str = SCOPE) -> None:
        self.target = f"{host}:{port}"
        self.service_name = service_name
        self.queue: list[trace_pb2.Span] = []
        self.dropped = 0
        self.exported = 0
        self._channel: grpc.aio.Channel | None = None
        self._export: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failing = False

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=ts.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=ts.ExportTraceServiceResponse.FromString,
        )
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add(self, span: trace_pb2.Span) -> None:
        if len(self.queue) >= MAX_QUEUE:
            self.dropped += 1
            return
        self.queue.append(span)
        if len(self.queue) >= MAX_BATCH:
            self._wake.set()

    def request(self, spans: list[trace_pb2.Span]) -> ts.ExportTraceServiceRequest:
        req = ts.ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.append(_attr("service.name", self.service_name))
        group = getattr(rs, _GROUP_FIELD).add()
        scope = group.scope if hasattr(group, "scope") else group.instrumentation_library
        scope.name = SCOPE
        group.spans.extend(spans)
        return req

    async def flush(self) -> None:
        while self.queue:
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            try:
                await self._export(self.request(batch), timeout=EXPORT_TIMEOUT_SECONDS)
            except (TimeoutError, grpc.RpcError) as e:
                self.dropped += len(batch)
                if not self._failing:
                    log.warning("span export to %s failed (spans dropped): %s", self.target, e)
                self._failing = True
                return
            self.exported += len(batch)
            if self._failing:
                log.info("span export to %s works again", self.target)
            self._failing = False

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # never let the exporter die quietly
                log.exception("span export failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()
        if self._channel is not None:
            await self._channel.close()
