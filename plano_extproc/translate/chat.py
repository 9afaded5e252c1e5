"""OpenAI Chat Completions shapes shared by the translators whose provider is Chat
(``messages_chat``, ``responses_chat``): message content they build, replies they read.

Only what both do the same way lives here. Usage and finish reasons stay in each translator:
they map to different client shapes (Anthropic usage excludes cached input, Responses usage
includes it; stop reasons vs. response status).
"""

from __future__ import annotations

from typing import Any


def message_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content as one string (widest provider support), else the part list."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def tool_message_text(texts: list[str], images: int) -> str:
    """A ``role: tool`` message's text. Chat tool messages carry no images: when the result had
    some, the text says they follow in the next user message (where the caller puts them)."""
    text = "\n".join(texts)
    if images:
        note = f"[{images} image(s) attached in the next user message]"
        text = f"{text}\n{note}" if text else note
    return text


def text_of(content: Any) -> str:
    """The text of a message/delta ``content``: a string, or text parts (some providers answer
    with parts); anything else is no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def reasoning_of(obj: dict[str, Any]) -> str:
    """Reasoning text of a message or delta: ``reasoning_content``, else ``reasoning`` (providers
    use one or the other name)."""
    value = obj.get("reasoning_content")
    if not isinstance(value, str):
        value = obj.get("reasoning")
    return value if isinstance(value, str) else ""
