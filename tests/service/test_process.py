"""``aat serve`` as a real process on 127.0.0.1: upload then classify, raw paths with dot
segments, a fuzz pass of malformed bodies, a stalled upload, queue-full 503 and 504 timeouts.

Two servers start in parallel (one normal, one that can only refuse) and are polled with
bounded loops; nothing is left running.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from aat_serve.cli.main import main as aat
from tests.server_process import Server
from tests.service.helpers import ADMIN, auth, reference_scores, wav_bytes

WAV = {"content-type": "audio/wav"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, ckpt_dir):
    tmp = tmp_path_factory.mktemp("proc")
    (tmp / "s1").mkdir()
    (tmp / "s2").mkdir()
    normal = Server(tmp, "normal", ckpt_dir, tmp / "s1",
                    {"AAT_ADMIN_TOKEN": ADMIN, "AAT_MAX_UPLOADS": "1", "AAT_MAX_WAIT_MS": "1"})
    # Can only refuse: one queue place and a timeout shorter than any decode.
    refusing = Server(tmp, "refusing", ckpt_dir, tmp / "s2",
                      {"AAT_MAX_QUEUE": "1", "AAT_REQUEST_TIMEOUT_S": "0.000001"})
    try:
        normal.wait_ready()
        refusing.wait_ready()
        yield {"normal": normal, "refusing": refusing, "store": tmp / "s1"}
    finally:
        normal.stop()
        refusing.stop()


def _raw(server: Server, method: str, path: str, body: bytes = b"",
         headers: dict | None = None) -> tuple[int, dict]:
    """A request whose path is sent verbatim (no client-side normalisation of dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_upload_then_classify(servers, ckpt, bundles):
    s = servers["normal"]
    b = bundles["birds"]
    with httpx.Client(base_url=s.url, timeout=20) as c:
        r = c.put("/tasks/birds", content=b.to_bytes(),
                  headers={"content-type": "application/octet-stream", **auth(ADMIN)})
        assert r.status_code == 201 and r.json()["version"] == b.manifest.version
        assert [t["task"] for t in c.get("/tasks").json()["tasks"]] == ["birds"]
        audio = wav_bytes(0.5, seed=3)
        r = c.post("/classify/birds?top_k=4", content=audio, headers={**WAV,
                                                                      "X-Request-ID": "p-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "p-1"
        got = {p["label"]: p["score"] for p in r.json()["predictions"]}
        ref = reference_scores(ckpt, b, audio)
        torch.testing.assert_close(torch.tensor([got[x] for x in b.manifest.labels]), ref,
                                   atol=1e-5, rtol=0)
    assert (servers["store"] / "birds" / "ACTIVE").read_text() == b.manifest.version + "\n"
    # structured JSON logs with the request id, task, status and timings
    lines = [json.loads(x) for x in s.log.read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("request_id") == "p-1"]
    assert access and access[0]["task"] == "birds" and access[0]["status"] == 200
    assert {"queue_ms", "inference_ms", "duration_ms", "version"} <= set(access[0])


@pytest.mark.parametrize("path,name", [("/classify/../x", "../x"), ("/classify/%2e%2e", ".."),
                                       ("/classify/a/b", "a/b"), ("/classify/", ""),
                                       ("/tasks/../../etc/passwd", "../../etc/passwd")])
def test_raw_paths_with_dot_segments_are_400(servers, path, name):
    method = "POST" if path.startswith("/classify") else "GET"
    status, body = _raw(servers["normal"], method, path, b"x", WAV)
    assert (status, body) == (400, {"error": {
        "type": "invalid_task_name",
        "message": f"invalid task name {name!r}: expected 1-64 characters of a-z, 0-9, '_' or "
                   "'-', starting with a letter or digit"}})


def _hours_long_wav() -> bytes:
    """A WAV header declaring three hours of 8 kHz audio, followed by 1 kB of samples."""
    n = 8000 * 2 * 3 * 3600
    fmt = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + n) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", n) + bytes(1000))


def test_fuzzed_bodies_are_all_4xx_and_the_server_still_answers(servers):
    s = servers["normal"]
    rng = np.random.default_rng(0)
    good = wav_bytes(0.5)
    bodies = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()
              for n in rng.integers(1, 5000, 12)]
    bodies += [good[:k] for k in (4, 12, 44, 100, len(good) // 2)]
    bodies += [_hours_long_wav(), b"", b"RIFF\xff\xff\xff\xffWAVEfmt ", good[:44] + b"\xff" * 9]
    bad_headers = [WAV, {"content-type": "audio/flac"}, {"content-type": "application/json"},
                   {"content-type": "multipart/form-data; boundary=zz"},
                   {"content-type": "multipart/form-data"}]
    statuses = set()
    with httpx.Client(base_url=s.url, timeout=20) as c:
        for i, body in enumerate(bodies):
            r = c.post("/classify/birds", content=body, headers=bad_headers[i % len(bad_headers)])
            assert 400 <= r.status_code < 500, (i, r.status_code, r.text)
            assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"type", "message"}
            statuses.add(r.status_code)
        r = c.post("/classify/birds", content=_hours_long_wav(), headers=WAV)
        assert r.status_code == 400 and "truncated" in r.json()["error"]["message"]
        r = c.post("/classify/birds", content=good, headers=WAV)
        assert r.status_code == 200
        assert c.get("/healthz").json() == {"status": "ok"}
    assert statuses >= {400, 415}


def test_a_stalled_upload_blocks_neither_classification_nor_the_server(servers, bundles):
    s = servers["normal"]
    data = bundles["words"].to_bytes()
    head = (f"PUT /tasks/words HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {ADMIN}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    slow = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    try:
        slow.sendall(head + data[:1000])  # ...and then nothing
        with httpx.Client(base_url=s.url, timeout=20) as c:
            deadline = time.monotonic() + 10
            while True:  # the stalled upload holds the only upload place (AAT_MAX_UPLOADS=1)
                r = c.put("/tasks/tags", content=bundles["tags"].to_bytes(),
                          headers={"content-type": "application/octet-stream", **auth(ADMIN)})
                if r.status_code == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert (r.status_code, r.json()) == (503, {"error": {
                "type": "overloaded", "message": "too many bundle uploads in progress (1, "
                                                 "AAT_MAX_UPLOADS); retry later"}})
            assert r.headers["retry-after"] == "5"
            r = c.post("/classify/birds", content=wav_bytes(), headers=WAV)
            assert r.status_code == 200
    finally:
        slow.close()  # a truncated upload: the server drops it and frees the place
    with httpx.Client(base_url=s.url, timeout=20) as c:
        deadline = time.monotonic() + 10
        while True:
            r = c.put("/tasks/words", content=data,
                      headers={"content-type": "application/octet-stream", **auth(ADMIN)})
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 201
        assert c.get("/tasks/words").json()["version"] == bundles["words"].manifest.version


def test_queue_full_and_timeouts_in_a_real_process(servers, bundles):
    """One queue place and a 1 us timeout: every request is refused, never computed."""
    s = servers["refusing"]
    bundles["birds"].save(Path(servers["refusing"].log).parent / "s2" / "birds.safetensors")
    audio = wav_bytes(0.5)
    timeout = {"error": {"type": "timeout", "message": "the request was not answered within "
                                                       "1e-06 s (AAT_REQUEST_TIMEOUT_S)"}}
    full = {"error": {"type": "overloaded",
                      "message": "the queue is full (1 requests, AAT_MAX_QUEUE); retry later"}}
    seen: dict[int, int] = {}
    with httpx.Client(base_url=s.url, timeout=20,
                      limits=httpx.Limits(max_connections=32)) as c:
        r = c.post("/classify/birds", content=audio, headers=WAV)  # resolved from the store
        assert (r.status_code, r.json()) == (504, timeout)
        for _ in range(10):  # bursts until the queue was seen full (bounded)
            with ThreadPoolExecutor(24) as pool:
                answers = list(pool.map(
                    lambda _: c.post("/classify/birds", content=audio, headers=WAV), range(24)))
            for r in answers:
                assert (r.status_code, r.json()) in ((504, timeout), (503, full))
                if r.status_code == 503:
                    assert r.headers["retry-after"] == "1"
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if seen.get(503):
                break
        assert seen.get(503) and seen.get(504)
        metrics = c.get("/metrics").text
    assert "aat_batch_size_count 0.0" in metrics  # nothing was computed
    assert f'aat_rejections_total{{reason="overloaded"}} {float(seen[503])}' in metrics


def test_serve_without_configuration_explains_what_to_set(monkeypatch, capsys):
    from aat_serve.adapters import demo_assets

    monkeypatch.setattr(demo_assets, "available", lambda: False)  # as before `aat demo build`
    for k in list(os.environ):
        if k.startswith("AAT_"):
            monkeypatch.delenv(k)
    assert aat(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no backbone configured: set AAT_CHECKPOINT (or pass "
                          "--checkpoint)")
    monkeypatch.setenv("AAT_MAX_BATCH", "0")
    assert aat(["serve", "--checkpoint", "x"]) == 1
    assert capsys.readouterr().err == ("error: invalid configuration: AAT_MAX_BATCH: Input "
                                       "should be greater than or equal to 1 (got '0')\n")
    monkeypatch.delenv("AAT_MAX_BATCH")
    monkeypatch.setenv("AAT_ADMIN_TOKEN", "changeme")
    assert aat(["serve", "--bundle-dir", "/tmp"]) == 1
    assert capsys.readouterr().err == ("error: invalid configuration: AAT_ADMIN_TOKEN: is a "
                                       "placeholder ('changeme'); set a real secret\n")
    monkeypatch.delenv("AAT_ADMIN_TOKEN")
    assert aat(["serve", "--checkpoint", "/nonexistent/ckpt.pth"]) == 1
    assert capsys.readouterr().err == ("error: checkpoint '/nonexistent/ckpt.pth' does not "
                                       "exist\n")

