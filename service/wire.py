"""Frames between the front-end processes and the model process, over a Unix socket.

With ``AAT_FRONT_ENDS`` set, several front-end processes take the HTTP requests and one model
process owns the model (``service.frontend``, ``service.engine_server``). They talk in frames:
an 8-byte prefix (two big-endian unsigned 32-bit lengths), a JSON header (orjson) and a binary
payload (a clip's float32 PCM, a response body, an uploaded bundle). A header with an ``id`` is
a call and gets exactly one reply with the same ``id``; a header without one is a notice
(no reply). Frames are read whole with their sizes bounded, so a broken peer cannot make the
other side allocate more than ``MAX_PAYLOAD`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from typing import Any

import orjson

PREFIX = struct.Struct("!II")
MAX_HEADER = 1 << 20
"""Most bytes of one frame's JSON header."""
MAX_PAYLOAD = 1 << 31
"""Most bytes of one frame's payload (an upload is bounded far below by AAT_MAX_BUNDLE_MB)."""

Frame = tuple[dict[str, Any], bytes]


class WireError(Exception):
    """A frame that breaks the format: sizes out of bounds, a header that is not a JSON
    object. The connection it came on is closed."""


def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> list[bytes]:
    """The frame's pieces, for ``StreamWriter.writelines`` (the payload is not copied)."""
    head = orjson.dumps(header)
    if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise WireError(f"frame too large: header {len(head)} bytes (at most {MAX_HEADER}), "
                        f"payload {len(payload)} bytes (at most {MAX_PAYLOAD})")
    return [PREFIX.pack(len(head), len(payload)) + head, payload]


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """The next whole frame; ``asyncio.IncompleteReadError`` at the end of the stream."""
    n_head, n_payload = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if n_head > MAX_HEADER or n_payload > MAX_PAYLOAD:
        raise WireError(f"frame sizes out of bounds: header {n_head}, payload {n_payload}")
    try:
        header = orjson.loads(await reader.readexactly(n_head))
    except orjson.JSONDecodeError as e:
        raise WireError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not a JSON object")
    payload = await reader.readexactly(n_payload) if n_payload else b""
    return header, payload


class ConnectionLost(Exception):
    """The peer closed the connection (or it broke) before a call was answered."""


class Caller:
    """The calling side of one connection: ``call`` sends a frame and waits for its reply;
    ``notify`` sends a notice. One task reads the replies and hands each to its caller."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.closed = asyncio.Event()
        """Set when the connection is gone; every waiting call then raises ``ConnectionLost``."""
        self._replies = asyncio.get_running_loop().create_task(self._read_replies(),
                                                               name="aat-wire-replies")

    async def call(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> Frame:
        if self.closed.is_set():
            raise ConnectionLost("the connection is closed")
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        try:
            self._writer.writelines(encode({**header, "id": call_id}, payload))
            if len(payload) > 1 << 20:
                await self._writer.drain()
            return await future
        finally:
            self._waiting.pop(call_id, None)

    def notify(self, header: dict[str, Any]) -> None:
        """Send a notice (no reply); dropped when the connection is closed."""
        if not self.closed.is_set():
            self._writer.writelines(encode(header))

    async def _read_replies(self) -> None:
        try:
            while True:
                header, payload = await read_frame(self._reader)
                future = self._waiting.get(header.get("id"))
                if future is not None and not future.done():
                    future.set_result((header, payload))
        except (asyncio.IncompleteReadError, ConnectionError, WireError):
            pass
        finally:
            self._lost()

    def _lost(self) -> None:
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionLost("the model process closed the connection"))
        self._writer.close()

    async def close(self) -> None:
        self._replies.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._replies
        self._lost()
