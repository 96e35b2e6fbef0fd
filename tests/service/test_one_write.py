"""A response leaves the process in one socket write (service/one_write.py).

The transport is a recorder, so what is checked is exactly the list of writes uvicorn's protocol
hands to the socket: with the wrapper, a small response is one write holding head and body;
without it, the same response is several writes (the gap a killed replica leaves a head
without its body in, which nginx cannot retry).
"""

from __future__ import annotations

import asyncio

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.server import ServerState

from aat_serve.service.logs import RequestContextMiddleware
from aat_serve.service.one_write import FLUSH_BYTES, CoalescingTransport, one_write_protocol


class RecordingTransport(asyncio.Transport):
    """Records every write and whether and when it was closed or aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default)

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is "sent"

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _turn() -> None:
    """Let the event loop run the callbacks already scheduled."""
    await asyncio.sleep(0)


# ---- the transport on its own ----------------------------------------------------------------

def test_writes_of_one_loop_turn_become_one_write_and_later_turns_their_own():
    async def main():
        raw = RecordingTransport()
        t = CoalescingTransport(raw)
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"")  # h11's end of a Content-Length body: nothing to send
        t.write(b'{"a":1}')
        assert raw.writes == []  # held until the turn ends
        assert t.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\n{\"a\":1}")
        await _turn()
        assert raw.writes == [b'HTTP/1.1 200 OK\r\n\r\n{"a":1}']
        # a write in a later turn is not held back for more: it goes out on its own
        t.write(b"next")
        await _turn()
        assert raw.writes == [b'HTTP/1.1 200 OK\r\n\r\n{"a":1}', b"next"]
        assert t.get_write_buffer_size() == 0

    asyncio.run(main())


def test_close_writes_what_is_pending_first_and_abort_drops_it():
    async def main():
        raw = RecordingTransport()
        t = CoalescingTransport(raw)
        t.write(b"head")
        t.write(b"body")
        t.close()
        assert raw.writes == [b"headbody"] and raw.events == ["write", "close"]
        await _turn()  # the scheduled flush finds nothing left
        assert raw.writes == [b"headbody"]

        raw = RecordingTransport()
        t = CoalescingTransport(raw)
        t.write(b"head")
        t.abort()
        await _turn()
        assert raw.writes == [] and raw.events == ["abort"]

    asyncio.run(main())


def test_a_large_write_goes_out_at_once_so_flow_control_still_sees_it():
    async def main():
        raw = RecordingTransport()
        t = CoalescingTransport(raw)
        t.write(b"h")
        t.write(b"x" * FLUSH_BYTES)
        assert raw.writes == [b"h" + b"x" * FLUSH_BYTES]  # not held until the turn ends
        t.write(b"y" * (FLUSH_BYTES - 1))
        assert len(raw.writes) == 1  # under the threshold: held
        await _turn()
        assert raw.writes[1] == b"y" * (FLUSH_BYTES - 1)

    asyncio.run(main())


# ---- uvicorn's protocol with the service's middleware ----------------------------------------

def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/classify/{task}")
    async def classify(task: str) -> dict:
        return {"task": task, "predictions": [{"label": "a", "score": 0.5}]}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            for part in (b"one", b"two"):
                yield part
                await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="text/plain")

    app.add_middleware(RequestContextMiddleware)
    return app


def _serve_one(protocol_class: type[asyncio.Protocol], request: bytes) -> list[bytes]:
    """The writes uvicorn's protocol makes answering ``request`` on one connection."""

    async def main() -> list[bytes]:
        config = uvicorn.Config(_app(), log_config=None, lifespan="off")
        config.load()
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
        raw = RecordingTransport()
        protocol.connection_made(raw)
        protocol.data_received(request)
        for _ in range(200):  # bounded: the app answers within a few loop turns
            await _turn()
            if b"".join(raw.writes).endswith((b"]}", b"0\r\n\r\n")):
                break
        await _turn()
        protocol.connection_lost(None)
        return raw.writes

    return asyncio.run(main())


POST = (b"POST /classify/birds HTTP/1.1\r\nHost: x\r\nX-Request-ID: r-1\r\n"
        b"Content-Type: audio/wav\r\nContent-Length: 4\r\n\r\nRIFF")


def test_uvicorn_writes_a_response_in_one_write_with_the_wrapper_and_several_without():
    (one,) = _serve_one(one_write_protocol(), POST)
    head, _, body = one.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-request-id: r-1" in head
    assert body == b'{"task":"birds","predictions":[{"label":"a","score":0.5}]}'
    # the same response from uvicorn's own protocol: the head is a write of its own
    plain = _serve_one(AutoHTTPProtocol, POST)
    assert len(plain) > 1 and plain[0].endswith(b"\r\n\r\n") and b"".join(plain) == one


def test_a_streamed_body_still_goes_out_chunk_by_chunk():
    writes = _serve_one(one_write_protocol(), b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(writes) > 1  # the chunks are not held back until the body ends
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"3\r\none\r\n")
    assert b"".join(writes).endswith(b"3\r\ntwo\r\n0\r\n\r\n")
