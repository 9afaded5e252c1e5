"""The ext_proc servicer: Envoy messages in, ``Gateway`` decisions out.

``ExtProcStream`` holds the per-request logic; two transports drive it: our own HTTP/2
server (``server/h2.py``, the default) and grpc.aio (``ExternalProcessor``, which uses the
``context.read()/write()`` API, measurably cheaper than async generators). Every header value
is sent as ``raw_value`` (Envoy ignores ``value`` for mutations).
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from plano_extproc.errors import GatewayError
from plano_extproc.failover import Attempt, AttemptRequest, Failure, PlanError
from plano_extproc.gateway import BodyBudget, Gateway, Immediate, RequestInfo, Upstream
from plano_extproc.identifiers import ascii_header, header_safe
from plano_extproc.metrics import Metrics
from plano_extproc.names import (
    API_KEY,
    DECISION_METADATA,
    FAILOVER_KEY,
    FAILURE_PREFIXES,
    HIDE_USAGE_KEY,
    LENGTH_KEY,
    MODEL_KEY,
    PINNED_KEY,
    RATELIMIT_KEY,
    REQUESTED_KEY,
    ROUTE_KEY,
    TX_KEY,
    USAGE_KEY,
    failure_key,
    retry_after_key,
)
from plano_extproc.providers import ClientApi
from plano_extproc.response_phase import ContextError, HeadersPlan, ResponseTranslation

log = logging.getLogger("plano_extproc.server")

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())


def _headers_map(msg: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        raw = h.raw_value  # what Envoy sends; ``value`` only from older Envoys
        value = raw.decode("latin-1") if raw else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _add_headers(mutation: pb.HeaderMutation, headers: Iterable[tuple[str, str]]) -> None:
    # Filled in place: passing sub-messages to constructors copies each one (~3x slower).
    add = mutation.set_headers.add
    for key, value in headers:
        option = add(append_action=_OVERWRITE)
        option.header.key = key
        option.header.raw_value = header_safe(value).encode("latin-1", "replace")


def immediate_response(imm: Immediate) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    reply = out.immediate_response
    reply.status.code = imm.status
    reply.headers.SetInParent()
    _add_headers(reply.headers, imm.headers)
    reply.body = imm.body
    reply.details = imm.details
    return out


MAX_REQUESTED_CHARS = 256  # the requested model, as metadata for the usage record


def upstream_response(up: Upstream, info: RequestInfo) -> pb.ProcessingResponse:
    """The request-body reply (BUFFERED body): the decision, header and body mutations."""
    out = pb.ProcessingResponse()
    _decision(out, up, info)
    common = out.request_body.response
    _rewrite_request(common, up.headers.set, up.headers.remove, up.body)
    common.clear_route_cache = True
    return out


def upstream_replies(up: Upstream, info: RequestInfo, raw: bytes, trailers: bool) -> Reply:
    """The replies to a FULL_DUPLEX_STREAMED request once its body is in: the header reply
    (decision, header mutations; Envoy still holds the headers), then the whole body as
    streamed body replies (Envoy drained what it sent, so an unchanged body is sent back),
    then the trailers' reply if the request had trailers."""
    head = pb.ProcessingResponse()
    decision = _decision(head, up, info)
    body = raw if up.body is None else up.body
    # Envoy drops content-length in this mode and ignores ours: the filter after the
    # ext_proc restores it from this (envoy_config: _content_length_filter).
    decision[LENGTH_KEY].string_value = str(len(body))
    common = head.request_headers.response
    plan = up.headers
    _rewrite_request(common, [h for h in plan.set if h[0] != "content-length"], plan.remove, None)
    common.clear_route_cache = True
    more = streamed_body(body, not trailers)
    if trailers:
        more.append(_REPLY_TRAILERS)
    return Reply(head, True, tuple(more))


STREAMED_PIECE = 64 * 1024  # processing_mode.proto: streamed body replies of <= 64 KiB


def streamed_body(body: bytes, end_of_stream: bool) -> list[pb.ProcessingResponse]:
    """``body`` as StreamedBodyResponse replies of at most ``STREAMED_PIECE`` bytes."""
    pieces = [body[i : i + STREAMED_PIECE] for i in range(0, len(body), STREAMED_PIECE)] or [b""]
    out = []
    for n, piece in enumerate(pieces, 1):
        reply = pb.ProcessingResponse()
        streamed = reply.request_body.response.body_mutation.streamed_response
        streamed.body = piece
        streamed.end_of_stream = end_of_stream and n == len(pieces)
        out.append(reply)
    return out


def _decision(out: pb.ProcessingResponse, up: Upstream, info: RequestInfo) -> Any:
    """The decision as dynamic metadata: Envoy turns it into x-plano-* response headers and
    span tags without another ext_proc round trip (envoy_config: DECISION_METADATA)."""
    decision = out.dynamic_metadata.fields[DECISION_METADATA].struct_value.fields
    # Envoy copies these into response headers verbatim: ascii_header keeps CR/LF out.
    decision[MODEL_KEY].string_value = ascii_header(up.provider.name)
    if up.route is not None:
        decision[ROUTE_KEY].string_value = ascii_header(up.route)
    if up.translation is not None:  # read by the response-translation filter's stream
        decision[TX_KEY].string_value = up.translation.metadata
    if up.api is not None:  # Envoy's own error replies use the client's error format
        decision[API_KEY].string_value = up.api.value
    if up.failover is not None:  # read by each attempt's stream
        decision[FAILOVER_KEY].string_value = up.failover.metadata
    # For Envoy's usage record (gen_ai_request_model, the access log's pin).
    if info.request_model:
        decision[REQUESTED_KEY].string_value = header_safe(info.request_model)[:MAX_REQUESTED_CHARS]
    if up.pinned is not None:
        decision[PINNED_KEY].bool_value = up.pinned
    if up.hide_usage:  # Envoy's Lua filter takes it out of the client's stream again
        decision[HIDE_USAGE_KEY].bool_value = True
    if up.ratelimit is not None:  # settled by the worker that gets the usage record
        decision[RATELIMIT_KEY].string_value = up.ratelimit
    return decision


def _rewrite_request(
    common: pb.CommonResponse,
    set_headers: Iterable[tuple[str, str]],
    remove: Iterable[str],
    body: bytes | None,
) -> None:
    """A request reply's header and body mutations (body None: the body is kept)."""
    common.header_mutation.SetInParent()
    _add_headers(common.header_mutation, set_headers)
    common.header_mutation.remove_headers.extend(remove)
    if body is not None:
        common.body_mutation.body = body


def attempt_request_reply(req: AttemptRequest) -> pb.ProcessingResponse:
    """The attempt's upstream request; the model that serves it reported as metadata (the
    last attempt's write wins: x-plano-model names the one that served)."""
    out = pb.ProcessingResponse()
    decision = out.dynamic_metadata.fields[DECISION_METADATA].struct_value.fields
    decision[MODEL_KEY].string_value = ascii_header(req.model)
    _rewrite_request(out.request_body.response, req.headers.set, req.headers.remove, req.body)
    return out


def attempt_failed_reply(attempt: int, failure: Failure) -> pb.ProcessingResponse:
    """A failing response Envoy will retry elsewhere: untouched, why kept for the next
    attempt's stream (cooldowns, logs and metrics)."""
    out = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    decision = out.dynamic_metadata.fields[DECISION_METADATA].struct_value.fields
    decision[failure_key(attempt)].string_value = failure.status
    if failure.retry_after is not None:
        decision[retry_after_key(attempt)].string_value = failure.retry_after
    return out


def _lost(what: str, details: str) -> Reply:
    """A 502 for a stream whose context (metadata from another stream) is missing."""
    body = (
        '{"error": {"type": "server_error", "message": "the gateway lost the ' + what + '"}}'
    ).encode()
    return Reply(immediate_response(Immediate(502, body, details=details)), True)


def _failover_plan(metadata: Any) -> str | None:
    """The ``plano.fo`` plan forwarded to a provider cluster's attempt filter, if any."""
    namespaces = metadata.filter_metadata
    if DECISION_METADATA not in namespaces:
        return None
    fields = namespaces[DECISION_METADATA].fields
    return fields[FAILOVER_KEY].string_value if FAILOVER_KEY in fields else None


@dataclass(slots=True)
class Reply:
    """The messages for Envoy answering one of its messages (``message`` None: nothing yet,
    a full-duplex body chunk being gathered); ``last`` ends the ext_proc stream after them."""

    message: pb.ProcessingResponse | None
    last: bool
    more: tuple[pb.ProcessingResponse, ...] = ()


_GATHERING = Reply(None, False)
_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED


_STREAMED = ProcessingMode.STREAMED
_BUFFERED = ProcessingMode.BUFFERED


def response_headers_reply(plan: HeadersPlan) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    common = out.response_headers.response
    mutation = common.header_mutation
    if plan.status is not None:
        _add_headers(mutation, ((":status", str(plan.status)),))
    _add_headers(mutation, plan.set)
    mutation.remove_headers.extend(plan.remove)
    if plan.body_mode is not None:
        # Honoured only in a headers reply; both body modes are taken as given (request: NONE).
        out.mode_override.response_body_mode = (
            _STREAMED if plan.body_mode == "streamed" else _BUFFERED
        )
    return out


def response_body_reply(
    body: bytes, status: int | None = None, clear_if_empty: bool = True
) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    common = out.response_body.response
    if body or not clear_if_empty:
        common.body_mutation.body = body
    else:
        common.body_mutation.clear_body = True  # this chunk produced no client bytes
    if status is not None:
        _add_headers(common.header_mutation, ((":status", str(status)),))
    return out


_REPLY_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_REPLY_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_REPLY_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
_REPLY_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


class ExtProcStream:
    """The logic of one ext_proc stream (one HTTP request), shared by both transports.

    ``step`` answers the headers phase synchronously and returns a coroutine for the body
    phase (which may wait for the router or the session cache), so a transport only pays for
    a task when there is something to wait for.
    """

    __slots__ = (
        "attempt",
        "chunks",
        "gateway",
        "info",
        "metrics",
        "request_id",
        "response",
        "size",
    )

    def __init__(self, gateway: Gateway, metrics: Metrics) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.info: RequestInfo | None = None
        # Set on the response-translation filter's streams (they start at response headers),
        # and on a failover attempt whose response is translated.
        self.response: ResponseTranslation | None = None
        # Set on failover attempt streams (the provider cluster's upstream filter).
        self.attempt: Attempt | None = None
        self.request_id = ""  # an attempt stream's, for its log lines (made header-safe)
        # A FULL_DUPLEX_STREAMED request body being gathered (None: Envoy buffers the body).
        self.chunks: list[bytes] | None = None
        self.size = 0

    def step(self, req: pb.ProcessingRequest) -> Reply | Coroutine[Any, Any, Reply]:
        which = req.WhichOneof("request")
        if self.attempt is not None:
            return self._attempt_step(req, which)
        if which == "request_headers":
            if req.HasField("metadata_context"):
                plan = _failover_plan(req.metadata_context)
                if plan is not None:  # the provider cluster's filter: a failover attempt
                    return self._attempt_start(req, plan)
            info = RequestInfo.build(
                _headers_map(req.request_headers), req.request_headers.end_of_stream
            )
            self.info = info
            early = self.gateway.on_headers(info)
            if early is not None:
                api = info.api.value if info.api is not None else None
                self.metrics.count_immediate(early.status, info.kind, api)
                return Reply(immediate_response(early), True)
            if req.protocol_config.request_body_mode == _FULL_DUPLEX:
                # Envoy sends the body without waiting and holds the headers until our
                # header reply, which goes out with the body's once the decision is made:
                # one round trip per request instead of two.
                self.chunks = []
                return _GATHERING
            return Reply(_CONTINUE_HEADERS, False)
        if which == "request_body":
            if self.chunks is not None:
                return self._gather(self.chunks, req.request_body)
            return self._body(req.request_body.body)
        if which == "request_trailers" and self.chunks is not None:
            return self._gathered(True)
        # Phases our Envoy config never sends (SKIP/NONE); answered so that a hand-written
        # bootstrap with other modes still works.
        if which == "response_headers" and self.info is None:
            return self._response_headers(req)
        return self._other_phase(req, which)

    def _other_phase(self, req: pb.ProcessingRequest, which: str | None) -> Reply:
        """A translated response's body, or a phase our bootstrap never sends."""
        if which == "response_body" and self.response is not None:
            return self._response_body(req.response_body)
        if which == "request_trailers":
            return Reply(_REPLY_TRAILERS, False)
        if which == "response_headers":
            return Reply(_REPLY_RESPONSE_HEADERS, False)
        if which == "response_body":
            return Reply(_REPLY_RESPONSE_BODY, False)
        return Reply(_REPLY_RESPONSE_TRAILERS, False)

    def _response_headers(self, req: pb.ProcessingRequest) -> Reply:
        """The first message of a response-translation stream."""
        fields = req.metadata_context.filter_metadata[DECISION_METADATA].fields
        raw = fields["tx"].string_value if "tx" in fields else None
        try:
            self.response = response = ResponseTranslation.from_metadata(raw)
        except ContextError as e:
            log.error("response translation impossible: %s", e)
            return _lost("translation context of this response", "plano_translation_context")
        headers = _headers_map(req.response_headers)
        try:
            status = int(headers.get(":status", "0"))
        except ValueError:
            status = 0
        plan = response.on_headers(status, headers, req.response_headers.end_of_stream)
        return Reply(response_headers_reply(plan), plan.body_mode is None)

    def _response_body(self, body: pb.HttpBody) -> Reply:
        response = self.response
        assert response is not None
        if response.kind == "stream":
            out = response.on_chunk(body.body, body.end_of_stream)
            reply = response_body_reply(out)
            if body.end_of_stream:
                usage = response.hidden_usage()
                if usage is not None:  # for the usage record (the client's stream lacks it)
                    fields = reply.dynamic_metadata.fields[DECISION_METADATA].struct_value.fields
                    fields[USAGE_KEY].string_value = usage.encode()
            return Reply(reply, body.end_of_stream)
        result = response.on_buffered(body.body)
        return Reply(response_body_reply(result.body, result.status, clear_if_empty=False), True)

    # ------------------------------------------------------------------ failover attempts

    def _attempt_step(
        self, req: pb.ProcessingRequest, which: str | None
    ) -> Reply | Coroutine[Any, Any, Reply]:
        attempt = self.attempt
        assert attempt is not None
        if which == "request_body":
            return self._attempt_body(attempt, req.request_body.body)
        if which == "response_headers":
            headers = _headers_map(req.response_headers)
            try:
                status = int(headers.get(":status", "0"))
            except ValueError:
                status = 0
            plan, reason = attempt.on_response_headers(
                status, headers, req.response_headers.end_of_stream
            )
            if reason is not None:
                return Reply(attempt_failed_reply(attempt.attempt, reason), True)
            if plan is None:
                return Reply(_REPLY_RESPONSE_HEADERS, True)
            self.response = attempt.response
            return Reply(response_headers_reply(plan), plan.body_mode is None)
        return self._other_phase(req, which)

    def _attempt_start(self, req: pb.ProcessingRequest, plan: str) -> Reply:
        fields = req.metadata_context.filter_metadata[DECISION_METADATA].fields
        headers = _headers_map(req.request_headers)
        failures = {k: v.string_value for k, v in fields.items() if k.startswith(FAILURE_PREFIXES)}
        gw = self.gateway
        try:
            attempt = Attempt.start(
                gw.catalog, gw.config.failover, gw.cooldowns, plan, headers, failures
            )
        except PlanError as e:
            log.error("failover attempt impossible: %s", e)
            return _lost("failover plan of this request", "plano_failover_plan")
        self.attempt = attempt
        self.request_id = header_safe(headers.get("x-request-id", ""))
        switch = attempt.switch
        if switch is not None:
            log.warning(
                "request_id=%s failover %s -> %s (attempt %d, %s)",
                self.request_id,
                switch.from_model,
                switch.to_model,
                attempt.attempt,
                switch.reason,
            )
            self.metrics.count_failover(switch.from_model, switch.to_model, switch.reason)
        return Reply(_CONTINUE_HEADERS, False)

    async def _attempt_body(self, attempt: Attempt, body: bytes) -> Reply:
        request_id = self.request_id
        try:
            req = await attempt.on_body(body, request_id)
        except GatewayError as e:
            # This model cannot take the request (e.g. a field its API lacks): the client
            # hears why, in its own format; no later model is tried.
            log.info(
                "request_id=%s model %s refused the request: %s",
                request_id,
                attempt.provider.name,
                header_safe(e.message),
            )
            anthropic = attempt.client is ClientApi.MESSAGES
            imm = Immediate(e.status, e.body(anthropic=anthropic), details=f"plano_{e.type}")
            return Reply(immediate_response(imm), True)
        return Reply(attempt_request_reply(req), False)

    async def _body(self, body: bytes) -> Reply:
        info = self.info
        if info is None:
            info = self.info = RequestInfo.build({})
        result = await self.gateway.on_body(info, body)
        if isinstance(result, Immediate):
            return self._immediate(info, result)
        # Nothing else to process (response phases are SKIP): ending the stream now frees
        # it at once instead of holding it open until the upstream answers.
        return Reply(upstream_response(result, info), True)

    def _immediate(self, info: RequestInfo, result: Immediate) -> Reply:
        api = info.api.value if info.api is not None else None
        self.metrics.count_immediate(result.status, info.kind, api)
        return Reply(immediate_response(result), True)

    def _gather(self, chunks: list[bytes], body: pb.HttpBody) -> Reply | Coroutine[Any, Any, Reply]:
        """One chunk of a full-duplex body. Envoy buffers nothing in this mode, so the
        listener's request size limit is enforced here (the same 413 Envoy would send)."""
        data = body.body
        if data:
            n = len(data)
            self.size += n
            info, gw = self.info, self.gateway
            assert info is not None
            fits = gw.bodies.add(n, self.size)  # counted before any check: close() gives back
            refusal = None
            if self.size > gw.config.listener.max_request_bytes:
                refusal = gw.body_too_large(info)
            elif not fits:
                refusal = gw.bodies_full(info)
            elif BodyBudget.crumbs(len(chunks) + 1, self.size):
                refusal = gw.body_in_crumbs(info)
            if refusal is not None:
                self.close()
                return self._immediate(info, refusal)
            chunks.append(data)
        if not body.end_of_stream:
            return _GATHERING
        return self._gathered(False)

    async def _gathered(self, trailers: bool) -> Reply:
        chunks, info = self.chunks, self.info
        assert chunks is not None and info is not None
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = None
        try:
            result = await self.gateway.on_body(info, raw)
        finally:
            self.close()
        if isinstance(result, Immediate):
            return self._immediate(info, result)
        return upstream_replies(result, info, raw, trailers)

    def close(self) -> None:
        """The stream is over (or its body refused): the gathered bytes leave the budget."""
        if self.size:
            self.gateway.bodies.held -= self.size
            self.size = 0
        self.chunks = None


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """The grpc.aio transport (``--transport grpcio``)."""

    def __init__(self, gateway: Gateway, metrics: Metrics) -> None:
        self.gateway = gateway
        self.metrics = metrics

    async def Process(self, request_iterator: Any, context: Any) -> None:
        stream = ExtProcStream(self.gateway, self.metrics)
        try:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    return
                reply = stream.step(req)
                if not isinstance(reply, Reply):
                    reply = await reply
                if reply.message is not None:
                    await context.write(reply.message)
                for message in reply.more:
                    await context.write(message)
                if reply.last:
                    return
        finally:
            stream.close()


# grpc.health.v1, answered by both transports: Envoy's active health checks on the ext_proc
# cluster call it. Messages are handled as raw protobuf bytes (one optional string field), so
# no health-checking package is needed.
HEALTH_SERVICES = ("", "envoy.service.ext_proc.v3.ExternalProcessor")  # "" = the server
HEALTH_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def health_service_name(raw: bytes) -> str | None:
    """The ``service`` of a HealthCheckRequest (field 1), or None if it cannot be read."""
    if not raw:
        return ""
    if raw[0] != 0x0A or len(raw) < 2 or raw[1] >= 0x80 or len(raw) != 2 + raw[1]:
        return None
    try:
        return raw[2:].decode()
    except UnicodeDecodeError:
        return None


def health_check_error(raw: bytes) -> str | None:
    """None when the check is for a service we serve (answer HEALTH_SERVING), else the
    NOT_FOUND message."""
    service = health_service_name(raw)
    if service is None or service not in HEALTH_SERVICES:
        return f"unknown service {service!r}"
    return None


async def _health_check(raw: bytes, context: Any) -> bytes:
    error = health_check_error(raw)
    if error is not None:
        await context.abort(grpc.StatusCode.NOT_FOUND, error)
    return HEALTH_SERVING


def health_handler() -> grpc.GenericRpcHandler:
    """``/grpc.health.v1.Health/Check``: SERVING while the process serves."""
    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(_health_check)}
    )
