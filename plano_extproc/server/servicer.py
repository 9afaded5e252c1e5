"""The ext_proc gRPC servicer: Envoy messages in, ``Gateway`` decisions out.

Uses grpc.aio's ``context.read()/write()`` API (measurably cheaper than async generators)
and sends every header value as ``raw_value`` (Envoy ignores ``value`` for mutations).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3.http_status_pb2 import HttpStatus

from plano_extproc.gateway import Gateway, Immediate, RequestInfo, Upstream
from plano_extproc.metrics import Metrics

log = logging.getLogger("plano_extproc.server")

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())


def _headers_map(msg: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        value = h.raw_value.decode("latin-1") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _set(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=key, raw_value=value.encode("latin-1", "replace")),
        append_action=_OVERWRITE,
    )


def immediate_response(imm: Immediate) -> pb.ProcessingResponse:
    headers = [_set(k, v) for k, v in imm.headers]
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=imm.status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=imm.body,
            details=imm.details,
        )
    )


def upstream_response(up: Upstream) -> pb.ProcessingResponse:
    mutation = pb.HeaderMutation(
        set_headers=[_set(k, v) for k, v in up.headers.set],
        remove_headers=up.headers.remove,
    )
    common = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
    if up.body is not None:
        common.body_mutation.body = up.body
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway, metrics: Metrics) -> None:
        self.gateway = gateway
        self.metrics = metrics

    async def Process(self, request_iterator: Any, context: Any) -> None:
        info: RequestInfo | None = None
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            which = req.WhichOneof("request")
            if which == "request_headers":
                info = RequestInfo.build(
                    _headers_map(req.request_headers), req.request_headers.end_of_stream
                )
                early = self.gateway.on_headers(info)
                if early is not None:
                    self.metrics.count_immediate(early.status)
                    await context.write(immediate_response(early))
                    return
                await context.write(_CONTINUE_HEADERS)
            elif which == "request_body":
                if info is None:
                    info = RequestInfo.build({})
                started = time.perf_counter()
                result = await self.gateway.on_body(info, req.request_body.body)
                if isinstance(result, Immediate):
                    self.metrics.count_immediate(result.status, info.kind)
                    await context.write(immediate_response(result))
                    return
                self.metrics.count_routed(result, time.perf_counter() - started)
                await context.write(upstream_response(result))
            elif which == "request_trailers":
                await context.write(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
            elif which == "response_headers":
                await context.write(pb.ProcessingResponse(response_headers=pb.HeadersResponse()))
            elif which == "response_body":
                await context.write(pb.ProcessingResponse(response_body=pb.BodyResponse()))
            elif which == "response_trailers":
                await context.write(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))
