"""Translation wiring through the real Envoy: which requests get response processing, what the
provider receives, and what the client gets back (JSON, SSE, errors, long and cut streams).

The translators' own mapping is tested in tests/unit/test_translate_*.py and, with the SDKs, in
test_translation_envoy.py. Both ext_proc transports run every test.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import orchestrated_seed_config
from tests.fakes import FakeOrchestrator, FakeProvider
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

PLAIN = "What is the capital of France?"
RESPONSE_STREAMS = "http.plano.ext_proc.response_translation.streams_started"


class ScriptedProvider(FakeProvider):
    """FakeProvider plus scripted answers: a 429 with Retry-After, a long Chat stream."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.script: str | None = None
        self.events = 0
        self.gap = 0.0
        self.written = 0  # chunks written by the last long stream before it ended or broke

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.script == "429":
            await self._record(request)
            return web.json_response(
                {"error": {"message": "slow down", "type": "rate_limit_error"}},
                status=429,
                headers={"retry-after": "7"},
            )
        if self.script == "long":
            await self._record(request)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            self.written = 0
            try:
                for i in range(self.events):  # bounded
                    chunk = {
                        "id": "chatcmpl-long",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": "m",
                        "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                     "finish_reason": None}],
                    }  # fmt: skip
                    await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.written += 1
                    await asyncio.sleep(self.gap)
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except (ConnectionResetError, ConnectionError):
                pass
            return resp
        return await super().handle(request)


@pytest.fixture(scope="module")
def providers() -> Iterator[tuple[ScriptedProvider, ScriptedProvider]]:
    oa, an = ScriptedProvider("openai").start(), ScriptedProvider("anthropic").start()
    yield oa, an
    oa.stop()
    an.stop()


@pytest.fixture(scope="module")
def orch() -> Iterator[FakeOrchestrator]:
    fake = FakeOrchestrator().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module", params=["h2", "grpcio"])
def gw(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    providers: tuple[ScriptedProvider, ScriptedProvider],
    orch: FakeOrchestrator,
) -> Iterator[GatewayProcess]:
    oa, an = providers
    cfg = orchestrated_seed_config(oa.base_url, an.base_url, orch.base_url, timeout_ms=500)
    tmp: Path = tmp_path_factory.mktemp("tx")
    args = ["--transport", request.param]
    with GatewayProcess(cfg, tmp, extra_args=args) as g:
        yield g


@pytest.fixture
def oa(providers: tuple[ScriptedProvider, ScriptedProvider]) -> ScriptedProvider:
    p = providers[0]
    p.clear()
    p.script = None
    return p


@pytest.fixture
def an(providers: tuple[ScriptedProvider, ScriptedProvider]) -> ScriptedProvider:
    p = providers[1]
    p.clear()
    p.script = None
    return p


def stat(gw: GatewayProcess, name: str) -> int:
    text = httpx.get(f"http://127.0.0.1:{gw.admin_port}/stats?filter=^{name}$", timeout=5).text
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def post(gw: GatewayProcess, path: str, body: dict[str, object], **headers: str) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=30)


# --------------------------------------------------------------------------- native pairs


def test_native_pair_gets_no_response_processing(gw: GatewayProcess, oa: ScriptedProvider) -> None:
    before = stat(gw, RESPONSE_STREAMS)
    resp = post(
        gw,
        "/v1/chat/completions",
        {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": PLAIN}]},
        authorization="Bearer client-key",
    )
    assert resp.status_code == 200
    # The provider's bytes and length, untouched; no second ext_proc stream was opened.
    assert resp.headers["content-length"] == str(len(resp.content))
    assert resp.json()["choices"][0]["message"]["content"] == "hello from openai (gpt-4o)"
    assert stat(gw, RESPONSE_STREAMS) == before
    rec = oa.last()
    assert "x-plano-translate" not in rec.headers and "x-plano-upstream" not in rec.headers
    assert "accept-encoding" not in rec.headers or rec.headers["accept-encoding"] != "identity"


def test_client_cannot_turn_translation_on(gw: GatewayProcess, oa: ScriptedProvider) -> None:
    before = stat(gw, RESPONSE_STREAMS)
    resp = post(
        gw,
        "/v1/chat/completions",
        {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": PLAIN}]},
        **{"x-plano-translate": "1"},
    )
    assert resp.status_code == 200 and resp.headers["content-length"]
    assert stat(gw, RESPONSE_STREAMS) == before
    assert "x-plano-translate" not in oa.last().headers


# --------------------------------------------------------------------------- translated pairs


def test_messages_client_served_by_chat_provider(gw: GatewayProcess, oa: ScriptedProvider) -> None:
    before = stat(gw, RESPONSE_STREAMS)
    client = anthropic.Anthropic(base_url=gw.url, api_key="client-key", max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="openai/gpt-4o", max_tokens=32, messages=[{"role": "user", "content": PLAIN}]
    )
    msg = raw.parse()
    assert msg.type == "message" and msg.content[0].type == "text"
    assert msg.content[0].text == "hello from openai (gpt-4o)"
    assert raw.headers["x-plano-model"] == "openai/gpt-4o"
    assert stat(gw, RESPONSE_STREAMS) == before + 1
    rec = oa.last()
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer sk-openai-test"
    assert "x-api-key" not in rec.headers
    assert rec.headers["accept-encoding"] == "identity"
    assert rec.headers["content-length"] == str(len(rec.body))
    assert rec.json["model"] == "gpt-4o"
    assert not any(h.startswith("x-plano") for h in rec.headers)


def test_messages_client_stream_from_chat_provider(
    gw: GatewayProcess, oa: ScriptedProvider
) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key="client-key", max_retries=0)
    with client.messages.stream(
        model="openai/gpt-4o", max_tokens=32, messages=[{"role": "user", "content": PLAIN}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "hello from openai (gpt-4o)"
    assert final.stop_reason == "end_turn"
    assert oa.last().json["stream"] is True


def test_chat_client_served_by_anthropic_natively_translated(
    gw: GatewayProcess, an: ScriptedProvider
) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)
    resp = client.chat.completions.create(
        model="anthropic/claude-sonnet-4-20250514",
        messages=[{"role": "user", "content": PLAIN}],
    )
    assert resp.choices[0].message.content == "hello from anthropic (claude-sonnet-4-20250514)"
    rec = an.last()
    assert rec.path == "/v1/messages"
    assert rec.headers["x-api-key"] == "sk-ant-test"
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in rec.headers  # the client's credential never leaves
    assert rec.json["model"] == "claude-sonnet-4-20250514"
    assert isinstance(rec.json["max_tokens"], int)


def test_chat_client_stream_from_anthropic(gw: GatewayProcess, an: ScriptedProvider) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)
    stream = client.chat.completions.create(
        model="anthropic/claude-sonnet-4-20250514",
        messages=[{"role": "user", "content": PLAIN}],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "hello from anthropic (claude-sonnet-4-20250514)"
    assert an.last().path == "/v1/messages"


def test_provider_429_arrives_in_the_clients_format(
    gw: GatewayProcess, oa: ScriptedProvider
) -> None:
    oa.script = "429"
    resp = post(
        gw,
        "/v1/messages",
        {"model": "openai/gpt-4o", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "7"
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["type"] == "error"
    assert body["error"] == {"type": "rate_limit_error", "message": "slow down"}
    # The SDK raises its own rate-limit class from it.
    client = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(
            model="openai/gpt-4o", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )


def test_long_stream_is_not_cut(gw: GatewayProcess, oa: ScriptedProvider) -> None:
    oa.script, oa.events, oa.gap = "long", 300, 0.01  # ~3+ s, 300 provider events
    body = {
        "model": "openai/gpt-4o",
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    deltas = 0
    names: list[str] = []
    with httpx.stream("POST", gw.url + "/v1/messages", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in resp.headers
        for line in resp.iter_lines():
            if line.startswith("event: "):
                names.append(line[7:])
                deltas += line == "event: content_block_delta"
    assert deltas == 300
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "error" not in names


def test_client_disconnect_mid_stream_frees_the_streams(
    gw: GatewayProcess, oa: ScriptedProvider
) -> None:
    oa.script, oa.events, oa.gap = "long", 400, 0.02  # ~8 s if nobody hung up
    body = json.dumps(
        {
            "model": "openai/gpt-4o",
            "max_tokens": 8,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        }
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        got = b""
        for _ in range(100):  # bounded: read until a few translated events arrived
            got += sock.recv(65536)
            if got.count(b"content_block_delta") >= 3:
                break
        assert b"message_start" in got
    # Envoy resets the provider request and both ext_proc streams; nothing stays open.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if stat(gw, "cluster.plano_extproc.upstream_rq_active") == 0 and oa.written < 400:
            break
        time.sleep(0.1)
    assert stat(gw, "cluster.plano_extproc.upstream_rq_active") == 0
    time.sleep(0.5)
    assert oa.written < 400  # the provider stream was cut too, not read to the end
    # And the worker still serves.
    oa.script = None
    ok = post(
        gw,
        "/v1/messages",
        {"model": "openai/gpt-4o", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
    )
    assert ok.status_code == 200 and ok.json()["type"] == "message"


# --------------------------------------------------------------------------- several workers


def test_translation_is_stateless_across_workers(
    tmp_path: Path, providers: tuple[ScriptedProvider, ScriptedProvider], orch: FakeOrchestrator
) -> None:
    """With two ext_proc workers a response stream may land on another worker than the
    request's routing stream: the context travels in Envoy metadata, so every answer is
    translated whichever worker serves it (24 concurrent requests, JSON and SSE)."""
    oa, an = providers
    cfg = orchestrated_seed_config(oa.base_url, an.base_url, orch.base_url, timeout_ms=500)
    with GatewayProcess(cfg, tmp_path, workers=2) as g:
        client = anthropic.Anthropic(base_url=g.url, api_key="client-key", max_retries=0)

        def one(i: int) -> str:
            kw: dict[str, Any] = {
                "model": "openai/gpt-4o",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": f"{PLAIN} {i}"}],
            }
            if i % 2:
                with client.messages.stream(**kw) as stream:
                    return "".join(stream.text_stream)
            msg = client.messages.create(**kw)
            assert msg.content[0].type == "text"
            return msg.content[0].text

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(one, range(24)))
        assert answers == ["hello from openai (gpt-4o)"] * 24
        assert stat(g, RESPONSE_STREAMS) == 24
