"""``POST /classify/{task}``'s fast path (service/fast_path.py) answers exactly as FastAPI's
route does: the same status, body, headers and counted metrics for every kind of request, and a
query it cannot read exactly is left to FastAPI."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI

from aat_serve.service.classify import Options
from aat_serve.service.fast_path import classify_options
from tests.service.helpers import API, auth, served, wav_bytes

TIMINGS = {"queue_ms", "inference_ms", "batch_size", "batch_tasks"}
"""Fields that depend on when the request ran, not on how it was answered."""


@pytest.mark.parametrize(("query", "expected"), [
    (b"", Options()),
    (b"top_k=3", Options(top_k=3)),
    (b"top_k=10000&windows=true", Options(top_k=10_000, windows=True)),
    (b"hop_s=0.25&aggregate=max&windows=0", Options(hop_s=0.25, aggregate="max")),
    (b"aggregate=fir%73t", Options(aggregate="first")),
    (b"windows=1&hop_s=3600", Options(windows=True, hop_s=3600.0)),
])
def test_plain_queries_are_read(query, expected):
    assert classify_options(query) == expected


@pytest.mark.parametrize("query", [
    b"top_k=0", b"top_k=10001", b"top_k=05", b"top_k=", b"top_k=3.0", b"top_k=-1",
    b"top_k=1&top_k=2", b"hop_s=0", b"hop_s=3600.5", b"hop_s=1e-1", b"hop_s=inf",
    b"aggregate=median", b"aggregate=MEAN", b"windows=yes", b"windows=TRUE", b"top=3",
    b"top_k", b"\xff=1",
])
def test_other_queries_are_left_to_fastapi(query):
    assert classify_options(query) is None


def classify_requests(long_clip: bytes, clip: bytes) -> list[tuple[str, dict, bytes | None, dict]]:
    """(url, headers, raw body, multipart files) of every kind of classify request."""
    wav = {"Content-Type": "audio/wav"}
    return [
        ("/classify/birds", wav, clip, {}),
        ("/classify/tags?top_k=2", wav, clip, {}),
        ("/classify/birds?top_k=2&aggregate=max&windows=true&hop_s=0.25", wav, long_clip, {}),
        ("/classify/words?aggregate=first", wav, long_clip, {}),
        ("/classify/birds", {}, None, {"file": ("a.wav", clip, "audio/wav")}),
        ("/classify/nope", wav, clip, {}),
        ("/classify/a/b", wav, clip, {}),
        ("/classify/..%2Fx", wav, clip, {}),
        ("/classify/", wav, clip, {}),
        ("/classify/birds", {"Content-Type": "text/plain"}, clip, {}),
        ("/classify/birds", wav, b"", {}),
        ("/classify/birds", wav, b"RIFF\x00\x00\x00\x00WAVEjunk", {}),
        ("/classify/birds", wav, wav_bytes(3.0, seed=4), {}),  # over AAT_MAX_AUDIO_MB
        ("/classify/birds?top_k=0", wav, clip, {}),
        ("/classify/birds?top_k=abc&windows=maybe", wav, clip, {}),
        ("/classify/birds?top_k=05&windows=yes", wav, clip, {}),
        ("/classify/birds?unknown=1", wav, clip, {}),
        ("/classify/birds?hop_s=9999", wav, long_clip, {}),
    ]


def send_all(client, requests, headers=None) -> list[tuple[int, dict, dict]]:
    """(status, body without timings, headers without ids and dates) of each request."""
    out = []
    for url, hdrs, body, files in requests:
        r = client.post(url, headers={**hdrs, **(headers or {})}, content=body,
                        files=files or None)
        body = r.json()
        for k in TIMINGS:
            body.pop(k, None)
        kept = {k: v for k, v in r.headers.items()
                if k not in ("x-request-id", "content-length", "date")}
        out.append((r.status_code, body, kept))
    return out


def counted(client) -> list[str]:
    """The request and rejection counters of ``/metrics`` (not_ready: /readyz polls)."""
    metrics = client.get("/metrics").text
    return sorted(line for line in metrics.splitlines()
                  if re.match(r"aat_(requests|rejections)_total\{", line)
                  and "not_ready" not in line)


def _answers(app, requests, headers=None) -> list[tuple[int, dict, dict]]:
    with served(app) as client:
        out = send_all(client, requests, headers)
        return [*out, counted(client)]


def store_with(store, bundles):
    for name, b in bundles.items():
        b.save(store / f"{name}.safetensors")


def test_the_fast_path_answers_as_the_route_does(make_app, store, bundles):
    store_with(store, bundles)
    requests = classify_requests(wav_bytes(2.0, seed=1), wav_bytes(0.5, seed=2))
    fast = make_app(max_audio_mb=0.08)
    route = make_app(max_audio_mb=0.08)
    route.fast_classify = None
    got, want = _answers(fast, requests), _answers(route, requests)
    for request, a, b in zip(requests, got, want, strict=False):
        assert a == b, request[0]
    assert got[-1] == want[-1] and any('"ok"' in line for line in got[-1])
    statuses = [a[0] for a in got[:-1]]
    assert statuses == [200, 200, 200, 200, 200, 404, 400, 400, 400, 415, 400, 400, 413, 400,
                        400, 200, 200, 400]
    # the pair: the answers differ where the requests do (an identity would pass the above)
    assert got[0][1]["predictions"] != got[1][1]["predictions"]
    assert got[2][1]["windows"] > 1 and got[3][1]["windows"] == 1


def test_the_token_is_checked_as_the_route_checks_it(make_app, store, bundles):
    store_with(store, bundles)
    clip = wav_bytes(0.5, seed=3)
    requests = [("/classify/birds", {"Content-Type": "audio/wav", **h}, clip, {})
                for h in ({}, auth("wrong-token-0123456789abcdef"), auth(API))]
    fast = make_app(api_token=API)
    route = make_app(api_token=API)
    route.fast_classify = None
    got, want = _answers(fast, requests), _answers(route, requests)
    assert got == want
    assert [a[0] for a in got[:-1]] == [401, 401, 200]


def test_plain_requests_skip_the_framework(make_app, store, bundles, monkeypatch):
    """FastAPI's own entry point runs for a query the fast path leaves to it, for other routes,
    and for classify when the fast path is off; not for a plain classify request."""
    store_with(store, bundles)
    calls: list[str] = []
    real = FastAPI.__call__

    async def counting(self, scope, receive, send):
        if scope["type"] == "http":
            calls.append(scope["path"] + "?" + scope["query_string"].decode())
        await real(self, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", counting)
    clip = wav_bytes(0.5, seed=5)
    app = make_app()
    with served(app) as client:
        calls.clear()
        for url in ("/classify/birds", "/classify/birds?top_k=2", "/classify/birds?top_k=02"):
            assert client.post(url, content=clip,
                               headers={"Content-Type": "audio/wav"}).status_code == 200
        assert calls == ["/classify/birds?top_k=02"]
        app.fast_classify = None
        assert client.post("/classify/birds", content=clip,
                           headers={"Content-Type": "audio/wav"}).status_code == 200
        assert calls[-1] == "/classify/birds?"
