"""selection_policy through real Envoy: a route's models ranked by a cost catalog."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import orchestrated_seed_config
from tests.fakes import FakeMetrics, FakeOrchestrator, FakeProvider
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

CODE = "Write a Python function that implements binary search"
CLAUDE = "anthropic/claude-sonnet-4-20250514"


@pytest.fixture(scope="module")
def metrics_fake() -> Iterator[FakeMetrics]:
    fake = FakeMetrics().start()
    # DigitalOcean-style catalog ids, mapped to our model names with model_aliases.
    fake.cost = {"anthropic-claude-sonnet-4": 18.0, "openai-gpt-4o": 12.5}
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
    metrics_fake: FakeMetrics,
) -> Iterator[GatewayProcess]:
    cfg = orchestrated_seed_config(
        openai_fake.base_url, anthropic_fake.base_url, orchestrator_fake.base_url
    )
    routes = f"    models: [{CLAUDE}, openai/gpt-4o]\n"
    assert routes in cfg
    cfg = cfg.replace(routes, routes + "    selection_policy: {prefer: cheapest}\n")
    cfg += f"""
model_metrics_sources:
  - type: cost
    provider: digitalocean
    url: {metrics_fake.base_url}/catalog
    model_aliases:
      anthropic-claude-sonnet-4: {CLAUDE}
      openai-gpt-4o: openai/gpt-4o
"""
    with GatewayProcess(cfg, tmp_path_factory.mktemp("sel")) as g:
        yield g


def test_decision_lists_route_models_cheapest_first(gw: GatewayProcess) -> None:
    resp = httpx.post(
        gw.url + "/routing/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": CODE}]},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["route"] == "code_generation"
    assert data["models"] == ["openai/gpt-4o", CLAUDE]  # configured order is the reverse


def test_proxy_dispatches_the_cheapest_route_model(
    gw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    openai_fake.clear()
    anthropic_fake.clear()
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": CODE}]},
        headers={"authorization": "Bearer client"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert openai_fake.last().json["model"] == "gpt-4o"
    assert not anthropic_fake.requests


def test_ready_reports_the_metrics_source(gw: GatewayProcess, metrics_fake: FakeMetrics) -> None:
    [source] = httpx.get(gw.worker_admin[0] + "/ready").json()["model_metrics"]
    assert source["type"] == "cost" and source["provider"] == "digitalocean"
    assert source["models"] == 2 and source["error"] is None
    assert any(r.path == "/catalog" for r in metrics_fake.requests)
