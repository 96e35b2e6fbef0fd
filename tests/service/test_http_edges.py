"""HTTP edges in process: Content-Encoding 415, a PUT without Content-Type, the body timeouts of
``BodyTimeoutMiddleware`` (driven with a scripted ``receive``) and the parser-error answers."""

from __future__ import annotations

import asyncio
import json

import pytest

from aat_serve.service.body_timeout import BodyTimeoutMiddleware
from aat_serve.service.errors import ErrorType, ServiceError
from aat_serve.service.http_protocol import error_bytes, http_protocol, parse_error_answer
from tests.service.helpers import ADMIN, auth, error, served, wav_bytes

WAV = {"content-type": "audio/wav"}
OCTET = {"content-type": "application/octet-stream"}


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate", "gzip, identity", "x-custom"])
def test_a_content_encoding_other_than_identity_is_415(make_app, store, bundles, coding):
    bundles["birds"].save(store / "birds.safetensors")
    expected = error(415, "unsupported_media_type",
                     f"unsupported Content-Encoding {coding!r}; send the body unencoded "
                     "(identity)")
    with served(make_app(admin_token=ADMIN)) as c:
        r = c.post("/classify/birds", content=wav_bytes(),
                   headers={**WAV, "content-encoding": coding})
        assert (r.status_code, r.json()) == expected
        assert r.headers["accept-encoding"] == "identity"
        r = c.put("/tasks/birds", content=bundles["birds"].to_bytes(),
                  headers={**OCTET, **auth(ADMIN), "content-encoding": coding})
        assert (r.status_code, r.json()) == expected
        # accepted: identity, spelled either way, or no header at all
        for headers in ({"content-encoding": "identity"}, {"content-encoding": "Identity"}, {}):
            r = c.post("/classify/birds", content=wav_bytes(), headers={**WAV, **headers})
            assert r.status_code == 200, r.text
        r = c.put("/tasks/birds", content=bundles["birds"].to_bytes(),
                  headers={**OCTET, **auth(ADMIN), "content-encoding": "identity"})
        assert r.status_code == 200 and r.json()["version"] == bundles["birds"].manifest.version


def test_a_put_without_content_type_is_read_as_octet_stream(make_app, store, bundles):
    b = bundles["words"]
    with served(make_app(admin_token=ADMIN)) as c:
        r = c.put("/tasks/words", content=b.to_bytes(), headers=auth(ADMIN))
        assert "content-type" not in r.request.headers
        assert r.status_code == 201, r.text
        assert r.json()["version"] == b.manifest.version
        assert c.get("/tasks/words").json()["version"] == b.manifest.version
        # refused: an empty Content-Type is not an absent one, and another type stays 415
        for ct in ("", "text/plain"):
            r = c.put("/tasks/words", content=b.to_bytes(),
                      headers={**auth(ADMIN), "content-type": ct})
            assert (r.status_code, r.json()) == error(
                415, "unsupported_media_type", f"unsupported Content-Type {ct or '(none)'!r}; "
                "send application/octet-stream or multipart/form-data with a 'file' field")
        # classification keeps its rule: audio needs a Content-Type
        r = c.post("/classify/words", content=wav_bytes())
        assert "content-type" not in r.request.headers
        assert (r.status_code, r.json()) == error(
            415, "unsupported_media_type", "unsupported Content-Type '(none)'; send audio/* "
            "(e.g. audio/wav), application/octet-stream or multipart/form-data with a 'file' "
            "field")


# -- body timeouts, with a scripted receive ------------------------------------------------------

def _run_body(pieces: list[tuple[float, bytes, bool]], idle_s: float, total_s: float
              ) -> tuple[bytes, ServiceError | None, list[dict]]:
    """Feed ``pieces`` (delay, bytes, more_body) through the middleware to an app that reads
    the whole body; return what it read, the error it got and the later receive() results."""
    got = bytearray()
    after: list[dict] = []
    caught: list[ServiceError] = []

    async def receive_script():
        for delay, data, more in pieces:
            await asyncio.sleep(delay)
            yield {"type": "http.request", "body": data, "more_body": more}
        await asyncio.sleep(0.3)  # a later receive waits for a disconnect: not bounded
        yield {"type": "http.disconnect"}

    async def app(scope, receive, send):
        try:
            while True:
                m = await receive()
                got.extend(m.get("body", b""))
                if not m.get("more_body", False):
                    break
        except ServiceError as e:
            caught.append(e)
            return
        after.append(await receive())

    async def main():
        script = receive_script()
        mw = BodyTimeoutMiddleware(app, idle_s=idle_s, total_s=total_s)
        await asyncio.wait_for(mw({"type": "http"}, script.__anext__, None), 10)

    asyncio.run(main())
    return bytes(got), (caught[0] if caught else None), after


def test_a_body_that_keeps_arriving_is_read_whole():
    pieces = [(0.0, b"ab", True), (0.05, b"cd", True), (0.05, b"ef", False)]
    body, err, after = _run_body(pieces, idle_s=0.2, total_s=5)
    assert (body, err) == (b"abcdef", None)
    assert after == [{"type": "http.disconnect"}]  # waited 0.3 s > idle_s without a timeout


def test_a_stalled_body_is_408_naming_the_setting():
    pieces = [(0.0, b"0123456789", True), (1.0, b"late", False)]
    body, err, _ = _run_body(pieces, idle_s=0.1, total_s=5)
    assert body == b"0123456789"
    assert (err.status, err.type, err.message, err.headers) == (
        408, "request_timeout", "the request body stalled: no data for 0.1 s after 10 bytes "
        "(AAT_BODY_TIMEOUT_S)", {"Connection": "close"})


def test_a_trickled_body_is_408_at_the_total_bound():
    pieces = [(0.0, b"x", True)] + [(0.05, b"x", True)] * 40 + [(0.0, b"", False)]
    body, err, _ = _run_body(pieces, idle_s=0.5, total_s=0.4)
    assert err is not None and 3 <= len(body) < 41
    assert (err.status, err.type, err.message) == (
        408, "request_timeout", f"the request body was not complete within 0.4 s ({len(body)} "
        "bytes arrived) (AAT_BODY_TOTAL_TIMEOUT_S)")


# -- the protocol layer's own answers -------------------------------------------------------------

@pytest.mark.parametrize(("parse_error", "expected"), [
    ((400, "bad Content-Length"), (ErrorType.INVALID_REQUEST,
                                   "malformed HTTP request: bad Content-Length")),
    ((400, "illegal chunk header: bytearray(b'zz\\r\\n')"),
     (ErrorType.INVALID_REQUEST, "malformed HTTP request: illegal chunk header: b'zz\\r\\n'")),
    ((431, "Receive buffer too long"), (ErrorType.HEADERS_TOO_LARGE,
                                        "the request line and headers are too large (Receive "
                                        "buffer too long)")),
    (None, (ErrorType.INVALID_REQUEST, "malformed HTTP request: the request line, a header, "
                                       "Content-Length or the chunked encoding could not be "
                                       "parsed")),
])
def test_parser_errors_get_the_json_shape(parse_error, expected):
    assert parse_error_answer(parse_error) == expected
    kind, message = expected
    raw = error_bytes(kind, message, [(b"server", b"x")])
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    phrase = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}[kind.status]
    assert lines[0] == b"HTTP/1.1 %d %s" % (kind.status, phrase)
    assert b"content-length: %d" % len(body) in lines and b"connection: close" in lines
    assert json.loads(body) == {"error": {"type": kind.value, "message": message}}


def test_the_guarded_protocol_keeps_its_timeout_per_class():
    a, b = http_protocol(2.5, "h11"), http_protocol(7.0, "h11")
    assert (a.header_timeout_s, b.header_timeout_s) == (2.5, 7.0)
    from uvicorn.protocols.http.h11_impl import H11Protocol
    assert issubclass(a, H11Protocol) and a is not b
