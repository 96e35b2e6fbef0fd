"""The HTTP/1.1 connection layer under uvicorn: a request-head timeout and JSON parser errors.

uvicorn closes idle keep-alive connections, but a client that sends its request head slowly
(slowloris: a header line every few seconds) holds its connection for ever. ``GuardedConnection``
arms a timer when a connection opens and again each time a response completes; if no complete
request head has arrived when it fires (``AAT_HEADER_TIMEOUT_S``), the connection is closed,
after a 408 ``request_timeout`` JSON body when part of a head had arrived.

When the HTTP parser itself refuses a request (malformed Content-Length, bad chunk size,
invalid request line, headers too large), uvicorn answers 400 in plain text; here the answer is
the service's JSON error shape (``invalid_request``) with the parser's reason where it gives one.

The mixin only uses what uvicorn's h11 and httptools protocols share (``cycle``, ``transport``,
``server_state``, ``on_response_complete``, ``send_400_response``), so ``http_protocol()`` builds
the guarded class over either; only the parser's reason text is h11-specific (httptools gives
the generic message).
"""

from __future__ import annotations

import asyncio
import json
import re
from http import HTTPStatus
from typing import Any

from aat_serve.service.errors import ErrorType

GENERIC_PARSE_ERROR = ("the request line, a header, Content-Length or the chunked encoding "
                       "could not be parsed")
MAX_REASON_CHARS = 200


def error_bytes(kind: ErrorType, message: str,
                extra_headers: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with the JSON error body of ``kind``."""
    assert kind.status is not None
    body = json.dumps({"error": {"type": kind.value, "message": message}}).encode()
    phrase = HTTPStatus(kind.status).phrase.encode()
    lines = [b"HTTP/1.1 %d %s" % (kind.status, phrase)]
    lines += [name + b": " + value for name, value in extra_headers]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body),
              b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def header_timeout_message(timeout_s: float) -> str:
    return (f"the request head (request line and headers) did not arrive within "
            f"{timeout_s:g} s (AAT_HEADER_TIMEOUT_S)")


def parse_error_answer(parse_error: tuple[int, str] | None) -> tuple[ErrorType, str]:
    """The error type and message for a request the HTTP parser refused."""
    if parse_error is None:
        return ErrorType.INVALID_REQUEST, f"malformed HTTP request: {GENERIC_PARSE_ERROR}"
    status, reason = parse_error
    if status == ErrorType.HEADERS_TOO_LARGE.status:
        return ErrorType.HEADERS_TOO_LARGE, ("the request line and headers are too large "
                                             f"({reason})")
    reason = re.sub(r"bytearray\((b'.*')\)", r"\1", reason)[:MAX_REASON_CHARS]
    return ErrorType.INVALID_REQUEST, f"malformed HTTP request: {reason}"


class GuardedConnection:
    """Mixin over a uvicorn HTTP protocol class: head timeout and JSON parser errors."""

    header_timeout_s: float = 10.0
    # Set by the parser-specific subclass when the parser says why it refused a request:
    # the status it suggests (400 or 431) and its reason.
    _parse_error: tuple[int, str] | None = None

    # -- uvicorn protocol hooks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if data and self._between_requests():
            self._head_started = True
        super().data_received(data)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            kind, message = parse_error_answer(self._parse_error)
            self.transport.write(error_bytes(kind, message, self.server_state.default_headers))
        self.transport.close()

    # -- the head timer -----------------------------------------------------------------------

    def _between_requests(self) -> bool:
        """No request in flight and the last one fully read: the next bytes start a head.

        After an early response (e.g. 413) the rest of that body may still arrive; then it is
        not known whether bytes are body or head, and a timeout closes without a 408.
        """
        cycle = self.cycle
        return cycle is None or (cycle.response_complete and not cycle.more_body)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_started = False
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
            return  # a request is in flight: its head arrived in time
        if self._head_started and self._between_requests():
            self.transport.write(error_bytes(ErrorType.REQUEST_TIMEOUT,
                                             header_timeout_message(self.header_timeout_s),
                                             self.server_state.default_headers))
        self.transport.close()


def _guarded_h11() -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(GuardedConnection, H11Protocol):
        """h11 with the guard; keeps h11's reason for a refused request for the 400 body."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            next_event = self.conn.next_event

            def next_event_keeping_reason() -> Any:
                try:
                    return next_event()
                except h11.RemoteProtocolError as e:
                    self._parse_error = (e.error_status_hint, str(e))
                    raise

            self.conn.next_event = next_event_keeping_reason  # type: ignore[method-assign]

    return GuardedH11Protocol


def _guarded_httptools() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(GuardedConnection, HttpToolsProtocol):
        """httptools with the guard (the 400 body carries the generic reason)."""

    return GuardedHttpToolsProtocol


def http_protocol(header_timeout_s: float, impl: str = "auto") -> type[asyncio.Protocol]:
    """The guarded protocol class for ``uvicorn.run(http=...)``: httptools when installed
    (as uvicorn's ``auto``), else h11; ``impl`` forces ``h11`` or ``httptools``."""
    if impl == "auto":
        try:
            import httptools  # noqa: F401
            impl = "httptools"
        except ImportError:
            impl = "h11"
    base = _guarded_httptools() if impl == "httptools" else _guarded_h11()
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s})
