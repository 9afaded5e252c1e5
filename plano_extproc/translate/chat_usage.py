"""Chat Completions to Chat Completions, with the usage the gateway asked for taken out again.

A streamed Chat request reports no token usage unless the client sets
``stream_options.include_usage``; the gateway sets it on the provider's request so that every
stream is counted (``dispatch.hide_usage``), and this response-only pair gives the client the
stream it asked for: the ``choices: []`` chunk that carries the usage is dropped and the
``"usage": null`` member the provider adds to every other chunk is removed. The usage itself
is read from the provider's bytes by ``response_phase`` and handed to the metrics as metadata.

Events keep their text byte for byte, minus the ``"usage": null`` member (and its comma);
only a chunk whose usage sits beside content is re-serialised (the same JSON without it).
SSE comments and CRLF line ends are not kept (events are re-framed with LF).
"""

from __future__ import annotations

import json
import re
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


# The member the provider adds to every chunk once usage is asked for, with the comma that
# joins it to a neighbour. Inside a JSON string every quote is escaped, so ``"usage"`` followed
# by a colon can only be a member name.
_NULL_USAGE = (
    re.compile(r',\s*"usage"\s*:\s*null(?=\s*[,}])'),
    re.compile(r'"usage"\s*:\s*null\s*,'),
)


class HiddenUsage:
    """One stream: every event as the provider sent it, minus the usage the client did not
    ask for. Events without a ``usage`` member keep their text byte for byte; the member is
    cut out of the text, and the JSON re-serialised only when the cut cannot be verified."""

    __slots__ = ()
    raw_events = True  # SseTranslation hands over each event's text, not parsed JSON

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        if not isinstance(data, str) or '"usage"' not in data:
            return [(name, data)]
        try:
            value = json.loads(data)
        except ValueError:
            return [(name, data)]
        if not isinstance(value, dict) or "usage" not in value:
            return [(name, data)]
        usage = value.pop("usage")
        if isinstance(usage, dict) and not value.get("choices"):
            return []  # the usage chunk itself
        if usage is None:
            for pattern in _NULL_USAGE:
                cut, n = pattern.subn("", data, count=1)
                if n == 1:
                    try:
                        if json.loads(cut) == value:
                            return [(name, cut)]
                    except ValueError:
                        pass
        return [(name, value)]  # usage on a content chunk: the same JSON without it

    def end(self) -> list[SseOut]:
        return []  # the provider's own ending (``[DONE]`` or not) went through as it was


def stream(ctx: Context) -> HiddenUsage:
    return HiddenUsage()
