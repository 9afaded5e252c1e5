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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class FakeProvider(FakeServer):
    """Answers Chat Completions, Anthropic Messages and Responses requests (JSON or SSE)."""

    def __init__(self, name: str = "provider") -> None:
        super().__init__()
        self.name = name
        self.fail_status: int | None = None

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
