"""A provider's error reply in the client's error format (translated requests only).

Providers answer errors as OpenAI's ``{"error": {"message", "type", "code", "param"}}``,
Anthropic's ``{"type": "error", "error": {"type", "message"}}``, a list of those (Gemini's
OpenAI-compatible endpoint), or plain text from a proxy in front of them. The client gets its
own API's envelope with the same status, so its SDK raises the right exception class (the SDKs
pick it by status) with the provider's message. Types follow each API's documented set:
docs.claude.com/en/api/errors for Anthropic, platform.openai.com/docs/guides/error-codes for
OpenAI.
"""

from __future__ import annotations

import json
from typing import Any

from plano_extproc.providers import ClientApi

MAX_MESSAGE_CHARS = 2000  # the provider's text is quoted, not replayed without bound

_ANTHROPIC_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_OPENAI_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def _provider_error(body: bytes) -> tuple[str | None, str | None, Any]:
    """(type, message, code) read from any of the shapes providers use."""
    try:
        value: Any = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return None, text or None, None
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, dict):
        return None, None, None
    err = value.get("error", value)
    if isinstance(err, str):
        return None, err, None
    if not isinstance(err, dict):
        return None, None, None
    type_ = err.get("type") if isinstance(err.get("type"), str) else None
    message = err.get("message") if isinstance(err.get("message"), str) else None
    code = err.get("code")
    if not isinstance(code, (str, int)) or isinstance(code, bool):
        code = None
    if type_ is None and isinstance(err.get("status"), str):  # Google's {"error": {"status"}}
        type_ = err["status"]
    return type_, message, code


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def client_error(client: ClientApi, status: int, body: bytes) -> bytes:
    """The provider's error (``status``, ``body``) as the client API's error body."""
    ptype, message, code = _provider_error(body)
    text = _clip(message or f"the provider answered HTTP {status}")
    if client is ClientApi.MESSAGES:
        atype = _ANTHROPIC_BY_STATUS.get(status) or ("api_error" if status >= 500 else None)
        out: dict[str, Any] = {
            "type": "error",
            "error": {"type": atype or "invalid_request_error", "message": text},
        }
    else:
        otype = _OPENAI_BY_STATUS.get(status) or ("server_error" if status >= 500 else None)
        err: dict[str, Any] = {
            "message": text,
            "type": otype or "invalid_request_error",
            "param": None,
            "code": code if code is not None else ptype,
        }
        out = {"error": err}
    return json.dumps(out, ensure_ascii=False).encode()
