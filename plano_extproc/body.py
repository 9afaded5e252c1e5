"""Edit a JSON request body without re-serialising it.

Clients' bodies must reach the provider byte-for-byte except the members we own or rewrite
(``model``, ``routing_preferences``, ``routing_policy``). So we parse the top-level object
once with the stdlib C scanner, remember where each member sits in the text, and splice.
"""

from __future__ import annotations

import asyncio
import json
import re
import weakref
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

from plano_extproc.errors import bad_request


def _no_constants(name: str) -> Any:
    # Python's json reads NaN / Infinity; RFC 8259 does not, and providers disagree on them.
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity are not allowed)")


_decoder = json.JSONDecoder(parse_constant=_no_constants)
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]
_WS = " \t\n\r"
# Bodies from this size on are parsed cooperatively (parse_async), yielding every STEP_CHARS.
LARGE_BODY = 512 * 1024
STEP_CHARS = 256 * 1024
_RELEASE_SLICE = 2000  # array elements freed per event-loop turn
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True)
class _Member:
    start: int  # index of the key's opening quote
    value_start: int
    value_end: int


class JsonBody:
    """A parsed top-level JSON object plus the text spans of its members."""

    __slots__ = ("_members", "text", "values")

    def __init__(
        self, text: str, values: dict[str, Any], members: list[tuple[str, _Member]]
    ) -> None:
        self.text = text
        self.values = values
        self._members = members

    @classmethod
    def parse(cls, raw: bytes) -> JsonBody:
        text = _decode(raw)
        values: dict[str, Any] = {}
        members: list[tuple[str, _Member]] = []
        for _ in _scan(text, values, members, None):
            pass
        return cls._parsed(text, values, members, _surrogate_escape(text, 0, len(text)))

    @classmethod
    async def parse_async(cls, raw: bytes) -> JsonBody:
        """``parse`` that lets the event loop run every ``STEP_CHARS`` of a large body.

        The C scanner holds the GIL, so a thread would not free the loop (measured in
        docs/benchmarks.md); instead array members (``messages``, ``input``, ``tools``) are
        decoded one element at a time, and other requests run between elements.
        """
        if len(raw) < LARGE_BODY:
            return cls.parse(raw)
        # One large parse at a time per loop: N of them taking turns would stall everyone
        # else N steps at a time; serialised, small requests wait one step at most.
        async with _large_parse_lock():
            return await cls._parse_steps(raw)

    @classmethod
    async def _parse_steps(cls, raw: bytes) -> JsonBody:
        text = _decode(raw)
        await asyncio.sleep(0)
        values: dict[str, Any] = {}
        members: list[tuple[str, _Member]] = []
        surrogates = False
        checked = 0
        for reached in _scan(text, values, members, STEP_CHARS):
            # Searching 30 MB at once takes ~45 ms: the scan is spread over the steps too.
            surrogates = surrogates or _surrogate_escape(text, checked, reached)
            checked = reached
            await asyncio.sleep(0)
        surrogates = surrogates or _surrogate_escape(text, checked, len(text))
        return cls._parsed(text, values, members, surrogates)

    @classmethod
    def _parsed(
        cls,
        text: str,
        values: dict[str, Any],
        members: list[tuple[str, _Member]],
        surrogates: bool,
    ) -> JsonBody:
        if surrogates:
            # An escape of a lone UTF-16 surrogate (a JavaScript client cutting a string inside
            # an emoji) decodes to text that cannot be encoded: U+FFFD for our own reading;
            # the provider still gets the client's bytes.
            values = _replace_surrogates(values)
        return cls(text, values, members)

    async def release(self) -> None:
        """Free a large body's values a slice at a time: dropping millions of objects at once
        stalls the loop as long as building them did (measured: bench/large_bodies.py)."""
        if len(self.text) < LARGE_BODY:
            return
        for value in self.values.values():
            if isinstance(value, list):
                while value:
                    del value[-_RELEASE_SLICE:]
                    await asyncio.sleep(0)
        self.values = {}

    def edited(
        self, *, remove: tuple[str, ...] = (), set_values: dict[str, Any] | None = None
    ) -> bytes:
        """The body with members removed and values replaced (or added at the front)."""
        set_values = set_values or {}
        edits: list[tuple[int, int, str]] = []
        order = self._members
        kept = [idx for idx, (key, _) in enumerate(order) if key not in remove]
        last_kept = kept[-1] if kept else -1
        if last_kept < len(order) - 1:
            # The removed members after the last kept one go as one span, together with the
            # comma that joined them to it (or everything, when nothing is kept).
            start = order[last_kept][1].value_end if kept else order[0][1].start
            edits.append((start, order[-1][1].value_end, ""))
        for idx, (key, m) in enumerate(order):
            if key in remove:
                # Remove "key": value plus the comma that joins it to the next member.
                if idx < last_kept:
                    edits.append((m.start, order[idx + 1][1].start, ""))
            elif key in set_values:
                edits.append((m.value_start, m.value_end, _dump(set_values[key])))
        missing = [k for k in set_values if k not in self.values]
        if not edits and not missing:
            return self.text.encode("utf-8")
        text = self.text
        for start, end, new in sorted(edits, reverse=True):
            text = text[:start] + new + text[end:]
        if missing:
            brace = text.index("{")
            added = ", ".join(f"{_dump(k)}: {_dump(set_values[k])}" for k in missing)
            rest_empty = text[brace + 1 :].strip(_WS).startswith("}")
            text = text[: brace + 1] + added + ("" if rest_empty else ", ") + text[brace + 1 :]
        return text.encode("utf-8")


def scrub_surrogates(text: str) -> str:
    """``text`` with lone UTF-16 surrogates (from ``"hi \\ud83d"`` in JSON) replaced by U+FFFD,
    every other character where it was: such text cannot be encoded (hashing, tokenising)."""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_surrogates(value)
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def _decode(raw: bytes) -> str:
    if not raw.strip():
        raise bad_request("request body is empty; send a JSON object")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})") from None


_LARGE_PARSE_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _large_parse_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _LARGE_PARSE_LOCKS.get(loop)
    if lock is None:
        lock = _LARGE_PARSE_LOCKS[loop] = asyncio.Lock()
    return lock


def _surrogate_escape(text: str, start: int, end: int) -> bool:
    """Is there a ``\\uD8xx``-``\\uDFxx`` escape in ``text[start:end]`` (or straddling it)?"""
    start = max(0, start - 5)
    return text.find("\\ud", start, end) >= 0 or text.find("\\uD", start, end) >= 0


def _scan(
    text: str, values: dict[str, Any], members: list[tuple[str, _Member]], step: int | None
) -> Iterator[int]:
    """Fill ``values`` and ``members`` from the top-level object in ``text``.

    With ``step``, arrays are decoded element by element and the generator yields the
    position reached after every ``step`` characters, so an async caller can let other work
    run.
    """
    mark = 0
    try:
        i = _skip(text, 0)
        if i >= len(text) or text[i] != "{":
            _decoder.raw_decode(text, i)  # a JSONDecodeError here means "not JSON at all"
            kind = _kind_at(text, i)
            raise bad_request(f"request body must be a JSON object, got {kind}")
        i = _skip(text, i + 1)
        if i < len(text) and text[i] == "}":
            end = i + 1
        else:
            while True:
                if i >= len(text) or text[i] != '"':
                    raise ValueError(f"expected a member name at char {i}")
                key_start = i
                key, i = _scanstring(text, i + 1, True)
                i = _skip(text, i)
                if i >= len(text) or text[i] != ":":
                    raise ValueError(f"expected ':' at char {i}")
                i = _skip(text, i + 1)
                if key in values:
                    # Providers disagree on which copy wins (first, last, error): a
                    # duplicate would let the client smuggle past what we checked.
                    raise ValueError(f"member {key!r} appears more than once")
                if step is not None and i < len(text) and text[i] == "[":
                    value, vend = yield from _array(text, i, step)
                else:
                    value, vend = _decoder.raw_decode(text, i)
                values[key] = value
                members.append((key, _Member(key_start, i, vend)))
                if step is not None and vend - mark >= step:
                    mark = vend
                    yield vend
                i, closed = _after_item(text, vend, "}")
                if closed:
                    end = i
                    break
        if _skip(text, end) != len(text):
            raise ValueError(f"extra data after the JSON object at char {end}")
    except (ValueError, RecursionError) as e:
        if isinstance(e, json.JSONDecodeError):
            msg = f"{e.msg} at line {e.lineno} column {e.colno}"
        else:
            msg = str(e)
        raise bad_request(f"request body is not valid JSON: {msg}") from None


def _array(text: str, i: int, step: int) -> Generator[int, None, tuple[list[Any], int]]:
    """One JSON array starting at ``text[i]``, yielding every ``step`` characters."""
    out: list[Any] = []
    i = _skip(text, i + 1)
    if i < len(text) and text[i] == "]":
        return out, i + 1
    mark = i
    while True:
        value, i = _decoder.raw_decode(text, i)
        out.append(value)
        if i - mark >= step:
            mark = i
            yield i
        i, closed = _after_item(text, i, "]")
        if closed:
            return out, i


def _after_item(text: str, i: int, close: str) -> tuple[int, bool]:
    """After an object member or array element: where the next one starts, or (with True)
    the index just past ``close``."""
    i = _skip(text, i)
    if i < len(text) and text[i] == ",":
        return _skip(text, i + 1), False
    if i < len(text) and text[i] == close:
        return i + 1, True
    raise ValueError(f"expected ',' or '{close}' at char {i}")


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _skip(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _kind_at(text: str, i: int) -> str:
    if i >= len(text):
        return "nothing"
    try:
        value, _ = _decoder.raw_decode(text, i)
    except ValueError:
        return "invalid JSON"
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
