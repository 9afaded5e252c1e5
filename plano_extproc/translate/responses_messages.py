"""OpenAI Responses client -> Anthropic Messages provider, composed of two translators.

Responses -> Chat (``responses_chat``) then Chat -> Anthropic (``chat_messages``), and back the
same way: one mapping per API boundary instead of a third copy of both. Choices made here:

- The context nests both: ``{"responses": <responses_chat ctx>, "chat": <chat_messages ctx>}``.
  The inner ``model`` is blanked: it is the provider's model id, which the reply names anyway,
  and the outer context already carries the client's requested model.
- Errors the inner translator raises name Chat fields; they are renamed to the client's field
  through the origins map ``responses_chat.convert`` keeps (``messages[3].tool_calls[0].
  function.arguments`` -> ``input[5].arguments``, ``response_format`` -> ``text.format``,
  ``max_tokens`` -> ``max_output_tokens``, ``reasoning_effort`` -> ``reasoning.effort``, ...).
  A Chat message with no client origin (the user message carrying tool-output images) keeps
  its Chat path: its index is not an ``input`` index.
- The stream pipes Anthropic events through ``chat_messages`` and its chunks through
  ``responses_chat``; ``chat_messages`` turns an Anthropic ``error`` event or an early end into
  an error chunk, which ``responses_chat`` turns into ``error`` + ``response.failed``.
- Everything else (what is refused, dropped and defaulted: ``max_tokens`` 4096 when the client
  gives no ``max_output_tokens``, thinking from ``reasoning.effort``, all system text hoisted into
  Anthropic's ``system``) is what the two modules document.
"""

from __future__ import annotations

from typing import Any

from plano_extproc.errors import GatewayError
from plano_extproc.providers import ClientApi
from plano_extproc.translate import chat_messages, responses_chat
from plano_extproc.translate.base import Context, SseOut, Untranslatable

client: ClientApi = ClientApi.RESPONSES
provider: ClientApi = ClientApi.MESSAGES

# Chat names whose Responses name is fixed (the rest come from the request's origins map).
_RENAMED = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "response_format": "text.format",
    "messages": "input",
}


def _client_path(path: str, origins: dict[str, str]) -> str:
    """A Chat request path in the client's terms: the longest known prefix is replaced."""
    cut = len(path)
    while cut > 0:
        head = path[:cut]
        origin = origins.get(head) or _RENAMED.get(head)
        if origin is not None and not (head == "messages" and cut < len(path)):
            rest = path[cut:]
            if rest.startswith(".function") and head.endswith("]"):
                rest = rest[len(".function") :]  # tool_calls[n].function.name -> .name
            return (origin + rest).replace(".image_url.url", ".image_url")
        cut = max(path.rfind(".", 0, cut), path.rfind("[", 0, cut))
    return path


def _in_client_terms(err: GatewayError, origins: dict[str, str]) -> GatewayError:
    """Rename the field a ``chat_messages`` error names (its message starts with it quoted)."""
    message = err.message
    if message.startswith("'"):
        end = message.find("'", 1)
        if end > 0:
            path = _client_path(message[1:end], origins)
            message = f"'{path}'{message[end + 1 :]}"
            if isinstance(err, Untranslatable):
                err.field = path
    message = message.replace("(reasoning_effort)", "(reasoning.effort)")
    err.message = message
    err.args = (message,)
    return err


def request(body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], Context]:
    """The Anthropic body for ``model_id`` (via the Chat form) and both contexts."""
    chat, outer, origins = responses_chat.convert(body, model_id)
    try:
        out, inner = chat_messages.request(chat, model_id)
    except GatewayError as err:
        raise _in_client_terms(err, origins) from None
    inner = dict(inner, model="")
    return out, {"responses": outer, "chat": inner}


def _parts(ctx: Context) -> tuple[Context, Context]:
    outer, inner = ctx.get("responses"), ctx.get("chat")
    return (outer if isinstance(outer, dict) else {}), (inner if isinstance(inner, dict) else {})


def response(body: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """An Anthropic Message as a Response object (through the chat.completion form)."""
    outer, inner = _parts(ctx)
    return responses_chat.response(chat_messages.response(body, inner), outer)


class ComposedStream:
    """Anthropic events -> chat chunks (``chat_messages``) -> Responses events."""

    def __init__(self, ctx: Context) -> None:
        outer, inner = _parts(ctx)
        self._inner = chat_messages.stream(inner)
        self._outer = responses_chat.stream(outer)

    def _pipe(self, chunks: list[SseOut]) -> list[SseOut]:
        out: list[SseOut] = []
        for name, data in chunks:
            out += self._outer.event(name, data)
        return out

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        return self._pipe(self._inner.event(name, data))

    def end(self) -> list[SseOut]:
        out = self._pipe(self._inner.end())
        return out + self._outer.end()


def stream(ctx: Context) -> ComposedStream:
    """A translator for one Anthropic SSE stream answering a Responses client."""
    return ComposedStream(ctx)
