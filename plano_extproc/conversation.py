"""Turn each client API's body into the flat conversation routers read.

Validates only what routing depends on (the message list and its text); everything else
is the provider's business and passes through untouched.
"""

from __future__ import annotations

import re
from typing import Any

from plano_extproc.errors import bad_request
from plano_extproc.providers import ClientApi
from plano_extproc.routing.base import ChatMessage


def extract(api: ClientApi, body: dict[str, Any]) -> list[ChatMessage]:
    if api is ClientApi.CHAT:
        return _chat(body)
    if api is ClientApi.MESSAGES:
        return _anthropic(body)
    return _responses(body)


def _text_of(content: Any, where: str) -> str:
    """Flatten a content value (string, list of parts, or null) to text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise bad_request(f"{where}[{j}] must be an object or a string")
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "tool_result":
                texts.append(_text_of(part.get("content"), f"{where}[{j}].content"))
        return "\n".join(t for t in texts if t)
    raise bad_request(f"{where} must be a string, an array of content parts, or null")


def _message_list(body: dict[str, Any], key: str) -> list[Any]:
    if key not in body:
        raise bad_request(f"'{key}' is required")
    value = body[key]
    if not isinstance(value, list):
        raise bad_request(f"'{key}' must be an array of messages")
    if not value:
        raise bad_request(f"'{key}' must contain at least one message")
    return value


def _role(msg: Any, where: str) -> str:
    if not isinstance(msg, dict):
        raise bad_request(f"{where} must be an object")
    role = msg.get("role")
    if not isinstance(role, str) or not role:
        raise bad_request(f"{where}.role must be a non-empty string")
    return role


def _chat(body: dict[str, Any]) -> list[ChatMessage]:
    out = []
    for i, msg in enumerate(_message_list(body, "messages")):
        role = _role(msg, f"messages[{i}]")
        out.append(ChatMessage(role, _text_of(msg.get("content"), f"messages[{i}].content")))
    return out


def _anthropic(body: dict[str, Any]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    if "system" in body:
        out.append(ChatMessage("system", _text_of(body["system"], "system")))
    for i, msg in enumerate(_message_list(body, "messages")):
        role = _role(msg, f"messages[{i}]")
        if role not in ("user", "assistant"):
            raise bad_request(f"messages[{i}].role must be 'user' or 'assistant' (got {role!r})")
        content = msg.get("content")
        if (
            isinstance(content, list)
            and content
            and all(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
        ):
            role = "tool"  # tool results ride in user turns but are not user intent
        out.append(ChatMessage(role, _text_of(content, f"messages[{i}].content")))
    return out


def _responses(body: dict[str, Any]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("'instructions' must be a string")
        out.append(ChatMessage("system", instructions))
    if "input" not in body:
        raise bad_request("'input' is required")
    value = body["input"]
    if isinstance(value, str):
        if not value.strip():
            raise bad_request("'input' must not be empty")
        out.append(ChatMessage("user", value))
        return out
    if not isinstance(value, list):
        raise bad_request("'input' must be a string or an array of input items")
    if not value:
        raise bad_request("'input' must contain at least one item")
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message" or ("role" in item and "type" not in item):
            role = _role(item, where)
            out.append(ChatMessage(role, _text_of(item.get("content"), f"{where}.content")))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out.append(ChatMessage("tool", str(item.get("output", ""))))
        # Other item kinds (function_call, reasoning, ...) carry no user intent.
    return out


# Harness-injected wrappers (Claude Code and similar agents) that are not the user speaking.
_ENVELOPE = re.compile(
    r"<(system-reminder|user-prompt-submit-hook)>.*?</\1>", re.DOTALL | re.IGNORECASE
)


def is_user_turn(msg: ChatMessage) -> bool:
    """Whether a message is the user speaking (route_on_user_only): not a tool result, not
    an assistant turn, not empty and not only harness envelopes."""
    return msg.role == "user" and bool(_ENVELOPE.sub("", msg.content).strip())


def tool_names(body: dict[str, Any]) -> list[str]:
    """Names of the tools a request offers (OpenAI chat, Anthropic and Responses shapes)."""
    tools = body.get("tools")
    names: list[str] = []
    if not isinstance(tools, list):
        return names
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function")
        name = fn.get("name") if isinstance(fn, dict) else tool.get("name", tool.get("type"))
        if isinstance(name, str):
            names.append(name)
    return names
