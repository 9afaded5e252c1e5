"""Chat Completions to Chat Completions, with the usage the gateway asked for taken out again.

A streamed Chat request reports no token usage unless the client sets
``stream_options.include_usage``; the gateway sets it on the provider's request so that every
stream is counted (``dispatch.hide_usage``), and this response-only pair gives the client the
stream it asked for: the ``choices: []`` chunk that carries the usage is dropped and the
``"usage": null`` member the provider adds to every other chunk is removed. The usage itself
is read from the provider's bytes by ``response_phase`` and handed to the metrics as metadata.

Events are left byte for byte when they carry no ``usage`` member (``[DONE]``, comments);
a chunk that loses its member is re-serialised (the same JSON without it).
"""

from __future__ import annotations

from typing import Any

from plano_extproc.providers import ClientApi
from plano_extproc.translate.base import Context, SseOut

client = ClientApi.CHAT
provider = ClientApi.CHAT

# The context of a hidden-usage response (the client did not ask for usage).
CONTEXT: Context = {"include_usage": False}


def request(body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], Context]:
    """Not a request translator: the request is the client's own, edited in place."""
    raise NotImplementedError("chat>chat is a response-only pair")


def response(body: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A JSON reply (a provider that ignored ``stream``): it carries usage in any case."""
    return body


class HiddenUsage:
    """One stream: every event as the provider sent it, minus the usage the client did not
    ask for."""

    __slots__ = ()

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        if not isinstance(data, dict) or "usage" not in data:
            return [(name, data)]
        choices = data.get("choices")
        if isinstance(data["usage"], dict) and not choices:
            return []  # the usage chunk itself
        rest = {k: v for k, v in data.items() if k != "usage"}
        return [(name, rest)]

    def end(self) -> list[SseOut]:
        return []  # the provider's own ending (``[DONE]`` or not) went through as it was


def stream(ctx: Context) -> HiddenUsage:
    return HiddenUsage()
