"""Rate limits without Envoy: config, the prompt estimate, admission and settlement over the
real shared-budget store (injected clock), and the gateway's 429 in each client API's format."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest

from plano_extproc.config import Config, ConfigError, parse_config
from plano_extproc.errors import RateLimitError
from plano_extproc.gateway import Gateway, Immediate, RequestInfo, Upstream
from plano_extproc.metrics import Metrics
from plano_extproc.ratelimit.budget import Bucket
from plano_extproc.ratelimit.estimate import (
    MEDIA_TOKENS,
    TOKENS_PER_MESSAGE,
    estimate,
    prompt_tokens,
)
from plano_extproc.ratelimit.limiter import Admitted, RateLimiter, Refused, limit_id
from plano_extproc.ratelimit.memory import SharedBudgets
from plano_extproc.routing.base import NullRouter, RouterResult
from tests.unit.test_metrics import samples

BASE = """
version: v0.4.0
listeners: [{name: m, type: model}]
model_providers:
  - model: openai/gpt-4o
    access_key: sk-o
    default: true
  - model: openai/gpt-4o-mini
    access_key: sk-o
  - model: anthropic/claude-sonnet-4-20250514
    access_key: sk-a
  - model: vllm/*
    base_url: http://127.0.0.1:9/v1
    provider_interface: openai
model_aliases:
  fast: {target: openai/gpt-4o-mini}
  claude: {target: anthropic/claude-sonnet-4-20250514}
routing_preferences:
  - name: code
    description: writing code
    models: [openai/gpt-4o, anthropic/claude-sonnet-4-20250514]
"""


def cfg(limits: str, extra: str = "") -> Config:
    return parse_config(BASE + extra + "ratelimits:\n" + limits)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


# ---------------------------------------------------------------- config


def test_config_names_models_aliases_ids_and_wildcards() -> None:
    c = cfg("""
  - {model: gpt-4o, selector: {key: X-Tenant, value: "*"}, limit: {tokens: 100, unit: minute}}
  - {model: fast, selector: {key: x-tenant, value: acme}, limit: {tokens: 5, unit: day}}
  - {model: vllm/llama-3, selector: {key: x-team}, limit: {tokens: 9, unit: second}}
""")
    a, b, w = c.ratelimits
    assert (a.models, a.header, a.value, a.window_seconds) == (
        ("openai/gpt-4o",),
        "x-tenant",
        None,
        60,
    )
    assert (b.models, b.value, b.window_seconds) == (("openai/gpt-4o-mini",), "acme", 86400)
    assert (w.models, w.value) == (("vllm/llama-3",), None)
    assert a.label == "gpt-4o x-tenant=*" and b.label == "fast x-tenant=acme"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (
            "{model: nope, selector: {key: x}, limit: {tokens: 1, unit: minute}}",
            "ratelimits[0].model",
        ),
        (
            "{model: gpt-4o, selector: {key: 'a b'}, limit: {tokens: 1, unit: minute}}",
            "ratelimits[0].selector.key",
        ),
        (
            "{model: gpt-4o, selector: {key: ':path'}, limit: {tokens: 1, unit: minute}}",
            "ratelimits[0].selector.key",
        ),
        (
            "{model: gpt-4o, selector: {key: x, value: ''}, limit: {tokens: 1, unit: minute}}",
            "ratelimits[0].selector.value",
        ),
        (
            "{model: gpt-4o, selector: {key: x}, limit: {tokens: 0, unit: minute}}",
            "ratelimits[0].limit.tokens",
        ),
        (
            "{model: gpt-4o, selector: {key: x}, limit: {tokens: 1, unit: week}}",
            "ratelimits[0].limit.unit",
        ),
        ("{model: gpt-4o, selector: {key: x}, limit: {tokens: 1}}", "ratelimits[0].limit.unit"),
        (
            "{model: gpt-4o, selector: {key: x}, limit: {tokens: 1, unit: minute}, extra: 1}",
            "ratelimits[0].extra",
        ),
    ],
)
def test_config_errors_name_the_yaml_path(entry: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(f"  - {entry}\n")
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_config_duplicate_selector_is_an_error() -> None:
    with pytest.raises(ConfigError) as e:
        cfg("""
  - {model: gpt-4o, selector: {key: x, value: "*"}, limit: {tokens: 1, unit: minute}}
  - {model: openai/gpt-4o, selector: {key: X}, limit: {tokens: 2, unit: hour}}
""")
    assert any(p.startswith("ratelimits[1].selector: ratelimits[0]") for p in e.value.problems)


def test_config_without_ratelimits_is_not_warned_as_ignored() -> None:
    c = cfg("  - {model: gpt-4o, selector: {key: x}, limit: {tokens: 1, unit: minute}}\n")
    assert not any("ratelimits" in w for w in c.warnings)


# ---------------------------------------------------------------- estimate


def test_estimate_counts_text_bytes_messages_and_media() -> None:
    text = "a" * 400
    assert prompt_tokens({"messages": [{"role": "user", "content": text}]}) == (
        (400 + 4) // 4 + TOKENS_PER_MESSAGE  # "user" counts too
    )
    cjk = "字" * 100  # 300 UTF-8 bytes
    assert prompt_tokens({"input": cjk}) == 75 + TOKENS_PER_MESSAGE
    image = "data:image/png;base64," + "A" * 100_000
    body = {
        "model": "x" * 1000,  # not sent to the model as tokens
        "routing_preferences": [{"name": "y" * 1000}],
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}
        ],
    }
    # "user" and "image_url": 13 bytes, 4 tokens; the image counts as one media item.
    assert prompt_tokens(body) == MEDIA_TOKENS + 4 + TOKENS_PER_MESSAGE
    anthropic = {
        "system": "s" * 40,
        "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"data": "B" * 5000}}]}
        ],
    }
    assert prompt_tokens(anthropic) >= MEDIA_TOKENS + 10


def test_estimate_survives_deep_and_odd_bodies() -> None:
    deep: object = "x" * 8
    for _ in range(500):
        deep = [deep]
    assert prompt_tokens({"messages": deep, "n": 3, "stream": True}) >= 0
    assert prompt_tokens({"input": "\ud800 lone surrogate"}) > 0


# ---------------------------------------------------------------- admission and settlement


def limiter_for(c: Config, clock: Clock, telemetry: Metrics | None = None) -> RateLimiter:
    return RateLimiter(c.ratelimits, SharedBudgets(slots=64, clock=clock), telemetry)


async def test_wildcard_selector_keeps_one_budget_per_value(clock: Clock) -> None:
    c = cfg(
        "  - {model: gpt-4o, selector: {key: x-tenant, value: '*'}, "
        "limit: {tokens: 100, unit: minute}}\n"
    )
    lim = limiter_for(c, clock)
    a = {"x-tenant": "a"}
    assert isinstance(await lim.admit(["openai/gpt-4o"], a, 60), Admitted)
    refused = await lim.admit(["openai/gpt-4o"], a, 60)
    assert isinstance(refused, Refused)
    # 20 tokens short at 100/60 per second: 12 s.
    assert refused.retry_after == 12
    assert isinstance(refused.error, RateLimitError) and refused.error.status == 429
    assert (
        "gpt-4o x-tenant=*" in refused.error.message
        and "100 tokens per minute" in refused.error.message
    )
    assert isinstance(await lim.admit(["openai/gpt-4o"], {"x-tenant": "b"}, 60), Admitted)
    # No header: not limited by it; another model: not limited.
    assert (await lim.admit(["openai/gpt-4o"], {}, 10_000)) == Admitted(0, (True,), None)
    assert (await lim.admit(["openai/gpt-4o-mini"], a, 10_000)) == Admitted(0, (True,), None)
    clock.now += 12
    assert isinstance(await lim.admit(["openai/gpt-4o"], a, 60), Admitted)


async def test_literal_selector_limits_only_its_value(clock: Clock) -> None:
    c = cfg(
        "  - {model: gpt-4o, selector: {key: x-tenant, value: acme}, "
        "limit: {tokens: 10, unit: hour}}\n"
    )
    lim = limiter_for(c, clock)
    assert isinstance(await lim.admit(["openai/gpt-4o"], {"x-tenant": "acme"}, 10), Admitted)
    assert isinstance(await lim.admit(["openai/gpt-4o"], {"x-tenant": "acme"}, 1), Refused)
    assert isinstance(await lim.admit(["openai/gpt-4o"], {"x-tenant": "ACME"}, 1000), Admitted)


async def test_a_request_larger_than_the_limit_never_fits(clock: Clock) -> None:
    c = cfg("  - {model: gpt-4o, selector: {key: x-t}, limit: {tokens: 10, unit: minute}}\n")
    refused = await limiter_for(c, clock).admit(["openai/gpt-4o"], {"x-t": "a"}, 11)
    assert isinstance(refused, Refused) and refused.retry_after is None
    assert "cannot be served under this limit" in refused.error.message


async def test_routed_request_moves_to_the_next_model_over_budget(clock: Clock) -> None:
    c = cfg("""
  - {model: gpt-4o, selector: {key: x-t}, limit: {tokens: 100, unit: minute}}
  - {model: claude, selector: {key: x-t}, limit: {tokens: 100, unit: minute}}
""")
    lim = limiter_for(c, clock)
    models = ["openai/gpt-4o", "anthropic/claude-sonnet-4-20250514", "openai/gpt-4o-mini"]
    h = {"x-t": "a"}
    first = await lim.admit(models, h, 60)
    assert isinstance(first, Admitted) and first.index == 0 and first.keep == (True, True, True)
    second = await lim.admit(models, h, 60)
    # gpt-4o is over; claude takes it; gpt-4o-mini has no limit and stays a candidate.
    assert isinstance(second, Admitted) and second.index == 1
    assert second.keep == (False, True, True)
    third = await lim.admit(models, h, 60)
    assert isinstance(third, Admitted) and third.index == 2 and third.keep == (False, False, True)
    refused = await lim.admit(models[:2], h, 60)
    assert isinstance(refused, Refused) and refused.retry_after == 12
    assert "2 tried" in refused.error.message


async def test_settlement_charges_reported_usage_and_refunds_failures(clock: Clock) -> None:
    c = cfg("  - {model: gpt-4o, selector: {key: x-t}, limit: {tokens: 1000, unit: minute}}\n")
    telemetry = Metrics()
    lim = limiter_for(c, clock, telemetry)
    h = {"x-t": "a"}
    adm = await lim.admit(["openai/gpt-4o"], h, 100)
    assert isinstance(adm, Admitted) and adm.settlement is not None
    estimate, _, tail = adm.settlement.partition(" ")
    assert estimate == "100" and json.loads(tail)["a"] == "openai/gpt-4o"
    (ref,) = json.loads(tail)["b"]["openai/gpt-4o"]
    assert ref.startswith("0:") and len(ref) == 18  # the limit and a digest of the value
    # The provider reported 100 in + 850 out: 850 more than the estimate.
    ((buckets, delta),) = lim.corrections(adm.settlement, "openai/gpt-4o", 200, 950)
    assert delta == 850.0 and buckets[0].capacity == 1000.0
    await lim.store.adjust(buckets, delta)
    assert isinstance(await lim.admit(["openai/gpt-4o"], h, 60), Refused)
    assert samples(telemetry, "plano_ratelimit_tokens_total") == []  # counted per batch
    lim.flush()
    assert samples(telemetry, "plano_ratelimit_tokens_total") == [
        ({"limit": "gpt-4o x-t=*"}, 950.0)
    ]
    # A failed reply without usage: the estimate comes back.
    assert lim.corrections(adm.settlement, "openai/gpt-4o", 503, None)[0][1] == -100.0
    # A successful reply without usage keeps the estimate: nothing to correct.
    assert lim.corrections(adm.settlement, "openai/gpt-4o", 200, None) == []
    assert samples(telemetry, "plano_ratelimit_rejections_total") == [
        ({"limit": "gpt-4o x-t=*"}, 1.0)
    ]


async def test_settlement_after_failover_moves_the_charge(clock: Clock) -> None:
    c = cfg("""
  - {model: gpt-4o, selector: {key: x-t}, limit: {tokens: 1000, unit: minute}}
  - {model: claude, selector: {key: x-t}, limit: {tokens: 1000, unit: minute}}
""")
    lim = limiter_for(c, clock)
    models = ["openai/gpt-4o", "anthropic/claude-sonnet-4-20250514"]
    adm = await lim.admit(models, {"x-t": "a"}, 100)
    assert isinstance(adm, Admitted) and adm.settlement is not None
    back, charged = lim.corrections(adm.settlement, models[1], 200, 300)
    assert back[1] == -100.0 and charged[1] == 300.0
    assert back[0][0].key != charged[0][0].key
    # Failover to a model without limits: the admitted model's charge is given back.
    (only,) = lim.corrections(adm.settlement, "openai/gpt-4o-mini", 200, 300)
    assert only[1] == -100.0 and only[0] == back[0]


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "-",
        "not json",
        "1 []",
        "-1 {}",
        "x {}",
        "1 {",
        '1 {"a": 3, "b": {}}',
        '99999999999999999 {"a": "m", "b": {}}',
        '1 {"a": "m", "b": []}',
        '1 {"a": "m", "b": {"m": ["99:abc", "x", "0:' + "f" * 40 + '", 7, "1234567:"]}}',
        "1 " + "{" * 20000,
    ],
)
def test_settlement_ignores_malformed_records(raw: str, clock: Clock) -> None:
    c = cfg("  - {model: gpt-4o, selector: {key: x-t}, limit: {tokens: 10, unit: minute}}\n")
    assert limiter_for(c, clock).corrections(raw, "m", 200, 5) == []


def test_limit_ids_change_with_the_limit() -> None:
    a = cfg("  - {model: gpt-4o, selector: {key: x}, limit: {tokens: 10, unit: minute}}\n")
    b = cfg("  - {model: gpt-4o, selector: {key: x}, limit: {tokens: 11, unit: minute}}\n")
    assert limit_id(a.ratelimits[0]) != limit_id(b.ratelimits[0])
    assert limit_id(a.ratelimits[0]) == limit_id(
        cfg(
            "  - {model: gpt-4o, selector: {key: x}, limit: {tokens: 10, unit: minute}}\n"
        ).ratelimits[0]
    )


async def test_hostile_selector_values_are_digested(clock: Clock) -> None:
    c = cfg("  - {model: gpt-4o, selector: {key: x-t}, limit: {tokens: 10, unit: minute}}\n")
    lim = limiter_for(c, clock)
    for value in ("a\r\nb", "x" * 60000, '{}"\\', "\u202e", ""):
        ((_, bucket, ref),) = lim.buckets("openai/gpt-4o", {"x-t": value})
        assert isinstance(bucket, Bucket) and len(bucket.key) <= 33 and len(ref) <= 20
        assert value not in bucket.key or value == ""


# ---------------------------------------------------------------- through the gateway


class FixedRouter(NullRouter):
    async def route(self, messages, routes, request_id="") -> RouterResult:  # type: ignore[no-untyped-def,override]
        return RouterResult(route="code")


LIMITS = """
  - {model: gpt-4o, selector: {key: x-tenant}, limit: {tokens: 120, unit: minute}}
  - {model: claude, selector: {key: x-tenant, value: t1}, limit: {tokens: 120, unit: minute}}
"""


@pytest.fixture
def limited(clock: Clock) -> Iterator[Gateway]:
    """Every request is routed to ``code`` (gpt-4o, then claude)."""
    c = cfg(LIMITS)
    yield Gateway(c, FixedRouter(), None, limiter=limiter_for(c, clock))


@pytest.fixture
def unrouted(clock: Clock) -> Iterator[Gateway]:
    """No router: requests keep the model they name."""
    c = cfg(LIMITS)
    yield Gateway(c, NullRouter(), None, limiter=limiter_for(c, clock))


async def proxy(
    gw: Gateway, path: str, body: dict[str, object], **headers: str
) -> Upstream | Immediate:
    info = RequestInfo.build({":path": path, ":method": "POST", **headers})
    assert gw.on_headers(info) is None
    return await gw.on_body(info, json.dumps(body).encode())


async def test_gateway_429_in_each_client_format(unrouted: Gateway) -> None:
    limited = unrouted
    big = "w" * 240  # the body is plain JSON: estimated at its size / 4, about 70 tokens
    chat = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": big}]}
    up = await proxy(limited, "/v1/chat/completions", chat, **{"x-tenant": "t2"})
    assert isinstance(up, Upstream) and up.provider.name == "openai/gpt-4o" and up.ratelimit
    imm = await proxy(limited, "/v1/chat/completions", chat, **{"x-tenant": "t2"})
    assert isinstance(imm, Immediate) and imm.status == 429
    # e tokens of 120 spent, e more needed: 2e - 120 short at 120/60 = 2 per second.
    e = estimate(json.dumps(chat).encode(), chat)
    assert 60 < e <= 120 and ("retry-after", str(math.ceil((2 * e - 120) / 2))) in imm.headers
    err = json.loads(imm.body)["error"]
    assert err["type"] == "tokens" and err["code"] == "rate_limit_exceeded"
    assert "t2" not in err["message"]
    msgs = {"model": "openai/gpt-4o", "max_tokens": 5, "messages": chat["messages"]}
    imm = await proxy(limited, "/v1/messages", msgs, **{"x-tenant": "t2"})
    assert isinstance(imm, Immediate) and imm.status == 429
    assert json.loads(imm.body) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": json.loads(imm.body)["error"]["message"]},
    }
    resp = {"model": "openai/gpt-4o", "input": big}
    imm = await proxy(limited, "/v1/responses", resp, **{"x-tenant": "t2"})
    assert (
        isinstance(imm, Immediate)
        and json.loads(imm.body)["error"]["code"] == "rate_limit_exceeded"
    )
    # Another tenant, and no tenant at all, are not affected.
    assert isinstance(
        await proxy(limited, "/v1/chat/completions", chat, **{"x-tenant": "t3"}), Upstream
    )
    assert isinstance(await proxy(limited, "/v1/chat/completions", chat), Upstream)


async def test_gateway_routed_request_over_budget_is_served_by_the_next_model(
    limited: Gateway,
) -> None:
    body = {"messages": [{"role": "user", "content": "w" * 240}]}
    h = {"x-tenant": "t1"}
    first = await proxy(limited, "/v1/chat/completions", body, **h)
    assert isinstance(first, Upstream) and first.failover is not None
    assert first.provider.name == "openai/gpt-4o"
    second = await proxy(limited, "/v1/chat/completions", body, **h)
    # gpt-4o is over t1's budget: claude serves, alone (nothing after it in the route).
    assert isinstance(second, Upstream) and second.provider.name.startswith("anthropic/")
    assert second.failover is None and second.route == "code"
    third = await proxy(limited, "/v1/chat/completions", body, **h)
    assert isinstance(third, Immediate) and third.status == 429


async def test_plano_selector_header_limits_as_in_plano_and_cannot_opt_out(
    unrouted: Gateway,
) -> None:
    """A Plano client names the header to key on with x-arch-ratelimit-selector: it is limited
    as in Plano; a client that leaves it out is limited all the same (Plano would not)."""
    chat = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "w" * 240}]}
    plano = {"x-arch-ratelimit-selector": "x-tenant", "x-tenant": "p1"}
    assert isinstance(await proxy(unrouted, "/v1/chat/completions", chat, **plano), Upstream)
    imm = await proxy(unrouted, "/v1/chat/completions", chat, **plano)
    assert isinstance(imm, Immediate) and imm.status == 429
    imm = await proxy(unrouted, "/v1/chat/completions", chat, **{"x-tenant": "p1"})
    assert isinstance(imm, Immediate) and imm.status == 429
    # Naming another header does not escape the limit on x-tenant either.
    other = {"x-arch-ratelimit-selector": "x-other", "x-other": "z", "x-tenant": "p1"}
    imm = await proxy(unrouted, "/v1/chat/completions", chat, **other)
    assert isinstance(imm, Immediate) and imm.status == 429


async def test_pinned_session_over_budget_is_served_by_the_next_model(clock: Clock) -> None:
    from plano_extproc.affinity.memory import MemorySessionCache

    c = cfg(LIMITS)
    cache = MemorySessionCache()
    await cache.start()
    gw = Gateway(c, FixedRouter(), cache, limiter=limiter_for(c, clock))
    body = {"messages": [{"role": "user", "content": "w" * 240}]}
    h = {"x-tenant": "t1", "x-model-affinity": "session-1"}
    first = await proxy(gw, "/v1/chat/completions", body, **h)
    assert isinstance(first, Upstream) and first.provider.name == "openai/gpt-4o"
    assert first.pinned is False
    second = await proxy(gw, "/v1/chat/completions", body, **h)
    assert isinstance(second, Upstream) and second.pinned is True
    assert second.provider.name.startswith("anthropic/")
    pin = await cache.get("session-1")
    assert pin is not None and pin.model == "openai/gpt-4o"  # the pin stays
    await cache.close()


async def test_settle_applies_the_correction_to_the_store(clock: Clock) -> None:
    c = cfg("  - {model: gpt-4o, selector: {key: x-t}, limit: {tokens: 1000, unit: minute}}\n")
    lim = limiter_for(c, clock)
    adm = await lim.admit(["openai/gpt-4o"], {"x-t": "a"}, 100)
    assert isinstance(adm, Admitted) and adm.settlement is not None
    lim.settle(adm.settlement, "openai/gpt-4o", 200, 1000)  # the provider reported 1000
    assert isinstance(await lim.admit(["openai/gpt-4o"], {"x-t": "a"}, 1), Admitted)
    lim.flush()  # the batch's corrections reach the store together
    refused = await lim.admit(["openai/gpt-4o"], {"x-t": "a"}, 1)
    assert isinstance(refused, Refused)
    # Two records of one batch on one bucket, both failed: their estimates (100 and 1) come
    # back together. 1000 + 1 spent (the admit above) - 101 = 900.
    lim.settle(adm.settlement, "openai/gpt-4o", 500, None)
    lim.settle("1 " + adm.settlement.partition(" ")[2], "openai/gpt-4o", 500, None)
    lim.flush()
    assert isinstance(await lim.admit(["openai/gpt-4o"], {"x-t": "a"}, 100), Admitted)
    assert isinstance(await lim.admit(["openai/gpt-4o"], {"x-t": "a"}, 1), Refused)


def test_estimate_from_raw_size_only_for_plain_bodies() -> None:
    plain = {"model": "m", "messages": [{"role": "user", "content": "a" * 400}]}
    raw = json.dumps(plain).encode()
    assert estimate(raw, plain) == -(-len(raw) // 4)  # size / 4, no walk
    # Inline media, escaped non-ASCII and our own inline routes are walked instead.
    image = {"messages": [{"role": "user", "content": [{"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + "A" * 400_000}}]}]}  # fmt: skip
    assert estimate(json.dumps(image).encode(), image) == prompt_tokens(image) < 2000
    cjk = {"messages": [{"role": "user", "content": "字" * 300}]}
    escaped = json.dumps(cjk).encode()  # \u5b57 each: 6 bytes a character
    assert estimate(escaped, cjk) == prompt_tokens(cjk) < len(escaped) // 4
    routed = {**plain, "routing_preferences": [{"name": "x", "description": "y" * 4000}]}
    assert estimate(json.dumps(routed).encode(), routed) == prompt_tokens(routed)


def test_estimate_walks_inline_files() -> None:
    doc = {"input": [{"role": "user", "content": [{"type": "input_file", "filename": "a.pdf",
           "file_data": "JVBERi0xLjQK" * 50_000}]}]}  # fmt: skip
    assert estimate(json.dumps(doc).encode(), doc) == prompt_tokens(doc) < 2000


async def test_gateway_never_fitting_request_tells_sdks_not_to_retry(unrouted: Gateway) -> None:
    huge = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "w" * 4000}]}
    imm = await proxy(unrouted, "/v1/chat/completions", huge, **{"x-tenant": "big"})
    assert isinstance(imm, Immediate) and imm.status == 429
    assert ("x-should-retry", "false") in imm.headers
    assert not any(k == "retry-after" for k, _ in imm.headers)
    assert "cannot be served under this limit" in json.loads(imm.body)["error"]["message"]
