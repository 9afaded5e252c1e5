"""Shared fixtures: recording fake providers, a fake router LLM, config builders."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes import FakeOrchestrator, FakeProvider, keyword_router

SEED_RULES = {
    "binary search": "code_generation",
    "python function": "code_generation",
    "rest api": "code_generation",
    "react component": "code_generation",
    "quicksort": "code_generation",
    "trade-offs": "complex_reasoning",
    "explain": "complex_reasoning",
}


@pytest.fixture(scope="session")
def openai_fake() -> Iterator[FakeProvider]:
    fake = FakeProvider("openai").start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def anthropic_fake() -> Iterator[FakeProvider]:
    fake = FakeProvider("anthropic").start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def orchestrator_fake() -> Iterator[FakeOrchestrator]:
    fake = FakeOrchestrator(decide=keyword_router(SEED_RULES)).start()
    yield fake  # type: ignore[misc]
    fake.stop()


def seed_config(
    openai_url: str,
    anthropic_url: str,
    *,
    router: str = "",
    extra_providers: str = "",
    routing_extra: str = "",
) -> str:
    """The seed demo's config, with providers pointed at the fakes."""
    return f"""
version: v0.4.0
listeners:
  - name: model_listener
    type: model
    port: 12000
    timeout: 30s
model_providers:
  - model: openai/gpt-4o-mini
    base_url: {openai_url}/v1
    access_key: sk-openai-test
    default: true
  - model: openai/gpt-4o
    base_url: {openai_url}/v1
    access_key: sk-openai-test
  - model: anthropic/claude-sonnet-4-20250514
    base_url: {anthropic_url}/v1
    access_key: sk-ant-test
{extra_providers}
model_aliases:
  fast-model:
    target: openai/gpt-4o-mini
routing_preferences:
  - name: complex_reasoning
    description: complex reasoning tasks, multi-step analysis, or detailed explanations
    models: [openai/gpt-4o, openai/gpt-4o-mini]
  - name: code_generation
    description: generating new code, writing functions, or creating boilerplate
    models: [anthropic/claude-sonnet-4-20250514, openai/gpt-4o]
routing:
  session_ttl_seconds: 600
{routing_extra}
{router}
"""


def orchestrated_seed_config(
    openai_url: str,
    anthropic_url: str,
    orch_url: str,
    *,
    timeout_ms: int = 1000,
    routing_extra: str = "",
) -> str:
    """The seed demo's config routed by the orchestrator router, served by the fake router
    LLM at ``orch_url`` (declared as the provider ollama/Plano-Orchestrator)."""
    provider = f"""  - model: ollama/Plano-Orchestrator
    base_url: {orch_url}/v1
"""
    router = f"""  router:
    type: orchestrator
    model: ollama/Plano-Orchestrator
    timeout_ms: {timeout_ms}
"""
    return seed_config(
        openai_url,
        anthropic_url,
        extra_providers=provider,
        router=router,
        routing_extra=routing_extra,
    )
