"""selection_policy ranking: catalog parsing, ranking, config rules, and fetching from a real
HTTP server on 127.0.0.1 (refresh, failure keeps the last numbers)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from plano_extproc.config import ConfigError, MetricsSourceConfig, parse_config
from plano_extproc.model_metrics import (
    ModelMetrics,
    parse_digitalocean,
    parse_models_dev,
    parse_prometheus,
    rank,
)
from tests.fakes import FakeMetrics

HEAD = """
version: v0.4.0
listeners: [{name: m, type: model, port: 12000}]
routing: {router: {type: none}}
model_providers:
  - {model: openai/gpt-4o, access_key: k, default: true}
  - {model: openai/gpt-4o-mini, access_key: k}
routing_preferences:
  - name: r
    description: d
    models: [openai/gpt-4o, openai/gpt-4o-mini]
    selection_policy: {prefer: cheapest}
"""


# --------------------------------------------------------------------------- parsing


def test_digitalocean_catalog_sums_input_and_output_and_applies_aliases() -> None:
    doc = {
        "data": [
            {
                "model_id": "openai-gpt-4o",
                "pricing": {"input_price_per_million": 2.5, "output_price_per_million": 10},
            },
            {"model_id": "llama3-8b", "pricing": {"input_price_per_million": 0.2}},
            {"model_id": "no-pricing"},
            {"pricing": {"input_price_per_million": 1}},  # no model_id
        ]
    }
    out = parse_digitalocean(doc, {"openai-gpt-4o": "openai/gpt-4o"})
    assert out == {"openai/gpt-4o": 12.5, "llama3-8b": 0.2}
    with pytest.raises(ValueError):
        parse_digitalocean({"models": []}, {})


def test_models_dev_keys_provider_slash_model_and_bare_ids() -> None:
    doc = {
        "openai": {"models": {"gpt-4o": {"cost": {"input": 2.5, "output": 10}}}},
        "azure": {"models": {"gpt-4o": {"cost": {"input": 5, "output": 15}}}},
        "anthropic": {
            "models": {
                "claude-x": {"cost": {"input": 3}},  # no output price: skipped
                "claude-y": {"name": "no cost"},
            }
        },
        "broken": "not an object",
    }
    out = parse_models_dev(doc, {"azure/gpt-4o": "my-azure"})
    assert out["openai/gpt-4o"] == 12.5
    assert out["my-azure"] == 20
    assert out["gpt-4o"] == 12.5  # first provider listing the bare id wins
    assert "anthropic/claude-x" not in out and "claude-y" not in out


def test_prometheus_vector_by_model_name_label() -> None:
    doc = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"model_name": "openai/gpt-4o"}, "value": [1.0, "0.8"]},
                {"metric": {"model_name": "openai/gpt-4o-mini"}, "value": [1.0, "0.3"]},
                {"metric": {"model_name": "x"}, "value": [1.0, "NaN"]},
                {"metric": {"job": "no-model-label"}, "value": [1.0, "1"]},
            ],
        },
    }
    assert parse_prometheus(doc) == {"openai/gpt-4o": 0.8, "openai/gpt-4o-mini": 0.3}
    with pytest.raises(ValueError, match="bad_data"):
        parse_prometheus({"status": "error", "errorType": "bad_data", "error": "bad_data"})


def test_rank_ascending_then_unknown_in_configured_order() -> None:
    data = {"b": 2.0, "c": 1.0, "dup1": 5.0, "dup2": 5.0}
    assert rank(["a", "b", "c", "d"], data, {}) == ["c", "b", "a", "d"]
    assert rank(["dup2", "dup1"], data, {}) == ["dup2", "dup1"]  # ties keep their order
    assert rank(["x", "y"], {}, {}) == ["x", "y"]
    # Falls back to the provider's model id.
    assert rank(["openai/gpt-4o", "z"], {"gpt-4o": 1.0, "z": 2.0}, {"openai/gpt-4o": "gpt-4o"}) == [
        "openai/gpt-4o",
        "z",
    ]


# --------------------------------------------------------------------------- config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    return e.value.problems


def test_cost_source_defaults_and_fields() -> None:
    cfg = parse_config(
        HEAD
        + "model_metrics_sources:\n"
        + "  - {type: cost, provider: models.dev, refresh_interval: 60,"
        + " model_aliases: {openai/gpt-4o: gpt4o}}\n"
    )
    assert cfg.metrics_sources == (
        MetricsSourceConfig(
            type="cost",
            provider="models.dev",
            url="https://models.dev/api.json",
            refresh_seconds=60,
            aliases={"openai/gpt-4o": "gpt4o"},
        ),
    )
    cfg = parse_config(HEAD + "model_metrics_sources: [{type: cost, provider: digitalocean}]\n")
    assert cfg.metrics_sources[0].url == "https://api.digitalocean.com/v2/gen-ai/models/catalog"


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ("[{type: cost, provider: openrouter}]", "model_metrics_sources[0].provider: 'openrouter'"),
        ("[{type: latency, provider: datadog}]", "model_metrics_sources[0].provider: 'datadog'"),
        (
            "[{type: cost, provider: models.dev}, {type: latency, provider: prometheus}]",
            "model_metrics_sources[1]: a prometheus latency source needs url and query",
        ),
        (
            "[{type: cost, provider: models.dev}, {type: cost, provider: digitalocean}]",
            "model_metrics_sources[1].type: only one cost source is allowed",
        ),
        (
            "[{type: cost, provider: models.dev, url: 'ftp://x'}]",
            "model_metrics_sources[0].url: 'ftp://x' must be an http:// or https:// URL",
        ),
        (
            "[{type: cost, provider: models.dev, refresh_interval: 0}]",
            "model_metrics_sources[0].refresh_interval: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_sources_are_named(sources: str, expected: str) -> None:
    found = problems(HEAD + f"model_metrics_sources: {sources}\n")
    assert any(p.startswith(expected) for p in found), found


# --------------------------------------------------------------------------- fetching


@pytest.fixture
def fake() -> Iterator[FakeMetrics]:
    f = FakeMetrics().start()
    yield f
    f.stop()


def source(fake: FakeMetrics, kind: str, refresh: int | None = None) -> MetricsSourceConfig:
    if kind == "digitalocean":
        return MetricsSourceConfig("cost", "digitalocean", fake.base_url + "/catalog",
                                   refresh_seconds=refresh)  # fmt: skip
    if kind == "models.dev":
        return MetricsSourceConfig("cost", "models.dev", fake.base_url + "/api.json",
                                   refresh_seconds=refresh)  # fmt: skip
    return MetricsSourceConfig("latency", "prometheus", fake.base_url,
                               query='avg by (model_name) (ttft_seconds)',
                               refresh_seconds=refresh)  # fmt: skip


async def test_fetches_ranks_and_reports(fake: FakeMetrics) -> None:
    fake.cost = {"openai/gpt-4o": 12.5, "openai/gpt-4o-mini": 0.75}
    fake.latency = {"openai/gpt-4o": 0.4, "openai/gpt-4o-mini": 0.9}
    metrics = ModelMetrics([source(fake, "digitalocean"), source(fake, "prometheus")])
    await metrics.start()
    try:
        models = ["openai/gpt-4o", "openai/gpt-4o-mini"]
        assert metrics.ranked(models, "cheapest", {}) == ["openai/gpt-4o-mini", "openai/gpt-4o"]
        assert metrics.ranked(models, "fastest", {}) == models
        assert metrics.ranked(models, "none", {}) == models
        query = next(r for r in fake.requests if r.path == "/api/v1/query")
        assert "model_name" in query.query and query.query.startswith("query=")
        health = {h["type"]: h for h in metrics.health()}
        assert health["cost"]["models"] == 2 and health["cost"]["error"] is None
        assert health["latency"]["models"] == 2
    finally:
        await metrics.close()


async def test_refresh_updates_and_failures_keep_the_last_numbers(fake: FakeMetrics) -> None:
    fake.models_dev = {
        "openai": {
            "models": {
                "gpt-4o": {"cost": {"input": 1, "output": 1}},
                "gpt-4o-mini": {"cost": {"input": 2, "output": 2}},
            }
        }
    }
    metrics = ModelMetrics([source(fake, "models.dev", refresh=1)])
    await metrics.start()
    models = ["openai/gpt-4o-mini", "openai/gpt-4o"]
    try:
        assert metrics.ranked(models, "cheapest", {}) == ["openai/gpt-4o", "openai/gpt-4o-mini"]
        fake.models_dev["openai"]["models"]["gpt-4o"]["cost"]["input"] = 10
        for _ in range(50):  # bounded: the refresher runs every second
            if metrics.ranked(models, "cheapest", {})[0] == "openai/gpt-4o-mini":
                break
            await asyncio.sleep(0.1)
        assert metrics.ranked(models, "cheapest", {}) == models
        fake.fail_status = 503
        before = len(fake.requests)
        for _ in range(50):
            if metrics.health()[0]["error"]:
                break
            await asyncio.sleep(0.1)
        assert len(fake.requests) > before
        assert metrics.health()[0]["error"] == "RuntimeError: HTTP 503"
        assert metrics.ranked(models, "cheapest", {}) == models  # last good numbers kept
    finally:
        await metrics.close()


async def test_unreachable_source_at_start_is_not_fatal() -> None:
    cfg = MetricsSourceConfig("cost", "models.dev", "http://127.0.0.1:9/api.json")
    metrics = ModelMetrics([cfg])
    await metrics.start()
    try:
        assert metrics.health()[0]["models"] == 0
        assert metrics.health()[0]["error"]
        assert metrics.ranked(["a", "b"], "cheapest", {}) == ["a", "b"]
    finally:
        await metrics.close()
