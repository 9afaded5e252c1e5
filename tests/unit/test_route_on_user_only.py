"""routing.route_on_user_only: agent tool loops stay on the model their user turn chose.

Real pipeline: the orchestrator router talks to a fake router LLM over loopback HTTP (its
recorded requests count the router calls) and the real memory session cache.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import parse_config
from plano_extproc.gateway import Gateway, Immediate, RequestInfo, Upstream
from plano_extproc.metrics import Metrics
from plano_extproc.server.app import build_router
from tests.conftest import SEED_RULES
from tests.fakes import FakeOrchestrator, keyword_router

CODE = "Write a Python function that implements binary search"
PLAIN = "What is the capital of France?"
CLAUDE = "anthropic/claude-sonnet-4-20250514"
TOOLS = [{"type": "function", "function": {"name": "run_tests", "parameters": {}}}]


def config_text(orch_url: str, on: bool) -> str:
    return f"""
version: v0.4.0
listeners: [{{name: m, type: model}}]
model_providers:
  - {{model: openai/gpt-4o-mini, access_key: sk-o, default: true}}
  - {{model: openai/gpt-4o, access_key: sk-o}}
  - {{model: {CLAUDE}, access_key: sk-a}}
  - {{model: ollama/Plano-Orchestrator, base_url: "{orch_url}/v1"}}
routing_preferences:
  - name: code_generation
    description: generating new code
    models: [{CLAUDE}, openai/gpt-4o]
routing:
  route_on_user_only: {str(on).lower()}
  session_cache: {{tenant_header: x-tenant}}
  router: {{type: orchestrator, model: ollama/Plano-Orchestrator, timeout_ms: 1000}}
"""


@pytest.fixture(scope="module")
def orch() -> Iterator[FakeOrchestrator]:
    fake = FakeOrchestrator(decide=keyword_router(SEED_RULES)).start()
    yield fake  # type: ignore[misc]
    fake.stop()


async def make(orch: FakeOrchestrator, on: bool = True) -> tuple[Gateway, MemorySessionCache]:
    cfg = parse_config(config_text(orch.base_url, on))
    router = build_router(cfg)
    cache = MemorySessionCache()
    await router.start()
    await cache.start()
    return Gateway(cfg, router, cache), cache


@pytest.fixture
async def gw(orch: FakeOrchestrator) -> AsyncIterator[Gateway]:
    orch.clear()
    gateway, cache = await make(orch)
    yield gateway
    await gateway.router.close()
    await cache.close()


async def send(
    gw: Gateway, body: dict[str, Any], path: str = "/v1/chat/completions", **headers: str
) -> Upstream | Immediate:
    info = RequestInfo.build({":path": path, ":method": "POST", **headers})
    assert gw.on_headers(info) is None
    return await gw.on_body(info, json.dumps(body).encode())


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": list(messages), "tools": TOOLS}


USER_CODE = {"role": "user", "content": CODE}
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "run_tests"}}],
}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "3 passed"}


async def test_tool_results_replay_the_user_turns_model(
    gw: Gateway, orch: FakeOrchestrator
) -> None:
    first = await send(gw, chat(USER_CODE))
    assert isinstance(first, Upstream) and first.provider.name == CLAUDE
    assert len(orch.requests) == 1
    metrics = gw.telemetry = Metrics(routes=["code_generation"], router="orchestrator")
    for n in range(1, 4):  # several tool steps: no router call, same model and route
        step = await send(gw, chat(USER_CODE, *[CALL, RESULT] * n))
        assert isinstance(step, Upstream)
        assert (step.provider.name, step.route, step.replayed) == (CLAUDE, "code_generation", True)
    assert len(orch.requests) == 1
    replayed = metrics.registry.get_sample_value(
        "plano_routing_decisions_total",
        {"endpoint": "proxy", "router": "orchestrator", "route": "code_generation",
         "outcome": "replayed"},
    )  # fmt: skip
    assert replayed == 3


async def test_a_new_user_turn_is_routed_and_its_choice_replayed_next(
    gw: Gateway, orch: FakeOrchestrator
) -> None:
    await send(gw, chat(USER_CODE))
    history = [USER_CODE, CALL, RESULT, {"role": "assistant", "content": "done"}]
    plain = await send(gw, chat(*history, {"role": "user", "content": PLAIN}))
    assert isinstance(plain, Upstream)
    assert (plain.provider.name, plain.route, plain.replayed) == ("openai/gpt-4o-mini", None, False)
    assert len(orch.requests) == 2
    # The tool loop after that user turn follows the new (no-route) choice.
    after = await send(gw, chat(*history, {"role": "user", "content": PLAIN}, CALL, RESULT))
    assert isinstance(after, Upstream)
    assert (after.provider.name, after.replayed) == ("openai/gpt-4o-mini", True)
    assert len(orch.requests) == 2


async def test_other_conversations_tenants_and_model_lanes_do_not_share(
    gw: Gateway, orch: FakeOrchestrator
) -> None:
    await send(gw, chat(USER_CODE))
    other_first = {"role": "user", "content": CODE + " in Go"}
    cases = [
        (chat(other_first, CALL, RESULT), {}),  # another first user message
        (chat(USER_CODE, CALL, RESULT), {"x-tenant": "acme"}),  # another tenant
        ({**chat(USER_CODE, CALL, RESULT), "model": "openai/gpt-4o"}, {}),  # another lane
        ({**chat(USER_CODE, CALL, RESULT), "tools": []}, {}),  # other tools
    ]
    for i, (body, headers) in enumerate(cases, start=2):
        up = await send(gw, body, **headers)
        assert isinstance(up, Upstream) and up.replayed is False
        assert len(orch.requests) == i  # routed, not replayed


async def test_anthropic_tool_results_and_reminder_only_turns_are_not_user_turns(
    gw: Gateway, orch: FakeOrchestrator
) -> None:
    def messages(*extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": "anthropic/claude-sonnet-4-20250514",
            "max_tokens": 10,
            "system": "You are a coding agent.",
            "tools": [{"name": "bash", "input_schema": {}}],
            "messages": [{"role": "user", "content": CODE}, *extra],
        }

    first = await send(gw, messages(), "/v1/messages")
    assert isinstance(first, Upstream) and first.provider.name == CLAUDE
    use = {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "bash"}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}
    reminder = {"role": "user", "content": "<system-reminder>\nfiles changed\n</system-reminder>"}
    for extra in ([use, result], [use, result, reminder]):
        step = await send(gw, messages(*extra), "/v1/messages")
        assert isinstance(step, Upstream) and step.replayed is True
    assert len(orch.requests) == 1


async def test_decision_endpoint_replays_too(gw: Gateway, orch: FakeOrchestrator) -> None:
    path = "/routing/v1/chat/completions"
    first = await send(gw, chat(USER_CODE), path)
    assert isinstance(first, Immediate)
    assert json.loads(first.body)["models"] == [CLAUDE, "openai/gpt-4o"]
    step = await send(gw, chat(USER_CODE, CALL, RESULT), path)
    assert isinstance(step, Immediate)
    data = json.loads(step.body)
    assert (data["models"], data["route"]) == ([CLAUDE], "code_generation")
    assert len(orch.requests) == 1


async def test_explicit_affinity_header_keeps_the_classic_pin(
    gw: Gateway, orch: FakeOrchestrator
) -> None:
    first = await send(gw, chat(USER_CODE), **{"x-model-affinity": "s1"})
    again = await send(gw, chat(USER_CODE, CALL, RESULT, {"role": "user", "content": PLAIN}),
                       **{"x-model-affinity": "s1"})  # fmt: skip
    assert isinstance(first, Upstream) and isinstance(again, Upstream)
    assert again.provider.name == CLAUDE and again.pinned is True
    assert len(orch.requests) == 1


async def test_off_by_default_every_turn_is_routed(orch: FakeOrchestrator) -> None:
    orch.clear()
    gateway, cache = await make(orch, on=False)
    try:
        await send(gateway, chat(USER_CODE))
        step = await send(gateway, chat(USER_CODE, CALL, RESULT))
        assert isinstance(step, Upstream) and step.replayed is False
        assert len(orch.requests) == 2
    finally:
        await gateway.router.close()
        await cache.close()
