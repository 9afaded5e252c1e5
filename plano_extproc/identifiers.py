"""Client-controlled identifiers: what a model id may contain before it reaches a path or header.

A wildcard provider (``openai/*``) turns whatever the client sends after the prefix into the
model id that is spliced into the upstream path (Azure deployments) and reported back in the
``x-plano-model`` response header. Both places would carry CR/LF, ``../`` or ``?`` verbatim, so
ids are checked here once, at the edge, and escaped where they become a path segment; header
values get a last-line defence of their own (``header_safe``).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from plano_extproc.errors import bad_request

MAX_MODEL_ID = 256
# Printable ASCII without spaces: every provider's model ids (HF repos, Bedrock ARNs-as-ids,
# "llama3.1:8b", "@cf/meta/...") fit; control characters, spaces and non-ASCII do not.
_MODEL_ID = re.compile(r"[\x21-\x7e]+")
_UNSAFE_HEADER = re.compile(r"[\x00-\x1f\x7f]")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]+")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def traceparent(value: str) -> tuple[str, str, int] | None:
    """A W3C ``traceparent`` header's (trace id, parent span id, flags), or None when it is
    not one; each reader decides what else it requires (non-zero ids, the sampled flag)."""
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None:
        return None
    return m.group(1), m.group(2), int(m.group(3), 16)


def check_model_id(model_id: str, requested: str) -> str:
    """``model_id`` when it is a plausible model id, else a 400 naming the rule."""
    if len(model_id) > MAX_MODEL_ID:
        raise bad_request(
            f"model id is too long ({len(model_id)} characters; at most {MAX_MODEL_ID})"
        )
    if not _MODEL_ID.fullmatch(model_id):
        raise bad_request(
            f"model {requested!r} is not a valid model id: use printable ASCII without spaces "
            "or control characters"
        )
    return model_id


def path_segment(model_id: str) -> str:
    """A model id as ONE path segment: every reserved character escaped, dot segments refused."""
    if unquote(model_id) in (".", ".."):
        raise bad_request(f"model id {model_id!r} cannot be used as a path segment")
    return quote(model_id, safe="-._~:@")


def header_safe(value: str) -> str:
    """A header value that cannot end the header: control characters are percent-encoded.

    Names and ids are validated before they get here; this makes the header path itself unable
    to carry CR/LF (response splitting) whatever a future caller passes.
    """
    if value.isprintable() or not _UNSAFE_HEADER.search(value):  # isprintable: the fast path
        return value
    return _UNSAFE_HEADER.sub(lambda m: f"%{ord(m.group()):02X}", value)


def ascii_header(value: str) -> str:
    """A name for a response header Envoy fills from metadata: control characters and
    non-ASCII as percent-encoded UTF-8 (Envoy would pass UTF-8 bytes that clients read as
    Latin-1), so a configured route "código" arrives as "c%C3%B3digo"."""
    if value.isascii() and value.isprintable():
        return value
    return _NOT_PRINTABLE_ASCII.sub(lambda m: quote(m.group(), safe=""), value)
