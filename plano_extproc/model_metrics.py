"""Cost and latency numbers for ``selection_policy.prefer: cheapest | fastest``.

Plano's ``model_metrics_sources``: a cost catalog (DigitalOcean's Gen-AI catalog or
models.dev, input + output $/M tokens) and a Prometheus instant query for latency (one series
per model, labelled ``model_name``). A matched route's models are ranked by ascending metric;
models without a number keep their configured order after the ranked ones.

Unlike Plano, a failed refresh keeps the last good numbers (Plano empties them, which silently
turns ranking off until the next good fetch) and is visible on ``/ready``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from plano_extproc.config import PREFER_METRIC, MetricsSourceConfig

log = logging.getLogger("plano_extproc.model_metrics")

FETCH_TIMEOUT_SECONDS = 10.0


# --------------------------------------------------------------------------- parsing (pure)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        out = float(value)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def parse_digitalocean(doc: Any, aliases: Mapping[str, str]) -> dict[str, float]:
    """``{"data": [{"model_id", "pricing": {"input_price_per_million", ...}}]}``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError("expected an object with a 'data' list")
    out: dict[str, float] = {}
    for item in doc["data"]:
        if not isinstance(item, dict) or not isinstance(item.get("model_id"), str):
            continue
        pricing = item.get("pricing")
        if not isinstance(pricing, dict):
            continue
        cost_in = _number(pricing.get("input_price_per_million")) or 0.0
        cost_out = _number(pricing.get("output_price_per_million")) or 0.0
        key = item["model_id"]
        out[aliases.get(key, key)] = cost_in + cost_out
    return out


def parse_models_dev(doc: Any, aliases: Mapping[str, str]) -> dict[str, float]:
    """``{provider: {"models": {model: {"cost": {"input", "output"}}}}}``, keyed
    ``provider/model`` (and the bare model id when no other provider claimed it)."""
    if not isinstance(doc, dict):
        raise ValueError("expected an object keyed by provider id")
    out: dict[str, float] = {}
    bare: dict[str, float] = {}
    for provider_id, provider in doc.items():
        models = provider.get("models") if isinstance(provider, dict) else None
        if not isinstance(models, dict):
            continue
        for model_id, model in models.items():
            cost = model.get("cost") if isinstance(model, dict) else None
            if not isinstance(cost, dict):
                continue
            cost_in, cost_out = _number(cost.get("input")), _number(cost.get("output"))
            if cost_in is None or cost_out is None:
                continue
            key = f"{provider_id}/{model_id}"
            out[aliases.get(key, key)] = cost_in + cost_out
            bare.setdefault(model_id, cost_in + cost_out)
    for model_id, total in bare.items():
        out.setdefault(model_id, total)
    return out


def parse_prometheus(doc: Any) -> dict[str, float]:
    """An instant-query vector: ``data.result[].metric.model_name`` -> ``value[1]``."""
    data = doc.get("data") if isinstance(doc, dict) else None
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list):
        status = doc.get("status") if isinstance(doc, dict) else None
        error = doc.get("error") if isinstance(doc, dict) else None
        raise ValueError(f"not a Prometheus query result (status={status!r}, error={error!r})")
    out: dict[str, float] = {}
    for series in result:
        if not isinstance(series, dict):
            continue
        labels, value = series.get("metric"), series.get("value")
        name = labels.get("model_name") if isinstance(labels, dict) else None
        if not isinstance(name, str) or not isinstance(value, list) or len(value) != 2:
            continue
        number = _number(value[1])
        if number is not None:
            out[name] = number
    return out


def rank(models: Sequence[str], data: Mapping[str, float], ids: Mapping[str, str]) -> list[str]:
    """Ascending by metric; models without one keep their order, after the ranked ones.

    A model is looked up by its configured name, then by its provider model id (``ids``),
    so ``openai/gpt-4o`` finds a models.dev ``gpt-4o`` entry.
    """
    known: list[tuple[float, int, str]] = []
    unknown: list[str] = []
    for i, m in enumerate(models):
        value = data.get(m)
        if value is None and m in ids:
            value = data.get(ids[m])
        if value is None:
            unknown.append(m)
        else:
            known.append((value, i, m))
    known.sort()
    return [m for _, _, m in known] + unknown


# --------------------------------------------------------------------------- store + fetcher


@dataclass
class SourceState:
    config: MetricsSourceConfig
    data: dict[str, float]
    fetched_at: float | None = None  # time.time() of the last good fetch
    error: str | None = None  # the last failure, cleared by a good fetch

    def health(self) -> dict[str, Any]:
        return {
            "type": self.config.type,
            "provider": self.config.provider,
            "url": self.config.url,
            "models": len(self.data),
            "age_seconds": None
            if self.fetched_at is None
            else round(time.time() - self.fetched_at, 1),
            "error": self.error,
        }


class ModelMetrics:
    """Holds the latest numbers per source and refreshes them in the background."""

    def __init__(self, sources: Sequence[MetricsSourceConfig], ca_file: str | None = None) -> None:
        self.sources: dict[str, SourceState] = {s.type: SourceState(s, {}) for s in sources}
        self.ca_file = ca_file  # overrides.upstream_tls_ca_path, as for providers
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def ranked(self, models: Sequence[str], prefer: str, ids: Mapping[str, str]) -> list[str]:
        state = self.sources.get(PREFER_METRIC.get(prefer, ""))
        if state is None:
            return list(models)
        return rank(models, state.data, ids)

    def health(self) -> list[dict[str, Any]]:
        return [s.health() for s in self.sources.values()]

    async def start(self) -> None:
        """First fetch of every source (a failure is logged, not fatal), then refreshers."""
        if not self.sources:
            return
        tls: ssl.SSLContext | bool = True
        if self.ca_file is not None:
            tls = ssl.create_default_context(cafile=self.ca_file)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS),
            connector=aiohttp.TCPConnector(ssl=tls),
        )
        await asyncio.gather(*(self.refresh(s) for s in self.sources.values()))
        for state in self.sources.values():
            if state.config.refresh_seconds:
                self._tasks.append(asyncio.create_task(self._refresh_loop(state)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _refresh_loop(self, state: SourceState) -> None:
        assert state.config.refresh_seconds
        while True:
            await asyncio.sleep(state.config.refresh_seconds)
            await self.refresh(state)

    async def refresh(self, state: SourceState) -> None:
        cfg = state.config
        try:
            data = await self._fetch(cfg)
        except Exception as e:  # network, HTTP status, JSON or shape: keep the last numbers
            state.error = f"{type(e).__name__}: {e}"[:300]
            log.warning(
                "%s metrics from %s failed (%s); keeping %d known models",
                cfg.type,
                cfg.url,
                state.error,
                len(state.data),
            )
            return
        state.data, state.fetched_at, state.error = data, time.time(), None
        log.info("%s metrics: %d models from %s", cfg.type, len(data), cfg.provider)

    async def _fetch(self, cfg: MetricsSourceConfig) -> dict[str, float]:
        assert self._session is not None
        if cfg.type == "latency":
            url = cfg.url.rstrip("/") + "/api/v1/query"
            params = {"query": cfg.query or ""}
        else:
            url, params = cfg.url, {}
        async with self._session.get(url, params=params) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            doc = await resp.json(content_type=None)
        if cfg.type == "latency":
            return parse_prometheus(doc)
        if cfg.provider == "digitalocean":
            return parse_digitalocean(doc, cfg.aliases)
        return parse_models_dev(doc, cfg.aliases)
