"""The batching engine through the API: mixed-task batches, shape groups, back-pressure (503),
timeouts (504), readiness after warm-up, and model changes ordered with queued requests.

A gate wrapped around ``MultiTaskModel.classify`` records every batch and can hold the
inference worker, which makes queue states exact instead of timing-dependent.
"""

from __future__ import annotations

import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi.testclient import TestClient

from tests.service.helpers import (
    ADMIN,
    auth,
    error,
    make_bundle,
    reference_scores,
    served,
    wait_until,
    wav_bytes,
)

WAV = {"content-type": "audio/wav"}


def _post(c, task, audio, **kw):
    return c.post(f"/classify/{task}?top_k=10", content=audio, headers=WAV, **kw)


def _vector(body, labels):
    got = {p["label"]: p["score"] for p in body["predictions"]}
    return torch.tensor([got[x] for x in labels])


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def _save_all(store, bundles):
    for b in bundles.values():
        b.save(store / f"{b.manifest.task}.safetensors")


def test_one_batch_mixes_three_tasks_ordered_by_task(make_app, store, ckpt, bundles, gate):
    _save_all(store, bundles)
    jobs = [(task, wav_bytes(0.4, seed=s)) for s in range(3) for task in ("words", "tags",
                                                                          "birds")]
    with served(make_app(max_batch=9, max_wait_ms=5000)) as c:
        warm_calls = len(gate.calls)
        with ThreadPoolExecutor(9) as pool:
            answers = list(pool.map(lambda j: _post(c, *j), jobs))
        batches = gate.calls[warm_calls:]
        assert len(batches) == 1  # nine clips, three tasks, one forward pass
        tasks, shape = batches[0]
        assert tasks == sorted(tasks) and sorted(set(tasks)) == ["birds", "tags", "words"]
        assert shape == (9, 64, 32)
        for (task, audio), r in zip(jobs, answers, strict=True):
            body = r.json()
            assert r.status_code == 200 and body["task"] == task
            assert (body["batch_size"], body["batch_tasks"]) == (9, 3)
            b = bundles[task]
            torch.testing.assert_close(_vector(body, b.manifest.labels),
                                       reference_scores(ckpt, b, audio), atol=1e-5, rtol=0)
        text = c.get("/metrics").text
        assert _metric(text, 'aat_batch_tasks_bucket{le="2.0"}') == 0
        assert _metric(text, 'aat_batch_tasks_bucket{le="3.0"}') == 1
        assert _metric(text, "aat_batch_size_sum") == 9
        assert _metric(text, "aat_batch_size_count") == 1


def test_batches_group_clips_by_feature_shape(make_app, store, ckpt, bundles, gate):
    short_features = dataclasses.replace(ckpt.features, target_length=48)
    short = make_bundle(ckpt, "short", method="aat_ms", num_classes=3, seed=7,
                        features=short_features)
    short.save(store / "short.safetensors")
    bundles["birds"].save(store / "birds.safetensors")
    # 0.45 s: within one window of either task (48 frames are 0.495 s)
    jobs = [(task, wav_bytes(0.45, seed=s)) for s in range(3) for task in ("short", "birds")]
    with served(make_app(max_batch=6, max_wait_ms=1500)) as c:
        warm_calls = len(gate.calls)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda j: _post(c, *j), jobs))
        batches = gate.calls[warm_calls:]
        by_shape = {shape[1:]: tasks for tasks, shape in batches}
        assert by_shape == {(64, 32): ["birds"] * 3, (48, 32): ["short"] * 3}
        for (task, audio), r in zip(jobs, answers, strict=True):
            b = short if task == "short" else bundles[task]
            torch.testing.assert_close(_vector(r.json(), b.manifest.labels),
                                       reference_scores(ckpt, b, audio), atol=1e-5, rtol=0)


def test_a_full_queue_answers_503_with_retry_after(make_app, store, bundles, gate):
    _save_all(store, bundles)
    with served(make_app(max_batch=1, max_queue=1)) as c:
        svc = c.app.state.service
        gate.close()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, c, "birds", wav_bytes())
            assert gate.entered.wait(10)  # the worker holds the first clip
            second = pool.submit(_post, c, "words", wav_bytes())
            wait_until(lambda: svc.engine._admitted == 1)  # the second waits in the queue
            r = _post(c, "tags", wav_bytes())
            assert (r.status_code, r.json()) == error(
                503, "overloaded", "the queue is full (1 requests, AAT_MAX_QUEUE); retry later")
            assert r.headers["retry-after"] == "1"
            gate.opened.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert _post(c, "tags", wav_bytes()).status_code == 200
        text = c.get("/metrics").text
        assert _metric(text, 'aat_rejections_total{reason="overloaded"}') == 1
        assert _metric(text, 'aat_requests_total{outcome="overloaded",task="tags"}') == 1


def test_a_request_past_its_timeout_is_504_and_never_computed(make_app, store, bundles, gate):
    _save_all(store, bundles)
    with served(make_app(max_batch=1, request_timeout_s=0.5)) as c:
        warm_calls = len(gate.calls)
        gate.close()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, c, "birds", wav_bytes())
            assert gate.entered.wait(10)
            second = pool.submit(_post, c, "words", wav_bytes())
            expected = error(504, "timeout", "the request was not answered within 0.5 s "
                                             "(AAT_REQUEST_TIMEOUT_S)")
            r = second.result(20)
            assert (r.status_code, r.json()) == expected
            r = first.result(20)  # its batch is still held: it cannot answer in time either
            assert (r.status_code, r.json()) == expected
            gate.opened.set()
        r = _post(c, "tags", wav_bytes())
        assert r.status_code == 200
        computed = [tasks for tasks, _ in gate.calls[warm_calls:]]
        assert computed == [["birds"], ["tags"]]  # "words" timed out in the queue: not run
        text = c.get("/metrics").text
        assert _metric(text, 'aat_rejections_total{reason="timeout"}') == 2


def test_not_ready_until_the_warm_up_batch_ran(make_app, store, bundles, gate):
    _save_all(store, bundles)
    gate.close()
    with TestClient(make_app()) as c:
        assert gate.entered.wait(10)  # the warm-up batch is running
        assert gate.calls[0][0] == ["birds", "tags", "words"]
        expected = error(503, "not_ready",
                         "the service is starting: the backbone and tasks are warming up")
        r = c.get("/readyz")
        assert (r.status_code, r.json()) == expected and r.headers["retry-after"] == "1"
        r = _post(c, "birds", wav_bytes())
        assert (r.status_code, r.json()) == expected
        assert c.get("/healthz").json() == {"status": "ok"}
        assert "aat_ready 0.0" in c.get("/metrics").text
        gate.opened.set()
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert _post(c, "birds", wav_bytes()).status_code == 200


def test_queued_requests_finish_on_the_version_they_queued_behind(make_app, store, ckpt,
                                                                   bundles, gate):
    """Clips queued before an upload run on the old version, clips after it on the new."""
    v1 = bundles["words"]
    v2 = make_bundle(ckpt, "words", method="aat_m", num_classes=5, seed=23)
    v1.save(store / "words.safetensors")
    clips = [wav_bytes(0.4, seed=s) for s in range(3)]
    with served(make_app(max_batch=1, admin_token=ADMIN)) as c:
        engine = c.app.state.service.engine
        gate.close()
        with ThreadPoolExecutor(4) as pool:
            a = pool.submit(_post, c, "words", clips[0])
            assert gate.entered.wait(10)
            b = pool.submit(_post, c, "words", clips[1])
            wait_until(lambda: engine._admitted == 1)
            put = pool.submit(c.put, "/tasks/words", content=v2.to_bytes(),
                              headers={"content-type": "application/octet-stream",
                                       **auth(ADMIN)})
            wait_until(lambda: any(type(x).__name__ == "Control" for x in engine._pending))
            later = pool.submit(_post, c, "words", clips[2])
            wait_until(lambda: engine._admitted == 2)
            gate.opened.set()
            answers = [a.result(20), b.result(20), later.result(20)]
            assert put.result(20).status_code == 200
    versions = [r.json()["version"] for r in answers]
    assert versions == [v1.manifest.version, v1.manifest.version, v2.manifest.version]
    for r, clip, bundle in zip(answers, clips, (v1, v1, v2), strict=True):
        torch.testing.assert_close(_vector(r.json(), v1.manifest.labels),
                                   reference_scores(ckpt, bundle, clip), atol=1e-5, rtol=0)
