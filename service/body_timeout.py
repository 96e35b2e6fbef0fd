"""Slow request bodies: the body must keep arriving, and arrive whole within a bound.

``BodyTimeoutMiddleware`` wraps the ASGI ``receive`` while a request body is incomplete: a wait
longer than ``AAT_BODY_TIMEOUT_S`` for the next piece, or a body still incomplete
``AAT_BODY_TOTAL_TIMEOUT_S`` after the application began reading it, raises a 408
``request_timeout`` ``ServiceError`` with ``Connection: close`` (the rest of the body is never
read). Raised inside the handler's read, it is answered by the usual error handler with the JSON
body; if a response had already started, the server closes the connection. Once the body is
complete, ``receive`` is passed through untouched (waiting for a disconnect is not bounded).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aat_serve.service.errors import ErrorType, ServiceError

CLOSE = {"Connection": "close"}


def body_stalled(idle_s: float, received: int) -> ServiceError:
    return ServiceError(ErrorType.REQUEST_TIMEOUT,
                        f"the request body stalled: no data for {idle_s:g} s after {received} "
                        "bytes (AAT_BODY_TIMEOUT_S)", CLOSE)


def body_too_slow(total_s: float, received: int) -> ServiceError:
    return ServiceError(ErrorType.REQUEST_TIMEOUT,
                        f"the request body was not complete within {total_s:g} s ({received} "
                        "bytes arrived) (AAT_BODY_TOTAL_TIMEOUT_S)", CLOSE)


class _BodyClock:
    """The timing of one request's body: when reading began, how much arrived, whether done."""

    def __init__(self, receive: Any, idle_s: float, total_s: float) -> None:
        self.inner = receive
        self.idle_s = idle_s
        self.total_s = total_s
        self.started: float | None = None
        self.received = 0
        self.complete = False

    async def receive(self) -> dict:
        if self.complete:
            return await self.inner()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.started is None:
            self.started = now
        left = self.started + self.total_s - now
        wait = min(self.idle_s, left)
        if wait <= 0:
            raise body_too_slow(self.total_s, self.received)
        try:
            async with asyncio.timeout(wait):
                message = await self.inner()
        except TimeoutError:
            if wait < self.idle_s:
                raise body_too_slow(self.total_s, self.received) from None
            raise body_stalled(self.idle_s, self.received) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:  # http.disconnect: nothing more will arrive
            self.complete = True
        return message


class BodyTimeoutMiddleware:
    """Pure ASGI: bounds the wait for each piece of a request body and for the whole body."""

    def __init__(self, app: Any, idle_s: float, total_s: float) -> None:
        self.app = app
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clock = _BodyClock(receive, self.idle_s, self.total_s)
        await self.app(scope, clock.receive, send)
