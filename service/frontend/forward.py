"""Forwarding a request whole to the model process, which runs it through its own application.

The body is read here (with the front end's body timeouts) up to ``forward_limit`` bytes: past
that the model process's route answers its 413 from what it got (the declared length or the
bytes beyond its limit), exactly as in one process, and nothing larger is ever buffered.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from aat_serve.service.errors import ErrorType, ServiceError, bad_request, not_ready, timed_out
from aat_serve.service.settings import Settings
from aat_serve.service.wire import Caller, ConnectionLost, Frame

ANSWER_GRACE_S = 5.0
"""How long past a request's deadline a front end still waits for the model process's own
answer (its 504) before answering 504 itself."""


async def call_engine(caller: Caller, header: dict[str, Any], payload: Any = b"", *,
                      deadline: float | None = None, timeout_s: float = 0.0) -> Frame:
    """One call to the model process; an error reply is raised as the ``ServiceError`` it
    names, a lost connection as 503 ``not_ready``, no answer by ``deadline`` (monotonic; plus
    ``ANSWER_GRACE_S``) as 504 naming ``timeout_s`` (AAT_REQUEST_TIMEOUT_S)."""
    wait = None if deadline is None else (
        max(0.0, deadline - time.monotonic()) + ANSWER_GRACE_S)
    try:
        reply, body = await asyncio.wait_for(caller.call(header, payload), wait)
    except ConnectionLost:
        raise not_ready("the model process closed the connection; retry") from None
    except TimeoutError:
        raise timed_out(timeout_s) from None
    err = reply.get("error")
    if err is not None:
        raise ServiceError(ErrorType(err["type"]), err["message"], err.get("headers"))
    return reply, body


def forward_limit(settings: Settings) -> int:
    """Most body bytes a forwarded request carries: one past the largest body any route takes
    (a bundle, or audio), plus room for multipart framing."""
    return max(settings.max_bundle_bytes, settings.max_audio_bytes) + (1 << 20) + 1


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes (then the route refuses it); nothing when the
    declared length is already past ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) >= limit:
        return b""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    except ClientDisconnect:
        raise bad_request(f"the body is incomplete: the client disconnected after {size} "
                          "bytes") from None
    return b"".join(chunks)


async def forward(caller: Caller, request: Request, settings: Settings) -> Response:
    """The model process's answer to ``request`` (its status, headers and body)."""
    scope = request.scope
    body = await read_capped(request, forward_limit(settings))
    rid = request.state.request_id
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]
               if k.lower() != b"x-request-id"]
    headers.append(["x-request-id", rid])
    call = {"op": "http", "method": scope["method"], "path": scope["path"],
            "raw_path": (scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
            "query": scope.get("query_string", b"").decode("latin-1"), "headers": headers,
            "client": list(scope["client"]) if scope.get("client") else None,
            "request_id": rid}
    reply, answer = await call_engine(caller, call, body)
    request.state.log.update(reply.get("log") or {})
    response = Response(answer, status_code=reply["status"])
    response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1"))
                            for k, v in reply["headers"]]
    return response


