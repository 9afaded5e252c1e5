"""GenAI spans: which traces get one, what it says, and how the exporter batches and drops."""

from __future__ import annotations

import pytest

from plano_extproc import spans as spans_mod
from plano_extproc.metrics import Exchange
from plano_extproc.spans import SpanExporter, genai_span, parse_traceparent
from plano_extproc.usage import Usage
from tests.fakes import FakeCollector, free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_only_sampled_well_formed_traceparents_count() -> None:
    got = parse_traceparent(f"00-{TRACE}-{PARENT}-01")
    assert got == (bytes.fromhex(TRACE), bytes.fromhex(PARENT))
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-03") is not None
    for bad in (
        "",
        f"00-{TRACE}-{PARENT}-00",  # not sampled
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE}-{PARENT}",
        f"00-{TRACE}x-{PARENT}-01",
        "\r\n" * 40,
        "€" * 55,
    ):
        assert parse_traceparent(bad) is None, bad


def attrs(span: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:  # type: ignore[attr-defined]
        out[a.key] = a.value.int_value if a.value.HasField("int_value") else a.value.string_value
    return out


def test_the_span_follows_the_genai_conventions() -> None:
    ex = Exchange("messages", "claude", "anthropic/claude-x", "code", 200,
                  usage=Usage(input=120, output=30, cached_input=100))  # fmt: skip
    parent = (bytes.fromhex(TRACE), bytes.fromhex(PARENT))
    span = genai_span(parent, ex, started=100.0, ended=101.5, attempts="2")
    assert span.name == "chat claude"
    assert span.trace_id == parent[0] and span.parent_span_id == parent[1]
    assert len(span.span_id) == 8 and span.span_id != parent[1]
    assert span.end_time_unix_nano - span.start_time_unix_nano == 1_500_000_000
    assert attrs(span) == {
        "gen_ai.operation.name": "chat",
        "plano.client_api": "messages",
        "http.response.status_code": 200,
        "gen_ai.request.model": "claude",
        "gen_ai.response.model": "anthropic/claude-x",
        "gen_ai.provider.name": "anthropic",
        "plano.route.name": "code",
        "plano.attempts": 2,
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 30,
        "gen_ai.usage.cache_read.input_tokens": 100,
    }
    failed = genai_span(parent, Exchange("chat_completions", "", "", None, 503), 1.0, 0.5, "")
    assert attrs(failed)["error.type"] == "503" and failed.status.code == 2
    assert failed.end_time_unix_nano == failed.start_time_unix_nano  # never before its start
    assert failed.name == "chat unknown"


async def test_the_exporter_batches_into_one_trace_request() -> None:
    collector = FakeCollector().start()
    try:
        exporter = SpanExporter("127.0.0.1", collector.port)
        await exporter.start()
        parent = (bytes.fromhex(TRACE), bytes.fromhex(PARENT))
        for i in range(3):
            exporter.add(genai_span(parent, Exchange("chat_completions", f"m{i}", "a/b", None, 200),
                                    1.0, 2.0, "1"))  # fmt: skip
        await exporter.flush()
        assert exporter.exported == 3 and exporter.queue == []
        got = collector.spans_of(TRACE)
        assert sorted(s.name for _, s in got) == ["chat m0", "chat m1", "chat m2"]
        assert {r["service.name"] for r, _ in got} == {"plano-extproc"}
        await exporter.close()
    finally:
        collector.stop()


async def test_a_missing_collector_drops_spans_without_growing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spans_mod, "MAX_QUEUE", 10)
    monkeypatch.setattr(spans_mod, "EXPORT_TIMEOUT_SECONDS", 0.5)
    exporter = SpanExporter("127.0.0.1", free_port())  # nothing listens there
    await exporter.start()
    parent = (bytes.fromhex(TRACE), bytes.fromhex(PARENT))
    for _ in range(15):
        exporter.add(genai_span(parent, Exchange("chat_completions", "m", "a/b", None, 200),
                                1.0, 2.0, ""))  # fmt: skip
    assert len(exporter.queue) == 10 and exporter.dropped == 5
    await exporter.flush()
    assert exporter.exported == 0 and exporter.dropped == 15 and exporter.queue == []
    await exporter.close()
