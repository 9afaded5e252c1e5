"""One JSON error envelope for every error the gateway itself answers."""

from __future__ import annotations

import json


class GatewayError(Exception):
    """An error answered to the client as ``{"error": {"type", "message"}}`` with ``status``."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message

    def body(self) -> bytes:
        return error_body(self.type, self.message)


def error_body(type_: str, message: str) -> bytes:
    return json.dumps({"error": {"type": type_, "message": message}}).encode()


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, "invalid_request_error", message)


def not_found(message: str) -> GatewayError:
    return GatewayError(404, "not_found_error", message)
