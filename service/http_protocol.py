"""The HTTP/1.1 connection layer under uvicorn: a request-head timeout, a request-head size limit
and JSON parser errors, over either of uvicorn's parsers (h11, or httptools in C).

uvicorn closes idle keep-alive connections, but a client that sends its request head slowly
(slowloris: a header line every few seconds) holds its connection for ever. ``GuardedConnection``
arms a timer when a connection opens and again each time a response completes; if no complete
request head has arrived when it fires (``AAT_HEADER_TIMEOUT_S``), the connection is closed,
after a 408 ``request_timeout`` JSON body when part of a head had arrived.

When the HTTP parser itself refuses a request (malformed Content-Length, bad chunk size,
invalid request line, headers too large), uvicorn answers 400 in plain text; here the answer is
the service's JSON error shape (``invalid_request``) with the parser's reason.

The mixin only uses what uvicorn's h11 and httptools protocols share (``cycle``, ``transport``,
``server_state``, ``on_response_complete``, ``send_400_response``); each parser's subclass
keeps that parser's reason for the 400 body. h11 refuses a request head still incomplete after
``MAX_HEAD_BYTES`` (its receive buffer limit); httptools has no limit of its own, so its
subclass counts the bytes of an incomplete head and refuses at the same limit with the same
431 answer. ``http_protocol()`` picks the parser (``AAT_HTTP_PARSER``): httptools when
installed, else h11, unless one is forced.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from http import HTTPStatus
from typing import Any, get_args

from aat_serve.adapters.errors import ConfigError
from aat_serve.service.errors import ErrorType
from aat_serve.service.settings import HttpParser

GENERIC_PARSE_ERROR = ("the request line, a header, Content-Length or the chunked encoding "
                       "could not be parsed")
MAX_REASON_CHARS = 200
MAX_HEAD_BYTES = 16 * 1024
"""A request head (request line and headers) still incomplete after this many bytes is refused
with 431: h11's default receive-buffer limit, which uvicorn keeps, applied to httptools too."""
HEAD_TOO_LARGE_REASON = "Receive buffer too long"
"""h11's reason for that refusal; the httptools subclass gives the same, so the 431 body is one."""
PARSERS: tuple[str, ...] = get_args(HttpParser)
"""``AAT_HTTP_PARSER``'s values, from the setting's own type."""


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
        # Mid-response (head written, body not) an error body would corrupt it: just close.
        # After a complete response (the refused request came on a kept-alive connection) or
        # before any, the refused request gets its answer.
        if cycle is None or not cycle.response_started or cycle.response_complete:
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
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(GuardedConnection, HttpToolsProtocol):
        """httptools with the guard, h11's head size limit and httptools' reason in the 400.

        llhttp (under httptools) bounds neither the request line nor the headers, so the bytes
        read while a head is incomplete are counted (from the read the head began in, so a
        pipelined body's tail in that read counts too) and a head still incomplete after
        ``MAX_HEAD_BYTES`` is refused with 431, as h11 does: a larger head that arrives whole
        in one read is parsed by both.
        """

        _in_head = False
        _head_bytes = 0
        _deferred_400: str | None = None

        def data_received(self, data: bytes) -> None:
            if self._deferred_400 is not None or self.transport.is_closing():
                return  # refused or closed: the rest is not parsed
            super().data_received(data)
            if self._in_head and self._deferred_400 is None and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._parse_error = (ErrorType.HEADERS_TOO_LARGE.status,
                                         HEAD_TOO_LARGE_REASON)
                    self.send_400_response("head too large")

        def on_message_begin(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            # RFC 9112 3.2: an HTTP/1.1 request without Host is refused (h11 does; llhttp not)
            for name, _ in self.headers:
                if name == b"host":
                    break
            else:
                if self.parser.get_http_version() == "1.1":
                    raise httptools.HttpParserError("Missing mandatory Host: header")
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this from its ``except httptools.HttpParserError`` block, so the
            # exception being handled is the parser's: keep its reason for the JSON body.
            error = sys.exc_info()[1]
            if self._parse_error is None and isinstance(error, httptools.HttpParserError):
                self._parse_error = (400, httptools_reason(error))
            if self._answer_later():
                self._deferred_400 = msg
                return
            super().send_400_response(msg)

        def _answer_later(self) -> bool:
            """Whether requests before the refused one are still unanswered: httptools parses
            pipelined requests ahead, and those are answered first, in order (as h11, which
            parses one at a time, does). The refused one is the request whose body was being
            read (then a queued one leaves the queue), else a head after the last request."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return False
            queued = bool(self.pipeline) and self.pipeline[0][0] is cycle
            if cycle.more_body and queued:
                self.pipeline.popleft()  # its body is what was refused: it never runs
            return queued or not cycle.more_body

        def on_response_complete(self) -> None:
            last = not self.pipeline  # no queued request starts after this one
            super().on_response_complete()
            if self._deferred_400 is not None and last and not self.transport.is_closing():
                super().send_400_response(self._deferred_400)

    return GuardedHttpToolsProtocol


def httptools_reason(error: Exception) -> str:
    """What httptools says was wrong: its parser's message (``Invalid character in chunk
    size``), or for an error raised in one of uvicorn's callbacks the parser error inside it
    (``invalid url b'...'``); anything else raised there is not described (the generic text)."""
    import httptools

    if isinstance(error, httptools.HttpParserCallbackError):
        inner = error.__context__
        if isinstance(inner, httptools.HttpParserError):
            return str(inner)
        return GENERIC_PARSE_ERROR
    return str(error) or GENERIC_PARSE_ERROR


def resolve_parser(impl: str = "auto") -> str:
    """The parser ``impl`` (``AAT_HTTP_PARSER``) means here: ``auto`` is httptools when it is
    importable, else h11 (as uvicorn's ``auto``); a forced httptools must be installed
    (``ConfigError`` otherwise, as for an unknown name)."""
    if impl not in PARSERS:
        raise ConfigError(f"AAT_HTTP_PARSER: unknown HTTP parser {impl!r}; expected one of "
                          f"{', '.join(PARSERS)}")
    if impl == "h11":
        return impl
    try:
        import httptools  # noqa: F401
    except ImportError:
        if impl == "httptools":
            raise ConfigError("AAT_HTTP_PARSER=httptools but httptools is not installed (pip "
                             "install httptools); use auto or h11") from None
        return "h11"
    return "httptools"


def http_protocol(header_timeout_s: float, impl: str = "auto") -> type[asyncio.Protocol]:
    """The guarded protocol class for ``uvicorn.run(http=...)`` over the parser ``impl``
    names (``resolve_parser``)."""
    impl = resolve_parser(impl)
    base = _guarded_httptools() if impl == "httptools" else _guarded_h11()
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s})
