"""Token usage and first-token time read from a response body, in Python.

Envoy reads the usage of every answer itself (``envoy_config._usage_extractors``); this reader
serves the one place where Python holds a stream: the response filter that hides usage from a
Chat client that did not ask for it reads the provider's counters here before they go
(``response_phase``).

The gateway sees every response body after any translation, in the pieces Envoy forwards it in:
an SSE line, an event or a UTF-8 character may be cut anywhere. ``UsageMeter`` is fed those
pieces and says on which one the first token-bearing event was complete (time to first token);
at the end of the body it returns the usage the provider reported, in OpenTelemetry GenAI terms:

- ``input`` counts every prompt token, cached ones included (Anthropic's ``input_tokens``
  excludes cache reads and writes, so those are added back);
- ``output`` counts every completion token (reasoning included);
- ``cached_input`` is the part of ``input`` read from the provider's prompt cache.

It is pure logic that runs on every response, so it is cheap and bounded: a stream is scanned
line by line as bytes, an event is JSON-decoded only when it can carry usage (or, until the first
token, when it can carry one); at most one unfinished event is kept, and an event over
``MAX_EVENT_BYTES`` keeps only its last ``TAIL_BYTES`` (where the usage object sits, at the end of
a Responses ``response.completed`` that repeats the whole answer). A JSON body is kept up to
``MAX_JSON_BYTES`` and parsed at the end; past that only its last ``TAIL_BYTES`` are kept and the
last ``"usage"`` object in them is decoded. Nothing here raises: garbage, truncated bodies and
hostile values give no usage (or ignore the bad counter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from plano_extproc.providers import ClientApi

MAX_JSON_BYTES = 1 << 20
MAX_EVENT_BYTES = 4 << 20
TAIL_BYTES = 64 << 10
MAX_COUNT = 1 << 53  # a counter above this is capped (exact in a float, e.g. a histogram sum)
_TAIL_ATTEMPTS = 16  # "usage" objects tried, from the last one back, in a kept tail

_USAGE_OBJECT = re.compile(rb'"usage"\s*+:\s*+\{')
_TYPE = re.compile(rb'"type"\s*+:\s*+"([^"\\]{1,100})"')
# A Chat delta field with a value that may be a token (not null, "", [] or {}). Inside a JSON
# string a quote is escaped, so these keys cannot match text the model wrote.
_CHAT_TOKEN = re.compile(
    rb'"(?:content|refusal|reasoning_content|reasoning|tool_calls)"\s*+:\s*+(?!null|""|\[\]|\{\})'
)
_CHAT_TOKEN_FIELDS = ("content", "refusal", "reasoning_content", "reasoning", "tool_calls")
_RESPONSES_TERMINAL = frozenset((b"response.completed", b"response.incomplete", b"response.failed"))
_ANTHROPIC_FIELDS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
_DECODER = json.JSONDecoder()

# How the unfinished line of a stream was cut (over MAX_EVENT_BYTES): not, a data line, other.
_WHOLE, _CUT_DATA, _CUT_OTHER = 0, 1, 2


@dataclass(slots=True)
class Usage:
    input: int = 0  # all prompt tokens, cached ones included
    output: int = 0  # completion tokens (reasoning included)
    cached_input: int = 0  # the part of input read from the provider's prompt cache

    def encode(self) -> str:
        """As dynamic metadata carries it from one ext_proc stream to another."""
        return f"{self.input},{self.output},{self.cached_input}"

    @classmethod
    def decode(cls, text: str) -> Usage | None:
        """``encode``'s text back, or None when it is not three bounded counts."""
        parts = text.split(",")
        if len(parts) != 3 or not all(p.isdigit() and len(p) <= 16 for p in parts):
            return None
        inp, out, cached = (int(p) for p in parts)
        return cls(inp, out, min(cached, inp))


def _count(value: Any) -> int | None:
    """A token counter: a non-negative int (not a bool), capped at MAX_COUNT; else None."""
    if type(value) is int and value >= 0:
        return min(value, MAX_COUNT)
    return None


def _make(inp: int | None, out: int | None, cached: int | None) -> Usage | None:
    if inp is None and out is None:
        return None
    total = inp or 0
    return Usage(input=total, output=out or 0, cached_input=min(cached or 0, total))


def _chat_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:  # DeepSeek's own field
        cached = _count(usage.get("prompt_cache_hit_tokens"))
    return _make(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), cached)


def _responses_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return _make(_count(usage.get("input_tokens")), _count(usage.get("output_tokens")), cached)


def _anthropic_fields(usage: Any) -> dict[str, int]:
    """The valid Anthropic counters present in ``usage`` (an absent or bad one is left out)."""
    out: dict[str, int] = {}
    if isinstance(usage, dict):
        for key in _ANTHROPIC_FIELDS:
            value = _count(usage.get(key))
            if value is not None:
                out[key] = value
    return out


def _anthropic_usage(fields: dict[str, int]) -> Usage | None:
    if not fields:
        return None
    read = fields.get("cache_read_input_tokens", 0)
    total = fields.get("input_tokens", 0) + fields.get("cache_creation_input_tokens", 0) + read
    total = min(total, MAX_COUNT)
    return Usage(input=total, output=fields.get("output_tokens", 0), cached_input=min(read, total))


def _messages_usage(usage: Any) -> Usage | None:
    return _anthropic_usage(_anthropic_fields(usage))


_CONVERT: dict[ClientApi, Callable[[Any], Usage | None]] = {
    ClientApi.CHAT: _chat_usage,
    ClientApi.MESSAGES: _messages_usage,
    ClientApi.RESPONSES: _responses_usage,
}


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except Exception:  # ValueError, RecursionError on deep nesting, ...
        return None


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _tail_usage(data: bytes, valid: Callable[[Any], Any]) -> Any:
    """The last ``"usage": {...}`` object in ``data`` that ``valid`` accepts, else None."""
    for match in list(_USAGE_OBJECT.finditer(data))[-_TAIL_ATTEMPTS:][::-1]:
        start = match.end() - 1
        try:
            obj, _ = _DECODER.raw_decode(data[start:].decode("utf-8", "replace"))
        except Exception:
            continue
        if isinstance(obj, dict) and valid(obj):
            return obj
    return None


def _event_type(name: bytes | None, data: bytes) -> bytes:
    """The event's name, else its data's first ``type`` value."""
    if name is not None:
        return name
    match = _TYPE.search(data, 0, 512)
    return match.group(1) if match else b""


def _chat_has_token(obj: Any) -> bool:
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            for key in _CHAT_TOKEN_FIELDS:
                value = delta.get(key)
                if isinstance(value, str | list) and value:
                    return True
    return False


class UsageMeter:
    """Reads one response body: first-token chunk (streams) and the reported usage."""

    __slots__ = (
        "_anthropic",
        "_broken",
        "_buf",
        "_buf_len",
        "_chat_usage_data",
        "_cr",
        "_cut",
        "_data",
        "_data_len",
        "_done",
        "_first",
        "_name",
        "_overflow",
        "_result",
        "_tail",
        "_tail_cut",
        "_tail_len",
        "_usage",
        "api",
        "output_events",
        "stream",
    )

    def __init__(self, api: ClientApi, stream: bool) -> None:
        self.api = api
        self.stream = stream
        self.output_events = 0  # token-bearing events seen (streams)
        self._first = False
        self._done = False
        self._broken = False
        self._result: Usage | None = None
        # JSON body
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._overflow = False
        # SSE: the unfinished line and event
        self._tail: list[bytes] = []
        self._tail_len = 0
        self._tail_cut = _WHOLE
        self._cr = False  # the last chunk ended with CR: a following LF is the same line end
        self._name: bytes | None = None
        self._data: list[bytes] = []
        self._data_len = 0
        self._cut = False  # the event's data lost its head
        # SSE usage
        self._usage: Usage | None = None  # Responses
        self._chat_usage_data: tuple[bytes, bool] | None = None  # Chat: decoded at finish
        self._anthropic: dict[str, int] = {}  # Messages: counters so far

    # -- public

    def feed(self, chunk: bytes) -> bool:
        """One piece of the body; True on the piece that completed the first token event."""
        if self._done or self._broken or not chunk:
            return False
        try:
            if not self.stream:
                self._feed_json(chunk)
                return False
            return self._feed_sse(chunk)
        except Exception:
            self._broken = True
            return False

    def finish(self) -> Usage | None:
        """The body ended: the usage it reported, or None."""
        if self._done:
            return self._result
        self._done = True
        if self._broken:
            return None
        try:
            self._result = self._finish_sse() if self.stream else self._finish_json()
        except Exception:
            self._result = None
        return self._result

    # -- JSON

    def _feed_json(self, chunk: bytes) -> None:
        self._buf.append(chunk)
        self._buf_len += len(chunk)
        if self._buf_len > (2 * TAIL_BYTES if self._overflow else MAX_JSON_BYTES):
            self._overflow = True
            kept = b"".join(self._buf)[-TAIL_BYTES:]
            self._buf = [kept]
            self._buf_len = len(kept)

    def _finish_json(self) -> Usage | None:
        data = b"".join(self._buf)
        self._buf = []
        convert = _CONVERT[self.api]
        if self._overflow:
            return convert(_tail_usage(data, convert))
        return convert(_get(_loads(data), "usage"))

    # -- SSE bytes to lines to events

    def _feed_sse(self, chunk: bytes) -> bool:
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return False
        if b"\r" in chunk:
            self._cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = chunk.rfind(b"\n")
        if end < 0:
            self._add_tail(chunk)
            return False
        lines = chunk[:end].split(b"\n")
        first_cut = _WHOLE
        if self._tail:
            self._tail.append(lines[0])
            lines[0] = b"".join(self._tail)
            first_cut = self._tail_cut
            self._tail, self._tail_len, self._tail_cut = [], 0, _WHOLE
        token = False
        for i, line in enumerate(lines):
            if self._line(line, first_cut if i == 0 else _WHOLE):
                token = True
        if end + 1 < len(chunk):
            self._add_tail(chunk[end + 1 :])
        return token

    def _add_tail(self, piece: bytes) -> None:
        self._tail.append(piece)
        self._tail_len += len(piece)
        if self._tail_len + self._data_len > MAX_EVENT_BYTES:
            self._shrink()

    def _add_data(self, value: bytes) -> None:
        self._data.append(value)
        self._data_len += len(value) + 1
        if self._tail_len + self._data_len > MAX_EVENT_BYTES:
            self._shrink()

    def _shrink(self) -> None:
        """The unfinished event grew over MAX_EVENT_BYTES: keep the last TAIL_BYTES of each part."""
        if self._tail_len > TAIL_BYTES:
            line = b"".join(self._tail)
            if self._tail_cut == _WHOLE:
                self._tail_cut = _CUT_DATA if line.startswith(b"data:") else _CUT_OTHER
            if self._tail_cut == _CUT_DATA:
                self._cut = True
            line = line[-TAIL_BYTES:]
            self._tail, self._tail_len = [line], len(line)
        if self._data_len > TAIL_BYTES:
            data = b"\n".join(self._data)[-TAIL_BYTES:]
            self._data, self._data_len = [data], len(data)
            self._cut = True

    def _line(self, line: bytes, cut: int) -> bool:
        if cut:  # the rest of a line whose head was dropped: only a data line is kept
            if cut == _CUT_DATA:
                self._add_data(line)
            return False
        if not line:
            return self._dispatch()
        if line.startswith(b"data"):
            if len(line) == 4:
                self._add_data(b"")
            elif line[4] == 0x3A:  # "data:"
                self._add_data(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            self._name = line[7:] if line[6:7] == b" " else line[6:]
        # comments (":..."), id, retry and unknown fields: nothing to read
        return False

    def _dispatch(self) -> bool:
        data, name, cut = self._data, self._name, self._cut
        self._data, self._data_len, self._name, self._cut = [], 0, None, False
        if not data:
            return False
        joined = data[0] if len(data) == 1 else b"\n".join(data)
        if self.api is ClientApi.CHAT:
            token = self._chat_event(joined, cut)
        elif self.api is ClientApi.MESSAGES:
            token = self._messages_event(_event_type(name, joined), joined, cut)
        else:
            token = self._responses_event(_event_type(name, joined), joined, cut)
        if not token:
            return False
        self.output_events += 1
        if self._first:
            return False
        self._first = True
        return True

    def _finish_sse(self) -> Usage | None:
        if self._tail:
            line = b"".join(self._tail)
            cut = self._tail_cut
            self._tail, self._tail_len, self._tail_cut = [], 0, _WHOLE
            self._line(line, cut)
        self._cr = False
        self._dispatch()  # an unterminated last event still counts
        if self.api is ClientApi.CHAT:
            if self._chat_usage_data is None:
                return None
            data, cut = self._chat_usage_data
            self._chat_usage_data = None
            usage = _tail_usage(data, _chat_usage) if cut else _get(_loads(data), "usage")
            return _chat_usage(usage)
        if self.api is ClientApi.MESSAGES:
            return _anthropic_usage(self._anthropic)
        return self._usage

    # -- per API events

    def _chat_event(self, data: bytes, cut: bool) -> bool:
        if b'"usage"' in data and _USAGE_OBJECT.search(data):
            # The last one counts, decoded once at the end (some servers send it on every chunk).
            self._chat_usage_data = (data, cut)
        if cut:
            return True  # only deltas (text, tool arguments) grow that big
        if _CHAT_TOKEN.search(data) is None:
            return False
        return self._first or _chat_has_token(_loads(data))

    def _messages_event(self, kind: bytes, data: bytes, cut: bool) -> bool:
        if kind == b"content_block_delta":
            return True
        if kind == b"message_start" or kind == b"message_delta":
            if cut:
                usage = _tail_usage(data, _anthropic_fields)
            else:
                obj = _loads(data)
                usage = _get(obj, "message", "usage") if kind == b"message_start" else None
                if usage is None:
                    usage = _get(obj, "usage")
            # message_delta's counters (cumulative output; input and cache on newer API versions)
            # replace message_start's.
            self._anthropic.update(_anthropic_fields(usage))
        return False

    def _responses_event(self, kind: bytes, data: bytes, cut: bool) -> bool:
        if kind.endswith(b".delta"):
            return True
        if kind in _RESPONSES_TERMINAL:
            if cut:
                usage = _tail_usage(data, _responses_usage)
            elif _USAGE_OBJECT.search(data):
                usage = _get(_loads(data), "response", "usage")
            else:
                usage = None
            found = _responses_usage(usage)
            if found is not None:
                self._usage = found
        return False
