"""The OTLP LogsService Envoy's usage records arrive on: decode a batch, record each request.

Envoy's OpenTelemetry access logger (``envoy_config._usage_log``) batches one record per
proxied request and calls ``LogsService/Export`` on the ext_proc cluster; both transports
answer it on the ext_proc port. Each record becomes the request's metrics
(``Metrics.record``), its access-log line when ``--request-log`` is on, and a GenAI span in the
request's trace when Envoy traced it (the record carries the request span's ids).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as ls
from opentelemetry.proto.logs.v1 import logs_pb2

from plano_extproc.access_log import AccessLog
from plano_extproc.metrics import Exchange, Metrics
from plano_extproc.names import LOG_FIELDS, LOG_TRACEPARENT, RATELIMIT_KEY
from plano_extproc.observe import Observation
from plano_extproc.ratelimit.limiter import RateLimiter
from plano_extproc.spans import SpanExporter, genai_span, parse_traceparent

log = logging.getLogger("plano_extproc.usage")

SERVICE = "opentelemetry.proto.collector.logs.v1.LogsService"
# The bundled OTLP schema may name the record groups either way (same field, same bytes).
_GROUP_FIELD = (
    "scope_logs"
    if "scope_logs" in logs_pb2.ResourceLogs.DESCRIPTOR.fields_by_name
    else "instrumentation_library_logs"
)
_EMPTY_RESPONSE = ls.ExportLogsServiceResponse().SerializeToString()


def fields_of(rec: Any) -> dict[str, str] | None:
    """A record's fields by name: its body's lines in ``LOG_FIELDS`` order (what
    ``envoy_config`` renders), or its string attributes (configurations rendered before the
    body layout). None when the body has another number of lines."""
    body = rec.body.string_value
    if body:
        values = body.split("\n")
        if len(values) != len(LOG_FIELDS):
            return None
        return dict(zip(LOG_FIELDS, values, strict=True))
    return {kv.key: kv.value.string_value for kv in rec.attributes}


class UsageLog:
    """Turns Envoy's usage records into metrics, access-log lines and spans."""

    def __init__(
        self,
        metrics: Metrics,
        access_log: AccessLog | None = None,
        spans: SpanExporter | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.metrics = metrics
        self.limiter = limiter  # settles the token budgets an admitted request was charged
        self.access_log = access_log
        self.spans = spans
        self.records = 0
        self.malformed = 0  # records whose body did not have LOG_FIELDS' lines

    def export(self, raw: bytes) -> bytes:
        """One serialized ExportLogsServiceRequest in, the serialized (empty) response out."""
        req = ls.ExportLogsServiceRequest.FromString(raw)
        exchanges: list[Exchange] = []
        for resource in req.resource_logs:
            for group in getattr(resource, _GROUP_FIELD):
                for rec in group.logs:
                    ex = self._record(rec)
                    if ex is not None:
                        exchanges.append(ex)
        # The batch's metrics in one pass: one update per series, not per request.
        self.metrics.record_all(exchanges)
        if self.limiter is not None:  # the batch's budget corrections, in one store call
            self.limiter.flush()
        return _EMPTY_RESPONSE

    def _record(self, rec: Any) -> Exchange | None:
        attrs = fields_of(rec)
        if attrs is None:
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 1000 == 0:
                log.warning(
                    "%d usage record(s) not in the expected layout and not counted (an Envoy "
                    "configuration from another plano-extproc version? render it again with "
                    "`plano-extproc envoy-config`)",
                    self.malformed,
                )
            return None
        obs = Observation(attrs)
        ex = obs.exchange
        self.records += 1
        if self.limiter is not None:
            charged = attrs.get(RATELIMIT_KEY)
            if charged and charged != "-":
                usage = ex.usage
                used = usage.input + usage.output if usage is not None else None
                self.limiter.settle(charged, ex.model, ex.status, used)
        if self.access_log is not None:
            self.access_log.write(obs.log_line())
        if self.spans is not None:
            # Envoy's traceparent on the forwarded request: its span, and whether it sampled.
            parent = parse_traceparent(attrs.get(LOG_TRACEPARENT, ""))
            if parent is not None:
                started = rec.time_unix_nano / 1e9 if rec.time_unix_nano else 0.0
                ended = started + (ex.seconds or 0.0)
                attempts = str(obs.attempts) if obs.attempts is not None else ""
                self.spans.add(genai_span(parent, ex, started, ended, attempts))
        return ex

    async def handle(self, raw: bytes, context: Any) -> bytes:
        """The grpc.aio handler (``--transport grpcio``)."""
        try:
            return self.export(raw)
        except Exception:
            log.exception("usage records could not be read")
            await context.abort(grpc.StatusCode.INTERNAL, "cannot read the usage records")
            raise

    def grpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self.handle)}
        )
