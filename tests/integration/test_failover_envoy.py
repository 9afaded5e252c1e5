"""Failover across a route's models through the real Envoy, with the official SDKs.

Routes (the fake router LLM picks them by keyword):
- ``code``: [anthropic/claude-sonnet (fake ``an``), openai/gpt-4o (fake ``oa``)] - every client
  API crosses APIs between the two attempts (a Chat client: translated, then native; a
  Messages client: native, then translated; a Responses client: translated twice);
- ``refused``: [a model on a closed port, openai/gpt-4o];
- ``slow``: [a model whose provider stalls (fake ``hang``), openai/gpt-4o];
- ``wide``: four models, more than ``max_attempts`` (3).
Cooldowns are off in the main gateway (1 ms, no ejection) so tests do not leak into each
other; ``test_cooldown_*`` run their own two-worker gateway with the defaults.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeOrchestrator, FakeProvider, Script, Usage, keyword_router
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

RULES = {
    "binary search": "code",
    "refused": "refused",
    "slow": "slow",
    "wide": "wide",
    "cool": "cool",
    "millis": "millis",
}
CODE = "write a binary search"
CLAUDE = "anthropic/claude-sonnet-4-20250514"
GPT4O = "openai/gpt-4o"
FAIL_STATUSES = [429, 500, 503, 529]
ATTEMPT_TIMEOUT = 1.0


class HangingProvider(FakeProvider):
    """Waits ``hang`` seconds before answering (bounded); ``stall_after_first``: streams one
    event, then stalls for ``hang`` (the response has started: no failover may follow)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.hang = 0.0
        self.stall_after_first = False
        self.gap = 0.0  # a slow but live stream: one event every ``gap`` seconds
        self.events = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.gap:
            rec = await self._record(request)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            model = json.loads(rec.body).get("model", "m")
            for i in range(min(self.events, 100)):
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0,
                         "model": model, "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                                      "finish_reason": None}]}  # fmt: skip
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.gap)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        if self.stall_after_first:
            await self._record(request)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "first"},
                                  "finish_reason": None}]}  # fmt: skip
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(min(self.hang, 10.0))
            if request.transport is not None:
                request.transport.abort()  # the provider dies mid-answer
            return resp
        if self.hang:
            await self._record(request)
            await asyncio.sleep(min(self.hang, 10.0))  # Envoy gives up on it before this
            return web.json_response({"error": {"message": "too late"}}, status=500)
        return await super().handle(request)


class MillisProvider(FakeProvider):
    """Answers 429 with only ``retry-after-ms`` while ``limited``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.limited = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.limited:
            return await super().handle(request)
        await self._record(request)
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}
        return web.json_response(body, status=429, headers={"retry-after-ms": "30000"})


class OpenAIProvider(FakeProvider):
    """FakeProvider plus OpenAI's native Responses stream (the default answer, as SSE)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.endswith("/responses"):
            return await super().handle(request)
        rec = await self._record(request)
        body = json.loads(rec.body)
        if not body.get("stream"):
            self.requests.pop()  # recorded again by the default answer
            return await super().handle(request)
        text = f"hello from {self.name} ({body.get('model')})"
        base = {
            "id": "resp_1",
            "object": "response",
            "created_at": 0,
            "model": body["model"],
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
        done = {
            **base,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
        }
        events = [
            ("response.created", {"response": {**base, "status": "in_progress"}}),
            ("response.output_text.delta", {"item_id": "msg_1", "output_index": 0,
                                            "content_index": 0, "delta": text, "logprobs": []}),
            ("response.completed", {"response": done}),
        ]  # fmt: skip
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for n, (name, data) in enumerate(events):
            payload = json.dumps({"type": name, "sequence_number": n, **data})
            await resp.write(f"event: {name}\ndata: {payload}\n\n".encode())
        await resp.write_eof()
        return resp


def closed_port() -> int:
    """A port nothing listens on (bound and released: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(an: str, oa: str, extra: str, hang: str, refused: int, failover: str) -> str:
    return f"""
version: v0.4.0
listeners:
  - name: model_listener
    type: model
    port: 12000
    timeout: 30s
    max_request_bytes: 4194304
model_providers:
  - model: openai/gpt-4o
    base_url: {oa}/v1
    access_key: sk-openai-test
    default: true
  - model: anthropic/claude-sonnet-4-20250514
    base_url: {an}/v1
    access_key: sk-ant-test
  - model: openai/gpt-4o-mini
    base_url: {extra}/v1
    access_key: sk-extra-test
  - model: openai/gpt-4.1
    base_url: {extra}/v1
    access_key: sk-extra-test
  - model: openai/o3
    base_url: http://127.0.0.1:{refused}/v1
    access_key: sk-refused-test
  - model: openai/o4-mini
    base_url: {hang}/v1
    access_key: sk-hang-test
  - model: anthropic/claude-3-5-haiku-20241022
    base_url: {{haiku}}/v1
    access_key: sk-haiku-test
  - model: ollama/Plano-Orchestrator
    base_url: {{orch}}/v1
routing_preferences:
  - name: code
    description: writing code
    models: [{CLAUDE}, {GPT4O}]
  - name: refused
    description: refused
    models: [openai/o3, {GPT4O}]
  - name: slow
    description: slow
    models: [openai/o4-mini, {GPT4O}]
  - name: wide
    description: wide
    models: [{CLAUDE}, {GPT4O}, openai/gpt-4o-mini, openai/gpt-4.1]
  - name: cool
    description: cool
    models: [openai/gpt-4o-mini, {GPT4O}]
  - name: millis
    description: millis
    models: [anthropic/claude-3-5-haiku-20241022, {GPT4O}]
routing:
  router:
    type: orchestrator
    model: ollama/Plano-Orchestrator
    timeout_ms: 2000
  failover:
{failover}
"""


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    made: dict[str, Any] = {
        "an": FakeProvider("anthropic").start(),
        "oa": OpenAIProvider("openai").start(),
        "extra": FakeProvider("extra").start(),
        "hang": HangingProvider("hang").start(),
        "orch": FakeOrchestrator(decide=keyword_router(RULES)).start(),
        "haiku": MillisProvider("haiku").start(),
    }
    yield made
    for f in made.values():
        f.stop()


def _start(fakes: dict[str, Any], tmp: Path, failover: str, workers: int = 1) -> GatewayProcess:
    text = (
        config(
            fakes["an"].base_url,
            fakes["oa"].base_url,
            fakes["extra"].base_url,
            fakes["hang"].base_url,
            closed_port(),
            failover,
        )
        .replace("{orch}", fakes["orch"].base_url)
        .replace("{haiku}", fakes["haiku"].base_url)
    )
    return GatewayProcess(text, tmp, workers=workers).start()


@pytest.fixture(scope="module")
def gw(fakes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    knobs = (
        f"    attempt_timeout: {ATTEMPT_TIMEOUT}s\n"
        "    cooldown_default: 1ms\n    cooldown_max: 1ms\n    eject_after_failures: 1000\n"
    )
    g = _start(fakes, tmp_path_factory.mktemp("fo"), knobs)
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _reset(fakes: dict[str, Any]) -> None:
    for name in ("an", "oa", "extra", "hang"):
        f = fakes[name]
        f.clear()
        f.fail_status = None
    hang = fakes["hang"]
    hang.hang, hang.stall_after_first, hang.gap, hang.events = 0.0, False, 0.0, 0


def oai(gw: GatewayProcess, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0, **kw)


def ant(gw: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="client-key", max_retries=0)


def ask(gw: GatewayProcess, api: str, prompt: str, stream: bool) -> tuple[str, httpx.Headers]:
    """One request through the SDK of ``api``: (the answer's text, the response headers)."""
    if api == "chat":
        client = oai(gw)
        msgs: Any = [{"role": "user", "content": prompt}]
        if stream:
            s = client.chat.completions.create(model="gpt-4o", messages=msgs, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
            return text, s.response.headers
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=msgs)
        return raw.parse().choices[0].message.content or "", raw.headers
    if api == "messages":
        c = ant(gw)
        m: Any = [{"role": "user", "content": prompt}]
        if stream:
            st = c.messages.create(model="gpt-4o", max_tokens=50, messages=m, stream=True)
            text = "".join(
                e.delta.text
                for e in st
                if e.type == "content_block_delta" and e.delta.type == "text_delta"
            )
            return text, st.response.headers
        r = c.messages.with_raw_response.create(model="gpt-4o", max_tokens=50, messages=m)
        msg = r.parse()
        return "".join(b.text for b in msg.content if b.type == "text"), r.headers
    client = oai(gw)
    if stream:
        rs = client.responses.create(model="gpt-4o", input=prompt, stream=True)
        text = "".join(e.delta for e in rs if e.type == "response.output_text.delta")
        return text, rs.response.headers
    rr = client.responses.with_raw_response.create(model="gpt-4o", input=prompt)
    return rr.parse().output_text, rr.headers


def no_client_credential(*fakes: FakeProvider) -> None:
    for f in fakes:
        for rec in f.requests:
            assert "client-key" not in json.dumps(rec.headers)
            assert "x-plano-translate" not in rec.headers
            assert "x-plano-upstream" not in rec.headers


APIS = ["chat", "messages", "responses"]


# ------------------------------------------------------------------------------ the matrix


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("status", FAIL_STATUSES)
def test_failing_first_model_is_served_by_the_second(
    gw: GatewayProcess, fakes: dict[str, Any], status: int, api: str, stream: bool
) -> None:
    an, oa = fakes["an"], fakes["oa"]
    an.queue(Script(status=status, retry_after="0"))
    if api != "responses":  # (scripts answer in Chat's format; Responses is native here)
        oa.queue(Script(text=["hello from", " openai (gpt-4o)"]))
    text, headers = ask(gw, api, CODE, stream)
    assert text == "hello from openai (gpt-4o)"
    assert headers["x-plano-model"] == GPT4O and headers["x-plano-route"] == "code"
    assert headers["x-plano-attempts"] == "2"
    # Attempt 1: Anthropic's own API and key; attempt 2: OpenAI's, with nothing of attempt 1.
    [first] = an.requests
    assert first.path == "/v1/messages" and first.headers["x-api-key"] == "sk-ant-test"
    assert first.json["model"] == "claude-sonnet-4-20250514"
    [second] = oa.requests
    # A Responses client reaches OpenAI natively, the others through Chat Completions.
    assert second.path == ("/v1/responses" if api == "responses" else "/v1/chat/completions")
    assert second.headers["authorization"] == "Bearer sk-openai-test"
    assert "x-api-key" not in second.headers
    # anthropic-version: attempt 1 set it; only the client's own (Anthropic SDK) goes on.
    assert ("anthropic-version" in second.headers) == (api == "messages")
    assert second.headers["host"] == f"127.0.0.1:{oa.port}"
    assert second.json["model"] == "gpt-4o" and second.json.get("stream", False) == stream
    assert int(second.headers["content-length"]) == len(second.body)
    no_client_credential(an, oa)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
def test_refused_connection_fails_over(
    gw: GatewayProcess, fakes: dict[str, Any], api: str, stream: bool
) -> None:
    text, headers = ask(gw, api, "refused request", stream)
    assert text == "hello from openai (gpt-4o)"
    assert headers["x-plano-model"] == GPT4O and headers["x-plano-attempts"] == "2"
    assert len(fakes["oa"].requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
def test_attempt_timeout_fails_over(
    gw: GatewayProcess, fakes: dict[str, Any], api: str, stream: bool
) -> None:
    fakes["hang"].hang = 3 * ATTEMPT_TIMEOUT
    text, headers = ask(gw, api, "slow request", stream)
    assert text == "hello from openai (gpt-4o)"
    assert headers["x-plano-model"] == GPT4O and headers["x-plano-attempts"] == "2"
    assert len(fakes["hang"].requests) == 1 and len(fakes["oa"].requests) == 1


# ------------------------------------------------------------------------------ no second try


def test_a_long_live_stream_is_neither_cut_nor_sent_again(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """Events keep coming for longer than the attempt timeout: one provider call, whole answer."""
    hang = fakes["hang"]
    hang.gap, hang.events = ATTEMPT_TIMEOUT / 4, 10  # 2.5x the attempt timeout in total
    s = oai(gw).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "slow request"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    assert text == "".join(f"w{i} " for i in range(10))
    assert len(hang.requests) == 1 and not fakes["oa"].requests


def test_no_second_attempt_after_the_first_byte(gw: GatewayProcess, fakes: dict[str, Any]) -> None:
    """The provider stalls after its first event: the stream ends with an error; the next
    model is never called (its answer would follow half of another one)."""
    hang = fakes["hang"]
    hang.stall_after_first, hang.hang = True, 3 * ATTEMPT_TIMEOUT
    s = oai(gw).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "slow request"}], stream=True
    )
    got: list[str] = []
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for c in s:
            got.extend(ch.delta.content or "" for ch in c.choices)
    assert got == ["first"]
    assert len(hang.requests) == 1 and not fakes["oa"].requests


def test_in_band_error_after_200_is_not_failed_over(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """Anthropic's error event after the 200: the Chat client gets it as its own error, and
    no second model is called."""
    fakes["an"].queue(Script(text=["partial"], stream_error=True))
    s = oai(gw).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": CODE}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in s:
            pass
    assert len(fakes["an"].requests) == 1 and not fakes["oa"].requests


def test_a_request_the_first_model_refuses_is_not_retried(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    fakes["an"].queue(Script(status=400, error_message="bad field"))
    with pytest.raises(openai.BadRequestError) as e:
        oai(gw).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": CODE}]
        )
    assert "bad field" in str(e.value)
    assert e.value.response.headers["x-plano-attempts"] == "1"
    assert not fakes["oa"].requests


# ------------------------------------------------------------------------------ all failing


@pytest.mark.parametrize("api", APIS)
def test_every_model_failing_gives_the_last_failure_in_the_clients_format(
    gw: GatewayProcess, fakes: dict[str, Any], api: str
) -> None:
    fakes["an"].queue(Script(status=503))
    fakes["oa"].queue(Script(status=429, retry_after="7", error_message="gpt-4o is busy"))
    err: Any
    if api == "messages":
        with pytest.raises(anthropic.RateLimitError) as ae:
            ant(gw).messages.create(
                model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": CODE}]
            )
        err = ae.value
        assert err.body["type"] == "error" and err.body["error"]["type"] == "rate_limit_error"
        assert err.body["error"]["message"] == "gpt-4o is busy"
    else:
        with pytest.raises(openai.RateLimitError) as oe:
            if api == "chat":
                oai(gw).chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": CODE}]
                )
            else:
                oai(gw).responses.create(model="gpt-4o", input=CODE)
        err = oe.value
        assert err.body["message"] == "gpt-4o is busy"
    headers = err.response.headers
    assert headers["retry-after"] == "7"
    assert headers["x-plano-model"] == GPT4O and headers["x-plano-attempts"] == "2"


def test_every_model_refusing_connections_is_a_clear_error(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """Both connections refused: Envoy's own reply, in the Anthropic client's format (the
    last attempt's :path was OpenAI's, the format follows the client)."""
    fakes["oa"].stop()
    try:
        with pytest.raises(anthropic.APIStatusError) as e:
            ant(gw).messages.create(
                model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "refused"}]
            )
        assert e.value.status_code in (502, 503)
        assert e.value.body["type"] == "error"
        assert e.value.response.headers["x-plano-attempts"] == "2"
    finally:
        fakes["oa"].start()


def test_attempts_are_bounded_by_max_attempts(gw: GatewayProcess, fakes: dict[str, Any]) -> None:
    fakes["an"].queue(Script(status=503))
    fakes["oa"].queue(Script(status=503))
    fakes["extra"].queue(Script(status=500, error_message="third fails"))
    with pytest.raises(openai.InternalServerError) as e:
        oai(gw).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "wide request"}]
        )
    assert e.value.response.headers["x-plano-attempts"] == "3"
    assert e.value.response.headers["x-plano-model"] == "openai/gpt-4o-mini"
    # The fourth model (gpt-4.1, same fake) is never called.
    assert [r.json["model"] for r in fakes["extra"].requests] == ["gpt-4o-mini"]
    assert len(fakes["an"].requests) == len(fakes["oa"].requests) == 1


# ------------------------------------------------------------------------------ bodies, load


def test_a_large_body_fails_over_intact_and_a_too_large_one_is_refused(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """The retry buffer is the listener's max_request_bytes: any accepted body can fail over."""
    big = "x" * (3 * 1024 * 1024)
    fakes["an"].queue(Script(status=503))
    resp = oai(gw).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": CODE + " " + big}]
    )
    assert resp.choices[0].message.content == "hello from openai (gpt-4o)"
    [rec] = fakes["oa"].requests
    assert rec.json["messages"][0]["content"] == CODE + " " + big
    fakes["oa"].clear()
    with pytest.raises(openai.APIStatusError) as e:
        oai(gw).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": CODE + " " + big + big}]
        )
    assert e.value.status_code == 413
    assert not fakes["oa"].requests


def envoy_stat(gw: GatewayProcess, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/stats?filter={name}") as r:
        text = r.read().decode()
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.strip())


def test_32_concurrent_failovers_none_lost(gw: GatewayProcess, fakes: dict[str, Any]) -> None:
    """More concurrent retries than Envoy's default cap of 3 per cluster."""
    fakes["an"].fail_status = 503
    overflow = envoy_stat(gw, "upstream_rq_retry_overflow")

    def one(i: int) -> tuple[str, str]:
        raw = oai(gw).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"{CODE} #{i}"}]
        )
        return raw.parse().choices[0].message.content or "", raw.headers["x-plano-attempts"]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [("hello from openai (gpt-4o)", "2")] * 32
    assert len(fakes["an"].requests) == len(fakes["oa"].requests) == 32
    assert envoy_stat(gw, "upstream_rq_retry_overflow") == overflow


# ------------------------------------------------------------------------------ sessions, logs


def test_a_pinned_session_fails_over_for_one_request_and_keeps_its_pin(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    client = oai(gw, default_headers={"X-Model-Affinity": f"fo-{time.time_ns()}"})
    msgs: Any = [{"role": "user", "content": CODE}]
    first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=msgs)
    assert first.headers["x-plano-model"] == CLAUDE
    fakes["an"].queue(Script(status=529))
    second = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "something else entirely"}]
    )
    assert second.headers["x-plano-model"] == GPT4O
    third = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "and another"}]
    )
    assert third.headers["x-plano-model"] == CLAUDE and third.headers["x-plano-attempts"] == "1"


def test_the_failover_is_logged_and_counted(gw: GatewayProcess, fakes: dict[str, Any]) -> None:
    fakes["an"].queue(Script(status=429, retry_after="0"))
    oai(gw).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": CODE}])
    deadline = time.monotonic() + 5
    line = f"failover {CLAUDE} -> {GPT4O} (attempt 2, 429)"
    while line not in gw.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in gw.output()
    with urllib.request.urlopen(gw.worker_admin[0] + "/metrics") as r:
        metrics = r.read().decode()
    failovers = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "plano_failovers_total"
    }
    assert failovers[(("from_model", CLAUDE), ("reason", "429"), ("to_model", GPT4O))] >= 1


# ------------------------------------------------------------------------------ cooldowns


@pytest.fixture(scope="module")
def cool_gw(
    fakes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    # A short default rest: a test that sees a long one knows the provider's hint was read.
    g = _start(fakes, tmp_path_factory.mktemp("cool"), "    cooldown_default: 200ms", workers=2)
    yield g
    g.stop()


def worker_decisions(gw: GatewayProcess) -> list[int]:
    counts = []
    for url in gw.worker_admin:
        with urllib.request.urlopen(url + "/metrics") as r:
            text = r.read().decode()
        counts.append(
            sum(
                int(float(line.rsplit(" ", 1)[1]))
                for line in text.splitlines()
                if line.startswith("plano_routing_decisions_total{") and 'route="cool"' in line
            )
        )
    return counts


def test_cooldown_is_honoured_by_every_worker(
    cool_gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """A 429 with Retry-After: 30 on gpt-4o-mini: every later request, whichever worker
    routes it, skips that model (one attempt, straight to the next)."""
    extra, oa = fakes["extra"], fakes["oa"]
    extra.queue(Script(status=429, retry_after="30"))
    raw = oai(cool_gw).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "cool 0"}]
    )
    assert raw.headers["x-plano-attempts"] == "2" and raw.headers["x-plano-model"] == GPT4O
    before = worker_decisions(cool_gw)
    # Envoy balances idle workers by a coin flip per request (least-request, two choices), so
    # 8 requests all landed on one worker once in a while: send until both have routed some
    # (at most 40; the chance that 40 miss a worker is ~1e-12).
    sent = 0
    after = before
    while sent < 40 and not all(a > b for a, b in zip(after, before, strict=True)):
        sent += 1
        raw = oai(cool_gw).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"cool {sent}"}]
        )
        assert raw.headers["x-plano-model"] == GPT4O and raw.headers["x-plano-attempts"] == "1"
        after = worker_decisions(cool_gw)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert len(extra.requests) == 1 and len(oa.requests) == 1 + sent


def test_a_first_attempt_without_a_stream_still_rests_for_retry_after_ms(
    cool_gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """Haiku speaks the Messages client's API: the routing stream builds its request and its
    attempt has no ext_proc stream (the __first cluster); its 429 with retry-after-ms: 30000
    still rests it for later requests on every worker."""
    haiku = fakes["haiku"]
    haiku.clear()
    haiku.limited = True
    msgs: Any = [{"role": "user", "content": "millis"}]
    raw = ant(cool_gw).messages.with_raw_response.create(
        model="gpt-4o", max_tokens=5, messages=msgs
    )
    assert raw.headers["x-plano-model"] == GPT4O and raw.headers["x-plano-attempts"] == "2"
    haiku.limited = False
    time.sleep(0.5)  # past the 200 ms default rest: only the 30 s hint keeps haiku resting
    for _ in range(6):
        raw = ant(cool_gw).messages.with_raw_response.create(
            model="gpt-4o", max_tokens=5, messages=msgs
        )
        assert raw.headers["x-plano-model"] == GPT4O and raw.headers["x-plano-attempts"] == "1"
    assert len(haiku.requests) == 1
    assert envoy_stat(cool_gw, "__first.upstream_rq_total") >= 1


def test_when_every_model_rests_they_are_tried_anyway(
    cool_gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    fakes["an"].queue(Script(status=429, retry_after="30"))
    fakes["oa"].queue(Script(status=429, retry_after="30"))
    with pytest.raises(openai.RateLimitError):
        oai(cool_gw).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": CODE}]
        )
    # Both rest now; the next request still tries them in order.
    raw = oai(cool_gw).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": CODE}]
    )
    assert raw.headers["x-plano-model"] == CLAUDE and raw.headers["x-plano-attempts"] == "1"


# ------------------------------------------------------------------------------ untranslatable


def test_a_model_that_cannot_take_the_request_yields_to_the_next(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """previous_response_id has no Anthropic equivalent: Claude (the route's first model) is
    skipped, never called, and OpenAI's native Responses API serves the request."""
    raw = oai(gw).responses.with_raw_response.create(
        model="gpt-4o", input=CODE, previous_response_id="resp_earlier"
    )
    assert raw.parse().output_text == "hello from openai (gpt-4o)"
    assert raw.headers["x-plano-model"] == GPT4O and raw.headers["x-plano-attempts"] == "1"
    assert not fakes["an"].requests
    [rec] = fakes["oa"].requests
    assert rec.path == "/v1/responses" and rec.json["previous_response_id"] == "resp_earlier"


def test_a_model_that_cannot_take_the_request_is_not_tried_even_last(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """The only other candidate would refuse the body: the first model's failure is final."""
    fakes["oa"].fail_status = 503
    inline = [{"name": "code", "description": "writing code", "models": [GPT4O, CLAUDE]}]
    with pytest.raises(openai.InternalServerError) as e:
        oai(gw).responses.create(
            model="gpt-4o",
            input=CODE,
            previous_response_id="resp_earlier",
            extra_body={"routing_preferences": inline},
        )
    assert e.value.response.headers["x-plano-attempts"] == "1"
    assert len(fakes["oa"].requests) == 1 and not fakes["an"].requests


# ------------------------------------------------------------------------------ hostile, cut


def test_client_sent_failover_and_retry_headers_steer_nothing(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    """A direct-model request carrying slot, attempt-count and retry headers: served once by
    the requested model; none of them reaches the provider."""
    an, oa = fakes["an"], fakes["oa"]
    oa.queue(Script(status=503))
    hostile = {
        "x-plano-try-0": "anthropic_127_0_0_1_1__failover",
        "x-plano-try-1": "plano_extproc",
        "x-envoy-attempt-count": "0",
        "x-envoy-max-retries": "5",
        "x-envoy-retry-on": "5xx",
    }
    with pytest.raises(openai.InternalServerError) as e:
        oai(gw, default_headers=hostile).chat.completions.create(
            model="openai/gpt-4o", messages=[{"role": "user", "content": "hello"}]
        )
    assert e.value.response.headers["x-plano-attempts"] == "1"
    [rec] = oa.requests
    assert not an.requests
    for name in ("x-plano-try-0", "x-plano-try-1", "x-envoy-max-retries", "x-envoy-retry-on"):
        assert name not in rec.headers


@pytest.mark.parametrize("split", [1, 3])
def test_a_translated_stream_after_failover_survives_any_cut(
    gw: GatewayProcess, fakes: dict[str, Any], split: int
) -> None:
    """Attempt 2 (OpenAI, translated for an Anthropic client) streams its SSE cut every
    ``split`` bytes, inside UTF-8 characters too: the attempt stream reassembles it."""
    fakes["an"].queue(Script(status=529))
    fakes["oa"].queue(Script(text=["héllo ", "wörld ", "日本"], split=split, split_utf8=True))
    text, headers = ask(gw, "messages", CODE, stream=True)
    assert text == "héllo wörld 日本"
    assert headers["x-plano-model"] == GPT4O and headers["x-plano-attempts"] == "2"


# ------------------------------------------------------------------------------ usage


def _token_sums(gw: GatewayProcess, model: str) -> dict[str, float]:
    with urllib.request.urlopen(gw.worker_admin[0] + "/metrics") as r:
        text = r.read().decode()
    out = {"input": 0.0, "output": 0.0, "requests": 0.0}
    for line in text.splitlines():
        if (
            line.startswith("gen_ai_client_token_usage_sum{")
            and f'response_model="{model}"' in line
        ):
            kind = line.split('gen_ai_token_type="', 1)[1].split('"', 1)[0]
            if kind in out:
                out[kind] += float(line.rsplit(" ", 1)[1])
        if line.startswith("plano_requests_total{") and 'endpoint="proxy"' in line:
            out["requests"] += float(line.rsplit(" ", 1)[1])
    return out


def _settled(gw: GatewayProcess, model: str) -> dict[str, float]:
    """The sums once earlier tests' usage records have arrived (Envoy sends them in batches
    every 0.5 s): two reads a second apart that agree, bounded."""
    last = _token_sums(gw, model)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _token_sums(gw, model)
        if now == last:
            return now
        last = now
    raise AssertionError("usage records kept arriving")


@pytest.mark.parametrize(
    ("prompt", "first", "second", "first_fails"),
    [
        (CODE, "an", "oa", True),  # translated attempt fails, native one serves
        (CODE, "an", "oa", False),  # the translated first attempt serves
        ("cool", "extra", "oa", True),  # the routing stream's native first attempt fails
        ("cool", "extra", "oa", False),  # ... or serves
    ],
)
def test_chat_stream_without_usage_is_counted_whichever_attempt_serves(
    gw: GatewayProcess,
    fakes: dict[str, Any],
    prompt: str,
    first: str,
    second: str,
    first_fails: bool,
) -> None:
    """The gateway asks every attempt for usage; the client's stream shows none (no usage
    chunk, no usage member) and the tokens of the model that served are counted."""
    usage = Usage(prompt=23, completion=5)
    if first_fails:
        fakes[first].queue(Script(status=503))
        fakes[second].queue(Script(text="from the second", usage=usage))
    else:
        fakes[first].queue(Script(text="from the first", usage=usage))
    served = {"an": CLAUDE, "oa": GPT4O, "extra": "openai/gpt-4o-mini"}[
        second if first_fails else first
    ]
    before = _settled(gw, served)
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-plano-model"] == served
        raw = resp.read().decode()
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all("usage" not in c and c["choices"] for c in chunks), raw
    for name in (first, second):
        for rec in fakes[name].requests:
            if rec.path.endswith("/chat/completions"):  # each Chat attempt asked for usage
                assert json.loads(rec.body)["stream_options"] == {"include_usage": True}
    deadline = time.monotonic() + 10
    while True:
        after = _token_sums(gw, served)
        if after["requests"] > before["requests"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (after["input"] - before["input"], after["output"] - before["output"]) == (23, 5)
