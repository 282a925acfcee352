"""Errors answered as the real API server answers them: a ``Status`` object.

The ``kubernetes`` clients turn any non-2xx answer into ``ApiException`` and the pod operator reads
its ``status``, ``reason`` and ``message``, so these must have the real shape and wording.
"""

from __future__ import annotations

from typing import Any

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "AlreadyExists",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
    504: "Timeout",
}


class ApiError(Exception):
    """An error answered as a Kubernetes ``Status`` object."""

    def __init__(self, code: int, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, f'{kind} "{name}" not found', details={"name": name, "group": "", "kind": kind})


def forbidden(name: str, message: str) -> ApiError:
    """A pod refused by an admission plugin (priority, quota): 403, which the operator does not retry."""
    return ApiError(403, f'pods "{name}" is forbidden: {message}', details={"name": name, "kind": "pods"})


def invalid(name: str, message: str, causes: list[dict[str, str]] | None = None) -> ApiError:
    details: dict[str, Any] = {"name": name, "kind": "Pod"}
    if causes:
        details["causes"] = causes
    return ApiError(422, f'Pod "{name}" is invalid: {message}', details=details)
