"""route_on_user_only through real Envoy with the OpenAI SDK driving a tool loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import orchestrated_seed_config
from tests.fakes import FakeOrchestrator, FakeProvider
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

CODE = "Write a Python function that implements binary search"


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> Iterator[GatewayProcess]:
    cfg = orchestrated_seed_config(
        openai_fake.base_url,
        anthropic_fake.base_url,
        orchestrator_fake.base_url,
        routing_extra="  route_on_user_only: true",
    )
    with GatewayProcess(cfg, tmp_path_factory.mktemp("rouo")) as g:
        yield g


def test_sdk_tool_loop_stays_on_the_routed_model(
    gw: GatewayProcess, openai_fake: FakeProvider, orchestrator_fake: FakeOrchestrator
) -> None:
    orchestrator_fake.clear()
    openai_fake.clear()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)
    tools: Any = [{"type": "function", "function": {"name": "run", "parameters": {}}}]
    messages: list[Any] = [{"role": "user", "content": "Explain the trade-offs of SQL vs NoSQL"}]
    client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    assert openai_fake.last().json["model"] == "gpt-4o"  # complex_reasoning's first model
    assert len(orchestrator_fake.requests) == 1
    for i in range(3):
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": "run", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": "ok"},
        ]  # fmt: skip
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
        assert openai_fake.last().json["model"] == "gpt-4o"
    assert len(orchestrator_fake.requests) == 1  # tool turns did not call the router
    messages.append({"role": "user", "content": CODE})  # the user speaks: routed again
    client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    assert len(orchestrator_fake.requests) == 2
