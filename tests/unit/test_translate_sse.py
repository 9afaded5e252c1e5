"""The SSE byte layer: events survive any split, any line ending, and UTF-8 cut mid-character."""

from __future__ import annotations

import json
from typing import Any

import pytest

from plano_extproc.providers import ClientApi
from plano_extproc.translate import parse_pair, provider_api, translator
from plano_extproc.translate.base import SseOut
from plano_extproc.translate.errors import client_error
from plano_extproc.translate.sse import (
    MAX_PENDING_BYTES,
    SseError,
    SseParser,
    SseTranslation,
    encode,
    parse_data,
)

STREAM = (
    "event: message_start\n"
    'data: {"type":"message_start","text":"héllo 你好 🎉"}\n'
    "\n"
    ": keep-alive comment\n"
    "event: ping\n"
    "data: {}\n"
    "\n"
    "data: line one\n"
    "data:line two\n"
    "\n"
    "data: [DONE]\n"
    "\n"
).encode()
EXPECTED = [
    ("message_start", '{"type":"message_start","text":"héllo 你好 🎉"}'),
    ("ping", "{}"),
    (None, "line one\nline two"),
    (None, "[DONE]"),
]


def _parse_in_pieces(data: bytes, cuts: list[int]) -> list[tuple[str | None, str]]:
    parser = SseParser()
    out: list[tuple[str | None, str]] = []
    start = 0
    for cut in [*cuts, len(data)]:
        out += parser.feed(data[start:cut])
        start = cut
    return out + parser.finish()


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_single_cut_point_and_line_ending(newline: str) -> None:
    data = STREAM.decode().replace("\n", newline).encode()
    for cut in range(len(data) + 1):
        assert _parse_in_pieces(data, [cut]) == EXPECTED, (newline, cut)


def test_byte_by_byte() -> None:
    data = STREAM.replace(b"\n", b"\r\n")
    assert _parse_in_pieces(data, list(range(1, len(data)))) == EXPECTED


def test_unterminated_last_event_still_counts() -> None:
    assert _parse_in_pieces(b'data: {"a":1}', []) == [(None, '{"a":1}')]


def test_event_without_data_is_not_dispatched() -> None:
    assert _parse_in_pieces(b"event: ping\n\n", []) == []


def test_oversized_event_is_refused_not_buffered() -> None:
    parser = SseParser()
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"x" * (MAX_PENDING_BYTES + 1))
    parser = SseParser()
    line = b"data: " + b"x" * (1 << 20) + b"\n"
    with pytest.raises(SseError):
        for _ in range(MAX_PENDING_BYTES // len(line) + 2):
            parser.feed(line)


def test_parse_data() -> None:
    assert parse_data('{"a": 1}') == {"a": 1}
    assert parse_data("[DONE]") == "[DONE]"
    assert parse_data("{broken") == "{broken"
    assert parse_data("[1, 2]") == "[1, 2]"


def test_encode_frames_named_and_unnamed_events() -> None:
    events: list[SseOut] = [("ping", {"type": "ping"}), (None, "[DONE]"), (None, "a\r\nb")]
    assert encode(events) == (
        b'event: ping\ndata: {"type":"ping"}\n\ndata: [DONE]\n\ndata: a\ndata: b\n\n'
    )
    assert encode([(None, {"t": "é"})]) == 'data: {"t":"é"}\n\n'.encode()


class _Upper:
    """A stand-in stream translator that records what it saw (a test double of the contract,
    not of our code)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, Any]] = []

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        self.seen.append((name, data))
        return [(name, data)]

    def end(self) -> list[SseOut]:
        return [(None, "[END]")]


def test_translation_runs_events_through_translator_and_closes_once() -> None:
    t = _Upper()
    run = SseTranslation(t)
    half = len(STREAM) // 2
    out = run.feed(STREAM[:half]) + run.feed(STREAM[half:]) + run.end()
    assert [n for n, _ in t.seen] == ["message_start", "ping", None, None]
    assert t.seen[0][1] == {"type": "message_start", "text": "héllo 你好 🎉"}
    assert out.endswith(b"data: [END]\n\n")
    assert run.end() == b"" and run.feed(b"data: x\n\n") == b""


def test_provider_api_choice() -> None:
    assert provider_api("openai", ClientApi.CHAT) is ClientApi.CHAT
    assert provider_api("openai", ClientApi.MESSAGES) is ClientApi.CHAT
    assert provider_api("groq", ClientApi.RESPONSES) is ClientApi.CHAT
    assert provider_api("vercel", ClientApi.MESSAGES) is ClientApi.MESSAGES
    assert provider_api("amazon_bedrock", ClientApi.CHAT) is None
    assert provider_api("no-such-provider", ClientApi.CHAT) is None
    assert parse_pair("messages>chat_completions") == (ClientApi.MESSAGES, ClientApi.CHAT)
    assert parse_pair("chat_completions>chat_completions") is None  # native: no pair
    assert translator(ClientApi.CHAT, ClientApi.CHAT) is None
    assert parse_pair("bogus") is None


@pytest.mark.parametrize(
    ("status", "anthropic_type", "openai_type"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (403, "permission_error", "permission_error"),
        (404, "not_found_error", "not_found_error"),
        (413, "request_too_large", "invalid_request_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "api_error", "server_error"),
        (502, "api_error", "server_error"),
        (503, "overloaded_error", "server_error"),
        (529, "overloaded_error", "server_error"),
    ],
)
def test_client_error_types_by_status(status: int, anthropic_type: str, openai_type: str) -> None:
    openai_body = b'{"error": {"message": "m1", "type": "x", "code": "rate_limit_exceeded"}}'
    a = json.loads(client_error(ClientApi.MESSAGES, status, openai_body))
    assert a == {"type": "error", "error": {"type": anthropic_type, "message": "m1"}}
    anthropic_body = b'{"type":"error","error":{"type":"overloaded_error","message":"m2"}}'
    for api in (ClientApi.CHAT, ClientApi.RESPONSES):
        o = json.loads(client_error(api, status, anthropic_body))
        assert o["error"]["type"] == openai_type and o["error"]["message"] == "m2"
        assert o["error"]["code"] == "overloaded_error"


def test_client_error_odd_provider_bodies() -> None:
    gemini = b'[{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}]'
    assert json.loads(client_error(ClientApi.CHAT, 429, gemini))["error"]["message"] == "quota"
    text = json.loads(client_error(ClientApi.MESSAGES, 502, b"<html>Bad gateway</html>"))
    assert text["error"] == {"type": "api_error", "message": "<html>Bad gateway</html>"}
    empty = json.loads(client_error(ClientApi.CHAT, 500, b""))
    assert "HTTP 500" in empty["error"]["message"]
    huge = json.loads(client_error(ClientApi.CHAT, 400, b'{"error":"' + b"x" * 10000 + b'"}'))
    assert len(huge["error"]["message"]) < 2100
