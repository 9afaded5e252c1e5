"""Stand-in Messages client -> Chat provider translator (text only) for the wiring tests.

Used only while the real ``plano_extproc/translate/messages_chat.py`` is absent: the tests
append this directory to ``plano_extproc.translate.__path__``, after the package's own
directory, so the real module wins as soon as it exists.
"""

from __future__ import annotations

from typing import Any

from plano_extproc.providers import ClientApi
from plano_extproc.translate.base import SseOut

client = ClientApi.MESSAGES
provider = ClientApi.CHAT


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if isinstance(b, dict))


def request(body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    msgs = [{"role": m["role"], "content": _text(m["content"])} for m in body["messages"]]
    out: dict[str, Any] = {"model": model_id, "messages": msgs}
    if body.get("stream"):
        out["stream"] = True
    return out, {"stream": bool(body.get("stream")), "model": str(body.get("model"))[:256]}


def response(body: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    choice = body["choices"][0]
    return {
        "id": "msg_" + body["id"],
        "type": "message",
        "role": "assistant",
        "model": ctx["model"],
        "content": [{"type": "text", "text": choice["message"]["content"]}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }


class _Stream:
    def __init__(self, ctx: dict[str, Any]) -> None:
        self.ctx = ctx
        self.started = False
        self.done = False

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        out: list[SseOut] = []
        if data == "[DONE]":
            self.done = True
            return [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": 0},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
        if not isinstance(data, dict):
            return out
        if not self.started:
            self.started = True
            message = {
                "id": "msg_x",
                "type": "message",
                "role": "assistant",
                "model": self.ctx["model"],
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            out.append(("message_start", {"type": "message_start", "message": message}))
            out.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
            )
        text = data["choices"][0]["delta"].get("content")
        if text:
            out.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": text},
                    },
                )
            )
        return out

    def end(self) -> list[SseOut]:
        if self.done:
            return []
        return [
            (
                "error",
                {"type": "error", "error": {"type": "api_error", "message": "stream ended early"}},
            )
        ]


def stream(ctx: dict[str, Any]) -> _Stream:
    return _Stream(ctx)
