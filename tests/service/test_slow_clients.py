"""Slow and malformed clients against a real ``aat serve`` process on 127.0.0.1, once with each
HTTP parser (``AAT_HTTP_PARSER=h11`` and ``httptools``): every answer is checked for both.

Raw sockets check what the connection layer answers itself (malformed Content-Length, bad chunk
size, invalid request line, too-large headers: the JSON error shape, with each parser's reason),
the shapes httptools refuses and h11 serves, pipelined and kept-alive requests before a refused
one, ``Expect: 100-continue``, and the head and body timeouts (408 JSON, then the connection
closes). A second process holds 200 slowloris
connections while this one measures classification latency against a baseline taken without
them; the server must close every slow connection within the head timeout plus slack.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_process import Server
from tests.service.helpers import wav_bytes

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 1.0
BODY_TOTAL_TIMEOUT_S = 3.0
SLACK_S = 3.0  # event-loop lateness on a loaded 2-core machine, generously
SLOW_CONNECTIONS = 200
WAV = {"content-type": "audio/wav"}


@pytest.fixture(scope="module", params=["h11", "httptools"])
def server(request, tmp_path_factory, ckpt_dir, bundles):
    parser = request.param
    tmp = tmp_path_factory.mktemp(f"slow-{parser}")
    store = tmp / "store"
    store.mkdir()
    bundles["birds"].save(store / "birds.safetensors")
    s = Server(tmp, "slow", ckpt_dir, store, {
        "AAT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "AAT_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "AAT_BODY_TOTAL_TIMEOUT_S": str(BODY_TOTAL_TIMEOUT_S), "AAT_MAX_WAIT_MS": "1",
        "AAT_HTTP_PARSER": parser})
    s.parser = parser
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def _exchange(port: int, parts: list[tuple[float, bytes]], limit_s: float = 20.0
              ) -> tuple[bytes, float]:
    """Send each (delay, bytes), then read until the server closes the connection.

    Returns what came back and the seconds from connecting to the server's close.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        began = time.monotonic()
        for delay, data in parts:
            time.sleep(delay)
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                break
        received = b""
        while time.monotonic() - began < limit_s:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received, time.monotonic() - began


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, json.loads(body)


def _error(status: int, type_: str, message: str) -> tuple[int, dict]:
    return status, {"error": {"type": type_, "message": message}}


POST = b"POST /classify/birds HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
HEALTHY = (200, {"status": "ok"})
TOO_LARGE = _error(431, "headers_too_large",
                   "the request line and headers are too large (Receive buffer too long)")


def _bad(reason: str) -> tuple[int, dict]:
    return _error(400, "invalid_request", f"malformed HTTP request: {reason}")


def _both(answer: tuple[int, dict]) -> dict[str, tuple[int, dict]]:
    return {"h11": answer, "httptools": answer}


# name: (the request in pieces sent 0.3 s apart, the answer with each parser)
REFUSED = {
    "bad Content-Length": ([POST + b"Content-Length: 12abc\r\n\r\n"], {
        "h11": _bad("bad Content-Length"),
        "httptools": _bad("Invalid character in Content-Length")}),
    "two Content-Lengths": ([POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n"], {
        "h11": _bad("conflicting Content-Length headers"),
        "httptools": _bad("Duplicate Content-Length")}),
    "bad chunk size": ([POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"], {
        "h11": _bad("illegal chunk header: b'zz\\r\\n'"),
        "httptools": _bad("Invalid character in chunk size")}),
    "bad request line": ([b"GARBAGE\r\n\r\n"], {
        "h11": _bad("illegal request line: b'GARBAGE'"),
        "httptools": _bad("Invalid method encountered")}),
    "space in the URL": ([b"GET /heal thz HTTP/1.1\r\nHost: a\r\n\r\n"], {
        "h11": _bad("illegal request line: b'GET /heal thz HTTP/1.1'"),
        "httptools": _bad("Expected HTTP/, RTSP/ or ICE/")}),
    "unknown Transfer-Encoding": ([POST + b"Transfer-Encoding: gzip\r\n\r\nabc"], {
        "h11": _bad("Only Transfer-Encoding: chunked is supported"),
        "httptools": _bad("Request has invalid `Transfer-Encoding`")}),
    "no Host": ([b"GET /healthz HTTP/1.1\r\n\r\n"],
                _both(_bad("Missing mandatory Host: header"))),
    # both refuse a head still incomplete after 16 KiB, the URL or a header (docs/service.md)
    "long header": ([POST + b"X-Big: " + b"a" * 20_000, b"\r\n\r\n"], _both(TOO_LARGE)),
    "long URL": ([b"GET /" + b"a" * 20_000, b" HTTP/1.1\r\nHost: a\r\n\r\n"],
                 _both(TOO_LARGE)),
    # differs: under the limit, the same split head is served
    "header under 16 KiB": ([HEALTHZ + b"X-Big: " + b"a" * 15_000,
                             b"\r\nConnection: close\r\n\r\n"], _both(HEALTHY)),
    # httptools refuses what h11 serves (request smuggling shapes among them)
    "Content-Length and Transfer-Encoding": (
        [HEALTHZ + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close"
         b"\r\n\r\n0\r\n\r\n"],
        {"h11": HEALTHY,
         "httptools": _bad("Transfer-Encoding can't be present with Content-Length")}),
    "the same Content-Length twice": (
        [HEALTHZ + b"Content-Length: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"],
        {"h11": HEALTHY, "httptools": _bad("Duplicate Content-Length")}),
    "control character in a header": (
        [HEALTHZ + b"X-A: a\x01b\r\nConnection: close\r\n\r\n"],
        {"h11": HEALTHY, "httptools": _bad("Invalid header value char")}),
    "folded header line": (
        [HEALTHZ + b"X-A: a\r\n b\r\nConnection: close\r\n\r\n"],
        {"h11": HEALTHY, "httptools": _bad("Unexpected whitespace after header value")}),
    "bare LF line ends": (
        [b"GET /healthz HTTP/1.1\nHost: a\nConnection: close\n\n"],
        {"h11": HEALTHY, "httptools": _bad("Expected CRLF after version")}),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_parser_answers_with_the_json_error_shape(server, case):
    parts, answers = REFUSED[case]
    raw, _ = _exchange(server.port, [(0.3 * (i > 0), p) for i, p in enumerate(parts)])
    status, headers, body = _parse(raw)
    assert (status, body) == answers[server.parser], raw[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    # differs: a well-formed request is answered by the application
    ok = httpx.post(server.url + "/classify/birds", content=wav_bytes(0.25), headers=WAV)
    assert ok.status_code == 200


def _responses(raw: bytes) -> list[tuple[int, dict]]:
    """The (status, JSON body) of each response in ``raw``, in order (Content-Length bodies)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        n = int(headers["content-length"])
        out.append((int(lines[0].split(" ")[1]), json.loads(rest[:n])))
        raw = rest[n:]
    return out


@pytest.mark.parametrize(("case", "pieces", "expected"), [
    ("pipelined, then refused", [HEALTHZ + b"\r\n" + HEALTHZ + b"\r\nGARBAGE\r\n\r\n"],
     {"h11": [HEALTHY, HEALTHY, _bad("illegal request line: b'GARBAGE'")],
      "httptools": [HEALTHY, HEALTHY, _bad("Invalid method encountered")]}),
    ("kept alive, then refused", [HEALTHZ + b"\r\n", b"GARBAGE\r\n\r\n"],
     {"h11": [HEALTHY, _bad("illegal request line: b'GARBAGE'")],
      "httptools": [HEALTHY, _bad("Invalid method encountered")]}),
    ("pipelined, then a bad chunk size",
     [HEALTHZ + b"\r\n" + POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"],
     {"h11": [HEALTHY, _bad("illegal chunk header: b'zz\\r\\n'")],
      "httptools": [HEALTHY, _bad("Invalid character in chunk size")]}),
    ("pipelined, then a long head", [HEALTHZ + b"\r\n" + HEALTHZ + b"X: " + b"a" * 20_000,
                                     b"\r\n\r\n"], _both([HEALTHY, TOO_LARGE])),
    # differs: a well-formed last request is answered too, and closes as asked
    ("pipelined", [HEALTHZ + b"\r\n" + HEALTHZ + b"\r\n" + HEALTHZ + b"Connection: close"
                   b"\r\n\r\n"], _both([HEALTHY] * 3)),
])
def test_requests_before_a_refused_one_are_answered_first(server, case, pieces, expected):
    raw, closed_after = _exchange(server.port, [(0.3 * (i > 0), p) for i, p in
                                                enumerate(pieces)])
    assert _responses(raw) == expected[server.parser], raw[-300:]
    assert closed_after < HEADER_TIMEOUT_S  # closed after the last answer, not by a timer


def test_expect_100_continue_is_answered_before_the_body(server):
    audio = wav_bytes(0.25)
    head = POST + b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head % len(audio))
        interim = b""
        while not interim.endswith(b"\r\n\r\n") and len(interim) < 1000:
            chunk = sock.recv(1)
            assert chunk, interim
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(audio)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, _, body = _parse(raw)
    assert status == 200 and body["task"] == "birds", raw[:300]


def test_a_slow_head_is_408_then_closed(server):
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    raw, closed_after = _exchange(server.port, [(0, start)] + [(0.5, b"X-A: b\r\n")] * 12)
    status, _, body = _parse(raw)
    assert (status, body) == _error(
        408, "request_timeout", "the request head (request line and headers) did not arrive "
        f"within {HEADER_TIMEOUT_S:g} s (AAT_HEADER_TIMEOUT_S)")
    assert HEADER_TIMEOUT_S - 0.1 <= closed_after <= HEADER_TIMEOUT_S + SLACK_S
    # a connection that sends nothing is closed without an answer
    raw, closed_after = _exchange(server.port, [])
    assert raw == b"" and closed_after <= HEADER_TIMEOUT_S + SLACK_S
    # differs: a head completed in time is answered, over several keep-alive requests
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(start + b"\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"ok"}') and len(answer) < 65536:
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK")
            time.sleep(HEADER_TIMEOUT_S / 2)


def test_a_stalled_body_is_408_then_closed(server):
    head = POST + b"Content-Length: 1000\r\n\r\n"
    raw, closed_after = _exchange(server.port, [(0, head), (0, b"0123456789")])
    status, headers, body = _parse(raw)
    assert (status, body) == _error(
        408, "request_timeout", "the request body stalled: no data for "
        f"{BODY_TIMEOUT_S:g} s after 10 bytes (AAT_BODY_TIMEOUT_S)")
    assert headers["connection"] == "close"
    assert closed_after <= BODY_TIMEOUT_S + SLACK_S


def test_a_trickled_body_is_408_at_the_total_bound(server):
    head = POST + b"Content-Length: 1000\r\n\r\n"
    raw, closed_after = _exchange(server.port, [(0, head)] + [(0.3, b"x")] * 40)
    status, _, body = _parse(raw)
    got = int(body["error"]["message"].split("(")[1].split(" ")[0])
    assert 3 <= got < 40
    assert (status, body) == _error(
        408, "request_timeout", f"the request body was not complete within "
        f"{BODY_TOTAL_TIMEOUT_S:g} s ({got} bytes arrived) (AAT_BODY_TOTAL_TIMEOUT_S)")
    assert BODY_TOTAL_TIMEOUT_S - 0.1 <= closed_after <= BODY_TOTAL_TIMEOUT_S + SLACK_S


def _latencies(url: str, n: int, min_s: float = 0.0) -> np.ndarray:
    """Seconds per classification, each on a fresh connection; at least ``n`` requests and
    ``min_s`` seconds (bounded to 20 n requests)."""
    audio = wav_bytes(0.25, seed=1)
    out: list[float] = []
    until = time.monotonic() + min_s
    while (len(out) < n or time.monotonic() < until) and len(out) < 20 * n:
        t0 = time.perf_counter()
        r = httpx.post(url + "/classify/birds", content=audio, headers=WAV, timeout=30)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    return np.array(out)


def test_200_slow_connections_do_not_slow_normal_requests(server):
    _latencies(server.url, 10)  # warm
    base = _latencies(server.url, 100)
    script = Path(__file__).with_name("slow_clients.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(server.port),
                             "--connections", str(SLOW_CONNECTIONS), "--max-seconds", "120"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # long enough that every first slow connection reached the head timeout
        slow = _latencies(server.url, 100, min_s=HEADER_TIMEOUT_S + SLACK_S + 1)
        proc.stdin.close()
        stats = json.loads(proc.stdout.readline())
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    figures = {"baseline_ms": _pcts(base), "with_slow_ms": _pcts(slow), "slow": stats}
    print("\nslow-client figures:", json.dumps(figures))
    for q in (50, 99):
        b, s = np.percentile(base, q), np.percentile(slow, q)
        assert s <= 3 * b + 0.05, (q, figures)
    assert stats["closed_by_server"] >= SLOW_CONNECTIONS, figures
    assert stats["max_lifetime_s"] <= HEADER_TIMEOUT_S + SLACK_S, figures
    # not closed early (the client stamps a connection after its loop gets to it: lenient)
    assert stats["min_lifetime_s"] >= HEADER_TIMEOUT_S / 2, figures
    assert stats["answered_408"] >= 0.9 * stats["closed_by_server"], figures
    # really held them: the client reopens each connection the server closes, so at the stop
    # some are between a close and their next open; on a loaded machine (another suite beside
    # this one) 154 of 200 were open, so half is the bound that still proves they were held
    assert stats["open_at_stop"] >= SLOW_CONNECTIONS // 2, figures
    assert stats["oldest_open_s"] <= HEADER_TIMEOUT_S + SLACK_S, figures


def _pcts(x: np.ndarray) -> dict[str, float]:
    return {"n": len(x), "p50": round(float(np.percentile(x, 50)) * 1000, 2),
            "p99": round(float(np.percentile(x, 99)) * 1000, 2)}
