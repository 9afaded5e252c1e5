"""The request pipeline without Envoy or gRPC: real router (fake router LLM over loopback HTTP),
real memory session cache, real config."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import Config, parse_config
from plano_extproc.failover import Attempt
from plano_extproc.gateway import Gateway, Immediate, RequestInfo, Upstream, trace_id_from
from plano_extproc.names import ROUTE_HEADER, TRANSLATE_HEADER, failover_cluster
from plano_extproc.routing.base import NullRouter
from plano_extproc.server.app import build_router
from tests.conftest import SEED_RULES
from tests.fakes import FakeOrchestrator, keyword_router

# Pairs whose real translator module has not landed yet use a text-only stand-in.


def config(orch_url: str) -> Config:
    return parse_config(f"""
version: v0.4.0
listeners: [{{name: m, type: model}}]
model_providers:
  - model: openai/gpt-4o-mini
    access_key: sk-o
    default: true
  - model: openai/gpt-4o
    access_key: sk-o
  - model: anthropic/claude-sonnet-4-20250514
    access_key: sk-a
  - model: ollama/Plano-Orchestrator
    base_url: {orch_url}/v1
  - model: amazon_bedrock/us.amazon.nova-pro-v1:0
    base_url: https://bedrock-runtime.us-east-1.amazonaws.com
    access_key: sk-b
routing_preferences:
  - name: code_generation
    description: generating new code
    models: [anthropic/claude-sonnet-4-20250514, openai/gpt-4o]
routing:
  router: {{type: orchestrator, model: ollama/Plano-Orchestrator, timeout_ms: 300}}
""")


@pytest.fixture(scope="module")
def orch() -> Iterator[FakeOrchestrator]:
    fake = FakeOrchestrator(decide=keyword_router(SEED_RULES)).start()
    yield fake
    fake.stop()


@pytest.fixture
async def gateway(orch: FakeOrchestrator) -> AsyncIterator[Gateway]:
    orch.mode = "ok"
    cfg = config(orch.base_url)
    router = build_router(cfg)
    cache = MemorySessionCache()
    await router.start()
    await cache.start()
    yield Gateway(cfg, router, cache)
    await router.close()
    await cache.close()


def req(path: str, method: str = "POST", **headers: str) -> RequestInfo:
    return RequestInfo.build({":path": path, ":method": method, **headers})


async def run(
    gw: Gateway, info: RequestInfo, body: dict[str, object] | bytes
) -> Upstream | Immediate:
    early = gw.on_headers(info)
    if early is not None:
        return early
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await gw.on_body(info, raw)


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_routed_proxy_request(gateway: Gateway) -> None:
    raw = json.dumps({"model": "gpt-4o-mini", "messages": msgs("write a binary search")})
    info = req("/v1/chat/completions?x=1", authorization="Bearer client-key")
    out = await run(gateway, info, raw.encode())
    assert isinstance(out, Upstream) and out.failover is not None
    # The route's models in order: the first one serves unless it fails.
    anthropic, gpt4o = (
        gateway.catalog.lookup("anthropic/claude-sonnet-4-20250514"),
        (gateway.catalog.lookup("openai/gpt-4o")),
    )
    assert anthropic is not None and gpt4o is not None
    assert out.failover.candidates == (anthropic, gpt4o)
    assert out.provider is anthropic and out.route == "code_generation"
    headers = dict(out.headers.set)
    # Chat to Anthropic is translated: every attempt (the first too) has its own stream, in
    # the provider's failover cluster.
    assert out.failover.first_built is False
    assert headers["x-plano-try-0"] == failover_cluster(anthropic.cluster)
    assert headers["x-plano-try-1"] == failover_cluster(gpt4o.cluster)
    assert (headers["x-envoy-attempt-count"], headers["x-envoy-max-retries"]) == ("0", "1")
    assert "authorization" in out.headers.remove  # client credentials never go upstream
    assert not {":path", ":authority", "x-api-key", ROUTE_HEADER} & set(headers)
    assert out.body is None  # the client's body, replayed to every attempt
    # Attempt 1 (the anthropic cluster's stream): translated to Anthropic's native API.
    now = {**info.headers, **headers, "x-envoy-attempt-count": "1"}
    for name in out.headers.remove:
        now.pop(name, None)
    attempt = Attempt.start(
        gateway.catalog, gateway.config.failover, None, out.failover.metadata, now, {}
    )
    made = await attempt.on_body(raw.encode(), "rid")
    headers = dict(made.headers.set)
    assert made.model == anthropic.name
    assert headers[":path"] == "/v1/messages?x=1" and headers[":authority"] == anthropic.authority
    assert headers["x-api-key"] == "sk-a" and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers and "authorization" in made.headers.remove
    assert headers["accept-encoding"] == "identity"
    assert TRANSLATE_HEADER not in headers  # that route is not taken: never sent upstream
    assert made.body is not None and json.loads(made.body)["model"] == "claude-sonnet-4-20250514"
    assert headers["content-length"] == str(len(made.body))
    assert attempt.response is not None and attempt.response.pair_label == (
        "chat_completions>messages"
    )


async def test_router_timeout_fails_open(gateway: Gateway, orch: FakeOrchestrator) -> None:
    orch.mode, orch.delay = "slow", 1.0
    out = await run(
        gateway,
        req("/v1/chat/completions"),
        {"model": "gpt-4o", "messages": msgs("write a binary search")},
    )
    assert isinstance(out, Upstream)
    assert out.provider.name == "openai/gpt-4o" and out.route is None
    assert out.router_error and "timed out" in out.router_error


async def test_decision_no_match_shape(gateway: Gateway) -> None:
    out = await run(gateway, req("/routing/v1/chat/completions"), {"messages": msgs("hello")})
    assert isinstance(out, Immediate) and out.status == 200
    data = json.loads(out.body)
    assert data["models"] == ["none"] and data["route"] is None and len(data["trace_id"]) == 32


async def test_pin_then_hit_skips_router(gateway: Gateway, orch: FakeOrchestrator) -> None:
    first = await run(
        gateway,
        req("/v1/chat/completions", **{"x-model-affinity": "s1"}),
        {"messages": msgs("write a binary search")},
    )
    assert isinstance(first, Upstream) and first.pinned is False
    calls = len(orch.requests)
    second = await run(
        gateway,
        req("/v1/chat/completions", **{"x-model-affinity": "s1"}),
        {"messages": msgs("hello")},
    )
    assert isinstance(second, Upstream) and second.pinned is True
    assert second.provider.name == "anthropic/claude-sonnet-4-20250514"
    assert len(orch.requests) == calls


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        ("/v1/models", "GET", 200),
        ("/v1/models", "POST", 405),
        ("/v1/chat/completions", "GET", 405),
        ("/routing/v1/unknown", "POST", 404),
        ("/nope", "GET", 404),
    ],
)
def test_headers_phase_answers(path: str, method: str, status: int) -> None:
    cfg = config("http://127.0.0.1:9")
    gw = Gateway(cfg, NullRouter(), None)
    out = gw.on_headers(req(path, method))
    assert isinstance(out, Immediate) and out.status == status
    if status != 200:
        assert json.loads(out.body)["error"]["message"]


def test_body_required_for_post() -> None:
    gw = Gateway(config("http://127.0.0.1:9"), NullRouter(), None)
    info = RequestInfo.build({":path": "/v1/messages", ":method": "POST"}, end_of_stream=True)
    out = gw.on_headers(info)
    assert isinstance(out, Immediate) and out.status == 400


def test_trace_id_from_traceparent() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id_from({"traceparent": tp}) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_from({"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"}) != "0" * 32
    assert len(trace_id_from({"traceparent": "garbage"})) == 32


async def test_pin_holds_across_client_apis(gateway: Gateway) -> None:
    chat_first = await run(
        gateway,
        req("/v1/chat/completions", **{"x-model-affinity": "mixed"}),
        {"model": "openai/gpt-4o", "messages": msgs("hello")},
    )
    assert isinstance(chat_first, Upstream) and chat_first.provider.name == "openai/gpt-4o"
    assert chat_first.translation is None
    # A Messages request of the same session stays on the pinned OpenAI model, translated.
    messages = await run(
        gateway,
        req("/v1/messages", **{"x-model-affinity": "mixed"}),
        {"model": "claude-sonnet-4-20250514", "max_tokens": 5, "messages": msgs("hello")},
    )
    assert isinstance(messages, Upstream) and messages.pinned is True
    assert messages.provider.name == "openai/gpt-4o"
    assert messages.translation is not None
    assert messages.translation.pair == "messages>chat_completions"
    assert dict(messages.headers.set)[":path"] == "/v1/chat/completions"
    again = await run(
        gateway,
        req("/v1/chat/completions", **{"x-model-affinity": "mixed"}),
        {"model": "gpt-4o-mini", "messages": msgs("hello")},
    )
    assert isinstance(again, Upstream) and again.provider.name == "openai/gpt-4o"
    assert again.pinned is True


async def test_rejections_cannot_forge_log_lines(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="plano_extproc.gateway")
    hostile = "nope\r\n[2026-01-01][INFO] plano_extproc.gateway: forged"
    res = await run(
        gateway, req("/v1/chat/completions"), {"model": hostile, "messages": msgs("hi")}
    )
    assert isinstance(res, Immediate) and res.status == 400
    assert hostile in json.loads(res.body)["error"]["message"]  # the client sees its own text
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "\r" not in lines[0]
    assert "nope%0D%0A[2026-01-01]" in lines[0]


async def test_native_pair_is_unchanged(gateway: Gateway) -> None:
    """No translation: the client's bytes but the members we own, no extra headers."""
    raw = b'{"model": "openai/gpt-4o",  "messages": [{"role": "user", "content": "hi"}], "z": 1}'
    out = await run(gateway, req("/v1/chat/completions"), raw)
    assert isinstance(out, Upstream) and out.translation is None
    assert out.body == raw.replace(b'"openai/gpt-4o"', b'"gpt-4o"')
    headers = dict(out.headers.set)
    assert TRANSLATE_HEADER not in headers and "accept-encoding" not in headers
    assert headers[":path"] == "/v1/chat/completions"


async def test_decision_endpoint_and_proxy_agree_across_apis(gateway: Gateway) -> None:
    body = {"model": "gpt-4o-mini", "messages": msgs("write a binary search")}
    decided = await run(gateway, req("/routing/v1/chat/completions"), body)
    assert isinstance(decided, Immediate)
    models = json.loads(decided.body)["models"]
    proxied = await run(gateway, req("/v1/chat/completions"), body)
    assert isinstance(proxied, Upstream) and proxied.provider.name == models[0]


async def test_untranslatable_provider_is_a_clear_400(gateway: Gateway) -> None:
    out = await run(
        gateway,
        req("/v1/chat/completions"),
        {"model": "amazon_bedrock/us.amazon.nova-pro-v1:0", "messages": msgs("hi")},
    )
    assert isinstance(out, Immediate) and out.status == 400
    message = json.loads(out.body)["error"]["message"]
    assert message == (
        "model amazon_bedrock/us.amazon.nova-pro-v1:0 (provider 'amazon_bedrock') cannot serve "
        "OpenAI Chat Completions requests: translation between OpenAI Chat Completions and "
        "Bedrock Converse is not available"
    )
    # In the client's format: Anthropic's envelope for a Messages client.
    out = await run(
        gateway,
        req("/v1/messages"),
        {"model": "amazon_bedrock/us.amazon.nova-pro-v1:0", "max_tokens": 5, "messages": msgs("x")},
    )
    assert isinstance(out, Immediate) and out.status == 400
    assert json.loads(out.body)["type"] == "error"


async def test_translation_refusal_sends_nothing(gateway: Gateway) -> None:
    """A client body the translator rejects is a 400 before any upstream is planned."""
    out = await run(
        gateway,
        req("/v1/messages"),
        {"model": "openai/gpt-4o", "max_tokens": 5, "messages": "not a list"},
    )
    assert isinstance(out, Immediate) and out.status == 400
