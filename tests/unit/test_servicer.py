"""The ext_proc servicer over a real gRPC channel (Envoy's side played by a grpc.aio client).

Every test runs against both transports: the built-in HTTP/2 server (default) and grpc.aio.
grpcio-testing's harness drives only synchronous servicers, so these tests speak the real
protocol over loopback with grpcio's own client instead.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import parse_config
from plano_extproc.gateway import Gateway
from plano_extproc.routing.base import NullRouter
from tests.extproc_messages import body_msg, headers_msg, set_headers
from tests.extproc_server import CONFIG, TRANSPORTS, running


@pytest.fixture(params=TRANSPORTS)
async def stub(request: pytest.FixtureRequest) -> AsyncIterator[pb_grpc.ExternalProcessorStub]:
    gateway = Gateway(parse_config(CONFIG), NullRouter(), MemorySessionCache())
    async with running(request.param, gateway) as stub:
        yield stub


async def test_proxy_exchange(stub: pb_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    await call.write(
        headers_msg(
            "POST", "/v1/chat/completions", authorization="Bearer client", **{"x-request-id": "r1"}
        )
    )
    first = await call.read()
    assert first.WhichOneof("response") == "request_headers"
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    await call.write(body_msg(body))
    second = await call.read()
    await call.done_writing()
    common = second.request_body.response
    assert common.clear_route_cache is True
    hdrs = set_headers(second)
    assert hdrs[":path"] == "/v1/chat/completions"
    assert hdrs["authorization"] == "Bearer sk-test"
    assert hdrs["x-plano-upstream"] == "openai_api_openai_com_443"
    assert "x-api-key" in common.header_mutation.remove_headers
    # Model already matches the provider id: body untouched, no mutation, no content-length.
    assert not common.HasField("body_mutation")
    assert "content-length" not in hdrs


async def test_body_mutation_sets_content_length(stub: pb_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    await call.write(headers_msg("POST", "/v1/messages"))
    await call.read()
    body = json.dumps(
        {
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "routing_preferences": [],
        }
    ).encode()
    await call.write(body_msg(body))
    resp = await call.read()
    new_body = resp.request_body.response.body_mutation.body
    assert json.loads(new_body) == {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    hdrs = set_headers(resp)
    assert hdrs["content-length"] == str(len(new_body))
    assert hdrs["x-api-key"] == "sk-ant"
    assert hdrs[":path"] == "/v1/messages"


async def test_models_answered_in_headers_phase(stub: pb_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    await call.write(headers_msg("GET", "/v1/models", eos=True))
    resp = await call.read()
    imm = resp.immediate_response
    assert imm.status.code == 200
    ids = [m["id"] for m in json.loads(imm.body)["data"]]
    assert ids == ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-20250514"]
    assert await call.read() is grpc.aio.EOF


async def test_bad_body_is_an_immediate_json_error(stub: pb_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    await call.write(headers_msg("POST", "/routing/v1/chat/completions"))
    await call.read()
    await call.write(body_msg(b"{nope"))
    resp = await call.read()
    imm = resp.immediate_response
    assert imm.status.code == 400
    assert json.loads(imm.body)["error"]["type"] == "invalid_request_error"
    hdrs = {h.header.key: h.header.raw_value for h in imm.headers.set_headers}
    assert hdrs["content-type"] == b"application/json"


async def test_decision_response(stub: pb_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    await call.write(
        headers_msg(
            "POST",
            "/routing/v1/chat/completions",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            **{"x-model-affinity": "s-1"},
        )
    )
    await call.read()
    await call.write(body_msg(b'{"messages": [{"role": "user", "content": "hi"}]}'))
    resp = await call.read()
    data = json.loads(resp.immediate_response.body)
    assert data == {
        "models": ["none"],
        "route": None,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "session_id": "s-1",
        "pinned": False,
    }


async def test_utf8_affinity_id_is_accepted(stub: pb_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    session = "sesión-€-1"
    items = [(":method", b"POST"), (":path", b"/routing/v1/chat/completions")]
    items.append(("x-model-affinity", session.encode("utf-8")))
    await call.write(
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(
                headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v) for k, v in items])
            )
        )
    )
    first = await call.read()
    assert first.WhichOneof("response") == "request_headers"
    await call.write(body_msg(b'{"messages": [{"role": "user", "content": "hi"}]}'))
    resp = await call.read()
    assert json.loads(resp.immediate_response.body)["session_id"] == session


async def test_non_utf8_affinity_id_is_rejected(stub: pb_grpc.ExternalProcessorStub) -> None:
    call = stub.Process()
    items = [
        (":method", b"POST"),
        (":path", b"/v1/chat/completions"),
        ("x-model-affinity", b"\xff\xfe"),
    ]
    await call.write(
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(
                headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v) for k, v in items])
            )
        )
    )
    resp = await call.read()
    assert resp.immediate_response.status.code == 400
    assert "UTF-8" in json.loads(resp.immediate_response.body)["error"]["message"]


def test_header_path_cannot_carry_control_characters() -> None:
    # Names are validated at the edge; this is the second line: whatever reaches the Envoy
    # messages that become headers (x-plano-model/route via metadata, header mutations) has
    # its control characters percent-encoded, so no CR/LF can split the response.
    from dataclasses import replace

    from plano_extproc.gateway import RequestInfo, Upstream
    from plano_extproc.names import DECISION_METADATA
    from plano_extproc.rewrite import HeaderPlan
    from plano_extproc.server.servicer import upstream_response

    cfg = parse_config(
        "version: v0.4.0\nlisteners:\n  - {name: m, type: model}\n"
        "model_providers:\n  - model: openai/gpt-4o\n    access_key: k\n",
        env={},
    )
    provider = replace(cfg.providers[0], name="openai/x\r\nX-Smuggled: 1")
    plan = HeaderPlan(set=[("x-custom", "a\r\nb\x00c\x7f")])
    info = RequestInfo.build({})
    msg = upstream_response(Upstream(provider, plan, None, route="r\nX-Route: 1"), info)
    meta = msg.dynamic_metadata.fields[DECISION_METADATA].struct_value.fields
    assert meta["model"].string_value == "openai/x%0D%0AX-Smuggled: 1"
    assert meta["route"].string_value == "r%0AX-Route: 1"
    # a configured (trusted) non-ASCII route name: percent-encoded UTF-8, not mangled bytes
    msg = upstream_response(Upstream(provider, plan, None, route="código"), info)
    meta = msg.dynamic_metadata.fields[DECISION_METADATA].struct_value.fields
    assert meta["route"].string_value == "c%C3%B3digo"
    mutation = msg.request_body.response.header_mutation.set_headers[0].header
    assert mutation.raw_value == b"a%0D%0Ab%00c%7F"


def attempt_headers(plan: str, attempt: int, **failures: str) -> pb.ProcessingRequest:
    """The first message of a failover attempt's stream: headers plus the plano metadata."""
    msg = headers_msg("POST", "/v1/chat/completions", **{"x-envoy-attempt-count": str(attempt)})
    fields = msg.metadata_context.filter_metadata["plano"].fields
    fields["fo"].string_value = plan
    for key, value in failures.items():
        fields[key].string_value = value
    return msg


async def test_a_failover_attempt_stream(stub: pb_grpc.ExternalProcessorStub) -> None:
    """Attempt 2 of [gpt-4o-mini, claude]: Claude's request built from the replayed body; a
    429 on it is final (last candidate) and its answer gets a translation plan."""
    models = ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-20250514"]
    plan = json.dumps({"api": "chat_completions", "q": "", "c": models})
    call = stub.Process()
    await call.write(attempt_headers(plan, 2, failed_1="503"))
    first = await call.read()
    assert first.WhichOneof("response") == "request_headers"
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    await call.write(body_msg(body))
    second = await call.read()
    hdrs = set_headers(second)
    assert hdrs[":path"] == "/v1/messages" and hdrs["x-api-key"] == "sk-ant"
    assert hdrs[":authority"] == "api.anthropic.com"
    assert "authorization" in second.request_body.response.header_mutation.remove_headers
    served = second.dynamic_metadata.fields["plano"].struct_value.fields["model"].string_value
    assert served == "anthropic/claude-sonnet-4-20250514"
    translated = json.loads(second.request_body.response.body_mutation.body)
    assert translated["model"] == "claude-sonnet-4-20250514"
    response = pb.ProcessingRequest()
    response.response_headers.headers.CopyFrom(
        HeaderMap(headers=[HeaderValue(key=":status", raw_value=b"429"),
                           HeaderValue(key="content-type", raw_value=b"application/json")])
    )  # fmt: skip
    await call.write(response)
    third = await call.read()
    assert third.mode_override.response_body_mode  # the error is translated (BUFFERED)
    await call.done_writing()


async def test_an_attempt_without_a_usable_plan_is_a_502(
    stub: pb_grpc.ExternalProcessorStub,
) -> None:
    call = stub.Process()
    await call.write(attempt_headers("not json", 1))
    reply = await call.read()
    assert reply.immediate_response.status.code == 502
    assert b"lost the failover plan" in reply.immediate_response.body
