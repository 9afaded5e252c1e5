"""Router inputs and router failures through the real gateway (issue 11, items 1, 3, 7, 11).

Hostile inline route names and oversize inline sets are a 400 in the client's error envelope; a
router that fails in any way (echoes its credential, answers in the wrong shape, nests 100,000
deep, takes too long on a heavy inline set) fails open: the requested model is served and the
decision carries a short ``router_error`` that quotes nothing from the router.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import seed_config
from tests.fakes import FakeOrchestrator, FakeProvider
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

ROUTER_KEY = "sk-router-SECRET-4711"
HOSTILE = "code\r\nX-Route-Injected: yes"


def first_route(prompt: str) -> str | None:
    """A router model that always picks the first route it is offered (the hostile one)."""
    block = prompt.split("<routes>\n", 1)[1].split("\n</routes>", 1)[0]
    return str(json.loads(block.splitlines()[0])["name"])


@pytest.fixture(scope="module")
def orch() -> Iterator[FakeOrchestrator]:
    fake = FakeOrchestrator(decide=first_route).start()
    yield fake  # type: ignore[misc]
    fake.stop()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orch: FakeOrchestrator,
) -> Iterator[GatewayProcess]:
    provider = f"""  - model: ollama/Plano-Orchestrator
    base_url: {orch.base_url}/v1
    access_key: {ROUTER_KEY}
"""
    router = "  router:\n    type: orchestrator\n    model: ollama/Plano-Orchestrator\n"
    cfg = seed_config(
        openai_fake.base_url, anthropic_fake.base_url, extra_providers=provider, router=router
    )
    # debug logging: nothing the router sends back may reach the log at any level
    with GatewayProcess(
        cfg, tmp_path_factory.mktemp("rh"), extra_args=["--log-level", "debug"]
    ) as g:
        yield g


@pytest.fixture(autouse=True)
def _reset(openai_fake: FakeProvider, anthropic_fake: FakeProvider, orch: FakeOrchestrator) -> None:
    openai_fake.clear()
    anthropic_fake.clear()
    orch.clear()
    orch.mode = "ok"


def post(g: GatewayProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(g.url + path, json=body, timeout=30)


def ask(text: str = "Write a Python function that implements binary search") -> dict[str, Any]:
    return {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def inline(name: str, description: str = "writing code") -> dict[str, Any]:
    return {"name": name, "description": description, "models": ["openai/gpt-4o"]}


@pytest.mark.parametrize(
    "form",
    [
        lambda n: {"routing_preferences": [inline(n)]},
        lambda n: {
            "routing_policy": [
                {"model": "openai/gpt-4o", "routing_preferences": [{"name": n, "description": "d"}]}
            ]
        },
    ],
    ids=["routing_preferences", "routing_policy"],
)
@pytest.mark.parametrize(
    "name", [HOSTILE, "code\r\n\r\nHTTP/1.1 200 OK\r\nX-Route-Injected: yes", "x" * 129]
)
def test_hostile_inline_route_names_are_a_400_and_inject_nothing(
    gw: GatewayProcess, openai_fake: FakeProvider, name: str, form: Any
) -> None:
    r = post(gw, "/v1/chat/completions", {**ask(), **form(name)})
    assert r.status_code == 400, (r.status_code, dict(r.headers), r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert ".name " in error["message"]
    assert "x-route-injected" not in r.headers and "x-plano-route" not in r.headers
    assert openai_fake.requests == []


def test_printable_route_name_is_routed_and_reported(
    gw: GatewayProcess, openai_fake: FakeProvider
) -> None:
    name = "code gen: c++/{x}"
    r = post(gw, "/v1/chat/completions", {**ask(), "routing_preferences": [inline(name)]})
    assert r.status_code == 200, r.text
    assert r.headers["x-plano-route"] == name
    assert openai_fake.last().json["model"] == "gpt-4o"
    # Any language: non-ASCII arrives percent-encoded (UTF-8), never as mangled bytes.
    r = post(gw, "/v1/chat/completions", {**ask(), "routing_preferences": [inline("código")]})
    assert r.status_code == 200, r.text
    assert r.headers["x-plano-route"] == "c%C3%B3digo"


def test_oversize_inline_sets_are_a_400_through_the_sdk(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    phrases = ", ".join(f"task number {i}" for i in range(40))
    cases = {
        "routing_preferences has 100 entries; at most 32": [
            inline(f"r{i}", phrases) for i in range(100)
        ],
        "routing_preferences[0].description is too long (2000 characters; at most 1024)": [
            inline("r", "x" * 2000)
        ],
        "inline routing preferences are too large": [inline(f"r{i}", "y" * 1000) for i in range(9)],
    }
    for message, prefs in cases.items():
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"routing_preferences": prefs},
            )
        assert message in ei.value.message
    r = post(gw, "/routing/v1/chat/completions", {**ask(), "routing_preferences": cases[message]})
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_router_echoing_its_credential_fails_open_without_the_credential(
    gw: GatewayProcess, orch: FakeOrchestrator, openai_fake: FakeProvider
) -> None:
    orch.mode = "echo_auth"
    r = post(gw, "/routing/v1/chat/completions", ask())
    assert r.status_code == 200, r.text
    assert r.json()["router_error"] == "router returned HTTP 401"
    assert r.json()["models"] == ["none"]
    assert orch.last().headers["authorization"] == f"Bearer {ROUTER_KEY}"  # it was sent...
    r = post(gw, "/v1/chat/completions", ask())
    assert r.status_code == 200 and openai_fake.last().json["model"] == "gpt-4o-mini"
    assert ROUTER_KEY not in r.text
    assert "router returned HTTP 401" in gw.output()
    assert ROUTER_KEY not in gw.output()  # ...and is echoed nowhere


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"choices": {"0": {"message": {"content": "{}"}}}}', "unexpected shape"),
        (b'{"choices": [{"message": {"content": {"route": "code"}}}]}', "unexpected shape"),
        (b'{"choices": "' + ROUTER_KEY.encode() + b'"}', "unexpected shape"),
        (DEEP, "nested too deeply"),
        (b'{"choices": [{"message": {"content": "' + DEEP + b'"}}]}', "nested too deeply"),
        (b"1" * 5000, "not valid JSON"),
        (b"x" * (2 << 20), "larger than 1048576 bytes"),
    ],
    ids=["choices-object", "content-object", "choices-string", "deep", "deep-content", "digits",
         "2MiB"],
)  # fmt: skip
def test_wrong_shaped_router_replies_fail_open_with_a_short_reason(
    gw: GatewayProcess, orch: FakeOrchestrator, openai_fake: FakeProvider, raw: bytes, reason: str
) -> None:
    orch.mode = "raw"
    orch.raw_reply = raw
    r = post(gw, "/routing/v1/chat/completions", ask())
    assert r.status_code == 200, (r.status_code, r.text[:300])
    body = r.json()
    assert reason in body["router_error"] and body["route"] is None
    assert ROUTER_KEY not in r.text
    r = post(gw, "/v1/chat/completions", ask())
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert openai_fake.last().json["model"] == "gpt-4o-mini"


@pytest.fixture(scope="module")
def egw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
) -> Iterator[GatewayProcess]:
    router = "  router:\n    type: embedded\n    timeout_ms: 100\n"
    cfg = seed_config(openai_fake.base_url, anthropic_fake.base_url, router=router)
    with GatewayProcess(cfg, tmp_path_factory.mktemp("rhe")) as g:
        yield g


def heavy_set(seed: int) -> list[dict[str, Any]]:
    """32 routes x 20 short phrases: inside the limits (~7 K characters), ~1,300 texts to embed."""
    return [inline(f"r{r}", ", ".join(f"j{seed} k{r} i{p}" for p in range(20))) for r in range(32)]


def test_embedded_router_fails_open_on_a_heavy_inline_set_at_its_deadline(
    egw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    body = {**ask("Write a Python function"), "routing_preferences": heavy_set(1)}
    assert sum(len(p["name"]) + len(p["description"]) for p in body["routing_preferences"]) < 8192
    r = post(egw, "/routing/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["router_error"] == "embedded router timed out after 100 ms"
    assert r.json()["models"] == ["none"]
    client = openai.OpenAI(base_url=egw.url + "/v1", api_key="k", max_retries=0)
    client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "Write a Python function"}],
        extra_body={"routing_preferences": heavy_set(2)},
    )
    assert openai_fake.last().json["model"] == "gpt-4o-mini"  # the requested model
    # The configured routes keep routing on the same worker.
    r = post(egw, "/routing/v1/chat/completions", ask())
    assert r.status_code == 200 and r.json()["route"] == "code_generation", r.text
    assert "router_error" not in r.json()


def test_embedded_router_survives_lone_surrogates(egw: GatewayProcess) -> None:
    raw = (
        b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": '
        b'"hi \\ud83d Write a Python function that implements binary search \\udc00"}]}'
    )
    r = httpx.post(
        egw.url + "/routing/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert "router_error" not in r.json() and r.json()["route"] == "code_generation"
