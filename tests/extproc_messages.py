"""ext_proc messages as Envoy sends them, for the servicer and transport tests."""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb


def headers_msg(method: str, path: str, eos: bool = False, **extra: str) -> pb.ProcessingRequest:
    items = [(":method", method), (":path", path), (":authority", "gw"), (":scheme", "http")]
    items += extra.items()
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in items]),
            end_of_stream=eos,
        )
    )


def body_msg(body: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))


def set_headers(resp: pb.ProcessingResponse) -> dict[str, str]:
    """The headers a body response sets, by name."""
    mutation = resp.request_body.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def full_duplex(msg: pb.ProcessingRequest) -> pb.ProcessingRequest:
    """``msg`` (the stream's first) as Envoy sends it with a FULL_DUPLEX_STREAMED request body."""
    msg.protocol_config.request_body_mode = ProcessingMode.FULL_DUPLEX_STREAMED
    return msg


def chunk_msg(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def trailers_msg(**items: str) -> pb.ProcessingRequest:
    headers = HeaderMap(
        headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()]
    )
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers(trailers=headers))


def header_reply_sets(resp: pb.ProcessingResponse) -> dict[str, str]:
    """The headers a request-headers reply sets, by name."""
    mutation = resp.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
