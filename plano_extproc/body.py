"""Edit a JSON request body without re-serialising it.

Clients' bodies must reach the provider byte-for-byte except the members we own or rewrite
(``model``, ``routing_preferences``, ``routing_policy``). So we parse the top-level object
once with the stdlib C scanner, remember where each member sits in the text, and splice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from plano_extproc.errors import bad_request


def _no_constants(name: str) -> Any:
    # Python's json reads NaN / Infinity; RFC 8259 does not, and providers disagree on them.
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity are not allowed)")


_decoder = json.JSONDecoder(parse_constant=_no_constants)
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]
_WS = " \t\n\r"
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
        if not raw.strip():
            raise bad_request("request body is empty; send a JSON object")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad_request(f"request body is not valid UTF-8 (byte {e.start})") from None
        values: dict[str, Any] = {}
        # Every occurrence in text order: a duplicated key must be removed everywhere.
        members: list[tuple[str, _Member]] = []
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
                    value, vend = _decoder.raw_decode(text, i)
                    values[key] = value
                    members.append((key, _Member(key_start, i, vend)))
                    i = _skip(text, vend)
                    if i < len(text) and text[i] == ",":
                        i = _skip(text, i + 1)
                        continue
                    if i < len(text) and text[i] == "}":
                        end = i + 1
                        break
                    raise ValueError(f"expected ',' or '}}' at char {i}")
            if _skip(text, end) != len(text):
                raise ValueError(f"extra data after the JSON object at char {end}")
        except (ValueError, RecursionError) as e:
            if isinstance(e, json.JSONDecodeError):
                msg = f"{e.msg} at line {e.lineno} column {e.colno}"
            else:
                msg = str(e)
            raise bad_request(f"request body is not valid JSON: {msg}") from None
        if "\\ud" in text or "\\uD" in text:
            # An escape of a lone UTF-16 surrogate (a JavaScript client cutting a string inside
            # an emoji) decodes to text that cannot be encoded: U+FFFD for our own reading;
            # the provider still gets the client's bytes.
            values = _replace_surrogates(values)
        return cls(text, values, members)

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


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value) if _LONE_SURROGATE.search(value) else value
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


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
