"""Server-sent events in and out: the byte layer under every stream translator.

Providers' bytes arrive in whatever pieces Envoy read them in: an event, a line or a UTF-8
character may be cut anywhere, and the SSE grammar allows CRLF, LF or CR line ends. ``SseParser``
holds the unfinished tail and yields complete events; ``SseTranslation`` runs a translator over
them and frames what it returns in the client's grammar. Lines are decoded only once complete,
so a character split across reads is never decoded in halves.
"""

from __future__ import annotations

import json
from typing import Any

from plano_extproc.translate.base import SseOut, StreamTranslator

# A provider event larger than this (unfinished) is refused rather than buffered without end:
# the largest legitimate events are whole tool-call arguments, far below it.
MAX_PENDING_BYTES = 16 << 20


class SseError(ValueError):
    """The provider's stream cannot be read as SSE (an event over MAX_PENDING_BYTES)."""


class SseParser:
    """Incremental SSE parser (WHATWG event-stream rules for ``event`` and ``data``)."""

    __slots__ = ("_data", "_event", "_pending_cr", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._pending_cr = False  # the last chunk ended with CR: a following LF is the same end

    def feed(self, chunk: bytes) -> list[tuple[str | None, str]]:
        if self._pending_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._pending_cr = False
        if not chunk:
            return []
        buf = self._tail + chunk if self._tail else chunk
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                self._pending_cr = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buf.rfind(b"\n")
        if end < 0:
            if len(buf) > MAX_PENDING_BYTES:
                raise SseError(f"an SSE line exceeds {MAX_PENDING_BYTES} bytes")
            self._tail = buf
            return []
        self._tail = buf[end + 1 :]
        out: list[tuple[str | None, str]] = []
        for raw in buf[:end].split(b"\n"):
            self._line(raw, out)
        pending = len(self._tail) + sum(len(d) for d in self._data)
        if pending > MAX_PENDING_BYTES:
            raise SseError(f"an SSE event exceeds {MAX_PENDING_BYTES} bytes")
        return out

    def finish(self) -> list[tuple[str | None, str]]:
        """The stream ended: an unterminated last line and event still count."""
        out: list[tuple[str | None, str]] = []
        if self._tail:
            self._line(self._tail, out)
            self._tail = b""
        self._line(b"", out)
        return out

    def _line(self, raw: bytes, out: list[tuple[str | None, str]]) -> None:
        if not raw:  # blank line: dispatch
            if self._data:
                out.append((self._event, "\n".join(self._data)))
            self._event = None
            self._data = []
            return
        line = raw.decode("utf-8", "replace")
        if line[0] == ":":  # comment (keep-alive)
            return
        name, colon, value = line.partition(":")
        if not colon:
            value = ""
        elif value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        # id / retry / unknown fields: nothing a translator needs.


def parse_data(data: str) -> dict[str, Any] | str:
    """An event's data as a JSON object when it is one, else the text (e.g. "[DONE]")."""
    if data[:1] == "{":
        try:
            value = json.loads(data)
        except ValueError:
            return data
        if isinstance(value, dict):
            return value
    return data


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode(events: list[SseOut]) -> bytes:
    """Frame events for the client: ``event:`` line when named, one ``data:`` line, LF ends."""
    parts: list[str] = []
    for name, data in events:
        text = data if isinstance(data, str) else _dumps(data)
        if "\n" in text or "\r" in text:  # never for JSON from _dumps; defensive for str data
            text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\ndata: ")
        if name is not None:
            parts.append(f"event: {name}\ndata: {text}\n\n")
        else:
            parts.append(f"data: {text}\n\n")
    return "".join(parts).encode()


class SseTranslation:
    """Provider SSE bytes in, client SSE bytes out, for one response stream."""

    __slots__ = ("_done", "_parser", "_translator")

    def __init__(self, translator: StreamTranslator) -> None:
        self._parser = SseParser()
        self._translator = translator
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return b""
        return self._run(self._parser.feed(chunk))

    def end(self) -> bytes:
        """The provider's stream ended: flush and let the translator close the grammar."""
        if self._done:
            return b""
        out = self._run(self._parser.finish())
        self._done = True
        return out + encode(self._translator.end())

    def _run(self, events: list[tuple[str | None, str]]) -> bytes:
        if not events:
            return b""
        event = self._translator.event
        # A translator that keeps most events as they are reads their text itself.
        raw = getattr(self._translator, "raw_events", False)
        out: list[SseOut] = []
        for name, data in events:
            out += event(name, data if raw else parse_data(data))
        return encode(out) if out else b""
