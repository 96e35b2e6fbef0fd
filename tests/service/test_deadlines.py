"""Deadlines are real and one task's failure stays its own: expired clips are never decoded
nor computed, batches are bounded in frames, a raising task does not fail the other tasks of
its batch, and NaN/inf scores are never a 200.

``Gate`` (the ``gate`` fixture) holds the inference worker so queue states are exact.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.service import decoding
from aat_serve.service.engine import Engine, Job
from aat_serve.service.metrics import Metrics
from tests.service.helpers import error, served, wait_until, wav_bytes

WAV = {"content-type": "audio/wav"}
FRAMES = 64  # the tiny backbone's target length


def _post(c, task, seed=0):
    return c.post(f"/classify/{task}?top_k=10", content=wav_bytes(0.5, seed=seed), headers=WAV)


def _metric(c, line: str) -> float | None:
    m = re.search(rf"^{re.escape(line)} (\S+)$", c.get("/metrics").text, re.M)
    return float(m.group(1)) if m else None


def _save_all(store, bundles):
    for b in bundles.values():
        b.save(store / f"{b.manifest.task}.safetensors")


def _held_batches(c, gate, tasks: list[str]) -> list[tuple[list[str], tuple[int, ...]]]:
    """Hold the worker on one clip of ``tasks[0]``, queue the rest behind it, release; the
    batches that ran, and the answers."""
    warm = len(gate.calls)
    gate.close()
    with ThreadPoolExecutor(len(tasks)) as pool:
        first = pool.submit(_post, c, tasks[0])
        assert gate.entered.wait(10)
        rest = [pool.submit(_post, c, t, i) for i, t in enumerate(tasks[1:])]
        wait_until(lambda: _metric(c, "aat_queue_depth") == len(rest), 10)
        gate.opened.set()
        answers = [f.result(20) for f in [first, *rest]]
    return gate.calls[warm:], answers


def test_a_batch_is_bounded_in_frames(make_app, store, bundles, gate):
    _save_all(store, bundles)
    with served(make_app(max_batch=8, max_batch_frames=2 * FRAMES, max_wait_ms=200)) as c:
        calls, answers = _held_batches(c, gate, ["birds"] * 5)
        assert [a.status_code for a in answers] == [200] * 5
        assert [shape[0] for _, shape in calls] == [1, 2, 2]
        assert sorted(a.json()["batch_size"] for a in answers) == [1, 2, 2, 2, 2]
    with served(make_app(max_batch=8, max_wait_ms=200)) as c:  # default: 8 clips of 64 frames
        calls, answers = _held_batches(c, gate, ["birds"] * 5)
        assert [shape[0] for _, shape in calls] == [1, 4]


def test_a_clip_longer_than_the_frame_bound_still_runs_alone(make_app, store, bundles, gate):
    _save_all(store, bundles)
    with served(make_app(max_batch=8, max_batch_frames=FRAMES // 2, max_wait_ms=200)) as c:
        calls, answers = _held_batches(c, gate, ["birds", "words", "tags"])
        assert [a.status_code for a in answers] == [200] * 3
        assert [shape[0] for _, shape in calls] == [1, 1, 1]


def test_a_raising_task_does_not_fail_the_other_tasks_of_its_batch(make_app, store, bundles,
                                                                   gate, monkeypatch):
    _save_all(store, bundles)
    with served(make_app(max_batch=8, max_wait_ms=200)) as c:
        held = MultiTaskModel.classify  # the gate's wrapper

        def classify(model, features, tasks):
            if "words" in tasks and threading.current_thread().name.startswith("aat-infer"):
                held(model, features, tasks)  # through the gate, then fail
                raise RuntimeError("words is broken")
            return held(model, features, tasks)

        monkeypatch.setattr(MultiTaskModel, "classify", classify)
        calls, answers = _held_batches(c, gate, ["tags", "birds", "words", "birds"])
        assert [a.status_code for a in answers] == [200, 200, 500, 200]
        assert answers[2].json() == {"error": {"type": "internal_error", "message":
                                               answers[2].json()["error"]["message"]}}
        assert [tasks for tasks, _ in calls] == [["tags"], ["birds", "birds", "words"],
                                                 ["birds", "birds"], ["words"]]
        assert {a.json()["batch_size"] for a in (answers[1], answers[3])} == {2}


def test_non_finite_scores_are_500_naming_the_task_and_counted(make_app, store, bundles,
                                                               monkeypatch):
    _save_all(store, bundles)
    with served(make_app(max_wait_ms=200)) as c:
        real = MultiTaskModel.classify

        def classify(model, features, tasks):
            out = real(model, features, tasks)
            return [torch.full_like(o, float("nan")) if t == "words" else o
                    for o, t in zip(out, tasks, strict=True)]

        monkeypatch.setattr(MultiTaskModel, "classify", classify)
        with ThreadPoolExecutor(2) as pool:
            words, birds = pool.submit(_post, c, "words"), pool.submit(_post, c, "birds")
            words, birds = words.result(20), birds.result(20)
        assert (words.status_code, words.json()) == error(
            500, "task_failed", "task 'words' cannot answer: its model gave non-finite scores "
                                "(NaN or infinity) for this clip; its bundle is faulty")
        assert birds.status_code == 200
        assert all(p["score"] is not None for p in birds.json()["predictions"])
        assert _metric(c, 'aat_nonfinite_outputs_total{task="words"}') == 1.0
        assert _metric(c, 'aat_nonfinite_outputs_total{task="birds"}') is None
        assert _metric(c, 'aat_requests_total{outcome="task_failed",task="words"}') == 1.0


class CountingModel:
    """A ``ServingModel`` stand-in that counts forwards."""

    def __init__(self, tasks) -> None:
        self.tasks = tasks
        self.calls = 0

    def classify(self, features, tasks):
        self.calls += 1
        return [torch.zeros(3) for _ in tasks]


def test_a_clip_past_its_deadline_at_the_forward_is_not_computed(bundles):
    from aat_serve.adapters.slots import TaskInfo

    m = bundles["birds"].manifest
    info = TaskInfo("birds", 0, m.version, m.method, m.num_classes, m)
    model = CountingModel({"birds": info})
    engine = Engine(model, Metrics(), max_batch=4, max_wait_s=0, max_queue=4)
    now = time.monotonic()

    def job(deadline):
        return Job("birds", torch.zeros(16000), m.feature_config, m.version, m.features,
                   deadline, 1.0, future=None)

    out = engine.worker.forward([job(now - 0.001), job(now - 1)])
    assert model.calls == 0
    assert [type(o).__name__ for o in out] == ["ServiceError", "ServiceError"]
    assert {o.type for o in out} == {"timeout"}
    out = engine.worker.forward([job(now - 1), job(now + 60)])  # differs: the due one runs alone
    assert model.calls == 1 and out[0].type == "timeout" and out[1][1] is info
    engine.worker.shutdown()


def test_a_request_waiting_for_a_decode_thread_is_504_and_never_decoded(make_app, store,
                                                                         bundles, monkeypatch):
    _save_all(store, bundles)
    release = threading.Event()
    decoded = []
    real = decoding.load_audio

    def load_audio(*a, **kw):
        decoded.append(threading.current_thread().name)
        if len(decoded) == 1:
            assert release.wait(20)
        return real(*a, **kw)

    monkeypatch.setattr(decoding, "load_audio", load_audio)
    expected = error(504, "timeout", "the request was not answered within 0.5 s "
                                     "(AAT_REQUEST_TIMEOUT_S)")
    with served(make_app(decode_workers=1, request_timeout_s=0.5)) as c:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, c, "birds")
            wait_until(lambda: decoded, 10)
            started = time.monotonic()
            second = pool.submit(_post, c, "words")
            r = second.result(20)
            waited = time.monotonic() - started
            assert (r.status_code, r.json()) == expected
            assert waited < 10  # answered at its deadline, not after the held decode
            r = first.result(20)
            assert (r.status_code, r.json()) == expected
            release.set()
        assert _post(c, "tags").status_code == 200
        assert len(decoded) == 2  # the first and "tags": "words" was never decoded
