"""The JSON error envelope for every error the gateway itself answers, in the client's format.

OpenAI clients (Chat Completions, Responses, the decision endpoints) get
``{"error": {"type", "message"}}``; Anthropic Messages clients get Anthropic's
``{"type": "error", "error": {"type", "message"}}``, which their SDKs parse.
"""

from __future__ import annotations

import json


class GatewayError(Exception):
    """An error answered to the client as ``{"error": {"type", "message"}}`` with ``status``."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message

    def body(self, anthropic: bool = False) -> bytes:
        return error_body(self.type, self.message, anthropic)


def error_body(type_: str, message: str, anthropic: bool = False) -> bytes:
    error = {"type": type_, "message": message}
    return json.dumps({"type": "error", "error": error} if anthropic else {"error": error}).encode()


def body_limit_message(max_request_bytes: int) -> str:
    """The 413's message: Envoy's own (buffered bodies) and the worker's (full duplex)."""
    return f"request body exceeds the gateway limit of {max_request_bytes / (1024 * 1024):g} MiB"


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, "invalid_request_error", message)


def not_found(message: str) -> GatewayError:
    return GatewayError(404, "not_found_error", message)


class RateLimitError(GatewayError):
    """A 429 from the gateway's own budgets, shaped as each API's rate-limit error: OpenAI's
    ``{"error": {"message", "type": "tokens", "param", "code": "rate_limit_exceeded"}}`` and
    Anthropic's ``rate_limit_error``, so SDKs raise their RateLimitError with the message."""

    def __init__(self, message: str) -> None:
        super().__init__(429, "rate_limit_error", message)

    def body(self, anthropic: bool = False) -> bytes:
        if anthropic:
            return error_body(self.type, self.message, anthropic=True)
        error = {
            "message": self.message,
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        return json.dumps({"error": error}).encode()
