"""The HTTP API in-process (lifespan runs): answers, every error status with its exact body,
request ids, unexpected exceptions, OpenAPI."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from aat_serve.adapters.errors import AudioError
from aat_serve.adapters.features import features_from_audio
from tests.service.helpers import error, reference_scores, served, wav_bytes

WAV = {"content-type": "audio/wav"}


@pytest.fixture
def client(make_app, store, bundles):
    for b in bundles.values():
        b.save(store / f"{b.manifest.task}.safetensors")
    with served(make_app()) as c:
        yield c


def _scores(body: dict) -> dict[str, float]:
    return {p["label"]: p["score"] for p in body["predictions"]}


def _expected(ckpt, bundle, audio) -> dict[str, float]:
    ref = reference_scores(ckpt, bundle, audio)
    return dict(zip(bundle.manifest.labels, ref.tolist(), strict=True))


# -- answers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["birds", "words", "tags"])
def test_classify_equals_the_task_run_alone(client, ckpt, bundles, task):
    audio = wav_bytes(0.5, seed=1)
    r = client.post(f"/classify/{task}?top_k=10", content=audio, headers=WAV)
    assert r.status_code == 200, r.text
    body = r.json()
    b = bundles[task]
    assert body["task"] == task and body["version"] == b.manifest.version
    assert body["multi_label"] is b.manifest.multi_label
    assert body["duration_s"] == 0.5
    assert body["queue_ms"] >= 0 and body["inference_ms"] > 0
    expected = _expected(ckpt, b, audio)
    got = _scores(body)
    assert list(got) == sorted(expected, key=expected.get, reverse=True)  # best first, all C
    for label, score in expected.items():  # fp32, different batch layout: 1e-5
        assert got[label] == pytest.approx(score, abs=1e-5)
    other = _expected(ckpt, b, wav_bytes(0.5, seed=4))  # a different clip scores differently
    assert max(abs(other[k] - got[k]) for k in got) > 1e-3
    if b.manifest.multi_label:  # sigmoid scores, not a distribution
        assert abs(sum(got.values()) - 1.0) > 1e-3
    else:
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)


def test_every_accepted_body_form_gives_the_same_answer(client, ckpt, bundles):
    x = np.sin(np.arange(12000) / 9.0).astype(np.float32) * 0.4
    flac, wav = io.BytesIO(), io.BytesIO()
    sf.write(flac, x, 24000, format="FLAC")
    sf.write(wav, np.stack([x, x], 1), 24000, format="WAV")  # stereo, another rate
    f, w = flac.getvalue(), wav.getvalue()
    forms = [
        (f, dict(content=f, headers={"content-type": "audio/flac"})),
        (f, dict(content=f, headers={"content-type": "application/octet-stream"})),
        (f, dict(files={"file": ("clip.flac", f, "audio/flac")})),
        (w, dict(content=w, headers={"content-type": "audio/x-wav; codecs=1"})),
        (w, dict(files={"file": ("clip.wav", w, "audio/wav")})),
    ]
    for source, form in forms:
        expected = _expected(ckpt, bundles["words"], source)
        r = client.post("/classify/words?top_k=5", **form)
        assert r.status_code == 200, r.text
        got = _scores(r.json())
        assert r.json()["duration_s"] == 0.5
        for label, score in expected.items():
            assert got[label] == pytest.approx(score, abs=1e-5)


def test_top_k_limits_and_orders(client):
    audio = wav_bytes(0.3, seed=2)
    full = client.post("/classify/words?top_k=5", content=audio, headers=WAV).json()
    two = client.post("/classify/words?top_k=2", content=audio, headers=WAV).json()
    default = client.post("/classify/birds", content=audio, headers=WAV).json()
    assert two["predictions"] == full["predictions"][:2]
    scores = [p["score"] for p in full["predictions"]]
    assert scores == sorted(scores, reverse=True)
    assert len(default["predictions"]) == 4  # default 5, clipped to the 4 classes


# -- errors -------------------------------------------------------------------------------------

NAME_RULE = ("expected 1-64 characters of a-z, 0-9, '_' or '-', starting with a letter or "
             "digit")


@pytest.mark.parametrize("raw,name", [
    ("%2e%2e", ".."), ("..%2Fx", "../x"), ("a/b", "a/b"), ("a%2Fb", "a/b"), ("", ""),
    ("x" * 65, "x" * 65), ("Birds", "Birds"), ("-x", "-x"), ("b%00", "b\x00"),
])
def test_invalid_task_names_are_400_on_every_route(client, raw, name):
    expected = error(400, "invalid_task_name", f"invalid task name {name!r}: {NAME_RULE}")
    for method, path in (("POST", "/classify/"), ("GET", "/tasks/")):
        r = client.request(method, path + raw, content=b"x", headers=WAV)
        assert (r.status_code, r.json()) == expected, (method, raw)


def test_valid_edge_names_pass_the_check(client):
    for name in ("x" * 64, "0", "a_b-c"):
        r = client.post(f"/classify/{name}", content=b"x", headers=WAV)
        assert (r.status_code, r.json()) == error(404, "unknown_task", f"unknown task {name!r}")


def test_client_errors_have_exact_bodies(client):
    cases = [
        (dict(content=wav_bytes(), headers={"content-type": "text/plain"}),
         error(415, "unsupported_media_type",
               "unsupported Content-Type 'text/plain'; send audio/* (e.g. audio/wav), "
               "application/octet-stream or multipart/form-data with a 'file' field")),
        (dict(content=wav_bytes(), headers={"content-type": ""}),
         error(415, "unsupported_media_type",
               "unsupported Content-Type '(none)'; send audio/* (e.g. audio/wav), "
               "application/octet-stream or multipart/form-data with a 'file' field")),
        (dict(content=b"", headers=WAV),
         error(400, "invalid_request", "the audio is empty (0 bytes)")),
        (dict(files={"other": ("a.wav", wav_bytes(), "audio/wav")}),
         error(400, "invalid_request", "multipart body has no 'file' field")),
        (dict(data={"file": "not a file"}, files={"x": ("a", b"1")}),
         error(400, "invalid_request", "multipart field 'file' must be a file upload")),
    ]
    for kwargs, expected in cases:
        r = client.post("/classify/birds", **kwargs)
        assert (r.status_code, r.json()) == expected
    r = client.post("/classify/birds?top_k=0", content=wav_bytes(), headers=WAV)
    assert (r.status_code, r.json()) == error(
        400, "invalid_request",
        "invalid request: query parameter 'top_k': Input should be greater than or equal to 1")
    r = client.post("/classify/birds?top_k=many", content=wav_bytes(), headers=WAV)
    assert (r.status_code, r.json()) == error(
        400, "invalid_request", "invalid request: query parameter 'top_k': Input should be a "
        "valid integer, unable to parse string as an integer")
    r = client.post("/classify/nope", content=wav_bytes(), headers=WAV)
    assert (r.status_code, r.json()) == error(404, "unknown_task", "unknown task 'nope'")
    r = client.get("/tasks/nope")
    assert (r.status_code, r.json()) == error(404, "unknown_task", "unknown task 'nope'")
    r = client.get("/no/such/route")
    assert (r.status_code, r.json()) == error(404, "not_found", "no route GET /no/such/route")
    r = client.delete("/healthz")
    assert (r.status_code, r.json()) == error(405, "method_not_allowed",
                                              "method DELETE is not allowed on /healthz")
    assert r.headers["allow"] == "GET"
    r = client.get("/classify/birds")
    assert (r.status_code, r.json()) == error(405, "method_not_allowed",
                                              "method GET is not allowed on /classify/birds")


@pytest.mark.parametrize("data", [
    b"\x00" * 1000,
    bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
    wav_bytes(0.5)[:600],  # truncated WAV
    b"RIFF",
])
def test_undecodable_audio_is_400_with_the_decoder_message(client, bundles, data):
    with pytest.raises(AudioError) as e:
        features_from_audio(data, bundles["birds"].manifest.feature_config)
    r = client.post("/classify/birds", content=data, headers=WAV)
    assert (r.status_code, r.json()) == error(400, "invalid_audio", str(e.value))


def test_size_and_duration_limits_are_413(make_app, store, bundles):
    bundles["birds"].save(store / "birds.safetensors")
    with served(make_app(max_audio_mb=0.01, max_audio_seconds=0.25)) as c:
        limit = int(0.01 * 1024 * 1024)
        big = wav_bytes(0.5)  # 16 kB > 10 kB
        r = c.post("/classify/birds", content=big, headers=WAV)
        assert (r.status_code, r.json()) == error(
            413, "payload_too_large", f"audio is {len(big)} bytes, the limit is "
            f"{limit} bytes (AAT_MAX_AUDIO_MB)")

        def chunked():  # no Content-Length: the limit applies while streaming
            yield big[:5000]
            yield big[5000:]

        r = c.post("/classify/birds", content=chunked(), headers=WAV)
        assert (r.status_code, r.json()) == error(
            413, "payload_too_large", f"audio is larger than the limit of {limit} bytes "
            "(AAT_MAX_AUDIO_MB)")
        long = wav_bytes(0.3, sr=8000)  # 4.8 kB, 0.3 s > 0.25 s
        r = c.post("/classify/birds", content=long, headers=WAV)
        assert (r.status_code, r.json()) == error(
            413, "audio_too_long",
            "audio data is too long: its header declares 0.300 s; the limit is 0.25 s")
        ok = c.post("/classify/birds", content=wav_bytes(0.2, sr=8000), headers=WAV)
        assert ok.status_code == 200
        metrics = c.get("/metrics").text
        assert 'aat_rejections_total{reason="payload_too_large"} 2.0' in metrics
        assert 'aat_rejections_total{reason="audio_too_long"} 1.0' in metrics


# -- listing, health, metrics -------------------------------------------------------------------

def test_task_listing_and_manifest(client, bundles):
    body = client.get("/tasks").json()
    assert body["count"] == 3
    assert [t["task"] for t in body["tasks"]] == ["birds", "tags", "words"]
    for t in body["tasks"]:
        m = bundles[t["task"]].manifest
        assert t == {"task": m.task, "version": m.version, "method": m.method,
                     "labels": m.labels, "num_classes": len(m.labels),
                     "multi_label": m.multi_label, "metrics": m.metrics,
                     "created_at": m.created_at, "resident": True, "state": "active",
                     "reason": None}
    one = client.get("/tasks/words").json()
    assert one == {"task": "words", "version": bundles["words"].manifest.version,
                   "resident": True, "manifest": bundles["words"].manifest.to_dict()}


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "tasks": 3, "failed_tasks": 0,
                                            "device": "cpu",
                                            "dtype": "float32", "runtime": "torch",
                                            "provider": "segments", "front_ends": 0}
    client.post("/classify/birds", content=wav_bytes(), headers=WAV)
    client.post("/classify/nope", content=wav_bytes(), headers=WAV)
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ('aat_requests_total{outcome="ok",task="birds"} 1.0',
                 'aat_requests_total{outcome="unknown_task",task="_unknown"} 1.0',
                 "aat_tasks_resident 3.0", "aat_ready 1.0", "aat_queue_depth 0.0",
                 'aat_rejections_total{reason="unknown_task"} 1.0',
                 'aat_bundle_loads_total{outcome="ok",source="store"} 3.0'):
        assert line in text, line
    for name in ("aat_request_seconds_count", "aat_queue_seconds_count",
                 "aat_inference_seconds_count", "aat_batch_size_count",
                 "aat_batch_tasks_count", "aat_bundle_load_seconds_count"):
        assert name in text, name


# -- request ids and unexpected errors ----------------------------------------------------------

def test_request_ids_are_honoured_or_made(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.post("/classify/nope", content=b"x", headers={**WAV, "X-Request-ID": "e-1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "e-1"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    assert client.get("/healthz").headers["x-request-id"] != made
    bad = client.get("/healthz", headers={"X-Request-ID": "has space" + "x" * 200})
    assert len(bad.headers["x-request-id"]) == 32


def test_an_unexpected_error_is_500_without_internals_and_the_server_goes_on(
        client, caplog, monkeypatch):
    model = client.app.state.service.model

    def broken(features, tasks):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(model, "classify", broken)
    with caplog.at_level(logging.ERROR, logger="aat_serve"):
        r = client.post("/classify/birds", content=wav_bytes(), headers={**WAV,
                                                                         "X-Request-ID": "r-500"})
    assert (r.status_code, r.json()) == error(500, "internal_error",
                                              "internal error (request id r-500)")
    assert r.headers["x-request-id"] == "r-500"
    assert "secret" not in r.text
    logged = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "r-500"]
    assert logged and "secret internal detail" in logged[0].exc_text
    monkeypatch.undo()
    r = client.post("/classify/birds", content=wav_bytes(), headers=WAV)
    assert r.status_code == 200
    assert client.get("/healthz").status_code == 200


def test_openapi_documents_every_route_body_and_error(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/classify/{task}", "post"): {"200", "400", "401", "404", "408", "413", "415", "500",
                                       "503", "504"},
        ("/tasks", "get"): {"200", "401", "500"},
        ("/tasks/{task}", "get"): {"200", "400", "401", "404", "500"},
        ("/tasks/{task}", "put"): {"200", "201", "400", "401", "403", "408", "409", "413",
                                   "415", "422", "500", "503"},
        ("/tasks/{task}", "delete"): {"200", "400", "401", "403", "404", "500"},
        ("/healthz", "get"): {"200", "503"},
        ("/readyz", "get"): {"200", "503"},
        ("/metrics", "get"): {"200"}, ("/metrics", "head"): {"200"},
    }
    found = {(p, m) for p, ops in paths.items() for m in ops}
    assert found == set(expected)
    for (p, m), statuses in expected.items():
        op = paths[p][m]
        assert set(op["responses"]) == statuses, (p, m)
        assert op.get("summary") and op.get("description"), (p, m)
        for s in statuses - {"200", "201"}:
            schema = op["responses"][s]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (p, m, s)
    body = paths["/classify/{task}"]["post"]["requestBody"]["content"]
    assert set(body) == {"audio/*", "application/octet-stream", "multipart/form-data"}
    body = paths["/tasks/{task}"]["put"]["requestBody"]["content"]
    assert set(body) == {"application/octet-stream", "multipart/form-data"}
    top_k = paths["/classify/{task}"]["post"]["parameters"]
    assert {p["name"] for p in top_k} == {"task", "top_k", "hop_s", "aggregate", "windows"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_scores_use_softmax_or_sigmoid_of_the_logits(client, ckpt, bundles):
    """The multi-label head gives sigmoid scores: check one against the logits directly."""
    audio = wav_bytes(0.4, seed=3)
    b = bundles["tags"]
    import copy

    model = b.build_model(copy.deepcopy(ckpt.backbone)).eval()
    with torch.no_grad():
        logits = model(features_from_audio(audio, b.manifest.feature_config)[None])[0]
    got = _scores(client.post("/classify/tags", content=audio, headers=WAV).json())
    for label, lg in zip(b.manifest.labels, logits.tolist(), strict=True):
        assert got[label] == pytest.approx(1 / (1 + np.exp(-lg)), abs=1e-5)


def test_bfloat16_serving_agrees_with_float32(make_app, store, ckpt, bundles):
    bundles["words"].save(store / "words.safetensors")
    audio = wav_bytes(0.5, seed=2)
    with served(make_app(dtype="bfloat16")) as c:
        assert c.get("/readyz").json()["dtype"] == "bfloat16"
        body = c.post("/classify/words?top_k=5", content=audio, headers=WAV).json()
    expected = _expected(ckpt, bundles["words"], audio)
    got = _scores(body)
    # bf16 weights and activations (fp32 accumulation): scores within 0.02, not bit-equal
    assert max(abs(got[k] - expected[k]) for k in expected) < 0.02
    assert max(abs(got[k] - expected[k]) for k in expected) > 0


def test_no_configuration_serves_the_embedded_demo(monkeypatch, ckpt_dir, bundles, tmp_path):
    """Without AAT_CHECKPOINT the packaged demo backbone and tasks are served (read-only)."""
    import os

    from aat_serve.adapters import demo_assets
    from aat_serve.service.app import create_app
    from aat_serve.service.settings import load_settings

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    bundles["tags"].save(tasks / "tags.safetensors")
    monkeypatch.setattr(demo_assets, "BACKBONE_DIR", ckpt_dir)
    monkeypatch.setattr(demo_assets, "TASKS_DIR", tasks)
    monkeypatch.setattr(demo_assets, "available", lambda: True)
    for k in list(os.environ):
        if k.startswith("AAT_"):
            monkeypatch.delenv(k)
    with served(create_app(load_settings())) as c:
        assert [t["task"] for t in c.get("/tasks").json()["tasks"]] == ["tags"]
        assert c.post("/classify/tags", content=wav_bytes(), headers=WAV).status_code == 200
        assert c.put("/tasks/tags", content=b"x").status_code == 403  # management stays off
    own = tmp_path / "own"
    own.mkdir()
    bundles["words"].save(own / "words.safetensors")
    monkeypatch.setenv("AAT_BUNDLE_DIR", str(own))  # a store of one's own on the demo backbone
    with served(create_app(load_settings())) as c:  # AAT_DEMO defaults on: the demo's beside
        assert [t["task"] for t in c.get("/tasks").json()["tasks"]] == ["tags", "words"]
    monkeypatch.setenv("AAT_DEMO", "false")
    with served(create_app(load_settings())) as c:
        assert [t["task"] for t in c.get("/tasks").json()["tasks"]] == ["words"]
    assert sorted(p.name for p in tasks.iterdir()) == ["tags.safetensors"]  # left untouched


def test_metrics_carry_the_standard_process_series_and_answer_head(client):
    import re

    text = client.get("/metrics").text
    rss = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M)
    assert rss is not None and float(rss.group(1)) > 10 * 2**20  # a live process, in bytes
    cpu = re.search(r"^process_cpu_seconds_total (\S+)$", text, re.M)
    assert cpu is not None and float(cpu.group(1)) > 0
    assert re.search(r'^python_info\{.*version="\d+\.\d+\.\d+"', text, re.M)
    assert "python_gc_collections_total" in text
    head = client.head("/metrics")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/plain")
    assert int(head.headers["content-length"]) > 0  # what GET would send
    # The differs check: a route that does not take HEAD still refuses it.
    assert client.head("/tasks").status_code == 405
