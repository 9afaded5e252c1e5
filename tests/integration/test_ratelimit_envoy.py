"""Issue #13 end to end: Plano ``ratelimits`` through the real gateway (Envoy + workers).

The official SDKs send requests; recording fake providers answer with known usage. A tenant
over its token budget gets a 429 with Retry-After in its API's own error format and nothing
reaches the provider; other tenants and requests without the header are not limited; the
provider's reported usage is what the budget is charged; budgets are shared by the workers of
one gateway (memory) and by two gateways sharing Redis, which may die and come back.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import (
    FakeOrchestrator,
    FakeProvider,
    Script,
    Usage,
    keyword_router,
    running_providers,
)
from tests.gateway_proc import GatewayProcess
from tests.integration.conftest_affinity import *  # noqa: F403  (pytest fixtures)
from tests.redis_server import RedisServer, evalsha_calls

pytestmark = pytest.mark.integration

GPT = "openai/gpt-4o-mini"
GPT4 = "openai/gpt-4o"
CLAUDE = "anthropic/claude-sonnet-4-20250514"
PROMPT = "w" * 400  # about 110 tokens by the gateway's estimate (the body's size / 4)
ROUTED = "binary search " + "w" * 386  # the fake router LLM sends it to route ``code``
LIMITS = f"""
ratelimits:
  - model: {GPT}
    selector: {{key: x-tenant, value: "*"}}
    limit: {{tokens: 1000, unit: hour}}
  - model: claude
    selector: {{key: x-tenant, value: acme}}
    limit: {{tokens: 250, unit: hour}}
  - model: {GPT4}
    selector: {{key: x-team}}
    limit: {{tokens: 150, unit: second}}
  - model: {GPT}
    selector: {{key: x-probe}}
    limit: {{tokens: 1, unit: hour}}
  - model: {GPT4}
    selector: {{key: x-squad}}
    limit: {{tokens: 150, unit: hour}}
  - model: {GPT}
    selector: {{key: x-busy}}
    limit: {{tokens: 1000000, unit: hour}}
"""


def config(openai_url: str, anthropic_url: str, orch_url: str) -> str:
    return f"""
version: v0.4.0
listeners:
  - {{name: model_listener, type: model, port: 12000, timeout: 30s}}
model_providers:
  - model: {GPT}
    base_url: {openai_url}/v1
    access_key: sk-openai-test
    default: true
  - model: {GPT4}
    base_url: {openai_url}/v1
    access_key: sk-openai-test
  - model: {CLAUDE}
    base_url: {anthropic_url}/v1
    access_key: sk-ant-test
  - model: ollama/Plano-Orchestrator
    base_url: {orch_url}/v1
model_aliases:
  claude: {{target: {CLAUDE}}}
routing_preferences:
  - name: code
    description: writing code
    models: [{GPT4}, {GPT}]
routing:
  router: {{type: orchestrator, model: ollama/Plano-Orchestrator, timeout_ms: 2000}}
{LIMITS}"""


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    with running_providers("openai", "anthropic") as made:
        orch = FakeOrchestrator(decide=keyword_router({"binary search": "code"})).start()
        made["orch"] = orch  # type: ignore[assignment]  # stopped with the providers
        yield made


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeProvider]
) -> Iterator[GatewayProcess]:
    cfg = config(fakes["openai"].base_url, fakes["anthropic"].base_url, fakes["orch"].base_url)
    with GatewayProcess(cfg, tmp_path_factory.mktemp("rl"), workers=2) as g:
        yield g


@pytest.fixture(autouse=True)
def _fresh(fakes: dict[str, FakeProvider]) -> None:
    for name in ("openai", "anthropic"):
        fakes[name].clear()


def oa(gw: GatewayProcess, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key="sk-client", max_retries=0, default_headers=headers
    )


def an(gw: GatewayProcess, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gw.url, api_key="sk-client", max_retries=0, default_headers=headers
    )


def chat(gw: GatewayProcess, model: str = GPT, stream: bool = False, **headers: str) -> str:
    client = oa(gw, **headers)
    messages = [{"role": "user", "content": PROMPT}]
    if stream:
        parts = client.chat.completions.create(model=model, messages=messages, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    reply = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    return reply.headers["x-plano-model"]


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(gw.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    want = set(labels.items())
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and want <= set(s.labels.items())
    )


def eventually(gw: GatewayProcess, name: str, at_least: float, within: float = 15.0) -> None:
    """Wait (bounded) until the gateway's /metrics shows ``name`` >= ``at_least``: workers
    publish some series every 2 s, usage records arrive after the client's answer."""
    deadline = time.monotonic() + within
    while metric(gw, name) < at_least:
        assert time.monotonic() < deadline, f"{name} never reached {at_least}"
        time.sleep(0.1)


def settled(gw: GatewayProcess, limit: str, tokens: float, within: float = 15.0) -> None:
    """Wait until the usage records of the requests sent have charged ``limit`` this much
    (Envoy sends them after the client has its answer)."""
    deadline = time.monotonic() + within
    while metric(gw, "plano_ratelimit_tokens_total", limit=limit) < tokens:
        assert time.monotonic() < deadline, f"{limit} never reached {tokens} tokens"
        time.sleep(0.1)


def test_over_budget_gets_429_in_each_client_format_and_nothing_is_sent(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    ant = fakes["anthropic"]
    # acme's Claude budget is 250 tokens an hour: the provider reports 240 for the first one.
    ant.queue(Script(usage=Usage(prompt=110, completion=130)))
    client = an(gw, **{"x-tenant": "acme"})
    msg = client.messages.create(
        model="claude", max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
    )
    assert msg.content[0].text == "Hello world"
    settled(gw, "claude x-tenant=acme", 240)
    sent = len(ant.requests)
    with pytest.raises(anthropic.RateLimitError) as ae:
        client.messages.create(
            model="claude", max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
        )
    assert ae.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "claude x-tenant=acme" in ae.value.message
    assert int(ae.value.response.headers["retry-after"]) > 60  # 250 an hour refills slowly
    # The same budget refuses an OpenAI-format client of the same tenant and model.
    with pytest.raises(openai.RateLimitError) as oe:
        chat(gw, model="claude", **{"x-tenant": "acme"})
    assert oe.value.code == "rate_limit_exceeded" and oe.value.type == "tokens"
    assert int(oe.value.response.headers["retry-after"]) > 60
    with pytest.raises(openai.RateLimitError) as re_:
        oa(gw, **{"x-tenant": "acme"}).responses.create(model="claude", input=PROMPT)
    assert re_.value.code == "rate_limit_exceeded"
    assert len(ant.requests) == sent  # nothing reached the provider
    # Another tenant, and no tenant header: not limited by acme's budget.
    assert chat(gw, model="claude", **{"x-tenant": "other"}) == CLAUDE
    assert chat(gw, model="claude") == CLAUDE
    assert metric(gw, "plano_ratelimit_rejections_total", limit="claude x-tenant=acme") == 3
    assert metric(gw, "plano_requests_total", status_class="4xx") >= 3


def test_reported_usage_of_streams_is_charged_and_budgets_are_per_value(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    oai = fakes["openai"]
    label = f"{GPT} x-tenant=*"
    before = metric(gw, "plano_ratelimit_tokens_total", limit=label)
    # t-stream's budget is 1000 an hour; the estimate is about 110, the stream reports 990.
    # The client did not ask for usage: the gateway asks the provider and counts it.
    oai.queue(Script(usage=Usage(prompt=100, completion=890)))
    assert chat(gw, stream=True, **{"x-tenant": "t-stream"}) == "Hello world"
    settled(gw, label, before + 990)
    with pytest.raises(openai.RateLimitError):
        chat(gw, **{"x-tenant": "t-stream"})
    # Every distinct value has its own budget: many tenants, each served.
    for i in range(4):
        assert chat(gw, **{"x-tenant": f"t-{i}"}) == GPT


def chat_estimate(gw: GatewayProcess) -> int:
    """What the gateway estimates one ``chat`` request at: a budget of one token refuses it
    and says how many it needs."""
    with pytest.raises(openai.RateLimitError) as e:
        chat(gw, **{"x-probe": "p"})
    found = re.search(r"needs about (\d+) tokens", e.value.message)
    assert found, e.value.message
    return int(found[1])


def test_two_workers_share_one_budget(gw: GatewayProcess, fakes: dict[str, FakeProvider]) -> None:
    """Twelve sequential requests, spread over both workers by Envoy: the budget of 1000
    tokens admits exactly as many estimates as fit, whichever worker checks."""
    fakes["openai"].script = Script(usage=None)  # no usage reported: the estimate stays
    e = chat_estimate(gw)
    fit = int(1000 // e)
    assert 5 <= fit < 12, e
    fakes["openai"].clear()
    fakes["openai"].script = Script(usage=None)
    served = refused = 0
    for _ in range(12):
        try:
            chat(gw, **{"x-tenant": "shared"})
            served += 1
        except openai.RateLimitError:
            refused += 1
    assert (served, refused) == (fit, 12 - fit)
    assert len(fakes["openai"].requests) == fit


def test_routed_request_over_budget_moves_to_the_next_model_and_the_budget_refills(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    """gpt-4o allows team blue 150 tokens a second; a routed request over it is served by
    the route's next model; a direct one waits Retry-After, then passes."""
    fakes["openai"].script = Script(usage=None)
    h = {"x-team": "blue"}
    client = oa(gw, **h)

    def routed_model() -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=GPT4, messages=[{"role": "user", "content": ROUTED}]
        )
        return raw.headers["x-plano-model"]

    assert chat(gw, model=GPT4, **h) == GPT4
    with pytest.raises(openai.RateLimitError) as e:
        chat(gw, model=GPT4, **h)
    assert e.value.response.headers["retry-after"] == "1"
    time.sleep(1.2)  # 150 tokens a second: the window refills
    assert chat(gw, model=GPT4, **h) == GPT4
    assert routed_model() == GPT  # gpt-4o is over budget again: the route's next model


def test_failover_moves_the_charge_to_the_model_that_served(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    """gpt-4o allows squad red 150 tokens an hour: a routed request is admitted there (about
    115 charged), gpt-4o answers 500 and gpt-4o-mini serves it. The usage record gives
    gpt-4o its estimate back, so a request that only fits an unspent budget passes again."""
    h = {"x-squad": "red"}
    fakes["openai"].queue(Script(status=500))  # the first attempt (gpt-4o) fails
    client = oa(gw, **h)
    raw = client.chat.completions.with_raw_response.create(
        model=GPT4, messages=[{"role": "user", "content": ROUTED}]
    )
    assert raw.headers["x-plano-model"] == GPT and raw.headers["x-plano-attempts"] == "2"
    deadline = time.monotonic() + 15
    while True:  # without the refund gpt-4o would be over budget for about an hour
        try:
            assert chat(gw, model=GPT4, **h) == GPT4
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "gpt-4o never got its estimate back"
            time.sleep(0.2)


def test_ready_shows_the_limits(gw: GatewayProcess) -> None:
    ready = httpx.get(gw.worker_admin[0] + "/ready").json()["ratelimits"]
    assert f"{GPT} x-tenant=*" in ready["limits"]
    assert ready["store"]["backend"] in ("memory", "shared-memory")


# --------------------------------------------------------------------------- Redis


def ready_all(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [httpx.get(url + "/ready").json() for url in gw.worker_admin]


def served_alternately(g1: GatewayProcess, g2: GatewayProcess, tenant: str) -> tuple[int, int]:
    """Twelve requests of one tenant, alternating between two gateways: (served, refused)."""
    served = refused = 0
    for i in range(12):
        try:
            chat(g1 if i % 2 else g2, **{"x-tenant": tenant})
            served += 1
        except openai.RateLimitError:
            refused += 1
    return served, refused


def test_two_gateways_share_a_redis_budget_and_survive_its_outage(
    tmp_path: Path, redis_server: RedisServer, fakes: dict[str, FakeProvider]
) -> None:
    extra = f"  session_cache: {{type: redis, url: '{redis_server.url}'}}\n"
    cfg = config(fakes["openai"].base_url, fakes["anthropic"].base_url, fakes["orch"].base_url)
    cfg = cfg.replace("routing:\n", "routing:\n" + extra)
    fakes["openai"].script = Script(usage=None)
    with GatewayProcess(cfg, tmp_path) as g1, GatewayProcess(cfg, tmp_path) as g2:
        fit = int(1000 // chat_estimate(g1))
        assert 5 <= fit < 12
        # Alternating replicas: one budget of 1000 for both.
        assert served_alternately(g1, g2, "redis-shared") == (fit, 12 - fit)
        redis_server.kill()
        # Redis down: fail open, every request served (counted locally), none failed.
        statuses = []
        for i in range(6):
            statuses.append(chat(g1, **{"x-tenant": f"outage-{i}"}))
        assert statuses == [GPT] * 6
        ready = httpx.get(g1.worker_admin[0] + "/ready").json()["ratelimits"]["store"]
        assert ready["healthy"] is False and ready["fallbacks"] >= 1
        eventually(g1, "plano_ratelimit_fail_open_total", 1)
        assert metric(g1, "plano_ratelimit_store_healthy") == 0
        redis_server.restart()  # same port, empty: budgets start full again
        deadline = time.monotonic() + 20
        for g in (g1, g2):
            while not httpx.get(g.worker_admin[0] + "/ready").json()["ratelimits"]["store"][
                "healthy"
            ]:
                assert time.monotonic() < deadline, "the budget store never healed"
                time.sleep(0.2)
        # Enforcement is back, shared again.
        assert served_alternately(g1, g2, "after") == (fit, 12 - fit)
        # A busy tenant: its worker leases budget ahead, so most of its requests skip Redis.
        with redis.Redis.from_url(redis_server.url, socket_timeout=5) as admin:
            before = evalsha_calls(admin)
            for _ in range(40):
                assert chat(g1, **{"x-busy": "b"}) == GPT
            scripts = evalsha_calls(admin) - before
        assert scripts <= 20, scripts  # takes and settlement batches; without leases >= 40
        stores = [w["ratelimits"]["store"] for w in ready_all(g1)]
        assert sum(s["lease_groups"] for s in stores) >= 1
