"""Usage records: hidden Chat usage, reading Envoy's records, the LogsService on both transports."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as ls

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import parse_config
from plano_extproc.dispatch import hides_usage
from plano_extproc.gateway import Gateway
from plano_extproc.metrics import Metrics
from plano_extproc.names import LOG_FIELDS, USAGE_KEYS
from plano_extproc.observe import Observation
from plano_extproc.providers import ClientApi
from plano_extproc.response_phase import ResponseTranslation
from plano_extproc.routing.base import NullRouter
from plano_extproc.server.app import GRPC_OPTIONS
from plano_extproc.server.h2 import H2Server
from plano_extproc.server.servicer import ExternalProcessor, ExtProcStream
from plano_extproc.server.usage_log import _GROUP_FIELD, UsageLog
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


# ---------------------------------------------------------------- one usage record


def record(**kw: Any) -> dict[str, str]:
    """A usage record's attributes as Envoy's formatter writes them ("-": not known); counters
    (keyword arguments named like them) go into the ``usage`` JSON object."""
    base = {key: "-" for key in ("u", "route", "pn", "traceparent", "usage")}
    base.update(api="chat_completions", model=GPT, rq="fast", status="200", attempts="1",
                duration_us="1700000", body_us="700000", content_type="application/json",
                request_id="r1")  # fmt: skip
    counters = {k: kw.pop(k) for k in list(kw) if k in USAGE_KEYS}
    if counters:
        base["usage"] = json.dumps(counters)
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("api", "counters", "usage"),
    [
        ("chat_completions", {"prompt_tokens": 30, "completion_tokens": 4,
                              "cached_tokens": 8}, Usage(30, 4, 8)),
        # Anthropic's input_tokens exclude cache reads and writes: added back.
        ("messages", {"input_tokens": 10, "output_tokens": 6, "cache_read": 5,
                      "cache_write": 2}, Usage(17, 6, 5)),
        ("responses", {"input_tokens": 30.0, "output_tokens": 4, "input_cached": 8},
         Usage(30, 4, 8)),
        # Counters of another API's shape are not this API's usage.
        ("chat_completions", {"input_tokens": 10, "output_tokens": 6}, None),
    ],
)  # fmt: skip
def test_counters_mean_what_the_client_api_says(
    api: str, counters: dict[str, Any], usage: Usage | None
) -> None:
    assert Observation(record(api=api, **counters)).exchange.usage == usage


def test_stream_timing() -> None:
    obs = Observation(record(content_type="text/event-stream; charset=utf-8",
                             prompt_tokens=30, completion_tokens=4))  # fmt: skip
    ex = obs.exchange
    assert ex.seconds == pytest.approx(1.7) and ex.ttft == pytest.approx(0.7)
    assert ex.tpot == pytest.approx((1.7 - 0.7) / 3)
    assert (ex.client_api, ex.request_model, ex.model, ex.route) == (
        "chat_completions", "fast", GPT, None
    )  # fmt: skip
    json_answer = Observation(record(prompt_tokens=30, completion_tokens=4)).exchange
    assert json_answer.ttft is None and json_answer.tpot is None  # streams only


@pytest.mark.parametrize(
    "bad", [-1, 1.5, True, None, [1], {"a": 1}, "x", "", "9" * 30, "nan", "-1", "1e400"]
)
def test_hostile_counters_are_ignored(bad: Any) -> None:
    ex = Observation(record(prompt_tokens=bad, completion_tokens=4)).exchange
    assert ex.usage == Usage(0, 4, 0)
    assert Observation(record(duration_us=str(bad))).exchange.seconds is None


def test_a_huge_counter_is_capped_and_broken_usage_json_is_none() -> None:
    ex = Observation(record(prompt_tokens=1e300, completion_tokens=1)).exchange
    assert ex.usage is not None and ex.usage.input == 1 << 53
    for raw in ("{", "[1]", "-", "x" * 5000):
        assert Observation(record(usage=raw)).exchange.usage is None


def test_duration_falls_back_to_envoys_whole_milliseconds() -> None:
    ex = Observation(record(duration_us="-", duration_ms="250")).exchange
    assert ex.seconds == 0.25
    assert Observation(record(duration_us="-", duration_ms="-")).exchange.seconds is None


def test_errors_are_not_metered_and_unknown_apis_have_no_usage() -> None:
    ex = Observation(record(status="429", prompt_tokens=5, completion_tokens=1)).exchange
    assert ex.usage is None and ex.ttft is None and ex.status == 429
    ex = Observation(record(api="-", prompt_tokens=5, completion_tokens=1)).exchange
    assert ex.client_api == "other" and ex.usage is None
    assert Observation(record(status="-")).exchange.status == 0


def test_hidden_usage_fills_in_only_when_the_answer_had_none() -> None:
    assert Observation(record(u="30,4,8")).exchange.usage == Usage(30, 4, 8)
    shown = record(u="1,1,1", prompt_tokens=30, completion_tokens=4)
    assert Observation(shown).exchange.usage == Usage(30, 4, 0)
    assert Observation(record(u="garbage")).exchange.usage is None


def test_the_log_line_escapes_and_omits() -> None:
    hostile = 'x"}\n{"status": 1'
    obs = Observation(record(request_id=hostile, rq=hostile, pn="true", attempts="2",
                             prompt_tokens=3, completion_tokens=1))  # fmt: skip
    line = obs.log_line()
    assert "\n" not in line
    rec = json.loads(line)
    assert rec["request_id"] == hostile and rec["requested_model"] == hostile
    assert rec["pinned"] is True and rec["attempts"] == 2 and rec["status"] == 200
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_input_tokens"]) == (3, 1, 0)
    assert rec["duration_ms"] == 1700.0 and rec["ttft_ms"] is None
    long = Observation(record(rq="m" * 5000)).exchange.request_model
    assert len(long) == 256


# ---------------------------------------------------------------- the LogsService, both transports

CONFIG = """
version: v0.4.0
listeners: [{name: m, type: model, port: 12000}]
model_providers:
  - {model: openai/gpt-4o-mini, access_key: sk-test, default: true}
routing:
  router: {type: none}
"""


def export_request(*records: dict[str, str], layout: str = "body") -> bytes:
    """A batch as Envoy sends it: each record's fields as the lines of its body (what
    ``envoy_config`` renders; a field it lacks is "-", as Envoy prints an absent value), or as
    string attributes (``layout="attributes"``, configurations rendered before the body)."""
    req = ls.ExportLogsServiceRequest()
    resource = req.resource_logs.add()
    group_field = (
        "scope_logs" if hasattr(resource, "scope_logs") else "instrumentation_library_logs"
    )
    group = getattr(resource, group_field).add()
    for attrs in records:
        rec = group.logs.add()
        if layout == "body":
            rec.body.string_value = "\n".join(attrs.get(k, "-") for k in LOG_FIELDS)
            continue
        for key, value in attrs.items():
            kv = rec.attributes.add()
            kv.key = key
            kv.value.string_value = value
    return req.SerializeToString()


@pytest.fixture(params=["h2", "grpcio"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Metrics, list[str]]]:
    gateway = Gateway(parse_config(CONFIG), NullRouter(), MemorySessionCache())
    metrics = Metrics(models=[GPT])
    lines: list[str] = []

    class Lines:  # an AccessLog stand-in that keeps what it is given
        def write(self, line: str) -> None:
            lines.append(line)

    usage = UsageLog(metrics, Lines())  # type: ignore[arg-type]
    server: H2Server | grpc.aio.Server
    if request.param == "h2":
        server = H2Server(lambda: ExtProcStream(gateway, metrics), usage.export)
        port = await server.start("127.0.0.1", 0)
    else:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(gateway, metrics), server)
        server.add_generic_rpc_handlers((usage.grpc_handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        request_serializer=lambda b: b,
        response_deserializer=ls.ExportLogsServiceResponse.FromString,
    )
    yield export, metrics, lines
    await channel.close()
    await server.stop(None)


async def test_a_batch_of_records_is_counted_once_each(
    served: tuple[Any, Metrics, list[str]],
) -> None:
    export, metrics, lines = served
    stream = record(content_type="text/event-stream", u="30,4,8")
    reply = await export(export_request(record(prompt_tokens=5, completion_tokens=2), stream))
    assert isinstance(reply, ls.ExportLogsServiceResponse)
    reg = metrics.registry
    labels = {"endpoint": "proxy", "client_api": "chat_completions", "model": GPT,
              "route": "none", "status_class": "2xx"}  # fmt: skip
    assert reg.get_sample_value("plano_requests_total", labels) == 2
    tokens = {
        "gen_ai_request_model": "fast",
        "gen_ai_response_model": GPT,
        "gen_ai_provider_name": "openai",
        "route": "none",
        "client_api": "chat_completions",
    }
    got = reg.get_sample_value(
        "gen_ai_client_token_usage_sum", {"gen_ai_token_type": "input", **tokens}
    )
    assert got == 35
    assert reg.get_sample_value("gen_ai_server_time_to_first_token_seconds_count", tokens) == 1
    assert len(lines) == 2 and json.loads(lines[1])["input_tokens"] == 30


async def test_a_broken_batch_is_an_error_not_a_crash(
    served: tuple[Any, Metrics, list[str]],
) -> None:
    export, metrics, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await export(b"\xff\xff\xff")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    # The server still answers the next batch.
    await export(export_request(record()))
    assert metrics.registry.get_sample_value(
        "plano_requests_total",
        {"endpoint": "proxy", "client_api": "chat_completions", "model": GPT, "route": "none",
         "status_class": "2xx"},
    ) == 1  # fmt: skip


PROXY_2XX = {"endpoint": "proxy", "client_api": "chat_completions", "model": GPT,
             "route": "none", "status_class": "2xx"}  # fmt: skip


def test_both_record_layouts_count_and_a_misshapen_body_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics(models=[GPT])
    usage = UsageLog(metrics)
    usage.export(export_request(record(), record(status="503")))
    usage.export(export_request(record(), layout="attributes"))
    assert metrics.registry.get_sample_value("plano_requests_total", PROXY_2XX) == 2
    assert (
        metrics.registry.get_sample_value(
            "plano_requests_total", {**PROXY_2XX, "status_class": "5xx"}
        )
        == 1
    )
    # A line too many (a value that broke its line, or another version's layout) or too few:
    # the record is not guessed at, and the operator is told once.
    req = ls.ExportLogsServiceRequest.FromString(export_request(record(), record()))
    group = getattr(req.resource_logs[0], _GROUP_FIELD)[0]
    group.logs[0].body.string_value += "\nextra"
    group.logs[1].body.string_value = "chat_completions\n" + GPT
    with caplog.at_level("WARNING", logger="plano_extproc.usage"):
        usage.export(req.SerializeToString())
    assert usage.malformed == 2 and usage.records == 3
    assert metrics.registry.get_sample_value("plano_requests_total", PROXY_2XX) == 2
    assert sum("not in the expected layout" in r.getMessage() for r in caplog.records) == 1


def test_the_rendered_record_body_has_one_command_per_field() -> None:
    """The layout Envoy is told to write is the one the worker reads: a line per field of
    ``LOG_FIELDS``, each line a single formatter command (so no literal text can add a line)."""
    import re

    from plano_extproc.envoy_config import render_bootstrap

    boot = render_bootstrap(parse_config(CONFIG), extproc=[("127.0.0.1", 50051)])
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (otel,) = (
        log["typed_config"]
        for log in hcm["typed_config"]["access_log"]
        if log["name"] == "envoy.access_loggers.open_telemetry"
    )
    assert "attributes" not in otel
    lines = otel["body"]["string_value"].split("\n")
    assert len(lines) == len(LOG_FIELDS)
    assert all(re.fullmatch(r"%[A-Z_]+(\([^%\n]*\))?(:\d+)?%", line) for line in lines), lines
