"""Issue #10 end to end: token usage, durations and requests counted from real replies.

The official SDKs send requests through the real Envoy; scripted fake providers answer with
known usage in their own wire format (JSON and SSE). The usage filter observes each response as
the client receives it (translated when the provider speaks another API), so the worker's
counters must move by exactly the fake's usage for every client API, native and translated.
"""

from __future__ import annotations

import json
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
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeProvider, Script, Usage, running_providers
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

GPT = "openai/gpt-4o-mini"
CLAUDE = "anthropic/claude-sonnet-4-20250514"
CLIENT_KEY = "sk-client-SECRET-91ab"
OPENAI_KEY = "sk-openai-SECRET-test"
ANTHROPIC_KEY = "sk-ant-SECRET-test"


def config(openai_url: str, anthropic_url: str) -> str:
    return f"""
version: v0.4.0
listeners:
  - name: model_listener
    type: model
    port: 12000
    timeout: 30s
model_providers:
  - model: {GPT}
    base_url: {openai_url}/v1
    access_key: {OPENAI_KEY}
    default: true
  - model: {CLAUDE}
    base_url: {anthropic_url}/v1
    access_key: {ANTHROPIC_KEY}
model_aliases:
  chat-model:
    target: {GPT}
  claude:
    target: {CLAUDE}
"""


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    with running_providers("openai", "anthropic") as made:
        yield made


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("log") / "access.jsonl"


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeProvider], access_log: Path
) -> Iterator[GatewayProcess]:
    cfg = config(fakes["openai"].base_url, fakes["anthropic"].base_url)
    args = ["--request-log", str(access_log)]
    with GatewayProcess(cfg, tmp_path_factory.mktemp("obs"), extra_args=args) as g:
        yield g


@pytest.fixture(autouse=True)
def _fresh(fakes: dict[str, FakeProvider]) -> None:
    for fake in fakes.values():
        fake.clear()


def scrape(gw: GatewayProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The worker's own /metrics as {(sample name, labels): value}."""
    with urllib.request.urlopen(gw.worker_admin[0] + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, lb), v in samples.items() if n == name and want <= lb)


def wait_for_requests(gw: GatewayProcess, before: float, n: int = 1) -> dict[Any, float]:
    """The usage filter reports after the client has its answer (Envoy does not wait for it):
    poll until the request count moved, bounded."""
    deadline = time.monotonic() + 10
    while True:
        now = scrape(gw)
        if total(now, "plano_requests_total", endpoint="proxy") >= before + n:
            return now
        assert time.monotonic() < deadline, "the request was never counted"
        time.sleep(0.05)


def ant(gw: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


def oai(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)


def call(gw: GatewayProcess, client: str, model: str, stream: bool) -> Any:
    history = [{"role": "user", "content": "say hello"}]
    if client == "messages":
        kw: dict[str, Any] = {"model": model, "max_tokens": 64, "messages": history}
        if stream:
            with ant(gw).messages.stream(**kw) as s:
                return s.get_final_message()
        return ant(gw).messages.create(**kw)
    if client == "chat":
        if stream:
            kw = {"model": model, "messages": history, "stream_options": {"include_usage": True}}
            with oai(gw).chat.completions.stream(**kw) as s:
                return s.get_final_completion()
        return oai(gw).chat.completions.create(model=model, messages=history)  # type: ignore[arg-type]
    if stream:
        with oai(gw).responses.stream(model=model, input="say hello") as s:
            return s.get_final_response()
    return oai(gw).responses.create(model=model, input="say hello")


USAGE = Usage(prompt=37, completion=9, cached=12)
# (client API, alias, fake, whether the provider speaks another API)
CASES = [
    ("chat", "chat-model", "openai", GPT),
    ("messages", "claude", "anthropic", CLAUDE),
    ("chat", "claude", "anthropic", CLAUDE),  # translated
    ("messages", "chat-model", "openai", GPT),  # translated
    ("responses", "claude", "anthropic", CLAUDE),  # translated
]
API = {"chat": "chat_completions", "messages": "messages", "responses": "responses"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("client", "alias", "fake", "served"), CASES)
def test_tokens_move_by_exactly_the_providers_usage(
    gw: GatewayProcess,
    fakes: dict[str, FakeProvider],
    client: str,
    alias: str,
    fake: str,
    served: str,
    stream: bool,
) -> None:
    fakes[fake].queue(Script(text="hello there", usage=USAGE))
    before = scrape(gw)
    labels = {"client_api": API[client], "gen_ai_response_model": served}
    started = total(before, "plano_requests_total", endpoint="proxy")
    call(gw, client, alias, stream)
    after = wait_for_requests(gw, started)
    name = "gen_ai_client_token_usage_sum"
    moved = {
        kind: total(after, name, gen_ai_token_type=kind, **labels)
        - total(before, name, gen_ai_token_type=kind, **labels)
        for kind in ("input", "output", "cached_input")
    }
    assert moved == {"input": 37, "output": 9, "cached_input": 12}
    requested = {
        dict(lb).get("gen_ai_request_model")
        for (n, lb), _ in after.items()
        if n == name and ("gen_ai_response_model", served) in lb
    }
    assert alias in requested  # what the client asked for: the alias
    key = "gen_ai_client_operation_duration_seconds_count"
    assert total(after, key, **labels) == total(before, key, **labels) + 1
    ok = {"endpoint": "proxy", "client_api": API[client], "model": served, "status_class": "2xx"}
    assert (
        total(after, "plano_requests_total", **ok)
        == total(before, "plano_requests_total", **ok) + 1
    )
    ttft = "gen_ai_server_time_to_first_token_seconds_count"
    tpot = "gen_ai_server_time_per_output_token_seconds_count"
    assert total(after, ttft, **labels) - total(before, ttft, **labels) == (1 if stream else 0)
    assert total(after, tpot, **labels) - total(before, tpot, **labels) == (1 if stream else 0)


def test_provider_errors_count_by_status_class_without_tokens(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    fakes["openai"].queue(Script(status=429, retry_after="3"))
    before = scrape(gw)
    with pytest.raises(openai.RateLimitError):
        call(gw, "chat", "chat-model", False)
    after = wait_for_requests(gw, total(before, "plano_requests_total", endpoint="proxy"))
    err = {"endpoint": "proxy", "model": GPT, "status_class": "4xx"}
    assert (
        total(after, "plano_requests_total", **err)
        == total(before, "plano_requests_total", **err) + 1
    )
    name = "gen_ai_client_token_usage_count"
    assert total(after, name, gen_ai_response_model=GPT) == total(
        before, name, gen_ai_response_model=GPT
    )


def test_decision_endpoint_is_counted(gw: GatewayProcess) -> None:
    before = scrape(gw)
    resp = httpx.post(
        gw.url + "/routing/v1/messages",
        json={"model": "claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert resp.status_code == 200
    after = scrape(gw)
    got = {"endpoint": "decision", "client_api": "messages", "status_class": "2xx"}
    assert (
        total(after, "plano_requests_total", **got)
        == total(before, "plano_requests_total", **got) + 1
    )


def test_access_log_has_one_line_per_request_without_secrets(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], access_log: Path
) -> None:
    fakes["anthropic"].queue(Script(text="hi", usage=USAGE))
    before = scrape(gw)
    rid = "req-obs-1"
    answer = ant(gw).messages.with_raw_response.create(
        model="claude",
        max_tokens=8,
        messages=[{"role": "user", "content": "PROMPT-TEXT-NOT-LOGGED"}],
        extra_headers={"x-request-id": rid},
    )
    assert answer.http_response.status_code == 200
    wait_for_requests(gw, total(before, "plano_requests_total", endpoint="proxy"))
    lines = [json.loads(line) for line in access_log.read_text().splitlines()]
    mine = [r for r in lines if r["request_id"] == rid]
    assert len(mine) == 1
    rec = mine[0]
    assert rec["client_api"] == "messages" and rec["requested_model"] == "claude"
    assert rec["model"] == CLAUDE and rec["status"] == 200 and rec["stream"] is False
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_input_tokens"]) == (37, 9, 12)
    assert rec["attempts"] == 1 and rec["duration_ms"] > 0 and rec["ttft_ms"] is None
    text = access_log.read_text()
    for secret in ("PROMPT-TEXT-NOT-LOGGED", CLIENT_KEY, ANTHROPIC_KEY, OPENAI_KEY, "hello"):
        assert secret not in text


@pytest.mark.parametrize(
    ("alias", "fake", "served"), [("chat-model", "openai", GPT), ("claude", "anthropic", CLAUDE)]
)
@pytest.mark.parametrize("options", [None, {"include_usage": False}], ids=["absent", "false"])
def test_chat_stream_without_include_usage_is_counted_and_shows_no_usage(
    gw: GatewayProcess,
    fakes: dict[str, FakeProvider],
    alias: str,
    fake: str,
    served: str,
    options: dict[str, Any] | None,
) -> None:
    """The provider is asked for usage; the client gets the stream it asked for: no usage
    chunk, no "usage" member in any chunk."""
    fakes[fake].queue(Script(text="hello there", usage=USAGE))
    before = scrape(gw)
    body: dict[str, Any] = {
        "model": alias,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if options is not None:
        body["stream_options"] = options
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, timeout=30,
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        raw = resp.read().decode()
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all("usage" not in c for c in chunks), raw
    assert all(c["choices"] for c in chunks)  # no choices-less usage chunk
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "hello there"
    if fake == "openai":  # native: the provider was asked for usage, the rest left as sent
        sent = json.loads(fakes[fake].last().body)
        assert sent["stream_options"] == {"include_usage": True}
        assert sent["messages"] == body["messages"]
        # Byte for byte what the provider streams to a client that does not ask for usage
        # (the same script straight from the fake; only its answer counter differs).
        fakes[fake].queue(Script(text="hello there", usage=USAGE))
        direct = {**sent, "stream_options": {"include_usage": False}}
        plain = httpx.post(fakes[fake].base_url + "/v1/chat/completions", json=direct, timeout=30)
        renumber = re.compile(r"(chatcmpl-fake|req_fake)\d+")
        assert renumber.sub("X", raw) == renumber.sub("X", plain.text)
    after = wait_for_requests(gw, total(before, "plano_requests_total", endpoint="proxy"))
    labels = {"client_api": "chat_completions", "gen_ai_response_model": served}
    name = "gen_ai_client_token_usage_sum"
    moved = {
        kind: total(after, name, gen_ai_token_type=kind, **labels)
        - total(before, name, gen_ai_token_type=kind, **labels)
        for kind in ("input", "output", "cached_input")
    }
    assert moved == {"input": 37, "output": 9, "cached_input": 12}


@pytest.mark.parametrize("split", [1, 3, 17])
def test_hidden_usage_survives_a_stream_cut_anywhere(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], split: int
) -> None:
    """The provider writes its stream in pieces of ``split`` bytes (cuts inside events, lines and
    UTF-8 characters): Envoy's Lua filter still hands the client the stream the provider sends
    without include_usage, byte for byte."""
    text = "héllo wörld 你好"
    fakes["openai"].queue(Script(text=text, usage=USAGE, split=split, split_utf8=True))
    body: dict[str, Any] = {
        "model": "chat-model",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, timeout=30, headers=headers
    ) as resp:
        assert resp.status_code == 200
        raw = resp.read().decode()
    sent = json.loads(fakes["openai"].last().body)
    assert sent["stream_options"] == {"include_usage": True}
    fakes["openai"].queue(Script(text=text, usage=USAGE))
    direct = {**sent, "stream_options": {"include_usage": False}}
    plain = httpx.post(fakes["openai"].base_url + "/v1/chat/completions", json=direct, timeout=30)
    renumber = re.compile(r"(chatcmpl-fake|req_fake)\d+")
    assert renumber.sub("X", raw) == renumber.sub("X", plain.text)
