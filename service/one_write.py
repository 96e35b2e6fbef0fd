"""Each response leaves the process in one socket write, so a replica dies before or after it.

uvicorn writes a response's status line and headers, its body and its end in separate
``transport.write`` calls, each its own ``send()`` on the socket. A replica stopped or killed
between the first and the second (SIGKILL, the kernel's OOM killer, a frozen VM) leaves a head
without its body on the wire. nginx has then already passed that head to the client, so it
cannot retry the request on another replica: the client sees the connection close mid-response
(httpx: ``RemoteProtocolError``) and the request is lost. A replica killed before the head is
written is retried by nginx (``proxy_next_upstream error``), and one killed after the whole
response is written has answered; only the gap in between loses a request.

``CoalescingTransport`` closes that gap: the writes a connection makes during one turn of the
event loop are joined and handed to the real transport as one write at the end of the turn
(``loop.call_soon``). A small response is written whole in one step (Starlette sends the head
and the body without yielding in between), so it reaches the socket in one ``send()``: on
loopback and for anything under a TCP segment the peer then has all of it or none of it.
Closing flushes first (a response written just before ``close()`` still goes out, in order);
more than ``FLUSH_BYTES`` pending is written at once, so a large streamed body keeps uvicorn's
flow control. The cost is one ``call_soon`` per turn that writes, and no added latency beyond
the rest of that turn.

``OneWriteResponses`` is a mixin for any asyncio HTTP protocol class (uvicorn's h11 or
httptools one, or a subclass adding its own behaviour such as header timeouts): it only wraps
the transport in ``connection_made``. ``one_write_protocol()`` applies it to the protocol
uvicorn would pick by itself (``http="auto"``), for ``uvicorn.run(..., http=...)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

FLUSH_BYTES = 64 * 1024
"""Pending bytes that are written at once instead of at the end of the loop turn."""


class CoalescingTransport(asyncio.Transport):
    """Joins the writes of one event-loop turn into one write on ``transport``; everything
    else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop or asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_scheduled = False

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand everything pending to the wrapped transport now, as one write."""
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._transport.write(data)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._pending_bytes

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    # -- everything else is the wrapped transport's -----------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class OneWriteResponses:
    """Mixin for an asyncio protocol: its transport is a ``CoalescingTransport``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(CoalescingTransport(transport))  # type: ignore[misc]


def one_write_protocol(base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """``base`` (default: uvicorn's own choice of HTTP protocol, httptools when installed, else
    h11) writing each loop turn's output in one write."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    return type(f"OneWrite{base.__name__}", (OneWriteResponses, base),
                {"__doc__": OneWriteResponses.__doc__})
