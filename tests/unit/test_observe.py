"""The usage filter's side: observations, hidden Chat usage, and the stream over both transports."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import parse_config
from plano_extproc.dispatch import HIDDEN_USAGE, hides_usage
from plano_extproc.gateway import Gateway
from plano_extproc.metrics import Metrics
from plano_extproc.observe import Observation
from plano_extproc.providers import ClientApi
from plano_extproc.response_phase import ResponseTranslation
from plano_extproc.routing.base import NullRouter
from plano_extproc.server.app import GRPC_OPTIONS
from plano_extproc.server.h2 import H2Server
from plano_extproc.server.servicer import ExternalProcessor, ExtProcStream
from plano_extproc.translate.chat_usage import HiddenUsage
from plano_extproc.usage import Usage
from tests.fakes import Script, chat_chunks
from tests.fakes import Usage as FakeUsage

GPT = "openai/gpt-4o-mini"
SSE = {":status": "200", "content-type": "text/event-stream"}


def chat_stream(include_usage: bool) -> bytes:
    script = Script(text="hello world", usage=FakeUsage(prompt=30, completion=4, cached=8))
    frames = [f"data: {json.dumps(c)}\n\n" for c in chat_chunks(script, "m", "id1", include_usage)]
    return ("".join(frames) + "data: [DONE]\n\n").encode()


# ---------------------------------------------------------------- what a client may not see


def test_hides_usage_only_for_chat_streams_that_did_not_ask() -> None:
    chat = ClientApi.CHAT
    assert hides_usage(chat, {"stream": True})
    assert hides_usage(chat, {"stream": True, "stream_options": {"include_usage": False}})
    assert not hides_usage(chat, {"stream": True, "stream_options": {"include_usage": True}})
    assert not hides_usage(chat, {"stream": False})
    assert not hides_usage(chat, {"stream": "yes"})  # the provider refuses it, as sent
    assert not hides_usage(chat, {"stream": True, "stream_options": "x"})
    assert not hides_usage(ClientApi.MESSAGES, {"stream": True})  # always carries usage


def test_hidden_usage_drops_the_usage_chunk_and_null_members() -> None:
    h = HiddenUsage()
    assert h.event(None, {"id": "a", "choices": [], "usage": {"prompt_tokens": 1}}) == []
    assert h.event(None, {"id": "a", "choices": [{"index": 0}], "usage": None}) == [
        (None, {"id": "a", "choices": [{"index": 0}]})
    ]
    # A provider that puts usage on the last content chunk: the content stays.
    last = {"choices": [{"delta": {"content": "x"}}], "usage": {"prompt_tokens": 1}}
    assert h.event(None, last) == [(None, {"choices": [{"delta": {"content": "x"}}]})]
    assert h.event(None, "[DONE]") == [(None, "[DONE]")]
    assert h.event(None, {"choices": [{"index": 0}]}) == [(None, {"choices": [{"index": 0}]})]
    assert h.end() == []


@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_the_client_gets_the_stream_it_would_have_got(piece: int) -> None:
    """With usage asked for and hidden again, the client's events are those of a stream
    without include_usage; the usage is kept for the metrics."""
    rt = ResponseTranslation.from_metadata(HIDDEN_USAGE.metadata)
    plan = rt.on_headers(200, SSE, False)
    assert plan.body_mode == "streamed"
    data = chat_stream(include_usage=True)
    out = b""
    for i in range(0, len(data), piece):
        out += rt.on_chunk(data[i : i + piece], False)
    out += rt.on_chunk(b"", True)
    want = [json.loads(line[6:]) for line in chat_stream(False).decode().splitlines()
            if line.startswith("data: {")]  # fmt: skip
    got = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: {")]
    assert got == want
    assert out.decode().rstrip().endswith("data: [DONE]")
    assert rt.hidden_usage() == Usage(input=30, output=4, cached_input=8)


def test_hidden_usage_leaves_errors_and_json_untouched() -> None:
    for status, headers in ((429, {"content-type": "application/json"}), (200, {})):
        rt = ResponseTranslation.from_metadata(HIDDEN_USAGE.metadata)
        plan = rt.on_headers(status, headers, False)
        assert (plan.body_mode, plan.remove, plan.set, plan.status) == (None, [], [], None)


def test_a_translated_chat_client_without_usage_gets_it_measured() -> None:
    """chat -> messages with include_usage off: the Anthropic stream's usage is read."""
    ctx = json.dumps({"pair": "chat_completions>messages", "ctx": {"include_usage": False}})
    rt = ResponseTranslation.from_metadata(ctx)
    rt.on_headers(200, SSE, False)
    events = [
        ("message_start", {"type": "message_start", "message": {
            "id": "m", "type": "message", "role": "assistant", "model": "c", "content": [],
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 6}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    for name, ev in events:
        rt.on_chunk(f"event: {name}\ndata: {json.dumps(ev)}\n\n".encode(), False)
    rt.on_chunk(b"", True)
    assert rt.hidden_usage() == Usage(input=15, output=6, cached_input=5)


def test_usage_travels_as_three_bounded_counts() -> None:
    assert Usage.decode(Usage(5, 3, 2).encode()) == Usage(5, 3, 2)
    assert Usage.decode("5,3,9") == Usage(5, 3, 5)  # cached never above input
    for bad in ("", "1,2", "1,2,3,4", "a,b,c", "-1,2,3", "1, 2,3", "9" * 17 + ",1,1"):
        assert Usage.decode(bad) is None, bad


# ---------------------------------------------------------------- one observation


def fields(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"api": "chat_completions", "model": GPT, "rq": "fast", "t0": 100.0}
    base.update(kw)
    return base


def test_stream_timing_and_usage() -> None:
    obs = Observation(fields(route="code"), 200, SSE, now=100.5)
    data = chat_stream(include_usage=True)
    second = data.index(b"\n\n") + 2  # the role chunk ("content": "") is no token
    cut = data.index(b"\n\n", second) + 2  # the first token's event ends here
    obs.chunk(data[: cut - 1], now=100.6)
    obs.chunk(data[cut - 1 : cut], now=100.7)  # first token complete here
    obs.chunk(data[cut:], now=101.0)
    ex = obs.finish(now=101.7)
    assert ex.usage == Usage(30, 4, 8)
    assert ex.seconds == pytest.approx(1.7)
    assert ex.ttft == pytest.approx(0.7)
    assert ex.tpot == pytest.approx((101.7 - 100.7) / 3)
    assert (ex.client_api, ex.request_model, ex.model, ex.route) == (
        "chat_completions", "fast", GPT, "code"
    )  # fmt: skip


@pytest.mark.parametrize("t0", ["100", float("inf"), float("nan"), 500.0, None])
def test_a_bad_start_time_gives_no_duration(t0: Any) -> None:
    obs = Observation(fields(t0=t0), 200, {"content-type": "application/json"}, now=101.0)
    obs.chunk(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}', now=101.0)
    ex = obs.finish(now=102.0)
    assert ex.seconds is None and ex.ttft is None
    assert ex.usage == Usage(1, 2, 0)


def test_errors_and_compressed_bodies_are_not_metered() -> None:
    for status, headers in ((500, {}), (200, {"content-encoding": "gzip"})):
        obs = Observation(fields(), status, headers, now=100.0)
        obs.chunk(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}', now=100.0)
        assert obs.finish(now=100.1).usage is None


def test_hidden_usage_fills_in_only_when_the_stream_had_none() -> None:
    obs = Observation(fields(), 200, SSE, now=100.0)
    obs.chunk(chat_stream(include_usage=False), now=100.1)
    obs.hidden_usage("30,4,8")
    assert obs.finish(now=100.2).usage == Usage(30, 4, 8)
    obs = Observation(fields(), 200, SSE, now=100.0)
    obs.chunk(chat_stream(include_usage=True), now=100.1)
    obs.hidden_usage("1,1,1")  # the stream's own report wins
    assert obs.finish(now=100.2).usage == Usage(30, 4, 8)


def test_the_log_line_escapes_and_omits() -> None:
    hostile = 'x"}\n{"status": 1'
    headers = {"x-plano-attempts": "2", "content-type": "application/json"}
    obs = Observation(fields(id=hostile, rq=hostile, pn=True), 200, headers, now=100.0)
    obs.chunk(b'{"choices": [{"message": {"content": "SECRET ANSWER"}}], "usage": '
              b'{"prompt_tokens": 3, "completion_tokens": 1}}', now=100.1)  # fmt: skip
    line = obs.log_line(obs.finish(now=100.2))
    assert "\n" not in line and "SECRET" not in line
    record = json.loads(line)
    assert record["request_id"] == hostile and record["requested_model"] == hostile
    assert record["pinned"] is True and record["attempts"] == 2 and record["status"] == 200
    assert (record["input_tokens"], record["output_tokens"]) == (3, 1)


# ---------------------------------------------------------------- the stream, both transports

CONFIG = """
version: v0.4.0
listeners: [{name: m, type: model, port: 12000}]
model_providers:
  - {model: openai/gpt-4o-mini, access_key: sk-test, default: true}
routing:
  router: {type: none}
"""


@pytest.fixture(params=["h2", "grpcio"])
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[pb_grpc.ExternalProcessorStub, Metrics]]:
    gateway = Gateway(parse_config(CONFIG), NullRouter(), MemorySessionCache())
    metrics = Metrics(models=[GPT])
    server: H2Server | grpc.aio.Server
    if request.param == "h2":
        server = H2Server(lambda: ExtProcStream(gateway, metrics))
        port = await server.start("127.0.0.1", 0)
    else:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(gateway, metrics), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.ExternalProcessorStub(channel), metrics
    await channel.close()
    await server.stop(None)


def observed_headers(**meta: Any) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(observability_mode=True)
    for k, v in (SSE | {"x-plano-attempts": "1"}).items():
        req.response_headers.headers.headers.add(key=k, raw_value=v.encode())
    f = req.metadata_context.filter_metadata["plano"].fields
    for key, value in fields(**meta).items():
        if isinstance(value, float):
            f[key].number_value = value
        else:
            f[key].string_value = value
    return req


def observed_body(data: bytes, end: bool, hidden: str | None = None) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(observability_mode=True)
    req.response_body.body = data
    req.response_body.end_of_stream = end
    if hidden is not None:
        req.metadata_context.filter_metadata["plano"].fields["u"].string_value = hidden
    return req


@pytest.mark.parametrize("hidden", [None, "30,4,8"])
async def test_an_observed_stream_answers_nothing_and_counts_once(
    served: tuple[pb_grpc.ExternalProcessorStub, Metrics], hidden: str | None
) -> None:
    stub, metrics = served
    call = stub.Process()
    await call.write(observed_headers(t0=1.0))
    data = chat_stream(include_usage=hidden is None)
    await call.write(observed_body(data[:50], False))
    await call.write(observed_body(data[50:], True, hidden))
    # No message back: the server just ends the stream (Envoy waits for nothing).
    assert await call.read() == grpc.aio.EOF
    assert (await call.code()) == grpc.StatusCode.OK
    reg = metrics.registry
    labels = {"endpoint": "proxy", "client_api": "chat_completions", "model": GPT,
              "route": "none", "status_class": "2xx"}  # fmt: skip
    assert reg.get_sample_value("plano_requests_total", labels) == 1
    tokens = {
        "gen_ai_request_model": "fast",
        "gen_ai_response_model": GPT,
        "gen_ai_provider_name": "openai",
        "route": "none",
        "client_api": "chat_completions",
    }
    assert (
        reg.get_sample_value(
            "gen_ai_client_token_usage_sum", {"gen_ai_token_type": "input", **tokens}
        )
        == 30
    )
    assert reg.get_sample_value("gen_ai_server_time_to_first_token_seconds_count", tokens) == 1
