"""Reading an OpenAI Chat Completions provider's reply or chunk, shared by the translators
whose provider is Chat (``messages_chat``, ``responses_chat``).

Only what both read the same way lives here. Usage and finish reasons stay in each translator:
they map to different client shapes (Anthropic usage excludes cached input, Responses usage
includes it; stop reasons vs. response status).
"""

from __future__ import annotations

from typing import Any


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
