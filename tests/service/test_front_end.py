"""A front end beside the model process (service/frontend, service/engine_server) answers as
one process does: the same status, body, headers and counted metrics for every kind of classify
request, every other route forwarded whole, a task whose feature settings change re-decoded,
and a 503 while the model process is not reachable. In one process and one event loop here
(``front_end_pair``); tests/service/test_front_end_processes.py runs the real processes."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from fastapi.testclient import TestClient

from aat_serve.service.frontend.app import FrontEnd
from aat_serve.service.frontend.forward import forward_limit
from aat_serve.service.settings import Settings
from tests.service.helpers import (
    ADMIN,
    API,
    auth,
    make_bundle,
    reference_scores,
    served,
    wait_until,
    wav_bytes,
)
from tests.service.test_fast_path import classify_requests, counted, send_all, store_with

WAV = {"Content-Type": "audio/wav"}


def _settled(client, want: list[str], timeout_s: float = 10.0) -> list[str]:
    """The counters once the front end's observations reached the model process (they are
    sent every 50 ms): ``want``, or what was there after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    got = counted(client)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = counted(client)
    return got


def test_a_front_end_answers_every_classify_request_as_one_process(make_app, make_pair, store,
                                                                   bundles):
    store_with(store, bundles)
    requests = classify_requests(wav_bytes(2.0, seed=1), wav_bytes(0.5, seed=2))
    with served(make_app(max_audio_mb=0.08)) as client:
        want = send_all(client, requests)
        want_counted = counted(client)
    pair = make_pair(max_audio_mb=0.08)
    with served(pair) as client:
        got = send_all(client, requests)
        got_counted = _settled(client, want_counted)
    for request, a, b in zip(requests, got, want, strict=True):
        assert a == b, request[0]
    assert got_counted == want_counted and any('"ok"' in line for line in got_counted)
    assert [a[0] for a in got] == [200, 200, 200, 200, 200, 404, 400, 400, 400, 415, 400, 400,
                                   413, 400, 400, 200, 200, 400]
    # the pair: the answers differ where the requests do, and the front end really decoded
    # (it learned the tasks' decode settings from the model process)
    assert got[0][1]["predictions"] != got[1][1]["predictions"]
    assert got[2][1]["windows"] > 1 and got[3][1]["windows"] == 1
    assert pair.front.decode_params == {t: [16000, 600.0] for t in ("birds", "tags", "words")}


def test_tokens_are_checked_as_one_process_checks_them(make_app, make_pair, store, bundles):
    store_with(store, bundles)
    clip = wav_bytes(0.5, seed=3)
    requests = [("/classify/birds", {**WAV, **h}, clip, {})
                for h in ({}, auth("wrong-token-0123456789abcdef"), auth(API))]
    with served(make_app(api_token=API)) as client:
        want = send_all(client, requests)
        want_counted = counted(client)
    with served(make_pair(api_token=API)) as client:
        got = send_all(client, requests)
        assert _settled(client, want_counted) == want_counted
    assert got == want and [a[0] for a in got] == [401, 401, 200]


def _management(client, bundle: bytes, clip: bytes) -> list[tuple[int, object]]:
    """Routes the front end forwards: uploads, listings, deletes, errors of the framework."""
    admin, user = auth(ADMIN), {**WAV, **auth(API)}
    out = []
    for method, url, kw in [
        ("PUT", "/tasks/frogs", dict(content=bundle, headers=admin)),
        ("PUT", "/tasks/frogs", dict(content=bundle, headers=admin)),
        ("PUT", "/tasks/frogs", dict(content=bundle, headers=auth(API))),
        ("GET", "/tasks/frogs", dict(headers=user)),
        ("GET", "/tasks/frogs", {}),
        ("POST", "/classify/frogs", dict(content=clip, headers=user)),
        ("POST", "/classify/frogs?top_k=01", dict(content=clip, headers=user)),
        ("DELETE", "/tasks/frogs", dict(headers=admin)),
        ("POST", "/classify/frogs", dict(content=clip, headers=user)),
        ("GET", "/no/such/route", {}),
        ("DELETE", "/healthz", {}),
        ("GET", "/healthz", {}),
    ]:
        r = client.request(method, url, **kw)
        body = r.json()
        if isinstance(body, dict):
            for k in ("queue_ms", "inference_ms", "batch_size", "batch_tasks"):
                body.pop(k, None)
        out.append((r.status_code, body))
    return out


def test_every_other_route_is_forwarded_and_answered_as_in_one_process(make_app, make_pair,
                                                                       ckpt):
    bundle = make_bundle(ckpt, "frogs", num_classes=3, seed=9).to_bytes()
    clip = wav_bytes(0.5, seed=4)
    tokens = dict(admin_token=ADMIN, api_token=API)
    with served(make_app(**tokens)) as client:
        want = _management(client, bundle, clip)
    with served(make_pair(**tokens)) as client:
        got = _management(client, bundle, clip)
        ready = client.get("/readyz").json()
    assert got == want
    assert [s for s, _ in got] == [201, 200, 403, 200, 401, 200, 200, 200, 404, 404, 405, 200]
    assert ready["front_ends"] == 1  # the pair: one process says 0 (tests/service/test_api.py)


def test_management_through_a_front_end(make_pair, ckpt):
    bundle = make_bundle(ckpt, "frogs", num_classes=3, seed=9)
    clip = wav_bytes(0.5, seed=4)
    admin = auth(ADMIN)
    with served(make_pair(admin_token=ADMIN)) as client:
        assert client.put("/tasks/frogs", content=bundle.to_bytes(),
                          headers=admin).status_code == 201
        r = client.post("/classify/frogs?top_k=3", content=clip, headers=WAV)
        assert r.status_code == 200
        scores = [p["score"] for p in sorted(r.json()["predictions"], key=lambda p: p["label"])]
        want = reference_scores(ckpt, bundle, clip)
        assert torch.allclose(torch.tensor(scores), want, atol=1e-5)
        assert client.delete("/tasks/frogs", headers=admin).json()["task"] == "frogs"
        gone = client.post("/classify/frogs", content=clip, headers=WAV)
        assert (gone.status_code, gone.json()["error"]["type"]) == (404, "unknown_task")


def test_a_task_whose_sample_rate_changes_is_decoded_again(make_pair, ckpt, store):
    """The front end decodes at the rate it last learned; the model process answers a clip
    decoded at another rate with the task's new settings, and the front end decodes again."""
    clip = wav_bytes(0.5, seed=6)
    first = make_bundle(ckpt, "birds", seed=1)
    first.save(store / "birds.safetensors")
    import dataclasses

    slower = dataclasses.replace(ckpt.features, sample_rate=8000)
    second = make_bundle(ckpt, "birds", seed=1, features=slower)
    pair = make_pair(admin_token=ADMIN)
    with served(pair) as client:
        assert client.post("/classify/birds", content=clip, headers=WAV).status_code == 200
        assert pair.front.decode_params["birds"] == [16000, 600.0]
        r = client.put("/tasks/birds", content=second.to_bytes(), headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        r = client.post("/classify/birds?top_k=4", content=clip, headers=WAV)
        assert r.status_code == 200 and r.json()["version"] == second.manifest.version
        assert pair.front.decode_params["birds"] == [8000, 600.0]
        scores = [p["score"] for p in sorted(r.json()["predictions"], key=lambda p: p["label"])]
    want = reference_scores(ckpt, second, clip)
    before = reference_scores(ckpt, first, clip)
    assert torch.allclose(torch.tensor(scores), want, atol=1e-5)
    assert not torch.allclose(want, before, atol=1e-3)  # the pair: the rate matters


@pytest.mark.parametrize("declared", [True, False])
def test_a_forwarded_body_past_every_limit_is_refused_by_the_route(make_app, make_pair,
                                                                  declared):
    """A body longer than any route takes is never buffered whole: with its length declared it
    is not read at all, streamed it is read only up to the limit; either way the route
    answers its own 413, as in one process."""
    limits = dict(admin_token=ADMIN, max_bundle_mb=0.05, max_audio_mb=0.05)
    limit = forward_limit(Settings(bundle_dir="x", **limits))
    big = b"\0" * (limit + 100_000)

    def put(client):
        body = big if declared else iter([big[i:i + 65536] for i in range(0, len(big), 65536)])
        r = client.put("/tasks/frogs", content=body, headers=auth(ADMIN))
        return r.status_code, r.json()

    with served(make_app(**limits)) as client:
        want = put(client)
    with served(make_pair(**limits)) as client:
        got = put(client)
    assert got == want and want[0] == 413
    assert "AAT_MAX_BUNDLE_MB" in got[1]["error"]["message"]


def test_a_front_end_without_its_model_process_answers_503(tmp_path):
    front = FrontEnd(Settings(), str(tmp_path / "no-such.sock"))
    with TestClient(front) as client:
        for method, url in (("GET", "/healthz"), ("POST", "/classify/birds"),
                            ("GET", "/tasks")):
            r = client.request(method, url, content=wav_bytes(0.5), headers=WAV)
            assert r.status_code == 503, url
            assert r.json()["error"] == {
                "type": "not_ready",
                "message": "the model process is not reachable (starting or stopping)"}
            assert r.headers["retry-after"] == "1"


def test_a_model_process_that_never_answers_gets_the_front_ends_504(make_pair, store, bundles,
                                                                    monkeypatch):
    from aat_serve.service import engine_server
    from aat_serve.service.frontend import forward

    store_with(store, bundles)
    real = engine_server.EngineServer.classify

    async def stuck(self, header, payload):
        if payload:  # the call that carries the clip is never answered
            await asyncio.Event().wait()
        return await real(self, header, payload)

    monkeypatch.setattr(engine_server.EngineServer, "classify", stuck)
    monkeypatch.setattr(forward, "ANSWER_GRACE_S", 0.2)
    with served(make_pair(request_timeout_s=0.5)) as client:
        started = time.monotonic()
        r = client.post("/classify/birds", content=wav_bytes(0.5), headers=WAV)
        waited = time.monotonic() - started
        assert client.get("/healthz").status_code == 200  # the front end still serves
    assert (r.status_code, r.json()["error"]) == (504, {
        "type": "timeout",
        "message": "the request was not answered within 0.5 s (AAT_REQUEST_TIMEOUT_S)"})
    assert waited >= 0.5  # not before its deadline


def test_observations_count_known_outcomes_only(make_app, store, bundles):
    from aat_serve.service.engine_server import EngineServer

    store_with(store, bundles)
    app = make_app()
    with served(app) as client:
        server = EngineServer(app, app.state.service, store / "unused.sock")
        server.observe([["birds", "ok", 0.01, None], ["nope", "unknown_task", None,
                                                      "unknown_task"],
                        ["birds", "made_up", None, "made_up"], ["birds", "ok", None, None]])
        got = counted(client)
    assert got == ['aat_rejections_total{reason="unknown_task"} 1.0',
                   'aat_requests_total{outcome="ok",task="birds"} 2.0',
                   'aat_requests_total{outcome="unknown_task",task="_unknown"} 1.0']


def test_a_model_process_gone_mid_request_is_a_503_that_nginx_retries(make_pair, store,
                                                                      bundles, monkeypatch):
    """The model process dies while a front end waits for it: the request gets 503
    ``not_ready`` with Retry-After (deploy/nginx.conf retries a 503 on another replica,
    classify included: tests/deploy/test_manifests.py), and the front end is told to exit."""
    from aat_serve.service import engine_server

    store_with(store, bundles)
    real = engine_server.EngineServer.classify

    async def dies(self, header, payload):
        if payload:  # with the clip in hand, every connection to a front end breaks
            for writer in self._connections.values():
                writer.transport.abort()
            await asyncio.Event().wait()
        return await real(self, header, payload)

    monkeypatch.setattr(engine_server.EngineServer, "classify", dies)
    pair = make_pair()
    lost = []
    pair.front.on_lost = lambda: lost.append(True)
    with served(pair) as client:
        r = client.post("/classify/birds", content=wav_bytes(0.5), headers=WAV)
        wait_until(lambda: lost)
        health = client.get("/healthz")
    assert (r.status_code, r.json()["error"], r.headers["retry-after"]) == (503, {
        "type": "not_ready", "message": "the model process closed the connection; retry"}, "1")
    assert lost == [True]
    assert health.status_code == 503  # the pair: not connected any more (200 before)


def test_the_decode_threads_are_shared_out_among_the_front_ends(monkeypatch):
    from aat_serve.service.frontend import supervisor

    monkeypatch.setattr(supervisor, "usable_cores", lambda: 16)
    assert supervisor.front_end_settings(Settings(front_ends=4)).decode_workers == 4
    assert supervisor.front_end_settings(Settings(front_ends=32)).decode_workers == 1
    # the pair: a count the operator set is kept, and one process is left as it is
    assert supervisor.front_end_settings(
        Settings(front_ends=4, decode_workers=3)).decode_workers == 3
    assert supervisor.front_end_settings(Settings()).decode_workers is None


def _paging(client) -> tuple[list, list[str]]:
    """max_tasks=1: birds (disk), birds (hit), words (disk, evicts birds), birds (host): the
    load headers and the cache counters."""
    loads = [client.post(f"/classify/{t}", content=wav_bytes(0.5, seed=7), headers=WAV
                         ).headers.get("x-aat-task-load")
             for t in ("birds", "birds", "words", "birds")]
    lines = [line for line in client.get("/metrics").text.splitlines()
             if line.startswith(("aat_task_cache_hits_total{", "aat_task_cache_misses_total{",
                                 "aat_task_loads_total{"))]
    return loads, sorted(lines)


def test_cold_tasks_load_and_count_as_in_one_process(make_app, make_pair, store, bundles):
    """A front end's first request for a task asks the model process for the task's decode
    settings (which loads a cold task) and then sends the clip: the load is reported on that
    request, and the task's lookup counted once, as in one process."""
    store_with(store, {k: bundles[k] for k in ("birds", "words")})
    with served(make_app(preload="lazy", max_tasks=1)) as client:
        want = _paging(client)
    with served(make_pair(preload="lazy", max_tasks=1)) as client:
        got = _paging(client)
    assert got == want
    assert want[0] == ["disk", None, "disk", "host"]
    assert 'aat_task_cache_hits_total{tier="device"} 1.0' in want[1]
