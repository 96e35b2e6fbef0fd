"""One error path: every failure becomes ``{"error": {"type", "message"}}`` with one status.

``ServiceError`` carries the HTTP status, a stable ``type`` string and a message; the model
package's own errors (``aat_serve.adapters.errors``) are mapped to it in ``from_aat_error``.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from aat_serve.adapters.errors import (
    AATError,
    AudioError,
    BackboneMismatchError,
    BundleError,
    ConfigError,
    SlotsFullError,
    UnknownTaskError,
)


class ErrorInfo(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorInfo


class ServiceError(Exception):
    """An error with its HTTP status, type and extra headers."""

    def __init__(self, status: int, type_: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers or {}

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if request_id:
            headers["X-Request-ID"] = request_id
        return error_response(self.status, self.type, self.message, headers)


def error_response(status: int, type_: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status,
                        headers=headers)


def bad_request(message: str) -> ServiceError:
    return ServiceError(400, "invalid_request", message)


def unknown_task(task: str) -> ServiceError:
    return ServiceError(404, "unknown_task", f"unknown task {task!r}")


def too_large(what: str, size: int | None, limit: int, setting: str) -> ServiceError:
    got = f"{size} bytes" if size is not None else "more"
    return ServiceError(413, "payload_too_large",
                        f"{what} is too large: {got}, the limit is {limit} bytes ({setting})")


def overloaded(message: str, retry_after_s: int = 1) -> ServiceError:
    return ServiceError(503, "overloaded", message, {"Retry-After": str(retry_after_s)})


def not_ready(message: str = "the service is starting: the backbone and tasks are warming up",
              ) -> ServiceError:
    return ServiceError(503, "not_ready", message, {"Retry-After": "1"})


def timed_out(timeout_s: float) -> ServiceError:
    return ServiceError(504, "timeout",
                        f"the request was not answered within {timeout_s:g} s "
                        "(AAT_REQUEST_TIMEOUT_S)")


def from_aat_error(e: AATError) -> ServiceError:
    """Map a model-package error to its HTTP status (design.md, Service)."""
    msg = str(e)
    if isinstance(e, AudioError):
        if getattr(e, "too_long", False) or "too long" in msg or "longer than" in msg:
            return ServiceError(413, "audio_too_long", msg)
        return ServiceError(400, "invalid_audio", msg)
    if isinstance(e, UnknownTaskError):
        return ServiceError(404, "unknown_task", msg)
    if isinstance(e, BackboneMismatchError):
        return ServiceError(409, "backbone_mismatch", msg)
    if isinstance(e, BundleError):
        return ServiceError(422, "invalid_bundle", msg)
    if isinstance(e, SlotsFullError):
        return ServiceError(507, "slots_full", msg)
    if isinstance(e, ConfigError):
        return ServiceError(400, "invalid_request", msg)
    return ServiceError(500, "internal_error", "internal error")


# Shown in OpenAPI for each route: status -> description.
ERROR_DOCS: dict[int, str] = {
    400: "Bad request: undecodable audio (`invalid_audio`), a malformed request or query "
         "(`invalid_request`), or a task name outside `^[a-z0-9][a-z0-9_-]{0,63}$` "
         "(`invalid_task_name`).",
    401: "Missing or wrong bearer token (`unauthorized`).",
    403: "Management disabled because AAT_ADMIN_TOKEN is unset (`management_disabled`), or a "
         "token without the right to manage tasks (`forbidden`).",
    404: "Unknown task (`unknown_task`) or route (`not_found`).",
    405: "Method not allowed on this route (`method_not_allowed`).",
    409: "The bundle was trained on a different backbone (`backbone_mismatch`).",
    413: "Body larger than its limit (`payload_too_large`) or audio longer than "
         "AAT_MAX_AUDIO_SECONDS (`audio_too_long`).",
    415: "Unsupported Content-Type (`unsupported_media_type`).",
    422: "The bundle is invalid: format, manifest, tensor names, shapes, values or version "
         "(`invalid_bundle`).",
    500: "Unexpected server error (`internal_error`); logged with the request id.",
    503: "Queue full or too many uploads (`overloaded`) or still warming up (`not_ready`); "
         "retry after `Retry-After` seconds.",
    504: "Not answered within AAT_REQUEST_TIMEOUT_S (`timeout`); the request was not computed.",
    507: "Every task slot is in use (`slots_full`, AAT_MAX_TASKS).",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses=`` entries for these statuses, all with the error schema."""
    return {s: {"model": ErrorResponse, "description": ERROR_DOCS[s]} for s in statuses}
