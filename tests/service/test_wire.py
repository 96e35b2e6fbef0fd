"""Frames between front ends and the model process (service/wire.py): round trips, bounds,
calls answered out of order, notices, and a connection lost while calls wait."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from aat_serve.service.wire import (
    MAX_HEADER,
    PREFIX,
    Caller,
    ConnectionLost,
    WireError,
    encode,
    read_frame,
)


def _frames(data: bytes, n: int = 1) -> list:
    """The first ``n`` frames read from ``data`` (then the end of the stream)."""

    async def read():
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        return [await read_frame(r) for _ in range(n)]

    return asyncio.run(read())


def test_a_frame_round_trips_with_its_payload():
    header, payload = {"op": "classify", "task": "birds", "decode": [16000, 600.0]}, b"\x00\x01" * 7
    data = b"".join(encode(header, payload)) + b"".join(encode({"op": "observe"}))
    assert _frames(data, 2) == [(header, payload), ({"op": "observe"}, b"")]
    # the pair: the payload travels as given (a frame of other bytes reads back differently)
    other = b"".join(encode(header, b"\x00\x02" * 7))
    assert _frames(other)[0][1] != payload


def test_a_memoryview_payload_is_sent_without_a_copy_and_read_as_bytes():
    import numpy as np

    wave = np.arange(5, dtype=np.float32)
    pieces = encode({"op": "x"}, memoryview(wave).cast("B"))
    assert len(pieces[1]) == 20
    ((_, payload),) = _frames(b"".join(pieces))
    assert np.frombuffer(payload, dtype=np.float32).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("data", "message"), [
    (PREFIX.pack(MAX_HEADER + 1, 0), "out of bounds"),
    (PREFIX.pack(5, 0) + b"{nope", "not JSON"),
    (PREFIX.pack(2, 0) + b"[]", "not a JSON object"),
])
def test_broken_frames_are_refused(data, message):
    with pytest.raises(WireError, match=message):
        _frames(data)


def test_the_end_of_the_stream_mid_frame_is_an_incomplete_read():
    whole = b"".join(encode({"op": "x"}, b"abcdef"))
    with pytest.raises(asyncio.IncompleteReadError):
        _frames(whole[:-2])


def test_an_oversized_header_is_refused_when_sent():
    with pytest.raises(WireError, match="frame too large"):
        encode({"x": "a" * MAX_HEADER})


async def _echo_pair(handler):
    """A Caller connected to a loopback peer whose ``handler(header, payload, writer)``
    answers frames; the event is set when the peer's side ends."""
    server_done = asyncio.Event()

    async def serve(reader, writer):
        try:
            while True:
                header, payload = await read_frame(reader)
                await handler(header, payload, writer)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()
            server_done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return server, Caller(reader, writer), server_done


def test_calls_get_their_own_replies_even_out_of_order():
    async def scenario():
        seen = []

        async def handler(header, payload, writer):
            seen.append(header)
            if "id" not in header:
                return

            async def later():
                await asyncio.sleep(0.05 if header["n"] == 0 else 0)
                writer.writelines(encode({"id": header["id"], "n": header["n"] * 10},
                                         payload[::-1]))
            asyncio.get_running_loop().create_task(later())

        server, caller, done = await _echo_pair(handler)
        caller.notify({"op": "observe", "records": [1]})
        first = asyncio.ensure_future(caller.call({"n": 0}, b"ab"))
        await asyncio.sleep(0)  # sent: it takes id 1
        second = await caller.call({"n": 1}, b"xyz")
        assert second == ({"id": 2, "n": 10}, b"zyx")  # answered first, though sent second
        assert await first == ({"id": 1, "n": 0}, b"ba")
        assert seen[0] == {"op": "observe", "records": [1]}  # a notice carries no id
        await caller.close()
        await asyncio.wait_for(done.wait(), 10)
        server.close()

    asyncio.run(scenario())


def test_a_lost_connection_fails_every_waiting_call():
    async def scenario():
        async def handler(header, payload, writer):
            writer.close()  # the peer goes away without answering

        server, caller, done = await _echo_pair(handler)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(caller.call({"op": "x"}), 10)
        assert caller.closed.is_set()
        with pytest.raises(ConnectionLost, match="closed"):
            await caller.call({"op": "y"})
        caller.notify({"op": "dropped"})  # a notice on a closed connection is dropped
        await asyncio.wait_for(done.wait(), 10)
        server.close()

    asyncio.run(scenario())


def test_headers_are_orjson():
    (head, _) = encode({"a": 1.5})
    assert orjson.loads(head[PREFIX.size:]) == {"a": 1.5}
