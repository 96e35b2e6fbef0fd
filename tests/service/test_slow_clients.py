"""Slow and malformed clients against a real ``aat serve`` process on 127.0.0.1.

Raw sockets check what the connection layer answers itself (malformed Content-Length, bad chunk
size, invalid request line, too-large headers: the JSON error shape) and the head and body
timeouts (408 JSON, then the connection closes). A second process holds 200 slowloris
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


@pytest.fixture(scope="module")
def server(tmp_path_factory, ckpt_dir, bundles):
    tmp = tmp_path_factory.mktemp("slow")
    store = tmp / "store"
    store.mkdir()
    bundles["birds"].save(store / "birds.safetensors")
    s = Server(tmp, "slow", ckpt_dir, store, {
        "AAT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "AAT_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "AAT_BODY_TOTAL_TIMEOUT_S": str(BODY_TOTAL_TIMEOUT_S), "AAT_MAX_WAIT_MS": "1"})
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


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (POST + b"Content-Length: 12abc\r\n\r\n",
     _error(400, "invalid_request", "malformed HTTP request: bad Content-Length")),
    (POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
     _error(400, "invalid_request", "malformed HTTP request: conflicting Content-Length "
                                    "headers")),
    (POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
     _error(400, "invalid_request", "malformed HTTP request: illegal chunk header: "
                                    "b'zz\\r\\n'")),
    (b"GARBAGE\r\n\r\n",
     _error(400, "invalid_request", "malformed HTTP request: illegal request line: "
                                    "b'GARBAGE'")),
    # h11 refuses a head still incomplete after 16 KiB; one that arrives whole in one read
    # is parsed (docs/service.md)
    ([POST + b"X-Big: " + b"a" * 20_000, b"\r\n\r\n"],
     _error(431, "headers_too_large", "the request line and headers are too large (Receive "
                                      "buffer too long)")),
])
def test_the_parser_answers_with_the_json_error_shape(server, request_bytes, expected):
    parts = request_bytes if isinstance(request_bytes, list) else [request_bytes]
    raw, _ = _exchange(server.port, [(0.3 * (i > 0), p) for i, p in enumerate(parts)])
    status, headers, body = _parse(raw)
    assert (status, body) == expected
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    # differs: the same request well formed is answered by the application
    ok = httpx.post(server.url + "/classify/birds", content=wav_bytes(0.25), headers=WAV)
    assert ok.status_code == 200


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
