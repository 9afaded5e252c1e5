"""Field readers shared by the pair translators.

Two kinds, kept apart on purpose:
- ``need_*`` and ``client_id`` check a member of a client body (hostile input). A wrong type or
  bound raises ``bad_request`` naming the field path ``where`` the client sent, so every pair
  words the same mistake the same way.
- ``token_count``, ``clean_id`` and ``reply_model`` read a provider reply leniently: a reply we
  cannot fully trust must still translate, so they fall back instead of raising.
"""

from __future__ import annotations

import hashlib
from typing import Any

from plano_extproc.errors import bad_request
from plano_extproc.translate.base import Context

ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
"""The charset both OpenAI (tool/function names, call ids) and Anthropic (tool ids) accept."""

MAX_NAME = 64
"""Tool and function names: OpenAI's and Anthropic's shared cap."""

MAX_SHORT = 256
"""Cap on short strings (model, tool name, user id) copied across APIs."""

OPENAI_MAX_ID = 40
"""OpenAI's cap on tool call ids."""

_MAX_CLIENT_ID = 1024

# ---------------------------------------------------------------- client bodies


def need_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request(f"'{where}' must be an object")
    return value


def need_array(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise bad_request(f"'{where}' must be an array")
    return value


def need_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"'{where}' must be a string")
    return value


def need_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"'{where}' must be a boolean")
    return value


def need_number(value: Any, where: str) -> float | int:
    """Any JSON number (``bool`` is not one, though Python says so)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{where}' must be a number")
    return value


def need_number_in(value: Any, where: str, low: float, high: float) -> float | int:
    """A JSON number within ``low``..``high`` (the client API's documented range)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad_request(f"'{where}' must be a number from {low:g} to {high:g}")
    return value


def need_int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_request(f"'{where}' must be an integer >= {minimum}")
    return value


def need_name(value: Any, where: str) -> str:
    """A tool/function name both OpenAI and Anthropic accept: passed through, never rewritten
    (the model calls it by this name)."""
    name = need_str(value, where)
    if not 0 < len(name) <= MAX_NAME or not ID_CHARS.issuperset(name):
        raise bad_request(f"'{where}' must be 1-{MAX_NAME} characters of [a-zA-Z0-9_-]")
    return name


def client_id(value: Any, where: str, max_len: int, prefix: str) -> str:
    """A client tool call id as the provider gets it: kept when it is ``ID_CHARS`` and at most
    ``max_len`` long (the provider's cap), else ``prefix`` + 32 hex of its SHA-256. The digest
    is stable, so a call and its result map to the same id with no state kept."""
    ident = need_str(value, where)
    if not ident or len(ident) > _MAX_CLIENT_ID:
        raise bad_request(f"'{where}' must be 1-{_MAX_CLIENT_ID} characters")
    if len(ident) <= max_len and ID_CHARS.issuperset(ident):
        return ident
    return prefix + hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# ---------------------------------------------------------------- provider replies


def short_text(value: Any) -> str:
    """A string cut to ``MAX_SHORT``; anything else is empty."""
    return value[:MAX_SHORT] if isinstance(value, str) else ""


def token_count(value: Any) -> int:
    """A usage counter; anything but a positive integer counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def clean_id(value: Any, limit: int = 128) -> str:
    """A provider id cut to ``limit`` and to ``ID_CHARS`` (it goes into client-visible ids)."""
    if not isinstance(value, str):
        return ""
    return "".join(c for c in value[:limit] if c in ID_CHARS)


def reply_model(value: Any, ctx: Context) -> str:
    """The provider's model name, else the one the client asked for, capped at ``MAX_SHORT``."""
    if isinstance(value, str) and value:
        return value[:MAX_SHORT]
    return short_text(ctx.get("model"))
