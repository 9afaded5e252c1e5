"""ext_proc messages as Envoy sends them, for the servicer and transport tests."""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
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
