"""The contract every (client API, provider API) translator meets.

Translators are pure: dicts in, dicts out, no I/O, no gRPC. The request side runs in the
ext_proc stream that routes the request; the response side runs in a *different* ext_proc
stream (Envoy opens one per filter), possibly in another worker process. So the request side
returns a small JSON-safe ``context`` that travels to the response side through Envoy's
dynamic metadata; nothing else is shared.

Streams are translated event by event: ``sse.py`` cuts the provider's bytes into events and
frames the translator's output in the client's grammar, so translators never see bytes.
"""

from __future__ import annotations

from typing import Any, Protocol

from plano_extproc.errors import GatewayError
from plano_extproc.providers import ClientApi

# One event for the client: (SSE ``event:`` name or None, data). A dict is sent as JSON;
# a str is sent as is (e.g. "[DONE]").
SseOut = tuple[str | None, "dict[str, Any] | str"]

# Small, JSON-safe facts the response side needs (stream flag, requested model, whether the
# client asked for usage, ...). Bounded: it travels in Envoy dynamic metadata per request.
Context = dict[str, Any]


class Untranslatable(GatewayError):
    """A request member the target API cannot carry: a 400 naming it, nothing sent upstream."""

    def __init__(self, field: str, target: str, why: str = "") -> None:
        reason = f": {why}" if why else ""
        super().__init__(
            400,
            "invalid_request_error",
            f"'{field}' cannot be translated for a {target} model{reason}",
        )
        self.field = field


class StreamTranslator(Protocol):
    """One response stream. Stateful; one instance per request."""

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        """One provider event (``data`` parsed from JSON when it was JSON) to client events."""
        ...

    def end(self) -> list[SseOut]:
        """The provider's stream ended. Close the client's grammar: if the provider stopped
        before its terminal event, end with the client API's error event, never a clean stop."""
        ...


class PairTranslator(Protocol):
    """Translation between one client API and one provider API (module-level functions of a
    ``translate/<client>_<provider>.py`` module satisfy it)."""

    client: ClientApi
    provider: ClientApi

    def request(self, body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], Context]:
        """The provider's request body for ``model_id``, and the context for the response.

        Raises ``Untranslatable`` (or another ``GatewayError``) for what cannot be carried."""
        ...

    def response(self, body: dict[str, Any], ctx: Context) -> dict[str, Any]:
        """A provider's 2xx JSON reply in the client's shape."""
        ...

    def stream(self, ctx: Context) -> StreamTranslator:
        """A translator for one provider SSE stream."""
        ...
