"""Hostile request values through the real gateway (issue #11: items 1, 2, 4, 12, 13, 16-18).

Each test sends what a probe sent against the old main and checks the answer the client gets
from Envoy, and what (if anything) the recording fake provider received.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import seed_config
from tests.fakes import FakeOrchestrator, FakeProvider
from tests.gateway_proc import ROOT, GatewayProcess

pytestmark = pytest.mark.integration

AZURE_KEY = "sk-azure-SECRET-test"


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
) -> Iterator[GatewayProcess]:
    extra = f"""  - model: openai/*
    base_url: {openai_fake.base_url}/v1
    access_key: sk-openai-test
  - model: anthropic/*
    base_url: {anthropic_fake.base_url}/v1
    access_key: sk-ant-test
  - model: azure_openai/*
    base_url: {openai_fake.base_url}
    access_key: {AZURE_KEY}
  - model: chatgpt/*
    base_url: {openai_fake.base_url}/backend-api/codex
"""
    cfg = seed_config(
        openai_fake.base_url,
        anthropic_fake.base_url,
        extra_providers=extra,
        router="  router: {type: none}\n",
        routing_extra="  route_on_user_only: true",
    )
    # debug logging: the provider keys must not show up in the gateway's log either
    with GatewayProcess(
        cfg, tmp_path_factory.mktemp("hard"), extra_args=["--log-level", "debug"]
    ) as g:
        yield g


@pytest.fixture(autouse=True)
def _reset(openai_fake: FakeProvider, anthropic_fake: FakeProvider) -> None:
    openai_fake.clear()
    anthropic_fake.clear()
    openai_fake.fail_status = None


def chat(gw: GatewayProcess, body: bytes | dict[str, object], **kw: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        gw.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", "authorization": "Bearer client-key"},
        timeout=30,
        **kw,  # type: ignore[arg-type]
    )


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    "model",
    [
        "openai/x\r\nX-Smuggled: 1",
        "openai/x\nX-Smuggled: 1",
        "openai/x\r\n\r\nHTTP/1.1 200 OK\r\nX-Smuggled: 1",
        "claude-x\r\nX-Smuggled: 1",  # a bare name through anthropic/*
        "openai/" + "a" * 300,
    ],
)
def test_hostile_wildcard_model_ids_are_400_and_inject_nothing(
    gw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider, model: str
) -> None:
    r = chat(gw, {"model": model, "messages": user("hi")})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "x-smuggled" not in r.headers and "x-plano-model" not in r.headers
    assert openai_fake.requests == [] and anthropic_fake.requests == []


def test_wildcard_model_is_reported_in_the_model_header(
    gw: GatewayProcess, openai_fake: FakeProvider
) -> None:
    r = chat(gw, {"model": "openai/gpt-4.1-nano", "messages": user("hi")})
    assert r.status_code == 200, r.text
    assert r.headers["x-plano-model"] == "openai/gpt-4.1-nano"
    assert openai_fake.last().json["model"] == "gpt-4.1-nano"


def test_bare_model_names_resolve_through_family_wildcards(
    gw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)
    r = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=user("hi"))
    assert r.headers["x-plano-model"] == "openai/gpt-4.1"
    assert openai_fake.last().json["model"] == "gpt-4.1"
    assert openai_fake.last().headers["authorization"] == "Bearer sk-openai-test"
    r = client.chat.completions.with_raw_response.create(
        model="claude-3-5-haiku-latest", messages=user("hi")
    )
    assert r.headers["x-plano-model"] == "anthropic/claude-3-5-haiku-latest"
    assert anthropic_fake.last().json["model"] == "claude-3-5-haiku-latest"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="llama-3-unknown-family", messages=user("hi"))
    assert "not found in configured providers" in str(ei.value)


@pytest.mark.parametrize(
    ("model_id", "raw_path"),
    [
        ("../../../other?x=1#", "/openai/deployments/..%2F..%2F..%2Fother%3Fx%3D1%23/"),
        ("dep&api-version=1999-01-01", "/openai/deployments/dep%26api-version%3D1999-01-01/"),
    ],
)
def test_azure_wildcard_ids_cannot_leave_their_path_segment(
    gw: GatewayProcess, openai_fake: FakeProvider, model_id: str, raw_path: str
) -> None:
    r = httpx.post(
        gw.url + "/v1/chat/completions?api-version=1999-01-01&API-Version=1&keep=1",
        json={"model": f"azure_openai/{model_id}", "messages": user("hi")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    rec = openai_fake.last()
    assert rec.raw_path == raw_path + "chat/completions"
    assert rec.query == "api-version=2025-01-01-preview&keep=1"
    assert rec.headers["api-key"] == AZURE_KEY


@pytest.mark.parametrize("model_id", ["..", "%2e%2e", "."])
def test_azure_dot_segment_ids_are_400(
    gw: GatewayProcess, openai_fake: FakeProvider, model_id: str
) -> None:
    r = chat(gw, {"model": f"azure_openai/{model_id}", "messages": user("hi")})
    assert r.status_code == 400, r.text
    assert openai_fake.requests == []


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"model": "gpt-4o", "temperature": NaN, "messages": []}', "NaN"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], '
         b'"logit_bias": {"1": Infinity}}', "Infinity"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], '
         b'"model": "gpt-4o"}', "member 'model' appears more than once"),
    ],
)  # fmt: skip
def test_nan_infinity_and_duplicate_members_are_400(
    gw: GatewayProcess, openai_fake: FakeProvider, body: bytes, problem: str
) -> None:
    r = chat(gw, body)
    assert r.status_code == 400, r.text
    assert problem in r.json()["error"]["message"]
    assert openai_fake.requests == []


@pytest.mark.parametrize("model", ["gpt-4o", "openai/gpt-4o-wild"])
def test_lone_surrogates_are_served_not_500(
    gw: GatewayProcess, openai_fake: FakeProvider, model: str
) -> None:
    # route_on_user_only is on in this gateway and the second model is a wildcard: both paths
    # gave an empty 500 before. The provider gets the client's bytes unchanged.
    raw = (
        b'{"model": "' + model.encode() + b'", "messages": [{"role": "system", "content": '
        b'"sys \\ud83d"}, {"role": "user", "content": "cut emoji \\ud83d"}]}'
    )
    r = chat(gw, raw)
    assert r.status_code == 200, r.text
    assert openai_fake.last().body == raw.replace(b"openai/gpt-4o-wild", b"gpt-4o-wild")


def test_chatgpt_gets_the_clients_own_credentials(
    gw: GatewayProcess, openai_fake: FakeProvider
) -> None:
    r = httpx.post(
        gw.url + "/v1/responses",
        json={"model": "chatgpt/gpt-5", "input": "hi"},
        headers={"authorization": "Bearer user-chatgpt-token", "chatgpt-account-id": "acct-1"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    rec = openai_fake.last()
    assert rec.path == "/backend-api/codex/responses"
    assert rec.headers["authorization"] == "Bearer user-chatgpt-token"
    assert rec.headers["chatgpt-account-id"] == "acct-1"
    assert rec.headers["originator"] == "codex_cli_rs"


def test_provider_keys_stay_out_of_the_log(gw: GatewayProcess) -> None:
    chat(gw, {"model": "azure_openai/dep", "messages": user("hi")})
    out = gw.output()
    assert "debug" in out.lower() or "DEBUG" in out  # the log level really is debug
    for secret in (AZURE_KEY, "sk-openai-test", "sk-ant-test"):
        assert secret not in out


def test_empty_model_providers_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("version: v0.4.0\nlisteners:\n  - {name: m, type: model}\nmodel_providers: []\n")
    res = subprocess.run(
        [sys.executable, "-m", "plano_extproc", "validate", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "model_providers: declare at least one provider" in res.stderr


def test_undeclared_plano_orchestrator_uses_the_hosted_router(
    tmp_path: Path,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> None:
    # A Plano demo config: llm_routing_model names Plano-Orchestrator, no such provider. The
    # hosted endpoint is replaced by the fake router LLM (no traffic leaves this machine).
    cfg = seed_config(openai_fake.base_url, anthropic_fake.base_url)
    cfg += "overrides:\n  llm_routing_model: Plano-Orchestrator\n"
    env = {"PLANO_EXTPROC_HOSTED_ROUTER_URL": orchestrator_fake.base_url + "/v1"}
    orchestrator_fake.clear()
    with GatewayProcess(cfg, tmp_path, env=env) as g:
        assert "Plano's hosted endpoint" in g.output()
        r = httpx.post(
            g.url + "/routing/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": user("Write a Python function for sorting")},
            timeout=30,
        )
        models = httpx.get(g.url + "/v1/models", timeout=30).json()
    assert r.status_code == 200, r.text
    assert r.json()["route"] == "code_generation"
    assert orchestrator_fake.last().json["model"] == "Plano-Orchestrator"
    assert "plano/Plano-Orchestrator" not in {m["id"] for m in models["data"]}


def test_large_bodies_are_parsed_cooperatively_and_forwarded_intact(
    gw: GatewayProcess, openai_fake: FakeProvider
) -> None:
    # ~12 MB of chat history: parsed a step at a time (JsonBody.parse_async), then the model
    # rewritten in place; the rest reaches the provider byte-for-byte.
    history = [{"role": "user", "content": f"turn {i} " + "y" * 100} for i in range(100_000)]
    raw = json.dumps({"model": "fast-model", "messages": history, "temperature": 0.5}).encode()
    r = chat(gw, raw)
    assert r.status_code == 200, r.text
    assert openai_fake.last().body == raw.replace(b'"fast-model"', b'"gpt-4o-mini"', 1)


def test_messages_clients_get_anthropic_error_bodies(gw: GatewayProcess) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=gw.url, api_key="client-key", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.messages.create(
            model="claude-x\r\nX: 1", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    body = ei.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "not a valid model id" in body["error"]["message"]
    r = httpx.get(gw.url + "/v1/messages", timeout=30)
    assert r.status_code == 405 and r.json()["type"] == "error"
    # OpenAI clients keep OpenAI's envelope
    r = chat(gw, b"{not json")
    assert r.status_code == 400 and set(r.json()) == {"error"}


def test_metrics_labels_are_escaped_and_bounded(gw: GatewayProcess) -> None:
    from plano_extproc.metrics import MAX_WILDCARD_MODELS

    def counted(text: str) -> tuple[list[str], float]:
        lines = [ln for ln in text.splitlines() if ln.startswith("plano_requests_total{")]
        return lines, sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if 'endpoint="proxy"' in ln)

    with httpx.Client(timeout=30) as client:
        _, before = counted(client.get(gw.worker_admin[0] + "/metrics").text)
        # first, while the wildcard series are not all taken: it gets a series of its own
        hostile = {"model": 'openai/x"}1', "messages": user("hi")}
        assert client.post(gw.url + "/v1/chat/completions", json=hostile).status_code == 200
        for i in range(MAX_WILDCARD_MODELS + 20):
            body = {"model": f"openai/probe-{i}", "messages": user("hi")}
            assert client.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
        # Counted when each response ends (the usage filter does not hold requests): wait.
        deadline = time.monotonic() + 10
        while True:
            requests, now = counted(client.get(gw.worker_admin[0] + "/metrics").text)
            if now >= before + MAX_WILDCARD_MODELS + 21 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    wild = [ln for ln in requests if 'model="openai/probe-' in ln or 'model="openai/x' in ln]
    assert len(wild) <= MAX_WILDCARD_MODELS
    assert any('model="other"' in ln for ln in requests)
    assert any('model="openai/x\\"}1"' in ln for ln in requests)  # escaped
