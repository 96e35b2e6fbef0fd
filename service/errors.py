"""One error path: every failure becomes ``{"error": {"type", "message"}}`` with one status.

``ErrorType`` is the one table of the service's errors: each member is a stable ``type``
string, its HTTP status and what it means (shown in the OpenAPI description). ``ServiceError``
carries a member and a message; the model package's own errors are named by their class in
``aat_serve.adapters.errors.ERROR_TYPES`` (never by their message text) and mapped to the
member of that name here (``from_aat_error``).
"""

from __future__ import annotations

from enum import Enum

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from aat_serve.adapters.errors import AATError, error_type


class ErrorType(str, Enum):
    """Every error ``type`` the service answers with, its HTTP status and its meaning.

    ``status`` is None only for ``http_error``: an HTTP error raised by the web framework
    itself (other than 404 and 405), answered with the framework's own status.
    """

    status: int | None
    summary: str

    def __new__(cls, type_: str, status: int | None, summary: str) -> ErrorType:
        member = str.__new__(cls, type_)
        member._value_ = type_
        member.status = status
        member.summary = summary
        return member

    INVALID_REQUEST = ("invalid_request", 400, "a malformed request, query or parameter")
    INVALID_AUDIO = ("invalid_audio", 400, "audio that cannot be decoded or is unusable "
                                           "(empty, NaN, unsupported)")
    INVALID_TASK_NAME = ("invalid_task_name", 400,
                         "a task name outside `^[a-z0-9][a-z0-9_-]{0,63}$`")
    UNAUTHORIZED = ("unauthorized", 401, "a missing, malformed or wrong bearer token")
    MANAGEMENT_DISABLED = ("management_disabled", 403,
                           "task management is off because AAT_ADMIN_TOKEN is unset")
    FORBIDDEN = ("forbidden", 403, "a token without the right to manage tasks")
    UNKNOWN_TASK = ("unknown_task", 404, "no such task")
    NOT_FOUND = ("not_found", 404, "no such route")
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "the method is not allowed on this route")
    REQUEST_TIMEOUT = ("request_timeout", 408,
                       "the request head or body arrived too slowly (AAT_HEADER_TIMEOUT_S, "
                       "AAT_BODY_TIMEOUT_S, AAT_BODY_TOTAL_TIMEOUT_S); the connection is closed")
    BACKBONE_MISMATCH = ("backbone_mismatch", 409,
                         "the bundle was trained on a different backbone")
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, "the body is larger than its limit")
    AUDIO_TOO_LONG = ("audio_too_long", 413, "the audio is longer than AAT_MAX_AUDIO_SECONDS")
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415,
                              "an unsupported Content-Type, or a Content-Encoding other than "
                              "identity")
    INVALID_BUNDLE = ("invalid_bundle", 422, "the bundle is invalid: format, manifest, tensor "
                                             "names, shapes, values or version")
    HEADERS_TOO_LARGE = ("headers_too_large", 431,
                         "the request line and headers are larger than the HTTP parser accepts")
    INTERNAL_ERROR = ("internal_error", 500,
                      "an unexpected server error, logged with the request id")
    TASK_FAILED = ("task_failed", 500, "the named task cannot answer: its stored bundle failed "
                                       "to load or warm up, or its model gave non-finite scores "
                                       "(NaN, infinity) for this clip")
    OVERLOADED = ("overloaded", 503, "the queue is full or too many uploads run; retry after "
                                     "`Retry-After` seconds")
    NOT_READY = ("not_ready", 503, "warming up or shutting down; retry after `Retry-After` "
                                   "seconds")
    TASK_CHANGED = ("task_changed", 503, "the task changed its feature settings while the "
                                         "request waited; retry")
    TIMEOUT = ("timeout", 504,
               "not answered within AAT_REQUEST_TIMEOUT_S; the request was not computed")
    SLOTS_FULL = ("slots_full", 507, "every task slot is in use (AAT_MAX_TASKS)")
    HTTP_ERROR = ("http_error", None,
                  "any other HTTP error of the web framework, with the framework's status")


class ErrorInfo(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorInfo


class ServiceError(Exception):
    """An error of one ``ErrorType`` (which gives its status), with a message and headers."""

    def __init__(self, kind: ErrorType, message: str,
                 headers: dict[str, str] | None = None) -> None:
        if kind.status is None:
            raise ValueError(f"{kind.value} has no status of its own; use http_error_response")
        super().__init__(message)
        self.kind = kind
        self.status: int = kind.status
        self.type: str = kind.value
        self.message = message
        self.headers = headers or {}

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if request_id:
            headers["X-Request-ID"] = request_id
        return error_response(self.kind, self.message, headers)


def _body(type_: str, message: str, status: int,
          headers: dict[str, str] | None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status,
                        headers=headers)


def error_response(kind: ErrorType, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error response of ``kind``, with the status from ``ErrorType``."""
    if kind.status is None:
        raise ValueError(f"{kind.value} has no status of its own; use http_error_response")
    return _body(kind.value, message, kind.status, headers)


def http_error_response(status: int, message: str,
                        headers: dict[str, str] | None = None) -> JSONResponse:
    """``http_error``: an HTTP error raised by the web framework, with the framework's status."""
    return _body(ErrorType.HTTP_ERROR.value, message, status, headers)


def bad_request(message: str) -> ServiceError:
    return ServiceError(ErrorType.INVALID_REQUEST, message)


def unknown_task(task: str) -> ServiceError:
    return ServiceError(ErrorType.UNKNOWN_TASK, f"unknown task {task!r}")


def too_large(what: str, size: int | None, limit: int, setting: str) -> ServiceError:
    """413; ``size`` is the declared Content-Length, None when a streamed body passed the limit."""
    if size is None:
        message = f"{what} is larger than the limit of {limit} bytes ({setting})"
    else:
        message = f"{what} is {size} bytes, the limit is {limit} bytes ({setting})"
    return ServiceError(ErrorType.PAYLOAD_TOO_LARGE, message)


def overloaded(message: str, retry_after_s: int = 1) -> ServiceError:
    return ServiceError(ErrorType.OVERLOADED, message, {"Retry-After": str(retry_after_s)})


def not_ready(message: str = "the service is starting: the backbone and tasks are warming up",
              ) -> ServiceError:
    return ServiceError(ErrorType.NOT_READY, message, {"Retry-After": "1"})


def timed_out(timeout_s: float) -> ServiceError:
    return ServiceError(ErrorType.TIMEOUT,
                        f"the request was not answered within {timeout_s:g} s "
                        "(AAT_REQUEST_TIMEOUT_S)")


def task_failed(task: str, why: str) -> ServiceError:
    """500 ``task_failed``: ``task`` cannot answer (a faulty bundle), never the caller's fault."""
    return ServiceError(ErrorType.TASK_FAILED, f"task {task!r} cannot answer: {why}")


EXPOSED_MODEL_ERRORS = frozenset({"audio_too_long", "invalid_audio", "unknown_task",
                                  "backbone_mismatch", "invalid_bundle", "slots_full",
                                  "invalid_request"})
"""The model package's error types (``adapters.errors.ERROR_TYPES``) a client is told; any other
model error (a checkpoint's, or an untyped ``AATError``) is an internal error whose message,
which may name server paths, stays in the log."""


def from_aat_error(e: AATError) -> ServiceError:
    """Map a model-package error to its ``ErrorType`` by its class, never its message."""
    name = error_type(e)
    if name in EXPOSED_MODEL_ERRORS:
        return ServiceError(ErrorType(name), str(e))
    return ServiceError(ErrorType.INTERNAL_ERROR, "internal error")


def client_error(exc: BaseException) -> ServiceError | None:
    """``exc`` as the error its client is told: a ``ServiceError`` itself, a model error of an
    exposed type mapped by ``from_aat_error``; None for anything else (an internal error,
    logged with the request id and answered 500 without its message)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, AATError):
        err = from_aat_error(exc)
        if err.kind is not ErrorType.INTERNAL_ERROR:
            return err
    return None


def _status_doc(status: int) -> str:
    kinds = [k for k in ErrorType if k.status == status]
    return "; ".join(f"`{k.value}`: {k.summary}" for k in kinds) + "."


# Shown in OpenAPI for each route: status -> the error types with that status.
ERROR_DOCS: dict[int, str] = {
    s: _status_doc(s) for s in sorted({k.status for k in ErrorType if k.status is not None})}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses=`` entries for these statuses, all with the error schema."""
    return {s: {"model": ErrorResponse, "description": ERROR_DOCS[s]} for s in statuses}


def error_types_markdown() -> str:
    """Every error type with its status, as a Markdown table for the API description."""
    rows = ["| type | status | meaning |", "| --- | --- | --- |"]
    for k in ErrorType:
        status = str(k.status) if k.status is not None else "the framework's"
        rows.append(f"| `{k.value}` | {status} | {k.summary} |")
    return "\n".join(rows)
