"""Stand-in Chat client -> Messages provider translator (text only) for the wiring tests.

Used only while the real ``plano_extproc/translate/chat_messages.py`` is absent (see
messages_chat.py here).
"""

from __future__ import annotations

from typing import Any

from plano_extproc.providers import ClientApi
from plano_extproc.translate.base import SseOut

client = ClientApi.CHAT
provider = ClientApi.MESSAGES


def request(body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    system = [m["content"] for m in body["messages"] if m["role"] == "system"]
    msgs = [m for m in body["messages"] if m["role"] != "system"]
    out: dict[str, Any] = {
        "model": model_id,
        "max_tokens": body.get("max_tokens", 4096),
        "messages": msgs,
    }
    if system:
        out["system"] = "\n".join(system)
    if body.get("stream"):
        out["stream"] = True
    return out, {"stream": bool(body.get("stream")), "model": str(body.get("model"))[:256]}


def response(body: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    text = "".join(b.get("text", "") for b in body["content"] if b.get("type") == "text")
    return {
        "id": "chatcmpl-" + body["id"],
        "object": "chat.completion",
        "created": 0,
        "model": ctx["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class _Stream:
    def __init__(self, ctx: dict[str, Any]) -> None:
        self.ctx = ctx
        self.done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> SseOut:
        return (
            None,
            {
                "id": "chatcmpl-x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": self.ctx["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            },
        )

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        if not isinstance(data, dict):
            return []
        kind = data.get("type")
        if kind == "message_start":
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_delta" and data["delta"].get("type") == "text_delta":
            return [self._chunk({"content": data["delta"]["text"]})]
        if kind == "message_stop":
            self.done = True
            return [self._chunk({}, "stop"), (None, "[DONE]")]
        return []

    def end(self) -> list[SseOut]:
        if self.done:
            return []
        return [(None, {"error": {"type": "server_error", "message": "stream ended early"}})]


def stream(ctx: dict[str, Any]) -> _Stream:
    return _Stream(ctx)
