"""Failover without Envoy or gRPC: the routing stream's plan, each attempt's stream (its
request, its outcome), the Gateway's candidate list, and ``routing.failover`` validation.

Attempts are driven as Envoy drives them (measured, see plano_extproc/failover.py): header
mutations persist from one attempt to the next, so attempt 2 starts from the headers that
attempt 1 left behind.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.catalog import Catalog
from plano_extproc.config import Config, ConfigError, FailoverConfig, Provider, parse_config
from plano_extproc.cooldown import Cooldowns
from plano_extproc.failover import (
    MAX_PLAN_CHARS,
    NO_RESPONSE,
    Attempt,
    AttemptRequest,
    FailoverPlan,
    Failure,
    PlanError,
    plan,
)
from plano_extproc.gateway import Gateway, Immediate, RequestInfo, Upstream
from plano_extproc.names import (
    ATTEMPT_COUNT_HEADER,
    MAX_RETRIES_HEADER,
    ROUTE_HEADER,
    TRANSLATE_HEADER,
    failover_cluster,
    failure_key,
    first_cluster,
    retry_after_key,
    slot_header,
)
from plano_extproc.providers import ClientApi
from plano_extproc.rewrite import CREDENTIAL_HEADERS, HeaderPlan
from plano_extproc.server.app import build_router
from tests.conftest import SEED_RULES
from tests.fakes import FakeOrchestrator, keyword_router

MINI = "openai/gpt-4o-mini"
GPT4O = "openai/gpt-4o"
CLAUDE = "anthropic/claude-sonnet-4-20250514"
HAIKU = "anthropic/claude-3-5-haiku-20241022"
PASS = "openai/gpt-4.1"  # passthrough_auth: the client's own key
BEDROCK = "amazon_bedrock/us.amazon.nova-pro-v1:0"
ORCH = "ollama/Plano-Orchestrator"


def config_text(orch_url: str, routing: str = "", timeout: str = "300s") -> str:
    return f"""
version: v0.4.0
listeners: [{{name: m, type: model, timeout: {timeout}}}]
model_providers:
  - model: {MINI}
    access_key: sk-o
    default: true
  - model: {GPT4O}
    access_key: sk-o
  - model: {CLAUDE}
    access_key: sk-a
    headers: {{Anthropic-Beta: tools-2024-04-04}}
  - model: {HAIKU}
    access_key: sk-h
  - model: {PASS}
    base_url: https://proxy.example.com/v1
    passthrough_auth: true
  - model: {BEDROCK}
    base_url: https://bedrock-runtime.us-east-1.amazonaws.com
    access_key: sk-b
  - model: {ORCH}
    base_url: {orch_url}/v1
routing_preferences:
  - name: code_generation
    description: generating new code
    models: [{CLAUDE}, {GPT4O}, {MINI}]
routing:
  router: {{type: orchestrator, model: {ORCH}, timeout_ms: 5000}}
{routing}
"""


CFG = parse_config(config_text("http://127.0.0.1:9"))
CATALOG = Catalog(CFG)


def provider(name: str) -> Provider:
    p = CATALOG.lookup(name)
    assert p is not None
    return p


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def cooldowns(policy: FailoverConfig | None = None, **changes: object) -> Cooldowns:
    base = policy or CFG.failover
    return Cooldowns([p.name for p in CFG.providers], replace(base, **changes), None, Clock())  # type: ignore[arg-type]


CHAT_HEADERS = {
    ":method": "POST",
    ":path": "/v1/chat/completions",
    ":authority": "gateway.local",
    "content-type": "application/json",
    "authorization": "Bearer client-secret",
}
MESSAGES_HEADERS = {
    ":method": "POST",
    ":path": "/v1/messages",
    ":authority": "gateway.local",
    "content-type": "application/json",
    "x-api-key": "client-secret",
    "anthropic-version": "2023-06-01",
}


def chat_body(model: str = "gpt-4o-mini") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


def messages_body() -> bytes:
    return json.dumps(
        {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


def apply(headers: Mapping[str, str], hp: HeaderPlan) -> dict[str, str]:
    """What Envoy does with a header mutation: removals, then sets (overwrite)."""
    out = dict(headers)
    for name in hp.remove:
        out.pop(name, None)
    out.update(dict(hp.set))
    return out


def make_plan(client: ClientApi, headers: Mapping[str, str], *names: str) -> FailoverPlan:
    return plan(client, "", headers, [provider(n) for n in names])


def start(
    fo: FailoverPlan,
    now: Mapping[str, str],
    attempt: int,
    failures: Mapping[str, str] | None = None,
    cd: Cooldowns | None = None,
    policy: FailoverConfig | None = None,
) -> Attempt:
    return Attempt.start(
        CATALOG,
        policy or CFG.failover,
        cd,
        fo.metadata,
        {**now, ATTEMPT_COUNT_HEADER: str(attempt)},
        failures or {},
    )


async def run_attempts(
    client: ClientApi, client_headers: Mapping[str, str], body: bytes, *names: str
) -> list[tuple[Attempt, AttemptRequest, dict[str, str]]]:
    """Every attempt of a plan in turn; each starts from the headers the previous one left
    (Envoy keeps header mutations across retries). Returns (attempt, request, headers sent)."""
    fo = make_plan(client, client_headers, *names)
    now = apply(client_headers, fo.headers)
    out = []
    for n in range(1, len(names) + 1):
        now[ATTEMPT_COUNT_HEADER] = str(n)
        att = start(fo, now, n, {failure_key(n - 1): "503"} if n > 1 else {})
        made = await att.on_body(body, "rid")
        # Never both set and removed: which one wins would be Envoy's call, not ours.
        assert not set(made.headers.remove) & {k for k, _ in made.headers.set}
        now = apply(now, made.headers)
        out.append((att, made, dict(now)))
    return out


# ---------------------------------------------------------------- plan()


def test_plan_headers_name_each_attempts_cluster_and_remove_client_credentials() -> None:
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O, PASS)
    assert fo.candidates == (provider(CLAUDE), provider(GPT4O), provider(PASS))
    assert fo.first_built is False
    # Every attempt goes through its provider's failover cluster (the one with the attempt
    # filter), never through the provider's own cluster (no upstream filter there).
    assert fo.headers.set == [
        (slot_header(0), failover_cluster(provider(CLAUDE).cluster)),
        (slot_header(1), failover_cluster(provider(GPT4O).cluster)),
        (slot_header(2), failover_cluster(provider(PASS).cluster)),
        (ATTEMPT_COUNT_HEADER, "0"),
        (MAX_RETRIES_HEADER, "2"),
    ]
    assert sorted(fo.headers.remove) == sorted(CREDENTIAL_HEADERS)


def test_a_first_built_plan_sends_attempt_1_to_the_first_cluster() -> None:
    """The routing stream built attempt 1's request: it needs no attempt stream, so slot 0 is
    the provider's ``first`` cluster; later attempts still get their failover clusters."""
    candidates = [provider(GPT4O), provider(CLAUDE), provider(PASS)]
    fo = plan(ClientApi.CHAT, "", CHAT_HEADERS, candidates, first_built=True)
    assert fo.first_built is True
    slots = {k: v for k, v in fo.headers.set if k.startswith("x-plano-try-")}
    assert slots == {
        slot_header(0): first_cluster(provider(GPT4O).cluster),
        slot_header(1): failover_cluster(provider(CLAUDE).cluster),
        slot_header(2): failover_cluster(provider(PASS).cluster),
    }
    assert first_cluster(provider(GPT4O).cluster) != failover_cluster(provider(GPT4O).cluster)
    # The rest of the plan does not depend on who builds attempt 1.
    other = plan(ClientApi.CHAT, "", CHAT_HEADERS, candidates)
    assert fo.metadata == other.metadata and fo.headers.remove == other.headers.remove
    assert fo.headers.set[3:] == other.headers.set[3:]


def test_plan_max_retries_is_candidates_minus_one() -> None:
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O)
    assert dict(fo.headers.set)[MAX_RETRIES_HEADER] == "1"


def test_plan_metadata_names_models_only() -> None:
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O)
    # No passthrough candidate: the client's credential stays out of the plan.
    assert json.loads(fo.metadata) == {"api": "chat_completions", "q": "", "c": [CLAUDE, GPT4O]}
    assert "client-secret" not in fo.metadata


def test_plan_metadata_carries_the_credential_only_for_a_passthrough_candidate() -> None:
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, PASS)
    assert json.loads(fo.metadata)["cred"] == "client-secret"
    no_key = {k: v for k, v in CHAT_HEADERS.items() if k != "authorization"}
    assert "cred" not in json.loads(make_plan(ClientApi.CHAT, no_key, CLAUDE, PASS).metadata)


def test_plan_metadata_remembers_a_client_anthropic_version() -> None:
    fo = make_plan(ClientApi.MESSAGES, MESSAGES_HEADERS, CLAUDE, GPT4O)
    value = json.loads(fo.metadata)
    assert value["av"] == "2023-06-01" and value["api"] == "messages"
    assert "av" not in json.loads(make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O).metadata)


# ---------------------------------------------------------------- Attempt.start


def test_start_picks_candidate_attempt_minus_one() -> None:
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O, MINI)
    for n, name in enumerate((CLAUDE, GPT4O, MINI), start=1):
        att = start(fo, CHAT_HEADERS, n, {failure_key(n - 1): "429"})
        assert att.provider is provider(name)
        assert att.attempt == n and att.last == (n == 3)
    assert start(fo, CHAT_HEADERS, 1).switch is None


@pytest.mark.parametrize("count", ["0", "4", "-1", "", "one"])
def test_start_rejects_an_attempt_outside_the_plan(count: str) -> None:
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O, MINI)
    with pytest.raises(PlanError):
        Attempt.start(CATALOG, CFG.failover, None, fo.metadata, {ATTEMPT_COUNT_HEADER: count}, {})


def test_start_rejects_a_missing_attempt_count() -> None:
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O)
    with pytest.raises(PlanError):
        Attempt.start(CATALOG, CFG.failover, None, fo.metadata, {}, {})


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        "[1, 2]",
        '{"c": ["openai/gpt-4o"]}',
        '{"api": "smoke_signals", "c": ["openai/gpt-4o"]}',
        '{"api": "chat_completions"}',
        '{"api": "chat_completions", "c": 5}',
        '{"api": "chat_completions", "c": ["openai/not-configured", "openai/gpt-4o"]}',
        json.dumps({"api": "chat_completions", "c": [GPT4O, MINI], "q": "x" * MAX_PLAN_CHARS}),
    ],
)
def test_start_rejects_an_unusable_plan(raw: str) -> None:
    with pytest.raises(PlanError):
        Attempt.start(CATALOG, CFG.failover, None, raw, {ATTEMPT_COUNT_HEADER: "1"}, {})


def test_switch_reason_comes_from_the_previous_attempts_stream() -> None:
    cd = cooldowns()
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O)
    failures = {failure_key(1): "429", retry_after_key(1): "7"}
    att = start(fo, CHAT_HEADERS, 2, failures, cd)
    assert att.switch is not None
    assert (att.switch.from_model, att.switch.to_model, att.switch.reason) == (CLAUDE, GPT4O, "429")
    # The previous attempt recorded nothing (it may have had no stream): this one rests it,
    # for the Retry-After that came with the metadata.
    assert cd.resting(CLAUDE) == 7.0 and cd.resting(GPT4O) == 0.0


def test_the_first_attempt_records_no_previous_outcome() -> None:
    cd = cooldowns(eject_after_failures=1)
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O)
    att = start(fo, CHAT_HEADERS, 1, {failure_key(0): "503", failure_key(1): "429"}, cd)
    assert att.switch is None
    assert cd.resting(CLAUDE) == cd.resting(GPT4O) == 0.0


@pytest.mark.parametrize(
    ("wait", "rest"), [("12", 12.0), ("0.5", 0.5), ("999", 60.0), ("soon", 5.0), (None, 5.0)]
)
def test_a_429_of_the_previous_attempt_rests_it_for_its_retry_after(
    wait: str | None, rest: float
) -> None:
    """The Lua filter of a first cluster records the raw header; an attempt stream records
    seconds. Capped at cooldown_max; unreadable or absent: cooldown_default."""
    cd = cooldowns()
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O, MINI)
    failures = {failure_key(2): "429"}
    if wait is not None:
        failures[retry_after_key(2)] = wait
    start(fo, CHAT_HEADERS, 3, failures, cd)
    assert cd.resting(GPT4O) == rest
    assert cd.resting(CLAUDE) == cd.resting(MINI) == 0.0


@pytest.mark.parametrize("status", ["500", "503", "529"])
def test_another_failing_status_of_the_previous_attempt_counts_a_failure(status: str) -> None:
    cd = cooldowns(eject_after_failures=2, eject_seconds=30.0)
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O)
    # No rest for a 5xx, whatever Retry-After said; two failures eject.
    start(fo, CHAT_HEADERS, 2, {failure_key(1): status, retry_after_key(1): "20"}, cd)
    assert cd.resting(CLAUDE) == 0.0
    start(fo, CHAT_HEADERS, 2, {failure_key(1): status}, cd)
    assert cd.resting(CLAUDE) == 30.0


def test_switch_without_a_status_counts_a_failure_for_the_previous_model() -> None:
    cd = cooldowns(eject_after_failures=1, eject_seconds=30.0)
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O, MINI)
    att = start(fo, CHAT_HEADERS, 3, {failure_key(1): "503"}, cd)
    assert att.switch is not None
    assert (att.switch.from_model, att.switch.reason) == (GPT4O, NO_RESPONSE)
    assert cd.resting(GPT4O) == 30.0
    assert cd.resting(CLAUDE) == 0.0 and cd.resting(MINI) == 0.0


# ---------------------------------------------------------------- Attempt.on_body


async def test_second_attempt_to_openai_drops_what_the_anthropic_attempt_set() -> None:
    (a1, r1, sent1), (a2, r2, sent2) = await run_attempts(
        ClientApi.CHAT, CHAT_HEADERS, chat_body(), CLAUDE, GPT4O
    )
    claude, gpt4o = provider(CLAUDE), provider(GPT4O)
    # Attempt 1: Anthropic, translated.
    assert r1.model == CLAUDE and a1.response is not None
    assert sent1["x-api-key"] == "sk-a" and sent1["anthropic-beta"] == "tools-2024-04-04"
    assert sent1["anthropic-version"] == "2023-06-01"
    assert sent1[":authority"] == claude.authority and sent1[":path"] == "/v1/messages"
    assert "authorization" not in sent1
    # Attempt 2: OpenAI, native. Nothing of attempt 1's provider reaches it.
    assert r2.model == GPT4O and a2.response is None
    assert {"x-api-key", "anthropic-beta", "anthropic-version"} <= set(r2.headers.remove)
    for name in ("x-api-key", "anthropic-beta", "anthropic-version", "api-key"):
        assert name not in sent2
    assert sent2["authorization"] == "Bearer sk-o"
    assert sent2[":authority"] == gpt4o.authority and sent2[":path"] == "/v1/chat/completions"
    assert r2.body is not None and json.loads(r2.body)["model"] == "gpt-4o"
    assert sent2["content-length"] == str(len(r2.body))
    for _, made, sent in ((a1, r1, sent1), (a2, r2, sent2)):
        # The single-attempt routing headers: this route is taken, nothing strips them later.
        for name in (TRANSLATE_HEADER, ROUTE_HEADER):
            assert name not in dict(made.headers.set) and name not in sent
    assert "client-secret" not in json.dumps([sent1, sent2])


async def test_second_attempt_to_anthropic_drops_the_openai_bearer() -> None:
    (_, _, sent1), (a2, r2, sent2) = await run_attempts(
        ClientApi.CHAT, CHAT_HEADERS, chat_body(), GPT4O, CLAUDE
    )
    assert sent1["authorization"] == "Bearer sk-o"
    assert "authorization" in r2.headers.remove and "authorization" not in sent2
    assert sent2["x-api-key"] == "sk-a" and sent2["anthropic-beta"] == "tools-2024-04-04"
    assert a2.response is not None and r2.body is not None
    assert json.loads(r2.body)["model"] == "claude-sonnet-4-20250514"
    assert sent2["content-length"] == str(len(r2.body))


async def test_native_attempt_sets_content_length_even_for_an_unchanged_body() -> None:
    body = chat_body("gpt-4o")  # already this model's id: nothing to edit
    att, made, sent = (await run_attempts(ClientApi.CHAT, CHAT_HEADERS, body, GPT4O, CLAUDE))[0]
    assert made.body is None and att.response is None
    assert sent["content-length"] == str(len(body))


async def test_client_anthropic_version_is_kept_for_every_attempt() -> None:
    (a1, _, sent1), (a2, r2, sent2) = await run_attempts(
        ClientApi.MESSAGES, MESSAGES_HEADERS, messages_body(), CLAUDE, GPT4O
    )
    assert a1.response is None  # Messages to Anthropic: native
    assert sent1["x-api-key"] == "sk-a" and sent1["anthropic-version"] == "2023-06-01"
    assert a2.response is not None  # Messages to OpenAI: translated
    assert "anthropic-version" not in r2.headers.remove
    assert sent2["anthropic-version"] == "2023-06-01"
    assert "x-api-key" not in sent2 and sent2["authorization"] == "Bearer sk-o"


async def test_a_second_anthropic_attempt_keeps_the_anthropic_version_the_first_set() -> None:
    """The client sent none; attempt 1 (Anthropic) set it; attempt 2 (Anthropic again) must
    send it too, not remove it as an earlier attempt's leftover."""
    (_, _, sent1), (_, r2, sent2) = await run_attempts(
        ClientApi.CHAT, CHAT_HEADERS, chat_body(), CLAUDE, HAIKU
    )
    assert sent1["anthropic-version"] == sent2["anthropic-version"] == "2023-06-01"
    assert "anthropic-version" not in r2.headers.remove
    assert sent2["x-api-key"] == "sk-h"


async def test_passthrough_candidate_gets_the_clients_credential_and_no_other_does() -> None:
    (_, _, sent1), (_, r2, sent2) = await run_attempts(
        ClientApi.CHAT, CHAT_HEADERS, chat_body(), PASS, CLAUDE
    )
    assert sent1["authorization"] == "Bearer client-secret"
    assert sent1[":authority"] == "proxy.example.com"
    # Hostile: the client's key must not reach another provider.
    assert "client-secret" not in json.dumps(sent2)
    assert "client-secret" not in json.dumps([r2.headers.set])
    assert sent2["x-api-key"] == "sk-a" and "authorization" not in sent2


async def test_passthrough_after_another_provider_never_gets_that_providers_key() -> None:
    (_, _, sent1), (_, _, sent2) = await run_attempts(
        ClientApi.CHAT, CHAT_HEADERS, chat_body(), CLAUDE, PASS
    )
    assert sent1["x-api-key"] == "sk-a"
    assert sent2["authorization"] == "Bearer client-secret"
    assert "x-api-key" not in sent2 and "sk-a" not in json.dumps(sent2)
    # A client without a key: the passthrough attempt sends none (not the last one's).
    no_key = {k: v for k, v in CHAT_HEADERS.items() if k != "authorization"}
    (_, _, _), (_, _, sent2) = await run_attempts(ClientApi.CHAT, no_key, chat_body(), CLAUDE, PASS)
    assert not set(CREDENTIAL_HEADERS) & set(sent2)
    assert "sk-a" not in json.dumps(sent2)


# ---------------------------------------------------------------- on_response_headers


async def started(
    *names: str, attempt: int, cd: Cooldowns | None = None, policy: FailoverConfig | None = None
) -> Attempt:
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, *names)
    now = {**apply(CHAT_HEADERS, fo.headers), ATTEMPT_COUNT_HEADER: str(attempt)}
    att = start(fo, now, attempt, {failure_key(attempt - 1): "503"}, cd, policy)
    await att.on_body(chat_body(), "rid")
    return att


def metadata(attempt: int, failure: Failure | None) -> dict[str, str]:
    """What the servicer hands the next attempt's stream for a failed ``attempt``
    (server/servicer.py attempt_failed_reply, read back by _attempt_start)."""
    assert failure is not None
    out = {failure_key(attempt): failure.status}
    if failure.retry_after is not None:
        out[retry_after_key(attempt)] = failure.retry_after
    return out


JSON = {"content-type": "application/json"}


async def test_429_on_a_non_last_attempt_moves_on_and_rests_the_model() -> None:
    cd = cooldowns()
    att = await started(CLAUDE, GPT4O, attempt=1, cd=cd)
    hp, failure = att.on_response_headers(429, {**JSON, "retry-after": "12"}, False)
    assert hp is None and failure == Failure("429", "12")
    # Nothing recorded yet: the next attempt's stream does it, once.
    assert cd.resting(CLAUDE) == 0.0 and cd.resting(GPT4O) == 0.0
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O)
    nxt = start(fo, CHAT_HEADERS, 2, metadata(1, failure), cd)
    assert nxt.switch is not None and nxt.switch.reason == "429"
    assert cd.resting(CLAUDE) == 12.0 and cd.resting(GPT4O) == 0.0


async def test_429_with_retry_after_ms_passes_seconds_on() -> None:
    att = await started(CLAUDE, GPT4O, attempt=1)
    _, failure = att.on_response_headers(429, {"retry-after-ms": "1500"}, False)
    assert failure == Failure("429", "1.5")


async def test_429_without_retry_after_rests_for_the_default() -> None:
    cd = cooldowns(cooldown_default_seconds=4.0)
    att = await started(GPT4O, CLAUDE, attempt=1, cd=cd)
    hp, failure = att.on_response_headers(429, JSON, False)
    assert hp is None and failure == Failure("429", None)
    assert cd.resting(GPT4O) == 0.0
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, GPT4O, CLAUDE)
    start(fo, CHAT_HEADERS, 2, metadata(1, failure), cd)
    assert cd.resting(GPT4O) == 4.0 and cd.resting(CLAUDE) == 0.0


@pytest.mark.parametrize("status", [500, 502, 503, 529])
async def test_5xx_on_a_non_last_attempt_moves_on_and_counts_a_failure(status: int) -> None:
    cd = cooldowns(eject_after_failures=1, eject_seconds=30.0)
    att = await started(CLAUDE, GPT4O, attempt=1, cd=cd)
    hp, failure = att.on_response_headers(status, JSON, False)
    assert hp is None and failure == Failure(str(status), None)
    assert cd.resting(CLAUDE) == 0.0
    fo = make_plan(ClientApi.CHAT, CHAT_HEADERS, CLAUDE, GPT4O)
    nxt = start(fo, CHAT_HEADERS, 2, metadata(1, failure), cd)
    assert nxt.switch is not None and nxt.switch.reason == str(status)
    assert cd.resting(CLAUDE) == 30.0 and cd.resting(GPT4O) == 0.0


@pytest.mark.parametrize("status", [400, 401, 404, 413])
async def test_a_client_error_is_final(status: int) -> None:
    cd = cooldowns(eject_after_failures=1)
    native = await started(GPT4O, CLAUDE, attempt=1, cd=cd)
    assert native.on_response_headers(status, JSON, False) == (None, None)
    translated = await started(CLAUDE, GPT4O, attempt=1, cd=cd)
    hp, reason = translated.on_response_headers(status, JSON, False)
    assert reason is None and hp is not None and hp.body_mode == "buffered"
    assert cd.resting(GPT4O) == cd.resting(CLAUDE) == 0.0


async def test_the_last_attempts_failure_is_final_and_translated_when_needed() -> None:
    cd = cooldowns(eject_after_failures=1, eject_seconds=30.0)
    translated = await started(GPT4O, CLAUDE, attempt=2, cd=cd)
    assert translated.last and cd.resting(CLAUDE) == 0.0
    hp, reason = translated.on_response_headers(503, JSON, False)
    assert reason is None and hp is not None
    assert hp.body_mode == "buffered" and "content-length" in hp.remove
    assert cd.resting(CLAUDE) == 30.0  # no attempt after it: recorded by its own stream
    cd = cooldowns(eject_after_failures=1, eject_seconds=30.0)
    native = await started(CLAUDE, GPT4O, attempt=2, cd=cd)
    assert cd.resting(GPT4O) == 0.0
    assert native.on_response_headers(429, {"retry-after": "3"}, False) == (None, None)
    assert cd.resting(GPT4O) == 30.0  # ejected: that was its first failure too
    cd = cooldowns()
    native = await started(CLAUDE, GPT4O, attempt=2, cd=cd)
    assert native.on_response_headers(429, {"retry-after": "3"}, False) == (None, None)
    assert cd.resting(GPT4O) == 3.0


async def test_success_clears_the_cooldown() -> None:
    cd = cooldowns()
    cd.rate_limited(GPT4O, 20.0)
    att = await started(GPT4O, CLAUDE, attempt=1, cd=cd)
    assert att.on_response_headers(200, JSON, False) == (None, None)
    assert cd.resting(GPT4O) == 0.0


async def test_translated_success_gets_the_response_plan() -> None:
    att = await started(CLAUDE, GPT4O, attempt=1)
    hp, reason = att.on_response_headers(200, JSON, False)
    assert reason is None and hp is not None and hp.body_mode == "buffered"


async def test_custom_on_status_makes_other_statuses_final() -> None:
    policy = replace(CFG.failover, on_status=(429,))
    cd = cooldowns(policy, eject_after_failures=1)
    att = await started(GPT4O, CLAUDE, attempt=1, cd=cd, policy=policy)
    assert att.on_response_headers(503, JSON, False) == (None, None)
    assert cd.resting(GPT4O) == 0.0  # not a failure under this policy
    att = await started(GPT4O, CLAUDE, attempt=1, cd=cd, policy=policy)
    assert att.on_response_headers(429, JSON, False) == (None, Failure("429", None))


# ---------------------------------------------------------------- the Gateway's candidates


@pytest.fixture(scope="module")
def orch() -> Iterator[FakeOrchestrator]:
    fake = FakeOrchestrator(decide=keyword_router(SEED_RULES))
    fake.start()
    yield fake
    fake.stop()


@asynccontextmanager
async def gateway_for(
    orch: FakeOrchestrator, routing: str = "", cd: Cooldowns | None = None
) -> AsyncIterator[Gateway]:
    orch.mode = "ok"
    cfg = parse_config(config_text(orch.base_url, routing))
    router = build_router(cfg)
    cache = MemorySessionCache()
    await router.start()
    await cache.start()
    try:
        yield Gateway(cfg, router, cache, cooldowns=cd)
    finally:
        await router.close()
        await cache.close()


async def send(
    gw: Gateway, body: dict[str, object], path: str = "/v1/chat/completions", **headers: str
) -> Upstream:
    info = RequestInfo.build({":path": path, ":method": "POST", **headers})
    early = gw.on_headers(info)
    assert early is None
    out = await gw.on_body(info, json.dumps(body).encode())
    assert not isinstance(out, Immediate), out.body
    return out


def routed(
    models: list[str] | None = None, text: str = "write a binary search"
) -> dict[str, object]:
    """A request the fake router sends to code_generation (inline models when given)."""
    body: dict[str, object] = {"model": MINI, "messages": [{"role": "user", "content": text}]}
    if models is not None:
        body["routing_preferences"] = [
            {"name": "code_generation", "description": "writing code", "models": models}
        ]
    return body


def names(out: Upstream) -> list[str]:
    assert out.failover is not None
    return [c.name for c in out.failover.candidates]


async def test_candidates_follow_the_route_order(orch: FakeOrchestrator) -> None:
    async with gateway_for(orch) as gw:
        out = await send(gw, routed())
        assert names(out) == [CLAUDE, GPT4O, MINI] and out.provider.name == CLAUDE
        out = await send(gw, routed([GPT4O, PASS, CLAUDE]))
        assert names(out) == [GPT4O, PASS, CLAUDE] and out.provider.name == GPT4O
        assert out.route == "code_generation"


async def test_the_plan_carries_no_prompt_text(orch: FakeOrchestrator) -> None:
    async with gateway_for(orch) as gw:
        out = await send(gw, routed(text="write a binary search for SECRET-PROMPT-42"))
        assert out.failover is not None
        assert "SECRET-PROMPT-42" not in out.failover.metadata
        assert "SECRET-PROMPT-42" not in json.dumps(out.headers.set)
        # Our own fields leave the body that Envoy replays to every attempt.
        inline = await send(gw, routed([GPT4O, CLAUDE]))
        assert inline.body is not None and b"routing_preferences" not in inline.body
        assert dict(inline.headers.set)["content-length"] == str(len(inline.body))


def routed_messages(models: list[str], text: str = "write a binary search") -> dict[str, object]:
    """A Messages request the fake router sends to code_generation, with inline models."""
    return {
        "model": MINI,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        "routing_preferences": [
            {"name": "code_generation", "description": "writing code", "models": models}
        ],
    }


async def routing_stream(
    gw: Gateway, client_headers: Mapping[str, str], body: dict[str, object]
) -> tuple[Upstream, dict[str, str]]:
    """The routing stream's answer and the headers it leaves on the request (Envoy applies
    its mutation before the first route resolution)."""
    wire = {k: v for k, v in client_headers.items() if k != ":method"}
    out = await send(gw, body, path=wire.pop(":path"), **wire)
    assert not set(out.headers.remove) & {k for k, _ in out.headers.set}
    return out, apply(client_headers, out.headers)


async def test_a_native_first_model_is_built_by_the_routing_stream(orch: FakeOrchestrator) -> None:
    """Messages to Claude is native: the routing stream builds Claude's request as for a
    single model, and slot 0 is Claude's ``first`` cluster (no attempt stream)."""
    claude, gpt4o = provider(CLAUDE), provider(GPT4O)
    async with gateway_for(orch) as gw:
        out, sent = await routing_stream(gw, MESSAGES_HEADERS, routed_messages([CLAUDE, GPT4O]))
        assert out.failover is not None and out.failover.first_built is True
        assert names(out) == [CLAUDE, GPT4O] and out.provider.name == CLAUDE
        mine = dict(out.headers.set)
        assert mine[slot_header(0)] == first_cluster(claude.cluster)
        assert mine[slot_header(1)] == failover_cluster(gpt4o.cluster)
        assert (mine[ATTEMPT_COUNT_HEADER], mine[MAX_RETRIES_HEADER]) == ("0", "1")
        # Claude's own request: its key (the client's is gone), its host, its headers.
        assert sent["x-api-key"] == "sk-a" and "client-secret" not in json.dumps(sent)
        assert "x-api-key" not in out.headers.remove
        assert set(CREDENTIAL_HEADERS) - {"x-api-key"} <= set(out.headers.remove)
        assert sent[":authority"] == claude.authority and sent[":path"] == "/v1/messages"
        assert sent["anthropic-beta"] == "tools-2024-04-04"
        assert sent["anthropic-version"] == "2023-06-01"
        # The failover route is taken: the single-model routing headers are never set.
        assert ROUTE_HEADER not in sent and TRANSLATE_HEADER not in sent
        assert out.body is not None
        body = json.loads(out.body)
        assert body["model"] == "claude-sonnet-4-20250514" and "routing_preferences" not in body
        assert sent["content-length"] == str(len(out.body))


async def test_a_translated_first_model_is_left_to_its_attempt_stream(
    orch: FakeOrchestrator,
) -> None:
    """Chat to Claude is translated: the routing stream only removes our fields and the
    client's credentials; Claude's attempt stream builds its request."""
    async with gateway_for(orch) as gw:
        out, sent = await routing_stream(gw, CHAT_HEADERS, routed([CLAUDE, GPT4O]))
        assert out.failover is not None and out.failover.first_built is False
        mine = dict(out.headers.set)
        assert mine[slot_header(0)] == failover_cluster(provider(CLAUDE).cluster)
        assert mine[slot_header(1)] == failover_cluster(provider(GPT4O).cluster)
        assert not {":path", ":authority", "x-api-key", ROUTE_HEADER} & set(mine)
        assert not set(CREDENTIAL_HEADERS) & set(sent)
        assert sent[":path"] == "/v1/chat/completions"
        assert out.body is not None
        body = json.loads(out.body)
        assert body["model"] == MINI and "routing_preferences" not in body


async def test_attempt_2_after_a_first_built_attempt_drops_what_it_set(
    orch: FakeOrchestrator,
) -> None:
    """Attempt 2 starts from the headers the routing stream set for Claude and rebuilds
    GPT-4o's request from Claude's native body (still Messages)."""
    client = {**MESSAGES_HEADERS, "anthropic-beta": "client-beta"}
    gpt4o = provider(GPT4O)
    async with gateway_for(orch) as gw:
        out, now = await routing_stream(gw, client, routed_messages([CLAUDE, GPT4O]))
        assert out.failover is not None and out.failover.first_built
        assert now["x-api-key"] == "sk-a" and now["anthropic-beta"] == "tools-2024-04-04"
        assert out.body is not None
        now[ATTEMPT_COUNT_HEADER] = "2"
        cd = cooldowns()
        att = Attempt.start(
            gw.catalog, gw.config.failover, cd, out.failover.metadata, now,
            {failure_key(1): "429", retry_after_key(1): "9"},
        )  # fmt: skip
        assert att.provider.name == GPT4O and cd.resting(CLAUDE) == 9.0
        made = await att.on_body(out.body, "rid")
        assert not set(made.headers.remove) & {k for k, _ in made.headers.set}
        sent = apply(now, made.headers)
        assert made.model == GPT4O and att.response is not None  # Messages > Chat
        assert "x-api-key" in made.headers.remove and "x-api-key" not in sent
        assert sent["authorization"] == "Bearer sk-o"
        assert sent["anthropic-beta"] == "client-beta"  # the client's own, not Claude's
        assert sent["anthropic-version"] == "2023-06-01"  # the client sent it
        assert sent[":authority"] == gpt4o.authority and sent[":path"] == "/v1/chat/completions"
        assert made.body is not None and json.loads(made.body)["model"] == "gpt-4o"
        assert sent["content-length"] == str(len(made.body))
        assert "sk-a" not in json.dumps(sent) and "client-secret" not in json.dumps(sent)


async def test_attempt_2_after_a_first_built_openai_attempt_drops_its_bearer(
    orch: FakeOrchestrator,
) -> None:
    async with gateway_for(orch) as gw:
        out, now = await routing_stream(gw, CHAT_HEADERS, routed([GPT4O, CLAUDE]))
        assert out.failover is not None and out.failover.first_built
        assert now["authorization"] == "Bearer sk-o" and out.body is not None
        assert json.loads(out.body)["model"] == "gpt-4o"
        now[ATTEMPT_COUNT_HEADER] = "2"
        att = Attempt.start(gw.catalog, gw.config.failover, None, out.failover.metadata, now, {})
        assert att.switch is not None and att.switch.reason == NO_RESPONSE
        made = await att.on_body(out.body, "rid")
        sent = apply(now, made.headers)
        assert "authorization" in made.headers.remove and "authorization" not in sent
        assert sent["x-api-key"] == "sk-a" and sent["anthropic-beta"] == "tools-2024-04-04"
        assert "anthropic-version" in sent and sent[":path"] == "/v1/messages"
        assert made.body is not None
        assert json.loads(made.body)["model"] == "claude-sonnet-4-20250514"
        assert "sk-o" not in json.dumps(sent) and "client-secret" not in json.dumps(sent)


async def test_a_first_built_passthrough_model_gets_the_clients_key_and_no_later_one_does(
    orch: FakeOrchestrator,
) -> None:
    """Hostile: the routing stream sets the passthrough model's credential itself; Claude's
    attempt after it must get Claude's key and never the client's."""
    async with gateway_for(orch) as gw:
        out, now = await routing_stream(gw, CHAT_HEADERS, routed([PASS, CLAUDE]))
        assert out.failover is not None and out.failover.first_built
        assert now["authorization"] == "Bearer client-secret"
        assert now[":authority"] == "proxy.example.com"
        assert out.body is not None
        now[ATTEMPT_COUNT_HEADER] = "2"
        att = Attempt.start(gw.catalog, gw.config.failover, None, out.failover.metadata, now, {})
        made = await att.on_body(out.body, "rid")
        sent = apply(now, made.headers)
        assert sent["x-api-key"] == "sk-a" and "authorization" not in sent
        assert "client-secret" not in json.dumps(sent)
        assert made.body is not None and b"client-secret" not in made.body


async def test_models_that_cannot_serve_the_client_api_are_left_out(
    orch: FakeOrchestrator,
) -> None:
    async with gateway_for(orch) as gw:
        out = await send(gw, routed([CLAUDE, BEDROCK, GPT4O]))
        assert names(out) == [CLAUDE, GPT4O]
        # One servable model left: the single-attempt path.
        out = await send(gw, routed([BEDROCK, GPT4O]))
        assert out.failover is None and out.provider.name == GPT4O


async def test_resting_models_are_skipped_and_all_kept_when_all_rest(
    orch: FakeOrchestrator,
) -> None:
    cd = cooldowns()
    async with gateway_for(orch, cd=cd) as gw:
        cd.rate_limited(CLAUDE, 30.0)
        out = await send(gw, routed())
        assert names(out) == [GPT4O, MINI] and out.provider.name == GPT4O
        sent = dict(out.headers.set)
        # GPT-4o is native to a Chat client: the routing stream builds its attempt.
        assert sent[slot_header(0)] == first_cluster(provider(GPT4O).cluster)
        assert sent[slot_header(1)] == failover_cluster(provider(MINI).cluster)
        cd.rate_limited(GPT4O, 30.0)
        cd.rate_limited(MINI, 30.0)
        out = await send(gw, routed())
        assert names(out) == [CLAUDE, GPT4O, MINI]


async def test_candidates_are_capped_at_max_attempts(orch: FakeOrchestrator) -> None:
    async with gateway_for(orch, "  failover: {max_attempts: 2}") as gw:
        out = await send(gw, routed([GPT4O, CLAUDE, MINI, PASS]))
        assert names(out) == [GPT4O, CLAUDE]
        assert dict(out.headers.set)[MAX_RETRIES_HEADER] == "1"
        assert slot_header(2) not in dict(out.headers.set)
    async with gateway_for(orch, "  failover: {max_attempts: 1}") as gw:
        out = await send(gw, routed())
        assert out.failover is None and out.provider.name == CLAUDE


async def test_failover_disabled_is_a_single_attempt(orch: FakeOrchestrator) -> None:
    async with gateway_for(orch, "  failover: {enabled: false}") as gw:
        out = await send(gw, routed(), authorization="Bearer client-secret")
        assert out.failover is None and out.provider.name == CLAUDE
        assert out.route == "code_generation"
        sent = dict(out.headers.set)
        assert not any(k.startswith("x-plano-try-") for k in sent)
        assert ATTEMPT_COUNT_HEADER not in sent and sent["x-api-key"] == "sk-a"


async def test_a_request_that_is_not_routed_has_no_failover(orch: FakeOrchestrator) -> None:
    async with gateway_for(orch) as gw:
        out = await send(gw, routed(text="what is the weather like"))
        assert out.route is None and out.failover is None and out.provider.name == MINI
        out = await send(gw, {"model": GPT4O, "messages": [{"role": "user", "content": "hi"}]})
        assert out.failover is None and out.provider.name == GPT4O


async def test_a_resting_pinned_model_yields_to_its_routes_next_model(
    orch: FakeOrchestrator,
) -> None:
    cd = cooldowns()
    async with gateway_for(orch, cd=cd) as gw:
        first = await send(gw, routed(), **{"x-model-affinity": "session-1"})
        assert first.provider.name == CLAUDE and first.pinned is False
        cd.rate_limited(CLAUDE, 30.0)
        again = await send(gw, routed(), **{"x-model-affinity": "session-1"})
        assert again.pinned is True and again.route == "code_generation"
        assert names(again) == [GPT4O, MINI] and again.provider.name == GPT4O
        assert gw.cache is not None
        hit = await gw.cache.get("session-1")
        assert hit is not None and hit.model == CLAUDE  # the pin stays
        cd.succeeded(CLAUDE)
        back = await send(gw, routed(), **{"x-model-affinity": "session-1"})
        assert names(back) == [CLAUDE, GPT4O, MINI]


# ---------------------------------------------------------------- routing.failover config


def parse(routing: str, timeout: str = "300s") -> Config:
    return parse_config(config_text("http://127.0.0.1:9", routing, timeout))


def problems(routing: str, timeout: str = "300s") -> str:
    with pytest.raises(ConfigError) as e:
        parse(routing, timeout)
    return "\n".join(e.value.problems)


def test_failover_defaults() -> None:
    assert CFG.failover == FailoverConfig()
    assert parse("  failover: {}").failover == FailoverConfig()
    fo = CFG.failover
    assert fo.enabled and fo.max_attempts == 3 and fo.on_status is None
    assert fo.attempt_timeout_seconds == 60.0
    assert fo.retries_on(429) and fo.retries_on(500) and fo.retries_on(529)
    assert not fo.retries_on(400) and not fo.retries_on(200)


def test_failover_values_are_parsed() -> None:
    fo = parse(
        "  failover: {max_attempts: 4, on_status: [503, 429, 503], attempt_timeout: 20s,"
        " cooldown_default: 2s, cooldown_max: 30s, eject_after_failures: 5, eject_for: 1m}"
    ).failover
    assert fo == FailoverConfig(
        enabled=True,
        max_attempts=4,
        on_status=(429, 503),
        attempt_timeout_seconds=20.0,
        cooldown_default_seconds=2.0,
        cooldown_max_seconds=30.0,
        eject_after_failures=5,
        eject_seconds=60.0,
    )
    assert not fo.retries_on(500)


@pytest.mark.parametrize(
    ("routing", "path"),
    [
        ("  failover: {on_status: [200]}", "routing.failover.on_status"),
        ("  failover: {on_status: [429, 600]}", "routing.failover.on_status"),
        ("  failover: {on_status: []}", "routing.failover.on_status"),
        ("  failover: {attempt_timeout: 400s}", "routing.failover.attempt_timeout"),
        ("  failover: {attempt_timeout: 300s}", "routing.failover.attempt_timeout"),
        ("  failover: {attempt_timeout: soon}", "routing.failover.attempt_timeout"),
        ("  failover: {cooldown_default: 90s}", "routing.failover.cooldown_default"),
        (
            "  failover: {cooldown_default: 20s, cooldown_max: 10s}",
            "routing.failover.cooldown_default",
        ),
        ("  failover: {cooldown_max: 0s}", "routing.failover.cooldown_max"),
        ("  failover: {eject_for: 0s}", "routing.failover.eject_for"),
        ("  failover: {max_attempts: 0}", "routing.failover.max_attempts"),
        ("  failover: {max_attempts: 9}", "routing.failover.max_attempts"),
        ("  failover: {eject_after_failures: 0}", "routing.failover.eject_after_failures"),
        ("  failover: {retries: 2}", "routing.failover.retries"),
    ],
)
def test_bad_failover_values_name_their_path(routing: str, path: str) -> None:
    assert f"{path}:" in problems(routing)


def test_attempt_timeout_must_be_below_the_listener_timeout() -> None:
    message = problems("  failover: {attempt_timeout: 30s}", timeout="30s")
    assert "routing.failover.attempt_timeout" in message and "30s" in message
    assert parse("  failover: {attempt_timeout: 29s}", "30s").failover.attempt_timeout_seconds == 29
    # 0 turns the attempt timer off, whatever the listener timeout.
    assert parse("  failover: {attempt_timeout: 0s}", "30s").failover.attempt_timeout_seconds == 0


@pytest.mark.parametrize("timeout", ["60s", "30s", "5s"])
def test_a_short_listener_timeout_turns_the_default_attempt_timer_off(timeout: str) -> None:
    assert parse("", timeout).failover.attempt_timeout_seconds == 0.0
    assert parse("  failover: {max_attempts: 2}", timeout).failover.attempt_timeout_seconds == 0.0
    assert parse("", timeout).failover.max_attempts == 3  # the rest keeps its defaults


def test_a_longer_listener_timeout_keeps_the_default_attempt_timer() -> None:
    assert parse("", "61s").failover.attempt_timeout_seconds == 60.0
    assert parse("  failover: {max_attempts: 2}", "61s").failover.attempt_timeout_seconds == 60.0


# ---------------------------------------------------------------- found by review


async def test_a_client_header_a_candidate_overwrites_reaches_the_next_candidate() -> None:
    """Attempt 1's provider config overwrites the client's anthropic-beta; attempt 2 (which
    configures none) gets the client's own value back, not attempt 1's and not nothing."""
    headers = {**CHAT_HEADERS, "anthropic-beta": "client-beta"}
    (_, _, sent1), (_, _, sent2) = await run_attempts(
        ClientApi.CHAT, headers, chat_body(), CLAUDE, GPT4O
    )
    assert sent1["anthropic-beta"] == "tools-2024-04-04"
    assert sent2["anthropic-beta"] == "client-beta"
    # Without a client copy, attempt 1's configured value is removed (as before).
    (_, _, sent1), (_, _, sent2) = await run_attempts(
        ClientApi.CHAT, CHAT_HEADERS, chat_body(), CLAUDE, GPT4O
    )
    assert "anthropic-beta" not in sent2


async def test_a_plan_too_large_for_an_attempt_is_served_in_one_attempt(
    orch: FakeOrchestrator,
) -> None:
    """A ~17 KB query string (within max_request_headers_kb) would make the plan larger than
    an attempt accepts: the request is served by the route's first model, once, not a 502."""
    async with gateway_for(orch) as gw:
        out = await send(gw, routed(), path="/v1/chat/completions?q=" + "x" * 17000)
        assert out.failover is None and out.provider.name == CLAUDE
        assert dict(out.headers.set)[":path"].endswith("x" * 17000)


async def test_models_that_would_refuse_the_body_are_left_out(orch: FakeOrchestrator) -> None:
    """previous_response_id cannot be translated for Anthropic: Claude is skipped for that
    request only; with no model taking it, the single attempt's refusal is the answer."""
    async with gateway_for(orch) as gw:
        body = {"model": MINI, "input": "write a binary search", "previous_response_id": "r1"}
        out = await send(gw, body, path="/v1/responses")
        assert names(out) == [GPT4O, MINI]
        out = await send(gw, {**body, "previous_response_id": None}, path="/v1/responses")
        assert names(out) == [CLAUDE, GPT4O, MINI]
        info = RequestInfo.build({":path": "/v1/responses", ":method": "POST"})
        assert gw.on_headers(info) is None
        only = {**body, "routing_preferences": [
            {"name": "code_generation", "description": "code", "models": [CLAUDE]}]}  # fmt: skip
        refused = await gw.on_body(info, json.dumps(only).encode())
        assert isinstance(refused, Immediate) and refused.status == 400
        assert b"previous_response_id" in refused.body
