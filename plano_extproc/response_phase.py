"""The response side of a translated request, free of gRPC and Envoy types.

Envoy opens a second ext_proc stream (the "plano response translation" filter) only for
requests the routing stream marked as translated; its first message is the provider's
response headers, carrying the request's context (dynamic metadata ``plano.tx``). From there:

- 2xx ``text/event-stream``: the body is STREAMED; each provider chunk goes through the pair's
  stream translator and comes out in the client's event grammar;
- any other 2xx: the body is BUFFERED and the whole JSON answer is translated;
- non-2xx: BUFFERED; the provider's error becomes the client API's error envelope, with the
  status and the other headers (``Retry-After``) kept;
- a compressed body (the request asked for ``identity``): refused with a clear 502.

``content-length`` is always removed at the headers. Measured on Envoy 1.40: a provider length
kept with a changed body is a 500; a ``content-length`` set in the BUFFERED body reply is not
applied (a ``:status`` set there is), so the client gets a chunked (HTTP/1.1) or unsized
(HTTP/2) body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from plano_extproc.providers import ClientApi
from plano_extproc.translate import parse_pair, translator
from plano_extproc.translate.base import PairTranslator
from plano_extproc.translate.errors import client_error
from plano_extproc.translate.sse import SseTranslation
from plano_extproc.usage import Usage, UsageMeter

log = logging.getLogger("plano_extproc.response")

MAX_CONTEXT_CHARS = 8192  # the routing stream sends at most 4 KiB (gateway.MAX_CONTEXT_BYTES)
BodyMode = Literal["streamed", "buffered"]


class ContextError(ValueError):
    """The ``plano.tx`` metadata is missing or unreadable: the response cannot be translated."""


@dataclass(slots=True)
class HeadersPlan:
    """What to do at the provider's response headers."""

    body_mode: BodyMode | None  # None: leave the body alone (no body follows)
    status: int | None = None  # a new :status, or None to keep the provider's
    set: list[tuple[str, str]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)


@dataclass(slots=True)
class BodyResult:
    body: bytes
    status: int | None = None  # set only while Envoy still holds the headers (BUFFERED)


def _header_value(headers: Mapping[str, str], name: str) -> str:
    return headers.get(name, "").strip().lower()


class ResponseTranslation:
    """One translated response: decides the body mode, then rewrites the body."""

    __slots__ = (
        "_broken",
        "_hidden",
        "_sse",
        "_status",
        "client",
        "context",
        "kind",
        "pair",
        "provider",
    )

    def __init__(
        self, client: ClientApi, provider: ClientApi, pair: PairTranslator, context: dict[str, Any]
    ) -> None:
        self.client = client
        self.provider = provider
        self.pair = pair
        self.context = context
        self.kind: Literal["stream", "json", "error", "refused", "none"] = "none"
        self._sse: SseTranslation | None = None
        self._status = 200
        self._broken = False
        # A Chat client that did not ask for usage gets none in its stream: the provider's
        # usage is read here and handed to the metrics (``hidden_usage``).
        self._hidden: UsageMeter | None = None

    @classmethod
    def from_metadata(cls, raw: str | None) -> ResponseTranslation:
        """From the ``plano.tx`` JSON: {"pair": "messages>chat_completions", "ctx": {...}}."""
        if not raw:
            raise ContextError("no translation context (plano.tx) with the response")
        if len(raw) > MAX_CONTEXT_CHARS:
            raise ContextError(f"translation context exceeds {MAX_CONTEXT_CHARS} characters")
        try:
            value = json.loads(raw)
        except ValueError:
            raise ContextError("translation context is not JSON") from None
        if not isinstance(value, dict):
            raise ContextError("translation context is not a JSON object")
        name = value.get("pair")
        pair = parse_pair(name) if isinstance(name, str) else None
        context = value.get("ctx", {})
        if pair is None or not isinstance(context, dict):
            raise ContextError(f"translation context names no known pair: {raw[:200]!r}")
        client, provider = pair
        found = translator(client, provider)
        assert found is not None  # parse_pair names only pairs that have a translator
        return cls(client, provider, found, context)

    # ------------------------------------------------------------------ headers

    def on_headers(
        self, status: int, headers: Mapping[str, str], end_of_stream: bool
    ) -> HeadersPlan:
        self._status = status
        plan = HeadersPlan(body_mode=None, remove=["content-length"])
        if end_of_stream:  # no body (a bodiless error, HEAD): nothing to translate
            return plan
        encoding = _header_value(headers, "content-encoding")
        if encoding not in ("", "identity"):
            # We asked for identity; decompressing what a provider insists on compressing is
            # not worth the risk (bombs, codecs): a clear error instead of garbled text.
            self.kind = "refused"
            plan.status = 502
            plan.body_mode = "buffered"
            plan.remove.append("content-encoding")
            plan.set.append(("content-type", "application/json"))
            return plan
        if not 200 <= status < 300:
            self.kind = "error"
            plan.body_mode = "buffered"
            plan.set.append(("content-type", "application/json"))
            return plan
        if self._is_sse(headers):
            self.kind = "stream"
            self._sse = SseTranslation(self.pair.stream(self.context))
            if self.client is ClientApi.CHAT and self.context.get("include_usage") is not True:
                self._hidden = UsageMeter(self.provider, True)
            plan.body_mode = "streamed"
            return plan
        self.kind = "json"
        plan.body_mode = "buffered"
        plan.set.append(("content-type", "application/json"))
        return plan

    # ------------------------------------------------------------------ bodies

    def on_buffered(self, body: bytes) -> BodyResult:
        """The whole body (BUFFERED kinds: json, error, refused)."""
        if self.kind == "error":
            return BodyResult(client_error(self.client, self._status, body))
        if self.kind == "refused":
            return BodyResult(
                self._failure("the provider sent a compressed response although the gateway "
                              "asked for identity encoding; it cannot be translated")
            )  # fmt: skip
        try:
            value = json.loads(body)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            out = self.pair.response(value, self.context)
        except Exception as e:  # a provider body we cannot read or map: a 502, not a crash
            log.warning("%s response not translatable: %s", self.pair_label, e)
            return BodyResult(
                self._failure(f"the provider's answer could not be translated: {e}"[:500]),
                status=502,
            )
        return BodyResult(json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode())

    def on_chunk(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """One STREAMED chunk: the client's bytes for it (may be empty)."""
        sse = self._sse
        if sse is None or self._broken:
            return b""
        if self._hidden is not None and chunk:
            self._hidden.feed(chunk)
        try:
            out = sse.feed(chunk) if chunk else b""
            if end_of_stream:
                out += sse.end()
            return out
        except Exception as e:
            # Headers are gone: close the client's grammar with its error event and drop the
            # rest rather than reset the stream or forward untranslated bytes.
            log.warning("%s stream not translatable: %s", self.pair_label, e)
            self._broken = True
            try:
                return sse.end()
            except Exception:
                log.exception("%s stream translator failed to end", self.pair_label)
                return b""

    def hidden_usage(self) -> Usage | None:
        """At the stream's end: the usage the client's stream does not show, if any."""
        return self._hidden.finish() if self._hidden is not None else None

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _is_sse(headers: Mapping[str, str]) -> bool:
        return _header_value(headers, "content-type").startswith("text/event-stream")

    @property
    def pair_label(self) -> str:
        return f"{self.client.value}>{self.provider.value}"

    def _failure(self, message: str) -> bytes:
        return client_error(self.client, 502, message.encode())
