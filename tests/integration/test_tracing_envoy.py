"""Plano's ``tracing`` block: Envoy's OpenTelemetry tracer exports spans to an OTLP collector,
tagged with the route and model the ext_proc chose, continuing the client's trace."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import orchestrated_seed_config
from tests.fakes import FakeCollector, FakeOrchestrator, FakeProvider
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

CODE = "Write a Python function that implements binary search"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def collector() -> Iterator[FakeCollector]:
    fake = FakeCollector().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
    collector: FakeCollector,
) -> Iterator[GatewayProcess]:
    cfg = orchestrated_seed_config(
        openai_fake.base_url, anthropic_fake.base_url, orchestrator_fake.base_url
    )
    cfg += f"""
tracing:
  random_sampling: 100
  opentracing_grpc_endpoint: http://127.0.0.1:{collector.port}
  span_attributes:
    static: {{deployment.environment: test}}
"""
    with GatewayProcess(cfg, tmp_path_factory.mktemp("trace")) as g:
        yield g


def traced_chat(gw: GatewayProcess, traceparent: str) -> httpx.Response:
    """The seed config's routed chat request (code_generation -> Claude) under a trace."""
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": CODE}]},
        headers={"traceparent": traceparent, "authorization": "Bearer c"},
        timeout=30,
    )


def test_spans_carry_route_model_and_the_clients_trace(
    gw: GatewayProcess, collector: FakeCollector, anthropic_fake: FakeProvider
) -> None:
    resp = traced_chat(gw, f"00-{TRACE}-b7ad6b7169203331-01")
    assert resp.status_code == 200, resp.text
    # The provider sees the same trace, continued by Envoy.
    assert anthropic_fake.last().headers["traceparent"].split("-")[1] == TRACE
    deadline = time.monotonic() + 20  # Envoy's OTLP exporter flushes every 5 s
    while time.monotonic() < deadline and not any(
        "plano.route.name" in {a.key for a in s.attributes} and not s.name.startswith("chat ")
        for _, s in collector.spans_of(TRACE)
    ):
        time.sleep(0.2)
    spans = collector.spans_of(TRACE)
    assert spans, f"no span of trace {TRACE} reached the collector"
    resources = {r.get("service.name") for r, _ in spans}
    assert resources == {"plano-extproc"}
    ingress = next(
        s
        for _, s in spans
        if "plano.route.name" in {a.key for a in s.attributes} and not s.name.startswith("chat ")
    )
    attrs = {a.key: a.value.string_value for a in ingress.attributes}
    assert attrs["plano.route.name"] == "code_generation"
    assert attrs["llm.model"] == "anthropic/claude-sonnet-4-20250514"
    assert attrs["deployment.environment"] == "test"
    assert ingress.parent_span_id.hex() == "b7ad6b7169203331"
    # The ext_proc call itself is a span of the same trace.
    assert any("ExternalProcessor" in s.name for _, s in spans), [s.name for _, s in spans]


def test_a_genai_span_with_token_usage_joins_the_trace(
    gw: GatewayProcess, collector: FakeCollector, anthropic_fake: FakeProvider
) -> None:
    """Envoy's span cannot take the usage (known only when the answer ends, after Envoy settled
    its tags): the worker exports a GenAI child span into the same trace."""
    trace = "5bf92f3577b34da6a3ce929d0e0e4737"
    resp = traced_chat(gw, f"00-{trace}-c7ad6b7169203332-01")
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = collector.spans_of(trace)
        genai = [s for _, s in spans if s.name.startswith("chat ")]
        envoy_ids = {s.span_id for _, s in spans if not s.name.startswith("chat ")}
        if genai and genai[0].parent_span_id in envoy_ids:
            break
        time.sleep(0.2)
    assert len(genai) == 1, [s.name for _, s in spans]
    span = genai[0]
    assert span.name == "chat gpt-4o-mini"
    assert span.parent_span_id in envoy_ids  # the span Envoy forwarded the request under
    attrs = {
        a.key: a.value.int_value if a.value.HasField("int_value") else a.value.string_value
        for a in span.attributes
    }
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == "anthropic/claude-sonnet-4-20250514"
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attrs["plano.route.name"] == "code_generation"
    assert attrs["http.response.status_code"] == 200
    assert span.end_time_unix_nano > span.start_time_unix_nano
    # Envoy's own request span names the models too (GenAI attribute names).
    ingress = next(s for _, s in spans if "plano.route.name" in {a.key for a in s.attributes}
                   and not s.name.startswith("chat "))  # fmt: skip
    tags = {a.key: a.value.string_value for a in ingress.attributes}
    assert tags["gen_ai.request.model"] == "gpt-4o-mini"
    assert tags["gen_ai.response.model"] == "anthropic/claude-sonnet-4-20250514"


def test_an_unsampled_trace_gets_no_genai_span(
    gw: GatewayProcess, collector: FakeCollector
) -> None:
    trace = "6bf92f3577b34da6a3ce929d0e0e4738"
    resp = traced_chat(gw, f"00-{trace}-d7ad6b7169203333-00")
    assert resp.status_code == 200
    time.sleep(2.5)  # two export periods of the worker
    assert not [s for _, s in collector.spans_of(trace) if s.name.startswith("chat ")]
