"""End to end: SDK clients → real Envoy → our ext_proc → recording fake providers.

The router here is the orchestrator LLM path, served by a fake router model that answers
from keywords, so these tests pin down the gateway's behaviour independent of the embedded
classifier (which has its own integration tests). Every test runs against both ext_proc
transports: the built-in HTTP/2 server (default) and grpc.aio (``--transport grpcio``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.conftest import orchestrated_seed_config
from tests.fakes import FakeOrchestrator, FakeProvider
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

CODE_PROMPT = "Write a Python function that implements binary search"
REASONING_PROMPT = "Explain the trade-offs between microservices and monolithic architectures"
PLAIN_PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module", params=["h2", "grpcio"])
def gw(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> Iterator[GatewayProcess]:
    cfg = orchestrated_seed_config(
        openai_fake.base_url, anthropic_fake.base_url, orchestrator_fake.base_url, timeout_ms=500
    )
    transport = ["--transport", request.param]
    tmp = tmp_path_factory.mktemp("gw")
    with GatewayProcess(cfg, tmp, extra_args=transport) as g:
        yield g


@pytest.fixture(autouse=True)
def _reset(
    openai_fake: FakeProvider, anthropic_fake: FakeProvider, orchestrator_fake: FakeOrchestrator
) -> None:
    openai_fake.clear()
    anthropic_fake.clear()
    orchestrator_fake.clear()
    orchestrator_fake.mode = "ok"
    openai_fake.fail_status = None


def oai(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)


def post(
    gw: GatewayProcess, path: str, body: bytes | dict[str, object], **headers: str
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        gw.url + path,
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


# --------------------------------------------------------------------------- proxy path


def test_openai_sdk_unrouted_goes_to_requested_model(
    gw: GatewayProcess, openai_fake: FakeProvider
) -> None:
    resp = oai(gw).chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": PLAIN_PROMPT}]
    )
    assert resp.choices[0].message.content == "hello from openai (gpt-4o-mini)"
    rec = openai_fake.last()
    assert rec.method == "POST"
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer sk-openai-test"
    assert rec.json["model"] == "gpt-4o-mini"
    assert "x-plano-upstream" not in rec.headers
    assert rec.headers["host"] == f"127.0.0.1:{openai_fake.port}"


def test_openai_sdk_routed_to_route_model(
    gw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    resp = oai(gw).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": CODE_PROMPT}]
    )
    # Translated: the client reads the model it asked for; the route's model served it.
    assert resp.choices[0].message.content == "hello from anthropic (claude-sonnet-4-20250514)"
    rec = anthropic_fake.last()
    # Chat Completions are translated to Anthropic's native Messages API.
    assert rec.path == "/v1/messages"
    assert rec.headers["x-api-key"] == "sk-ant-test" and "authorization" not in rec.headers
    assert rec.json["model"] == "claude-sonnet-4-20250514"
    assert not openai_fake.requests


def test_body_reaches_upstream_byte_for_byte_except_owned_fields(
    gw: GatewayProcess, openai_fake: FakeProvider
) -> None:
    raw = (
        b'{ "model" :"fast-model",\n  "messages": [{"role":"user","content":"caf\\u00e9 \xc3\xa9 '
        b'hi"}],\n  "routing_preferences": [{"name":"x","description":"y",'
        b'"models":["openai/gpt-4o"]}],'
        b'  "temperature":1.0e0, "extra": {"keep": [1, 2.50, null]} ,"routing_policy":[]}'
    )
    resp = post(gw, "/v1/chat/completions", raw, authorization="Bearer client-key")
    assert resp.status_code == 200, resp.text
    rec = openai_fake.last()
    expected = (
        b'{ "model" :"gpt-4o-mini",\n  "messages": [{"role":"user","content":"caf\\u00e9 \xc3\xa9 '
        b'hi"}],\n  "temperature":1.0e0, "extra": {"keep": [1, 2.50, null]}}'
    )
    assert rec.body == expected
    assert rec.headers["content-length"] == str(len(expected))


def test_untouched_body_is_forwarded_as_is(gw: GatewayProcess, openai_fake: FakeProvider) -> None:
    raw = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}],"n":1}'
    assert post(gw, "/v1/chat/completions", raw).status_code == 200
    assert openai_fake.last().body == raw


def test_inline_routing_preferences_override_config(
    gw: GatewayProcess, openai_fake: FakeProvider, orchestrator_fake: FakeOrchestrator
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Write quicksort in Go"}],
        "routing_preferences": [
            {"name": "code_generation", "description": "code", "models": ["openai/gpt-4o"]}
        ],
    }
    resp = post(gw, "/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    rec = openai_fake.last()
    assert rec.json["model"] == "gpt-4o"
    assert "routing_preferences" not in rec.json
    prompt = orchestrator_fake.prompts()[-1]
    assert '"description": "code"' in prompt
    assert "complex_reasoning" not in prompt  # config routes replaced for this request


def test_inline_routing_policy_form(gw: GatewayProcess, openai_fake: FakeProvider) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Write quicksort in Go"}],
        "routing_policy": [
            {
                "model": "openai/gpt-4o",
                "routing_preferences": [
                    {"name": "code_generation", "description": "code generation and debugging"}
                ],
            },
            {
                "model": "openai/gpt-4o-mini",
                "routing_preferences": [
                    {"name": "general", "description": "simple questions and conversation"}
                ],
            },
        ],
    }
    resp = post(gw, "/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    assert openai_fake.last().json["model"] == "gpt-4o"
    assert "routing_policy" not in openai_fake.last().json


def test_streaming_passes_through(gw: GatewayProcess) -> None:
    stream = oai(gw).chat.completions.create(
        model="openai/gpt-4o",
        messages=[{"role": "user", "content": PLAIN_PROMPT}],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "hello from openai (gpt-4o)"


def test_anthropic_sdk_messages(gw: GatewayProcess, anthropic_fake: FakeProvider) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key="client-ant-key", max_retries=0)
    msg = client.messages.create(
        model="anthropic/claude-sonnet-4-20250514",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": CODE_PROMPT}],
    )
    assert msg.content[0].text == "hello from anthropic (claude-sonnet-4-20250514)"  # type: ignore[union-attr]
    rec = anthropic_fake.last()
    assert rec.path == "/v1/messages"
    assert rec.headers["x-api-key"] == "sk-ant-test"
    # The SDK's own anthropic-version is kept; 2023-06-01 is only the default (next test).
    assert rec.headers["anthropic-version"] == client.default_headers["anthropic-version"]
    assert "authorization" not in rec.headers
    assert rec.json["model"] == "claude-sonnet-4-20250514"


def test_messages_raw_client_gets_default_anthropic_version(
    gw: GatewayProcess, anthropic_fake: FakeProvider
) -> None:
    body = {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
    }
    resp = post(gw, "/v1/messages", body, authorization="Bearer client-key")
    assert resp.status_code == 200, resp.text
    rec = anthropic_fake.last()
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["x-api-key"] == "sk-ant-test"
    assert "authorization" not in rec.headers


def test_anthropic_stream(gw: GatewayProcess) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    with client.messages.stream(
        model="claude-sonnet-4-20250514",
        max_tokens=32,
        messages=[{"role": "user", "content": PLAIN_PROMPT}],
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == "hello from anthropic (claude-sonnet-4-20250514)"


def test_messages_route_dispatches_its_first_model_translated(
    gw: GatewayProcess, anthropic_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    # complex_reasoning lists OpenAI models only: the first one serves the Messages client.
    client = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    msg = client.messages.create(
        model="claude-sonnet-4-20250514",
        max_tokens=32,
        messages=[{"role": "user", "content": REASONING_PROMPT}],
    )
    assert msg.content[0].type == "text" and msg.content[0].text.startswith("hello from openai")
    assert openai_fake.last().path == "/v1/chat/completions"
    assert not anthropic_fake.requests


def test_responses_api(gw: GatewayProcess, openai_fake: FakeProvider) -> None:
    resp = oai(gw).responses.create(model="openai/gpt-4o", input=PLAIN_PROMPT)
    assert resp.output_text == "hello from openai (gpt-4o)"
    rec = openai_fake.last()
    assert rec.path == "/v1/responses"
    assert rec.json["model"] == "gpt-4o"
    assert rec.headers["authorization"] == "Bearer sk-openai-test"


def test_missing_model_uses_default_provider(gw: GatewayProcess, openai_fake: FakeProvider) -> None:
    resp = post(gw, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    assert openai_fake.last().json["model"] == "gpt-4o-mini"


def test_client_cannot_choose_upstream_with_internal_header(
    gw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    from plano_extproc.config import parse_config

    cfg = parse_config(gw.config_path.read_text())
    anthropic_cluster = next(p.cluster for p in cfg.providers if p.interface == "anthropic")
    resp = post(
        gw,
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        **{"x-plano-upstream": anthropic_cluster},
    )
    assert resp.status_code == 200
    assert openai_fake.requests and not anthropic_fake.requests
    assert "x-plano-upstream" not in openai_fake.last().headers


def test_upstream_error_is_forwarded(gw: GatewayProcess, openai_fake: FakeProvider) -> None:
    openai_fake.fail_status = 429
    with pytest.raises(openai.RateLimitError):
        oai(gw).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )


# --------------------------------------------------------------------------- decision path


@pytest.mark.parametrize(
    ("path", "body", "models", "route"),
    [
        (
            "/routing/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": CODE_PROMPT}]},
            ["anthropic/claude-sonnet-4-20250514", "openai/gpt-4o"],
            "code_generation",
        ),
        (
            "/routing/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": REASONING_PROMPT}]},
            ["openai/gpt-4o", "openai/gpt-4o-mini"],
            "complex_reasoning",
        ),
        (
            "/routing/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PLAIN_PROMPT}]},
            ["none"],
            None,
        ),
        (
            "/routing/v1/messages",
            {
                "model": "gpt-4o-mini",
                "max_tokens": 1024,
                "messages": [
                    {
                        "role": "user",
                        "content": "Create a REST API endpoint in Rust using actix-web that "
                        "handles user registration",
                    }
                ],
            },
            ["anthropic/claude-sonnet-4-20250514", "openai/gpt-4o"],
            "code_generation",
        ),
        (
            "/routing/v1/responses",
            {
                "model": "gpt-4o-mini",
                "input": "Build a React component that renders a sortable data table",
            },
            ["anthropic/claude-sonnet-4-20250514", "openai/gpt-4o"],
            "code_generation",
        ),
    ],
)
def test_decision_endpoint_seed_demo(
    gw: GatewayProcess,
    openai_fake: FakeProvider,
    path: str,
    body: dict[str, object],
    models: list[str],
    route: str | None,
) -> None:
    resp = post(gw, path, body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    data = resp.json()
    assert data["models"] == models
    assert data["route"] == route
    assert len(data["trace_id"]) == 32 and int(data["trace_id"], 16) >= 0
    assert set(data) == {"models", "route", "trace_id"}
    assert not openai_fake.requests  # no LLM called


def test_decision_trace_id_from_traceparent(gw: GatewayProcess) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = post(
        gw,
        "/routing/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}]},
        traceparent=tp,
    )
    assert resp.json()["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_response_headers_name_the_model_and_route(gw: GatewayProcess) -> None:
    routed = oai(gw).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": REASONING_PROMPT}]
    )
    assert routed.headers["x-plano-model"] == "openai/gpt-4o"
    assert routed.headers["x-plano-route"] == "complex_reasoning"
    plain = oai(gw).chat.completions.with_raw_response.create(
        model="fast-model", messages=[{"role": "user", "content": PLAIN_PROMPT}]
    )
    assert plain.headers["x-plano-model"] == "openai/gpt-4o-mini"
    assert "x-plano-route" not in plain.headers  # no route matched


def test_worker_serves_the_requested_transport(gw: GatewayProcess) -> None:
    # Guards the parametrisation: each run of this module really uses its transport.
    expected = gw.extra_args[gw.extra_args.index("--transport") + 1]
    assert httpx.get(gw.worker_admin[0] + "/ready").json()["transport"] == expected


def test_models_and_healthz(gw: GatewayProcess) -> None:
    assert httpx.get(gw.url + "/healthz").status_code == 200
    models = [m.id for m in oai(gw).models.list()]
    assert "openai/gpt-4o-mini" in models and "fast-model" in models


# --------------------------------------------------------------------------- router failures


@pytest.mark.parametrize("mode", ["slow", "garbage", "error"])
def test_router_failure_fails_open(
    gw: GatewayProcess, openai_fake: FakeProvider, orchestrator_fake: FakeOrchestrator, mode: str
) -> None:
    orchestrator_fake.mode = mode
    orchestrator_fake.delay = 2.0
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": CODE_PROMPT}]}
    decision = post(gw, "/routing/v1/chat/completions", body)
    assert decision.status_code == 200
    data = decision.json()
    assert data["models"] == ["none"] and data["route"] is None
    assert data["router_error"]
    proxied = post(gw, "/v1/chat/completions", body)
    assert proxied.status_code == 200
    assert openai_fake.last().json["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("mode", ["arch", "fenced"])
def test_router_output_shapes(
    gw: GatewayProcess, orchestrator_fake: FakeOrchestrator, mode: str
) -> None:
    orchestrator_fake.mode = mode
    body = {"messages": [{"role": "user", "content": CODE_PROMPT}]}
    assert post(gw, "/routing/v1/chat/completions", body).json()["route"] == "code_generation"


def test_router_down(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    from tests.fakes import free_port

    down = f"http://127.0.0.1:{free_port()}"
    cfg = orchestrated_seed_config(
        openai_fake.base_url, anthropic_fake.base_url, down, timeout_ms=500
    )
    with GatewayProcess(cfg, tmp_path) as g:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": CODE_PROMPT}]}
        data = post(g, "/routing/v1/chat/completions", body).json()
        assert data["route"] is None and "unreachable" in data["router_error"]
        assert post(g, "/v1/chat/completions", body).status_code == 200
        assert openai_fake.last().json["model"] == "gpt-4o"
    assert "router failed" in g.output()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", b"not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/chat/completions", b'{"model": "gpt-4o"}', 400, "'messages' is required"),
        ("/v1/chat/completions", b'{"model": "gpt-4o", "messages": []}', 400, "at least one"),
        ("/v1/chat/completions", b'{"model": "gpt-4o", "messages": "hi"}', 400, "array"),
        ("/v1/chat/completions", b'{"model": 5, "messages": [{"role": "user"}]}', 400, "'model'"),
        (
            "/v1/chat/completions",
            b'{"model": "gpt-4o", "messages": [{"content": "x"}]}',
            400,
            "role",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "nope/model-x", "messages": [{"role": "user", "content": "x"}]}',
            400,
            "Configured models: openai/gpt-4o-mini",
        ),
        ("/v1/responses", b'{"model": "gpt-4o"}', 400, "'input' is required"),
        ("/routing/v1/responses", b'{"input": 7}', 400, "'input' must be"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "routing_preferences": {"a": 1}}',
            400,
            "routing_preferences must be an array",
        ),
        (
            "/routing/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "routing_preferences": '
            b'[{"name": "a", "description": "b", "models": ["openai/gpt-9"]}]}',
            400,
            "openai/gpt-9",
        ),
        ("/routing/v1/embeddings", b"{}", 404, "unknown routing endpoint"),
        ("/v1/embeddings", b"{}", 404, "unknown path"),
        ("/v1/chat/completions", b"", 400, "empty"),
    ],
)
def test_bad_input(
    gw: GatewayProcess, openai_fake: FakeProvider, path: str, body: bytes, status: int, needle: str
) -> None:
    resp = post(gw, path, body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert needle in err["message"], err
    assert err["type"]
    assert not openai_fake.requests


def test_wrong_method(gw: GatewayProcess) -> None:
    resp = httpx.get(gw.url + "/v1/chat/completions")
    assert resp.status_code == 405
    assert "use POST" in resp.json()["error"]["message"]
    resp = httpx.put(gw.url + "/routing/v1/messages", content=b"{}")
    assert resp.status_code == 405


def test_large_prompt_accepted_and_oversize_rejected(
    gw: GatewayProcess, openai_fake: FakeProvider
) -> None:
    big = "x" * (16 * 1024 * 1024)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]})
    resp = post(gw, "/v1/chat/completions", body.encode())
    assert resp.status_code == 200, resp.text[:200]
    assert len(openai_fake.last().body) == len(body)
    too_big = b'{"messages": [{"role": "user", "content": "' + b"y" * (33 << 20) + b'"}]}'
    resp = post(gw, "/v1/chat/completions", too_big)
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "request_too_large"
