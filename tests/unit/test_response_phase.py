"""The response side of translated requests: the pure decisions (response_phase) and the
Envoy messages the servicer makes of them. Uses the real Messages<->Chat translator."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from plano_extproc.config import parse_config
from plano_extproc.gateway import Gateway
from plano_extproc.metrics import Metrics
from plano_extproc.response_phase import ContextError, ResponseTranslation
from plano_extproc.routing.base import NullRouter
from plano_extproc.server.servicer import ExtProcStream, Reply

TX = json.dumps({"pair": "messages>chat_completions", "ctx": {"stream": True, "model": "claude"}})
CHUNK = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "gpt-4o",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "héllo"},
                 "finish_reason": None}],
}  # fmt: skip
FINISH = {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
SSE = (f"data: {json.dumps(CHUNK)}\n\ndata: {json.dumps(FINISH)}\n\ndata: [DONE]\n\n").encode()


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "not json",
        "[1]",
        json.dumps({"pair": "messages>messages"}),
        json.dumps({"pair": "evil>chat_completions"}),
        json.dumps({"pair": 3}),
        json.dumps({"pair": "messages>chat_completions", "ctx": []}),
        json.dumps({"pair": "messages>chat_completions", "ctx": {"x": "y" * 9000}}),
    ],
)
def test_unusable_context_is_refused(raw: str | None) -> None:
    with pytest.raises(ContextError):
        ResponseTranslation.from_metadata(raw)


def test_header_plans() -> None:
    rt = ResponseTranslation.from_metadata(TX)
    sse = rt.on_headers(200, {"content-type": "text/event-stream", "content-length": "9"}, False)
    assert sse.body_mode == "streamed" and "content-length" in sse.remove and sse.status is None
    rt = ResponseTranslation.from_metadata(TX)
    js = rt.on_headers(200, {"content-type": "application/json"}, False)
    assert js.body_mode == "buffered" and ("content-type", "application/json") in js.set
    rt = ResponseTranslation.from_metadata(TX)
    err = rt.on_headers(429, {"content-type": "application/json", "retry-after": "7"}, False)
    assert err.body_mode == "buffered" and "retry-after" not in err.remove
    rt = ResponseTranslation.from_metadata(TX)
    gz = rt.on_headers(
        200, {"content-type": "text/event-stream", "content-encoding": "gzip"}, False
    )
    assert gz.status == 502 and gz.body_mode == "buffered" and "content-encoding" in gz.remove
    body = json.loads(rt.on_buffered(b"\x1f\x8b...").body)
    assert body["type"] == "error" and "compressed" in body["error"]["message"]
    rt = ResponseTranslation.from_metadata(TX)
    assert rt.on_headers(204, {}, True).body_mode is None


def test_error_body_in_the_clients_format() -> None:
    rt = ResponseTranslation.from_metadata(TX)
    rt.on_headers(429, {"content-type": "application/json"}, False)
    out = rt.on_buffered(b'{"error": {"message": "slow down", "type": "rate_limit_error"}}')
    assert out.status is None
    assert json.loads(out.body) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


def test_unreadable_json_answer_is_a_502() -> None:
    rt = ResponseTranslation.from_metadata(TX)
    rt.on_headers(200, {"content-type": "application/json"}, False)
    for hostile in (b"<html>", b"[]", b'{"choices": 5}'):
        out = rt.on_buffered(hostile)
        assert out.status == 502 and json.loads(out.body)["type"] == "error"


def test_stream_cut_anywhere_gives_the_same_bytes() -> None:
    whole = ResponseTranslation.from_metadata(TX)
    whole.on_headers(200, {"content-type": "text/event-stream"}, False)
    expected = whole.on_chunk(SSE, True)
    assert b"event: message_start" in expected and b"event: message_stop" in expected
    for cut in range(1, len(SSE)):
        rt = ResponseTranslation.from_metadata(TX)
        rt.on_headers(200, {"content-type": "text/event-stream"}, False)
        got = rt.on_chunk(SSE[:cut], False) + rt.on_chunk(SSE[cut:], False) + rt.on_chunk(b"", True)
        assert got == expected, cut


def test_stream_ending_early_ends_with_the_clients_error_event() -> None:
    rt = ResponseTranslation.from_metadata(TX)
    rt.on_headers(200, {"content-type": "text/event-stream"}, False)
    out = rt.on_chunk(f"data: {json.dumps(CHUNK)}\n\n".encode(), False) + rt.on_chunk(b"", True)
    assert out.rstrip().splitlines()[-2] == b"event: error"


# --------------------------------------------------------------------------- servicer


def stream() -> ExtProcStream:
    cfg = parse_config("""
version: v0.4.0
listeners: [{name: m, type: model}]
model_providers:
  - model: openai/gpt-4o
    access_key: k
    default: true
""")
    return ExtProcStream(Gateway(cfg, NullRouter(), None), Metrics())


def response_headers(tx: str | None, **headers: str) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=HeaderMap(
                headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
            )
        )
    )
    if tx is not None:
        req.metadata_context.filter_metadata["plano"].fields["tx"].string_value = tx
    return req


def step(s: ExtProcStream, req: pb.ProcessingRequest) -> Reply:
    reply = s.step(req)
    assert isinstance(reply, Reply)
    return reply


def test_servicer_streams_a_translated_sse_answer() -> None:
    s = stream()
    headers = {":status": "200", "content-type": "text/event-stream", "content-length": "5"}
    r = step(s, response_headers(TX, **headers))
    assert not r.last
    msg = r.message
    assert msg.mode_override.response_body_mode == ProcessingMode.STREAMED
    assert "content-length" in msg.response_headers.response.header_mutation.remove_headers
    half = len(SSE) // 2
    r1 = step(s, pb.ProcessingRequest(response_body=pb.HttpBody(body=SSE[:5])))
    # Nothing complete yet: the chunk is dropped (clear_body), the stream goes on.
    assert r1.message.response_body.response.body_mutation.clear_body and not r1.last
    r2 = step(s, pb.ProcessingRequest(response_body=pb.HttpBody(body=SSE[5:half])))
    r3 = step(
        s, pb.ProcessingRequest(response_body=pb.HttpBody(body=SSE[half:], end_of_stream=True))
    )
    assert r3.last
    out = b"".join(
        r.message.response_body.response.body_mutation.body for r in (r1, r2, r3)
    ).decode()
    assert out.count("event: message_start") == 1 and out.endswith(
        'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )


def test_servicer_buffers_an_error_and_ends() -> None:
    s = stream()
    r = step(s, response_headers(TX, **{":status": "503", "content-type": "text/plain"}))
    assert r.message.mode_override.response_body_mode == ProcessingMode.BUFFERED
    body = pb.ProcessingRequest(
        response_body=pb.HttpBody(body=b"upstream down", end_of_stream=True)
    )
    r = step(s, body)
    assert r.last
    data = json.loads(r.message.response_body.response.body_mutation.body)
    assert data["type"] == "error" and data["error"]["message"] == "upstream down"


def test_servicer_without_context_answers_502() -> None:
    r = step(stream(), response_headers(None, **{":status": "200"}))
    assert r.last and r.message.immediate_response.status.code == 502
