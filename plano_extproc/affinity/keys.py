"""Session-cache keys for model affinity.

The key layout matches Plano 0.4.x (``{tenant}:{id}`` or ``{id}``, Redis prefix
``plano:affinity:``) so a Redis shared with Plano during a migration sees the same pins.
Validation exists because the id comes straight from a client header: unbounded or
control-character values would bloat Redis, and control characters would corrupt logs.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata

AFFINITY_HEADER = "x-model-affinity"
"""Request header carrying the session id (header names are lower-case in ext_proc)."""

REDIS_PREFIX = "plano:affinity:"
"""Prefix of every Redis key written by the Redis backend (Plano's layout)."""

MAX_ID_BYTES = 256
"""Longest accepted id/tenant, in UTF-8 bytes."""


class InvalidAffinityId(ValueError):
    """The affinity id (or tenant) cannot be used as a cache key; the caller should reject it."""


def validate_affinity_id(value: str, *, what: str = "affinity id") -> str:
    """Return ``value`` unchanged if it is a usable key part, else raise ``InvalidAffinityId``.

    The message names the problem but never echoes the value (it may be huge or hostile).
    """
    if not value:
        raise InvalidAffinityId(f"{what} is empty")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_ID_BYTES:
        raise InvalidAffinityId(f"{what} is {size} bytes long; the limit is {MAX_ID_BYTES} bytes")
    for pos, ch in enumerate(value):
        # Category Cc covers C0 controls, DEL (0x7f) and the C1 range (0x80-0x9f).
        if unicodedata.category(ch) == "Cc":
            raise InvalidAffinityId(
                f"{what} contains control character U+{ord(ch):04X} at position {pos}"
            )
    return value


def cache_key(affinity_id: str, tenant: str | None = None) -> str:
    """Build the backend-neutral cache key: ``{tenant}:{id}`` when a tenant is given, else ``{id}``.

    Like Plano, tenant and id are joined with ``:`` without escaping, so a tenant containing
    ``:`` can alias another tenant's keys; deployments use tenant ids without colons.
    """
    validate_affinity_id(affinity_id)
    if tenant:
        validate_affinity_id(tenant, what="tenant")
        return f"{tenant}:{affinity_id}"
    return affinity_id


def implicit_key(
    tenant: str | None, lane: str, system: str, tools: list[str], first_user: str
) -> str:
    """Session key for route_on_user_only without ``X-Model-Affinity``: the parts of a
    conversation that stay fixed while an agent loops (tenant, requested model, system
    prompt, tool names, first user message)."""
    material = json.dumps([tenant or "", lane, system, tools, first_user], ensure_ascii=False)
    digest = hashlib.sha256(b"plano-extproc-implicit-v1\0" + material.encode()).hexdigest()
    return f"implicit:{digest[:32]}"
