"""Recording stand-ins for the paid LLM providers and the orchestrator LLM.

They are real HTTP servers on 127.0.0.1 (aiohttp, in a background thread with its own event
loop) so that Envoy, the SDKs and our router talk to them over the network as in production.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(n: int, tries: int = 50) -> int:
    """The first of ``n`` consecutive free ports, for commands that take a base port and
    count up from it (``--admin-port`` with ``--workers``): a lone free port's neighbour may
    be taken by another test's server."""
    for _ in range(tries):
        base = free_port()
        if base + n - 1 > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports in {tries} tries")


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    raw_path: str = ""  # as sent, percent-escapes kept (``path`` is decoded)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class _LoopThread:
    """One asyncio loop in a daemon thread, shared by all fakes in a test session."""

    _instance: _LoopThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _LoopThread:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class FakeServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Recorded] = []
        self._runner: web.AppRunner | None = None
        self._lt = _LoopThread.get()
        self.ssl_context: ssl.SSLContext | None = None  # set before start() to serve HTTPS

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        raise NotImplementedError

    def start(self) -> FakeServer:
        async def go() -> None:
            self._runner = web.AppRunner(self.app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
            await site.start()

        self._lt.run(go())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._lt.run(self._runner.cleanup())
            self._runner = None

    async def _record(self, request: web.Request) -> Recorded:
        body = await request.read()
        rec = Recorded(
            request.method,
            request.path,
            request.query_string,
            {k.lower(): v for k, v in request.headers.items()},
            body,
            request.raw_path.split("?", 1)[0],
        )
        self.requests.append(rec)
        return rec

    def last(self) -> Recorded:
        assert self.requests, "the fake received no request"
        return self.requests[-1]

    def clear(self) -> None:
        self.requests.clear()


# --------------------------------------------------------------------------- scripted answers
# Shapes follow the providers' public API references: OpenAI Chat Completions (chunk objects,
# ``delta.tool_calls[{index, id, type, function{name, arguments}}]``, the ``choices: []`` usage
# chunk sent only for ``stream_options.include_usage``, ``data: [DONE]``, in-band
# ``data: {"error": ...}``) and Anthropic Messages streaming (``message_start``,
# ``content_block_start``, ``ping``, ``content_block_delta`` text/input_json/thinking/signature,
# ``content_block_stop``, ``message_delta`` with usage, ``message_stop``, ``event: error``).


@dataclass
class ToolCall:
    """One tool call the scripted model makes; ``arguments`` (JSON text) is sent in ``pieces``."""

    name: str
    arguments: str
    pieces: int = 1
    id: str = ""  # default: call_<n> (Chat) / toolu_<n> (Anthropic)

    def split(self) -> list[str]:
        n = max(1, min(self.pieces, len(self.arguments) or 1))
        size = -(-len(self.arguments) // n) if self.arguments else 0
        if not size:
            return [""]
        return [self.arguments[i : i + size] for i in range(0, len(self.arguments), size)]


@dataclass
class Usage:
    """Token counts in neutral terms: ``prompt`` counts every input token, cached ones too.

    Chat reports ``prompt_tokens = prompt`` with ``cached_tokens``; Anthropic reports
    ``input_tokens`` without cache reads and writes (its documented accounting)."""

    prompt: int = 11
    completion: int = 7
    cached: int = 0
    cache_creation: int = 0
    reasoning: int = 0

    def chat(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def anthropic(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt - self.cached - self.cache_creation,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cached,
            "output_tokens": self.completion,
            "service_tier": "standard",
        }


# The provider's error ``type`` per status (OpenAI: error.type; Anthropic: error.type).
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
    529: "server_error",
}
_OPENAI_ERROR_CODES = {
    401: "invalid_api_key",
    404: "model_not_found",
    429: "rate_limit_exceeded",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


@dataclass
class Script:
    """What the fake provider answers to one request, in the wire format of the request's API.

    Content is sent in this order: reasoning/thinking, text, tool calls. ``finish`` is the
    provider's own value (``stop``/``length``/``tool_calls``/``content_filter`` for Chat,
    ``end_turn``/``max_tokens``/``tool_use``/``refusal`` for Anthropic); by default it follows
    the content. Transport quirks: ``split`` cuts the SSE bytes into pieces of that many bytes
    and ``split_utf8`` also cuts inside every multi-byte character; ``crlf`` frames events with
    CRLF; ``stream_error`` sends the provider's in-band error event after the content (status
    200 already sent); ``end_early`` stops after the content without any terminal event.
    ``status`` (>= 400) answers with the provider's error body and ``retry_after`` header.
    """

    text: list[str] = field(default_factory=lambda: ["Hello", " world"])
    tool_calls: list[ToolCall] = field(default_factory=list)
    interleave: bool = False  # Chat: argument deltas of parallel calls interleaved
    reasoning: list[str] = field(default_factory=list)
    refusal: str | None = None  # Chat: message.refusal / delta.refusal
    finish: str | None = None
    usage: Usage | None = field(default_factory=Usage)
    usage_chunk: bool | None = None  # Chat stream: None = as the request's include_usage says
    model: str | None = None  # the answer's model; default the request's
    split: int | None = None
    split_utf8: bool = False
    crlf: bool = False
    ping: bool = True  # Anthropic: a ping after the first content_block_start
    stream_error: bool = False
    end_early: bool = False
    status: int | None = None
    error_message: str = "scripted failure"
    retry_after: str | None = None
    piece_delay: float = 0.002  # between byte pieces, so Envoy reads them apart


def _cuts(data: bytes, split: int | None, utf8: bool) -> list[bytes]:
    """``data`` cut every ``split`` bytes and (``utf8``) inside every multi-byte character."""
    points: set[int] = set()
    if split:
        points.update(range(split, len(data), split))
    if utf8:
        for i, b in enumerate(data):
            if b >= 0xC0 and i + 1 < len(data):  # lead byte of a multi-byte character
                points.add(i + 1)
    out, last = [], 0
    for p in sorted(points):
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [piece for piece in out if piece]


def _chat_finish(script: Script) -> str:
    if script.finish:
        return script.finish
    if script.refusal is not None:
        return "content_filter"
    return "tool_calls" if script.tool_calls else "stop"


def _anthropic_finish(script: Script) -> str:
    if script.finish:
        return script.finish
    return "tool_use" if script.tool_calls else "end_turn"


def chat_completion(script: Script, model: str, ident: str) -> dict[str, Any]:
    """A Chat Completions (non-streamed) answer."""
    text = "".join(script.text)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not script.tool_calls else None,
        "refusal": script.refusal,
        "annotations": [],
    }
    if script.reasoning:
        message["reasoning_content"] = "".join(script.reasoning)  # vLLM / DeepSeek extension
    if script.tool_calls:
        message["tool_calls"] = [
            {
                "id": tc.id or f"call_{i}",
                "type": "function",
                "function": {"name": tc.name, "arguments": tc.arguments},
            }
            for i, tc in enumerate(script.tool_calls)
        ]
    out: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _chat_finish(script),
            }
        ],
        "system_fingerprint": "fp_fake",
    }
    if script.usage is not None:
        out["usage"] = script.usage.chat()
    return out


def chat_chunks(script: Script, model: str, ident: str, include_usage: bool) -> Iterator[Any]:
    """The data objects of a Chat Completions stream (without ``[DONE]``)."""
    with_usage = include_usage if script.usage_chunk is None else script.usage_chunk

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if with_usage:
            c["usage"] = None
        return c

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for piece in script.reasoning:
        yield chunk({"reasoning_content": piece})
    for piece in script.text:
        yield chunk({"content": piece})
    if script.refusal is not None:
        yield chunk({"refusal": script.refusal})
    calls = [(i, tc, tc.split()) for i, tc in enumerate(script.tool_calls)]
    for i, tc, _ in calls:
        if not script.interleave:
            break
        head = {"index": i, "id": tc.id or f"call_{i}", "type": "function"}
        yield chunk({"tool_calls": [{**head, "function": {"name": tc.name, "arguments": ""}}]})
    if script.interleave:
        longest = max((len(p) for _, _, p in calls), default=0)
        for k in range(longest):
            for i, _, pieces in calls:
                if k < len(pieces):
                    yield chunk(
                        {"tool_calls": [{"index": i, "function": {"arguments": pieces[k]}}]}
                    )
    else:
        for i, tc, pieces in calls:
            head = {"index": i, "id": tc.id or f"call_{i}", "type": "function"}
            yield chunk({"tool_calls": [{**head, "function": {"name": tc.name, "arguments": ""}}]})
            for piece in pieces:
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
    if script.stream_error:
        yield {"error": _openai_error_body(500, script.error_message)["error"]}
        return
    if script.end_early:
        return
    yield chunk({}, _chat_finish(script))
    if with_usage and script.usage is not None:
        last: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [],
            "usage": script.usage.chat(),
        }
        yield last


def anthropic_message(script: Script, model: str, ident: str) -> dict[str, Any]:
    """An Anthropic Messages (non-streamed) answer."""
    content: list[dict[str, Any]] = []
    if script.reasoning:
        thinking = "".join(script.reasoning)
        content.append({"type": "thinking", "thinking": thinking, "signature": "sig_fake"})
    if script.text:
        content.append({"type": "text", "text": "".join(script.text)})
    for i, tc in enumerate(script.tool_calls):
        tool = {"type": "tool_use", "id": tc.id or f"toolu_{i}", "name": tc.name}
        content.append({**tool, "input": json.loads(tc.arguments or "{}")})
    usage = (script.usage or Usage(0, 0)).anthropic()
    return {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _anthropic_finish(script),
        "stop_sequence": None,
        "usage": usage,
    }


def anthropic_events(script: Script, model: str, ident: str) -> Iterator[tuple[str, Any]]:
    """The (event name, data) pairs of an Anthropic Messages stream."""
    usage = (script.usage or Usage(0, 0)).anthropic()
    start = anthropic_message(script, model, ident)
    start.update(content=[], stop_reason=None, usage={**usage, "output_tokens": 1})
    yield "message_start", {"type": "message_start", "message": start}
    index = 0
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    if script.reasoning:
        deltas = [{"type": "thinking_delta", "thinking": p} for p in script.reasoning]
        deltas.append({"type": "signature_delta", "signature": "sig_fake"})
        blocks.append(({"type": "thinking", "thinking": "", "signature": ""}, deltas))
    if script.text:
        deltas = [{"type": "text_delta", "text": p} for p in script.text]
        blocks.append(({"type": "text", "text": ""}, deltas))
    for i, tc in enumerate(script.tool_calls):
        block = {"type": "tool_use", "id": tc.id or f"toolu_{i}", "name": tc.name, "input": {}}
        pieces = ["", *tc.split()]  # the API's first input_json_delta is often empty
        blocks.append((block, [{"type": "input_json_delta", "partial_json": p} for p in pieces]))
    for block, deltas in blocks:
        yield (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        )
        if index == 0 and script.ping:
            yield "ping", {"type": "ping"}
        for delta in deltas:
            yield (
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
        index += 1
    if script.stream_error:
        yield "error", _anthropic_error_body(529, script.error_message)
        return
    if script.end_early:
        return
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": _anthropic_finish(script), "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def _openai_error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _OPENAI_ERROR_TYPES.get(status, "server_error"),
            "param": None,
            "code": _OPENAI_ERROR_CODES.get(status),
        }
    }


def _anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message},
        "request_id": "req_fake",
    }


class FakeProvider(FakeServer):
    """Answers Chat Completions, Anthropic Messages and Responses requests (JSON or SSE)."""

    def __init__(self, name: str = "provider") -> None:
        super().__init__()
        self.name = name
        self.fail_status: int | None = None
        # Scripted mode: ``scripts`` are used one per request (first in, first out), then
        # ``script`` for every further request; with neither, the default answers below.
        self.script: Script | None = None
        self.scripts: list[Script] = []
        self.sent: list[bytes] = []  # the body bytes of each scripted answer, as sent
        self._served = 0

    def queue(self, *scripts: Script) -> FakeProvider:
        self.scripts.extend(scripts)
        return self

    def clear(self) -> None:
        super().clear()
        self.script = None
        self.scripts.clear()
        self.sent.clear()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        if self.fail_status:
            return web.json_response(
                {"error": {"message": f"{self.name} failing", "type": "server_error"}},
                status=self.fail_status,
            )
        script = self.scripts.pop(0) if self.scripts else self.script
        if script is not None:
            return await self._scripted(request, rec, script)
        try:
            body = json.loads(rec.body) if rec.body else {}
        except ValueError:
            body = {}
        model = body.get("model", "unknown")
        text = f"hello from {self.name} ({model})"
        if rec.path.endswith("/messages"):
            if body.get("stream"):
                return await self._sse_anthropic(request, model, text)
            return web.json_response(
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 5, "output_tokens": 5},
                }
            )
        if rec.path.endswith("/responses"):
            return web.json_response(
                {
                    "id": "resp_fake",
                    "object": "response",
                    "created_at": int(time.time()),
                    "status": "completed",
                    "model": model,
                    "output": [
                        {
                            "type": "message",
                            "id": "msg_1",
                            "status": "completed",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": text, "annotations": []}],
                        }
                    ],
                    "parallel_tool_calls": True,
                    "tool_choice": "auto",
                    "tools": [],
                    "usage": {
                        "input_tokens": 5,
                        "output_tokens": 5,
                        "total_tokens": 10,
                        "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens_details": {"reasoning_tokens": 0},
                    },
                }
            )
        if body.get("stream"):
            return await self._sse_openai(request, model, text)
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
            }
        )

    async def _sse_openai(self, request: web.Request, model: str, text: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, word in enumerate(text.split(" ")):
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": (" " if i else "") + word},
                        "finish_reason": None,
                    }
                ],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _sse_anthropic(
        self, request: web.Request, model: str, text: str
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 5, "output_tokens": 0},
                    },
                },
            ),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 5},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def _scripted(
        self, request: web.Request, rec: Recorded, script: Script
    ) -> web.StreamResponse:
        """Answer ``script`` in the format of the request's API (``/messages`` is Anthropic's)."""
        try:
            body = json.loads(rec.body) if rec.body else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        anthropic_api = rec.path.endswith("/messages")
        model = script.model or str(body.get("model", "unknown"))
        self._served += 1
        ident = f"msg_fake{self._served}" if anthropic_api else f"chatcmpl-fake{self._served}"
        headers = {"request-id" if anthropic_api else "x-request-id": f"req_fake{self._served}"}
        if script.status:
            if script.retry_after is not None:
                headers["retry-after"] = script.retry_after
            make = _anthropic_error_body if anthropic_api else _openai_error_body
            err = json.dumps(make(script.status, script.error_message)).encode()
            self.sent.append(err)
            return web.Response(
                body=err, status=script.status, headers=headers, content_type="application/json"
            )
        if not body.get("stream"):
            make_full = anthropic_message if anthropic_api else chat_completion
            data = json.dumps(make_full(script, model, ident)).encode()
            self.sent.append(data)
            return web.Response(body=data, headers=headers, content_type="application/json")
        nl = "\r\n" if script.crlf else "\n"
        frames: list[str] = []
        if anthropic_api:
            for name, event in anthropic_events(script, model, ident):
                frames.append(f"event: {name}{nl}data: {_dumps(event)}{nl}{nl}")
        else:
            options = body.get("stream_options")
            include = isinstance(options, dict) and options.get("include_usage") is True
            for chunk in chat_chunks(script, model, ident, include):
                frames.append(f"data: {_dumps(chunk)}{nl}{nl}")
            if not (script.end_early or script.stream_error):
                frames.append(f"data: [DONE]{nl}{nl}")
        data = "".join(frames).encode()
        self.sent.append(data)
        resp = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await resp.prepare(request)
        pieces = _cuts(data, script.split, script.split_utf8)
        for i, piece in enumerate(pieces):
            await resp.write(piece)
            if script.piece_delay and i + 1 < len(pieces) and len(pieces) <= 400:
                await asyncio.sleep(script.piece_delay)
        await resp.write_eof()
        return resp


def _dumps(obj: Any) -> str:
    """JSON with raw UTF-8 for non-ASCII text, as the providers send it (so byte cuts can land
    inside a character)."""
    return json.dumps(obj, ensure_ascii=False)


_CONV = re.compile(r"<conversation>\n(.*)\n</conversation>", re.DOTALL)


def keyword_router(rules: dict[str, str]) -> Callable[[str], str | None]:
    """Decide like a router model would, from the last user turn in the prompt."""

    def decide(prompt: str) -> str | None:
        m = _CONV.search(prompt)
        if not m:
            return None
        turns = json.loads(m.group(1))
        users = [t["content"] for t in turns if t["role"] == "user"]
        last = users[-1].lower() if users else ""
        for word, route in rules.items():
            if word in last:
                return route
        return None

    return decide


@dataclass
class FakeOrchestrator(FakeServer):
    """An OpenAI-compatible endpoint serving the router LLM; ``mode`` scripts failures."""

    decide: Callable[[str], str | None] = field(default=lambda _p: None)
    mode: str = "ok"  # ok | arch (string route) | slow | garbage | error | fenced | echo_auth | raw
    delay: float = 5.0
    raw_reply: bytes = b""  # mode "raw": this exact 200 body (wrong shapes, deep nesting)

    def __post_init__(self) -> None:
        super().__init__()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        return app

    def prompts(self) -> list[str]:
        return [r.json["messages"][0]["content"] for r in self.requests]

    async def handle(self, request: web.Request) -> web.Response:
        rec = await self._record(request)
        prompt = rec.json["messages"][0]["content"]
        route = self.decide(prompt)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode == "error":
            return web.json_response({"error": "overloaded"}, status=503)
        if self.mode == "echo_auth":  # a router that reflects its credential in an error body
            auth = request.headers.get("Authorization", "")
            return web.json_response({"error": f"invalid key: {auth}"}, status=401)
        if self.mode == "raw":
            return web.Response(body=self.raw_reply, content_type="application/json")
        if self.mode == "garbage":
            content = "I think the answer is probably code"
        elif self.mode == "arch":
            content = json.dumps({"route": route or "other"})
        elif self.mode == "fenced":
            content = "```json\n" + json.dumps({"route": [route] if route else []}) + "\n```"
        else:
            content = json.dumps({"route": [route] if route else []})
        return web.json_response(
            {
                "id": "router",
                "object": "chat.completion",
                "created": 0,
                "model": rec.json.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
            }
        )


class FakeMetrics(FakeServer):
    """Serves the model-metrics sources: a DigitalOcean-style catalog at ``/catalog``, a
    models.dev-style ``/api.json`` and a Prometheus instant query at ``/api/v1/query``.

    ``cost`` / ``latency`` map catalog keys to numbers; ``fail_status`` makes every answer fail.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cost: dict[str, float] = {}
        self.models_dev: dict[str, Any] = {}
        self.latency: dict[str, float] = {}
        self.fail_status: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/catalog", self.catalog)
        app.router.add_get("/api.json", self.api_json)
        app.router.add_get("/api/v1/query", self.query)
        return app

    async def catalog(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.fail_status:
            return web.Response(status=self.fail_status, text="down")
        data = [
            {"model_id": k, "pricing": {"input_price_per_million": v / 2,
                                        "output_price_per_million": v / 2}}
            for k, v in self.cost.items()
        ]  # fmt: skip
        return web.json_response({"data": data, "meta": {"total": len(data)}})

    async def api_json(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.fail_status:
            return web.Response(status=self.fail_status, text="down")
        return web.json_response(self.models_dev)

    async def query(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.fail_status:
            return web.Response(status=self.fail_status, text="down")
        result = [
            {"metric": {"model_name": k}, "value": [time.time(), str(v)]}
            for k, v in self.latency.items()
        ]
        return web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )


class FakeCollector:
    """An OTLP/gRPC trace collector on 127.0.0.1 that keeps every exported span."""

    METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

    def __init__(self) -> None:
        self.port = 0
        self.spans: list[Any] = []  # (resource attributes dict, Span)
        self._lt = _LoopThread.get()
        self._server: Any = None

    def start(self) -> FakeCollector:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

        async def export(request: Any, context: Any) -> Any:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                # xds-protos bundles an older OTLP schema: field 2 is named
                # instrumentation_library_spans there (scope_spans today, same wire format).
                groups = getattr(rs, "scope_spans", None) or rs.instrumentation_library_spans
                for group in groups:
                    self.spans.extend((resource, span) for span in group.spans)
            return ts.ExportTraceServiceResponse()

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    export,
                    request_deserializer=ts.ExportTraceServiceRequest.FromString,
                    response_serializer=ts.ExportTraceServiceResponse.SerializeToString,
                )
            },
        )

        async def go() -> None:
            self._server = grpc.aio.server()
            self._server.add_generic_rpc_handlers((handler,))
            self.port = self._server.add_insecure_port("127.0.0.1:0")
            await self._server.start()

        self._lt.run(go())
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._lt.run(self._server.stop(None))
            self._server = None

    def spans_of(self, trace_id_hex: str) -> list[tuple[dict[str, str], Any]]:
        return [(r, s) for r, s in list(self.spans) if s.trace_id.hex() == trace_id_hex]


@contextmanager
def running_providers(*names: str) -> Iterator[dict[str, FakeProvider]]:
    """One started FakeProvider per provider name, stopped on exit (a module's fixture)."""
    made = {name: FakeProvider(name) for name in names}
    for fake in made.values():
        fake.start()
    try:
        yield made
    finally:
        for fake in made.values():
            fake.stop()
