"""Envoy's limits, timeouts and local replies through the real gateway (issue 11: 6, 9, 10, 14).

Small configured limits (1-2 s timeouts, a handful of concurrent requests) make each one
observable in seconds: slow uploads are cut while normal traffic is served, overflow is an
immediate JSON 503, a stream is limited by idle time and not by total time, and every reply
Envoy itself produces carries the JSON error envelope of the client's API.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from tests.fakes import FakeProvider, free_port
from tests.gateway_proc import GatewayProcess, assert_envoy_accepts

pytestmark = pytest.mark.integration

TIMEOUT = 2.0  # listener `timeout`: the stream idle limit
REQUEST_TIMEOUT = 2.0  # listener request_timeout: the whole request must arrive in time
MAX_CONCURRENT = 12
MAX_STREAM = 8.0  # listener max_stream_duration: the opt-in total limit
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


class PacedProvider(FakeProvider):
    """A FakeProvider whose timing a test sets: answer late, drip a stream, or stall in it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.mode = "ok"  # ok | delay | drip | stall
        self.seconds = 0.0  # delay / stall length; drip: gap between chunks
        self.chunks = 0  # drip: how many chunks

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "delay":
            await asyncio.sleep(self.seconds)
        if self.mode not in ("drip", "stall"):
            return await super().handle(request)
        await self._record(request)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if self.mode == "drip":
            for i in range(self.chunks):
                await resp.write(f"data: {json.dumps({'chunk': i})}\n\n".encode())
                await asyncio.sleep(self.seconds)
        else:
            await resp.write(b'data: {"chunk": 0}\n\n')
            await asyncio.sleep(self.seconds)
            await resp.write(b'data: {"chunk": "late"}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def limits_config(openai_url: str, anthropic_url: str, closed_port: int) -> str:
    return f"""
version: v0.4.0
listeners:
  - name: model_listener
    type: model
    timeout: {TIMEOUT:g}s
    request_headers_timeout: 1s
    request_timeout: {REQUEST_TIMEOUT:g}s
    max_concurrent_requests: {MAX_CONCURRENT}
    max_request_headers_kb: 16
    max_stream_duration: {MAX_STREAM:g}s
model_providers:
  - model: openai/gpt-4o-mini
    base_url: {openai_url}/v1
    access_key: sk-openai-test
    default: true
  - model: anthropic/claude-sonnet-4-20250514
    base_url: {anthropic_url}/v1
    access_key: sk-ant-test
  - model: openai/gpt-closed
    base_url: http://127.0.0.1:{closed_port}/v1
    access_key: sk-openai-test
  - model: anthropic/claude-closed
    base_url: http://127.0.0.1:{closed_port}/v1
    access_key: sk-ant-test
routing: {{router: {{type: none}}}}
"""


@pytest.fixture(scope="module")
def paced() -> Iterator[tuple[PacedProvider, PacedProvider]]:
    oai, ant = PacedProvider("openai").start(), PacedProvider("anthropic").start()
    yield oai, ant  # type: ignore[misc]
    oai.stop()
    ant.stop()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, paced: tuple[PacedProvider, PacedProvider]
) -> Iterator[GatewayProcess]:
    oai, ant = paced
    cfg = limits_config(oai.base_url, ant.base_url, free_port())
    with GatewayProcess(cfg, tmp_path_factory.mktemp("limits"), extra_args=["--access-log"]) as g:
        yield g


@pytest.fixture(autouse=True)
def _reset(paced: tuple[PacedProvider, PacedProvider]) -> None:
    for fake in paced:
        fake.mode = "ok"
        fake.fail_status = None
        fake.clear()


def chat(model: str = "openai/gpt-4o-mini", **extra: Any) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


def messages(model: str = "anthropic/claude-sonnet-4-20250514", **extra: Any) -> bytes:
    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({**body, **extra}).encode()


def post(gw: GatewayProcess, path: str, body: bytes, timeout: float = 20) -> httpx.Response:
    return httpx.post(
        gw.url + path, content=body, headers={"content-type": "application/json"}, timeout=timeout
    )


def openai_error(resp: httpx.Response) -> dict[str, Any]:
    """The OpenAI envelope, checked: {"error": {"type", "message", ...}}."""
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


def anthropic_error(resp: httpx.Response) -> dict[str, Any]:
    """Anthropic's envelope: {"type": "error", "error": {"type", "message"}}."""
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    doc = resp.json()
    assert doc["type"] == "error", doc
    assert isinstance(doc["error"]["type"], str) and doc["error"]["message"]
    return dict(doc["error"])


# --------------------------------------------------------------------------- raw clients


def raw_exchange(gw: GatewayProcess, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes, read until the gateway closes or ``wait`` passes."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=wait) as s:
        s.sendall(data)
        return read_all(s, wait)


def read_all(s: socket.socket, wait: float) -> bytes:
    out = b""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
        if b"\r\n\r\n" in out and response_complete(out):
            break
    return out


def response_complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def parse_raw(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


class SlowUpload:
    """A client that sends its headers, then one body byte every ``gap`` seconds."""

    def __init__(self, gw: GatewayProcess, gap: float = 0.5, body_len: int = 4096) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=15)
        self.sock.sendall(
            (
                f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
                f"content-length: {body_len}\r\n\r\n{{"
            ).encode()
        )
        self.gap = gap
        self.reply = b""
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        deadline = time.monotonic() + 15  # bounded: never more than 30 bytes
        for _ in range(30):
            if time.monotonic() > deadline:
                break
            try:
                self.sock.sendall(b" ")
            except OSError:
                break
            self.sock.settimeout(self.gap)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            self.reply += chunk
            self.reply += read_all(self.sock, 2.0)
            break
        self.sock.close()

    def result(self) -> tuple[int, dict[str, str], bytes]:
        self.thread.join(20)
        assert self.reply, "the slow upload was never answered"
        return parse_raw(self.reply)


# --------------------------------------------------------------------------- tests


def test_slow_uploads_are_cut_while_normal_requests_are_served(gw: GatewayProcess) -> None:
    slow = [SlowUpload(gw) for _ in range(MAX_CONCURRENT - 4)]
    time.sleep(0.3)
    resp = post(gw, CHAT, chat())  # served while the slow uploads hold their streams
    assert resp.status_code == 200, resp.text
    for s in slow:
        status, _, body = s.result()
        assert status == 408, body
        err = json.loads(body)["error"]
        assert err["type"] == "request_timeout"
        assert "request_timeout" in err["message"], err


def test_overflow_is_an_immediate_json_503_not_an_empty_500(gw: GatewayProcess) -> None:
    slow = [SlowUpload(gw) for _ in range(MAX_CONCURRENT + 8)]
    time.sleep(0.3)
    resp = post(gw, CHAT, chat(), timeout=5)
    assert resp.status_code == 503, resp.text
    err = openai_error(resp)
    assert err["type"] == "overloaded"
    assert f"max_concurrent_requests = {MAX_CONCURRENT}" in err["message"]
    resp = post(gw, MESSAGES, messages(), timeout=5)
    assert resp.status_code == 503, resp.text
    assert anthropic_error(resp)["type"] == "overloaded_error"
    statuses = sorted(s.result()[0] for s in slow)
    assert statuses == [408] * MAX_CONCURRENT + [503] * 8
    # Once the slow clients are cut, the gateway serves again.
    assert post(gw, CHAT, chat()).status_code == 200


def test_request_headers_must_arrive_in_time(gw: GatewayProcess) -> None:
    raw = raw_exchange(gw, f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nx-partial: ".encode(), wait=8)
    status, headers, body = parse_raw(raw)
    assert status == 408
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert "request headers not received within 1s" in err["message"], err


def test_connect_failure_is_a_json_503_in_each_api_format(gw: GatewayProcess) -> None:
    resp = post(gw, CHAT, chat("openai/gpt-closed"))
    assert resp.status_code == 503
    err = openai_error(resp)
    assert err["type"] == "upstream_connect_error"
    assert "upstream connect error" in err["message"]
    assert "connection_failure" in err["code"]
    resp = post(gw, MESSAGES, messages("anthropic/claude-closed"))
    assert resp.status_code == 503
    assert "upstream connect error" in anthropic_error(resp)["message"]
    # The official SDKs read the envelope.
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.InternalServerError) as oe:
        client.chat.completions.create(
            model="openai/gpt-closed", messages=[{"role": "user", "content": "hi"}]
        )
    assert "upstream connect error" in oe.value.message
    ant = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as ae:
        ant.messages.create(
            model="anthropic/claude-closed",
            max_tokens=8,
            messages=[{"role": "user", "content": "hi"}],
        )
    assert ae.value.status_code == 503
    assert "upstream connect error" in ae.value.message


def test_silent_provider_gives_a_json_504(
    gw: GatewayProcess, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    for fake in paced:
        fake.mode, fake.seconds = "delay", TIMEOUT + 2
    resp = post(gw, CHAT, chat())
    assert resp.status_code == 504
    err = openai_error(resp)
    assert err["type"] == "timeout" and "listener timeout" in err["message"], err
    resp = post(gw, MESSAGES, messages())
    assert resp.status_code == 504
    assert anthropic_error(resp)["type"] == "timeout_error"


def stream(gw: GatewayProcess) -> bytes:
    """A streamed chat completion's raw bytes; a cut stream ends where it was cut."""
    got = b""
    with httpx.stream(
        "POST", gw.url + CHAT, content=chat(stream=True), timeout=20
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        try:
            for chunk in resp.iter_raw():
                got += chunk
        except httpx.RemoteProtocolError:
            pass  # the gateway reset the stream
    return got


def test_a_stream_that_keeps_sending_is_not_cut_by_timeout(
    gw: GatewayProcess, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    oai, _ = paced
    # Three times the listener timeout in total, never idle for more than a quarter of it.
    oai.mode, oai.seconds, oai.chunks = "drip", TIMEOUT / 4, 12
    got = stream(gw)
    assert b'"chunk": 11' in got and got.endswith(b"data: [DONE]\n\n"), got[-200:]


def test_an_idle_stream_is_cut_by_timeout(
    gw: GatewayProcess, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    oai, _ = paced
    oai.mode, oai.seconds = "stall", TIMEOUT + 3
    got = stream(gw)
    assert b'"chunk": 0' in got
    assert b"late" not in got and b"[DONE]" not in got, got


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "http1.codec_error"),
        (b"GET /v1/models HTTP/1.0\r\n\r\n", 426, "low_version"),
        (
            b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-big: " + b"a" * (17 << 10) + b"\r\n\r\n",
            431,
            "http1.headers_too_large",
        ),
    ],
)
def test_protocol_errors_are_json(
    gw: GatewayProcess, request_bytes: bytes, status: int, code: str
) -> None:
    got_status, headers, body = parse_raw(raw_exchange(gw, request_bytes, wait=5))
    assert got_status == status
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert err["code"] == code and err["message"] and err["type"], err


def test_replies_envoy_did_not_make_are_untouched(
    gw: GatewayProcess, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    # The ext_proc's own errors keep their message (Envoy's mappers must not rewrite them).
    resp = post(gw, CHAT, b"{")
    assert resp.status_code == 400
    assert resp.json() == {
        "error": {
            "type": "invalid_request_error",
            "message": "request body is not valid JSON: expected a member name at char 1",
        }
    }
    resp = post(gw, MESSAGES, b"[]")
    assert resp.status_code == 400 and resp.json()["type"] == "error"
    assert "code" not in resp.json()["error"]
    resp = httpx.get(gw.url + "/healthz")
    assert (resp.status_code, resp.text) == (200, "ok")
    resp = post(gw, "/routing/v1/chat/completions", chat())
    assert resp.status_code == 200 and "models" in resp.json()
    # A provider's own error passes through unchanged.
    oai, _ = paced
    oai.fail_status = 503
    resp = post(gw, CHAT, chat())
    assert resp.status_code == 503
    assert resp.json() == {"error": {"message": "openai failing", "type": "server_error"}}


def test_max_stream_duration_is_an_opt_in_total_limit(
    gw: GatewayProcess, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    oai, _ = paced
    oai.mode, oai.seconds, oai.chunks = "drip", TIMEOUT / 4, int(MAX_STREAM / (TIMEOUT / 4)) + 8
    got = stream(gw)
    assert b'"chunk": 0' in got and b"[DONE]" not in got, got[-200:]


def test_http2_clients_get_the_configured_stream_cap(gw: GatewayProcess) -> None:
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(conn.data_to_send())
        settings: dict[int, int] = {}
        while not settings:
            data = s.recv(65536)
            assert data, "the gateway closed the HTTP/2 connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = {k: v.new_value for k, v in event.changed_settings.items()}
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 128
    assert settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 1 << 20


# --------------------------------------------------------------------------- full duplex
# The routing filter runs FULL_DUPLEX_STREAMED: Envoy streams the body to the worker as it
# arrives and drops content-length; the worker answers headers and body together and the
# content-length filter restores the length from the worker's metadata.

UNCHANGED = b'{"model": "gpt-4o-mini",   "messages": [{"role": "user", "content": "hi"}]}'


def test_a_chunked_upload_in_pieces_reaches_the_provider_whole_with_its_length(
    gw: GatewayProcess, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    oai, _ = paced
    for body, expected in ((UNCHANGED, UNCHANGED), (chat(), None)):
        pieces = [body[:7], body[7:30], body[30:]]
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(
                f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
                "transfer-encoding: chunked\r\nconnection: close\r\n\r\n".encode()
            )
            for piece in pieces:  # three reads for Envoy, well within request_timeout
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                time.sleep(0.2)
            s.sendall(b"0\r\n\r\n")
            status, _, answer = parse_raw(read_all(s, 10))
        assert status == 200, answer
        seen = oai.last()
        if expected is not None:
            assert seen.body == expected  # byte for byte: the worker sends it back as it came
        else:
            assert seen.json == {**json.loads(body), "model": "gpt-4o-mini"}
        assert seen.headers["content-length"] == str(len(seen.body))
        assert "transfer-encoding" not in seen.headers


def h2_post(
    gw: GatewayProcess, frames: list[bytes], trailers: list[tuple[str, str]] | None = None
) -> tuple[str, bytes]:
    """POST ``frames`` (one HTTP/2 DATA frame each) to the chat path over HTTP/2, then
    ``trailers`` if given: the status and body of the answer."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    head = [(":method", "POST"), (":path", CHAT), (":authority", "gw"), (":scheme", "http")]
    conn.send_headers(1, [*head, ("content-type", "application/json")])
    status, answer, ended = "", b"", False
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        for i, frame in enumerate(frames):
            conn.send_data(1, frame, end_stream=trailers is None and i == len(frames) - 1)
            if i % 500 == 0:
                s.sendall(conn.data_to_send())
        if trailers is not None:
            conn.send_headers(1, trailers, end_stream=True)
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            data = s.recv(65536)
            assert data, "the gateway closed the HTTP/2 connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    answer += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = True
            s.sendall(conn.data_to_send())
    assert ended, "no complete answer"
    return status, answer


def test_an_http2_request_with_trailers_is_routed(
    gw: GatewayProcess, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    oai, _ = paced
    status, answer = h2_post(gw, [UNCHANGED], trailers=[("x-checksum", "abc")])
    assert status == "200", answer
    assert json.loads(answer)["object"] == "chat.completion"
    assert oai.last().body == UNCHANGED


def test_a_body_in_one_byte_frames_is_refused_before_the_provider(
    gw: GatewayProcess, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    """Envoy hands each DATA frame to the worker as a message of its own: 6,000 one-byte
    frames (cheap for the client, a message each for the worker) get a JSON 400."""
    oai, _ = paced
    before = len(oai.requests)
    body = chat(messages=[{"role": "user", "content": "x" * 6000}])
    status, answer = h2_post(gw, [body[i : i + 1] for i in range(len(body))])
    assert status == "400", answer
    assert "pieces" in json.loads(answer)["error"]["message"]
    assert len(oai.requests) == before
    # The same body in ordinary frames is served.
    status, answer = h2_post(gw, [body[i : i + 4096] for i in range(0, len(body), 4096)])
    assert status == "200", answer


# --------------------------------------------------------------------------- memory bound

HEAP = 64 << 20
UPLOAD = 7 << 20


def test_unfinished_large_uploads_cannot_grow_envoy_past_max_heap_bytes(
    tmp_path: Path, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    """24 unfinished 7 MiB uploads (168 MiB) against a 64 MiB heap bound: Envoy streams the
    bodies to the workers, which refuse bodies past a quarter of the bound each (JSON 503), so
    Envoy's heap stays under the bound, hogs are answered long before their own 60 s
    timeouts, and the gateway serves a normal request while some of them still hang."""
    oai, ant = paced
    cfg = limits_config(oai.base_url, ant.base_url, free_port())
    # Only the heap bound may shed the hogs: long timeouts, no total limit, room for all.
    cfg = cfg.replace(f"    timeout: {TIMEOUT:g}s", "    timeout: 60s")
    cfg = cfg.replace(f"request_timeout: {REQUEST_TIMEOUT:g}s", "request_timeout: 60s")
    cfg = cfg.replace(f"    max_stream_duration: {MAX_STREAM:g}s\n", "")
    cfg = cfg.replace(f"max_concurrent_requests: {MAX_CONCURRENT}", "max_concurrent_requests: 64")
    assert "2s" not in cfg and "max_stream_duration" not in cfg
    cfg = cfg.replace(
        "    type: model\n", f"    type: model\n    max_request_bytes: {8 << 20}\n"
        f"    max_heap_bytes: {HEAP}\n"
    )  # fmt: skip
    with GatewayProcess(cfg, tmp_path) as g:
        admin = f"http://127.0.0.1:{g.admin_port}"
        hogs: list[socket.socket] = []
        peak = 0
        try:
            for _ in range(24):
                s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
                hogs.append(s)
                head = (
                    f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json"
                    f"\r\ncontent-length: {8 << 20}\r\n\r\n"
                )
                try:
                    s.sendall(head.encode() + b" " * UPLOAD)
                except OSError:
                    pass  # refused while the gateway is saturated
                time.sleep(0.3)
                peak = max(peak, int(httpx.get(admin + "/memory").json()["allocated"]))
            # Give the overload manager a few refreshes to shed the idle hogs.
            deadline = time.monotonic() + 15
            resp = None
            while time.monotonic() < deadline:
                peak = max(peak, int(httpx.get(admin + "/memory").json()["allocated"]))
                resp = post(g, CHAT, chat(), timeout=10)
                if resp.status_code == 200:
                    break
                assert resp.status_code == 503, resp.text
                assert openai_error(resp)["code"] == "overload"
                time.sleep(0.5)
            assert resp is not None and resp.status_code == 200, resp and resp.text
            answered = []
            for s in hogs:
                s.settimeout(0.1)
                try:
                    answered.append(s.recv(4096))
                except (TimeoutError, ConnectionResetError):
                    pass
            replies = [parse_raw(a) for a in answered if a.startswith(b"HTTP/1.1 ")]
            assert replies, "no unfinished upload was shed"
            for status, headers, _ in replies:
                assert status in (408, 503) and headers["content-type"] == "application/json"
            # Envoy streams the bodies to the workers (full duplex): their budget of a quarter
            # of max_heap_bytes each is what refuses the hogs past it.
            assert any(
                b"unfinished request bodies" in body for status, _, body in replies if status == 503
            ), replies
        finally:
            for s in hogs:
                s.close()
    assert peak < HEAP * 3 // 2, f"Envoy's heap reached {peak} bytes"


def test_rendered_limits_pass_envoy_validate(tmp_path: Path) -> None:
    from plano_extproc.config import parse_config
    from plano_extproc.envoy_config import render_bootstrap

    cfg = parse_config(limits_config("http://127.0.0.1:1", "https://api.anthropic.com", 2))
    assert_envoy_accepts(render_bootstrap(cfg, extproc=[("127.0.0.1", 9091)]), tmp_path)


# --------------------------------------------------------------------------- deployment files

ROOT = Path(__file__).resolve().parents[2]


def _k8s(name: str) -> list[dict[str, Any]]:
    import yaml

    return [d for d in yaml.safe_load_all((ROOT / "k8s" / name).read_text()) if d]


def test_k8s_envoy_memory_limit_is_above_the_heap_bound() -> None:
    from plano_extproc.config import parse_config

    [cm] = _k8s("configmap.yaml")
    keys = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}
    heap = parse_config(cm["data"]["config.yaml"], env=keys).listener.max_heap_bytes
    [deployment] = [d for d in _k8s("deployment.yaml") if d["kind"] == "Deployment"]
    [envoy] = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "envoy"
    ]
    limit = envoy["resources"]["limits"]["memory"]
    assert limit.endswith("Mi") and int(limit[:-2]) << 20 >= heap * 5 // 4, (limit, heap)


def test_istio_ext_proc_cluster_has_the_rendered_circuit_breakers() -> None:
    from plano_extproc.config import parse_config
    from plano_extproc.envoy_config import render_bootstrap

    [patch] = _k8s("istio-envoyfilter.yaml")
    [cluster] = [
        p["patch"]["value"] for p in patch["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"
    ]
    keys = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}
    [cm] = _k8s("configmap.yaml")
    ours = render_bootstrap(parse_config(cm["data"]["config.yaml"], env=keys), extproc=[])
    [rendered] = [c for c in ours["static_resources"]["clusters"] if c["name"] == cluster["name"]]
    assert cluster["circuit_breakers"] == rendered["circuit_breakers"]


def test_retries_do_not_overflow_envoys_default_of_three(
    tmp_path: Path, paced: tuple[PacedProvider, PacedProvider]
) -> None:
    """Envoy allows 3 concurrent retries per cluster by default; beyond that a retry is silently
    skipped and the client gets the first failure. Provider clusters get a retry cap sized
    like their request cap, so 16 failing requests at once each get their retry."""
    oai, ant = paced
    oai.mode, oai.seconds, oai.fail_status = "delay", 0.3, 503
    cfg = limits_config(oai.base_url, ant.base_url, free_port()).replace(
        f"max_concurrent_requests: {MAX_CONCURRENT}",
        "max_concurrent_requests: 64\n    max_retries: 1",
    )
    with GatewayProcess(cfg, tmp_path) as g:

        def one(_: int) -> int:
            return httpx.post(g.url + CHAT, content=chat(), timeout=30).status_code

        threads = 16
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(one(0))) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(30)
        assert results == [503] * threads
        assert len(oai.requests) == 2 * threads  # every request was tried twice
        stats = httpx.get(f"http://127.0.0.1:{g.admin_port}/stats?filter=retry_overflow").text
        overflow = sum(int(line.rsplit(": ", 1)[1]) for line in stats.splitlines() if ": " in line)
        assert overflow == 0, stats
