"""AAT_RUNTIME=onnxruntime: the service answers what the torch runtime answers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from aat_serve.service.settings import Settings
from tests.service.helpers import make_bundle, served, wav_bytes

pytest.importorskip("onnxruntime")

WAV = {"Content-Type": "audio/wav"}


def _stream(client, jobs):
    def post(job):
        task, audio = job
        r = client.post(f"/classify/{task}?top_k=10", content=audio, headers=WAV)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(post, jobs))


def test_onnxruntime_answers_equal_torch_for_a_mixed_stream(make_app, store, ckpt, bundles):
    extra = make_bundle(ckpt, "hums", method="joint", num_classes=2, seed=9)
    for b in [*bundles.values(), extra]:
        b.save(store / f"{b.manifest.task}.safetensors")
    jobs = [(task, wav_bytes(0.4, seed=s)) for s in range(3)
            for task in ("birds", "words", "tags", "hums")]
    answers = {}
    for runtime in ("torch", "onnxruntime"):
        with served(make_app(runtime=runtime, max_batch=6, max_wait_ms=20)) as c:
            ready = c.get("/readyz").json()
            assert ready["runtime"] == runtime
            if runtime == "onnxruntime":
                assert ready["provider"] == "CPUExecutionProvider"
            answers[runtime] = _stream(c, jobs)
    mixed = 0
    for t, o in zip(answers["torch"], answers["onnxruntime"], strict=True):
        assert t["task"] == o["task"] and t["version"] == o["version"]
        assert t["predictions"][0]["label"] == o["predictions"][0]["label"]
        ts = {p["label"]: p["score"] for p in t["predictions"]}
        for p in o["predictions"]:
            assert abs(p["score"] - ts[p["label"]]) < 1e-4
        mixed = max(mixed, o["batch_tasks"])
    assert mixed > 1  # the onnxruntime batches really mixed tasks


def test_onnxruntime_refuses_bfloat16():
    with pytest.raises(ValueError, match="AAT_RUNTIME=onnxruntime runs in float32"):
        Settings(runtime="onnxruntime", dtype="bfloat16")
