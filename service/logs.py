"""Structured JSON logs and the request-id middleware.

Every request gets an id (the client's ``X-Request-ID`` when it is sane, else a new one),
returned in the ``X-Request-ID`` header and written in one JSON log line per request with the
status, the time taken and whatever the route adds (task, version, queue and inference ms).
An unexpected exception is logged with its traceback and the id, and answered 500 without
internals.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from aat_serve.service.errors import ErrorType, error_response

log = logging.getLogger("aat_serve.service.access")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_RESERVED = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    """Send every log record to stderr as JSON (used by ``aat serve``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # we log requests ourselves


_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """32 hex digits, unique: a random prefix per process and a counter (a uuid4 per request
    cost a system call on the event loop; nothing relies on ids being unpredictable)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for k, v in headers:
        if k.lower() == b"x-request-id":
            value = v.decode("latin-1").strip()
            if _REQUEST_ID_RE.fullmatch(value):
                return value
            break
    return new_request_id()


class RequestContextMiddleware:
    """Pure ASGI: request id in, request id out, one access log line, 500s without internals."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope.get("headers", []))
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["log"] = {}
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = True
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid, "method": scope["method"],
                                                    "path": scope["path"]})
            if status["sent"]:
                raise
            status["code"] = 500
            response = error_response(ErrorType.INTERNAL_ERROR,
                                      f"internal error (request id {rid})",
                                      {"X-Request-ID": rid})
            await response(scope, receive, send)
        finally:
            if not scope.get("aat.forwarded"):  # a front end's request: it writes the line
                extra = {"request_id": rid, "method": scope["method"], "path": scope["path"],
                         "status": status["code"],
                         "duration_ms": round((time.perf_counter() - started) * 1000, 3)}
                extra.update(state.get("log", {}))
                log.info("request", extra=extra)
