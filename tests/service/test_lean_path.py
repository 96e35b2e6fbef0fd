"""The lean request path: the classify body as the model documents it, decode threads
single-threaded in torch, and ``aat serve`` on uvloop."""

from __future__ import annotations

import json
import sys
import threading

import orjson
import pytest
import torch

from aat_serve.service.api import json_response
from aat_serve.service.classify import probabilities, top_predictions
from aat_serve.service.schemas import ClassifyResponse
from aat_serve.service.threads import (
    decode_pool,
    inference_pool,
    inference_threads,
    single_threaded_torch,
    usable_cores,
)

BODY = dict(task="digits", version="1b27c4ba1d5cd063", multi_label=False,
            predictions=[{"label": "seven", "score": 0.9999816417694092},
                         {"label": "zero", "score": 1.5091905879671685e-05},
                         {"label": "four", "score": 1.678343892308476e-06}],
            duration_s=1.0, scored_s=1.0, windows=1, window_s=1.0, hop_s=1.0,
            aggregate="mean", window_results=None, queue_ms=5.56, inference_ms=29.248,
            batch_size=3, batch_tasks=2)


def test_the_body_is_byte_for_byte_the_models_json():
    """The orjson bytes equal pydantic's serialisation of the documented model (the bytes
    FastAPI wrote before), small exponents included."""
    raw = json_response(BODY).body
    assert raw == ClassifyResponse.model_validate(BODY).model_dump_json().encode()
    assert set(json.loads(raw)) == set(ClassifyResponse.model_fields)
    changed = dict(BODY, batch_size=4)
    assert json_response(changed).body != raw


def test_top_scores_best_first_ties_in_label_order():
    logits = torch.tensor([0.0, 2.0, 2.0, -1.0])
    top = top_predictions(probabilities(logits, False), ["a", "b", "c", "d"], 3)
    assert [p["label"] for p in top] == ["b", "c", "a"]
    assert top[0]["score"] == pytest.approx(float(torch.softmax(logits, -1)[1]))
    multi = top_predictions(probabilities(logits, True), ["a", "b", "c", "d"], 1)
    assert multi == [{"label": "b", "score": float(torch.sigmoid(torch.tensor(2.0)))}]
    assert orjson.loads(orjson.dumps(top)) == top


def test_decode_threads_run_torch_on_one_thread_and_others_keep_the_default():
    default = torch.get_num_threads()
    seen: list[int] = []
    with decode_pool(2) as pool:
        seen += [pool.submit(torch.get_num_threads).result() for _ in range(4)]
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [1, 1, 1, 1]
    assert later == [default] and torch.get_num_threads() == default
    assert usable_cores() >= 1


def test_single_threaded_torch_changes_only_the_calling_thread():
    out: list[int] = []

    def body() -> None:
        before = torch.get_num_threads()
        single_threaded_torch()
        out.extend([before, torch.get_num_threads()])

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out == [torch.get_num_threads(), 1]


def test_aat_serve_runs_uvloop_when_installed():
    pytest.importorskip("uvloop")
    from aat_serve.service.process import event_loop

    assert event_loop() == "uvloop"


def test_the_inference_thread_leaves_one_core_to_the_front_end():
    assert [inference_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert inference_threads() == max(1, usable_cores() - 1)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_inference_pool_sets_its_own_thread_only(threads):
    default = torch.get_num_threads()
    with inference_pool(threads) as pool:
        seen = [pool.submit(torch.get_num_threads).result() for _ in range(3)]
    assert seen == [threads] * 3
    assert torch.get_num_threads() == default
    with inference_pool(None) as pool:  # differs: None keeps the process's count
        assert pool.submit(torch.get_num_threads).result() == default


def test_the_server_sets_its_switch_interval(monkeypatch):
    from aat_serve.service.runtime import tune_process
    from aat_serve.service.settings import load_settings

    before = sys.getswitchinterval()
    try:
        monkeypatch.setenv("AAT_SWITCH_INTERVAL_MS", "0.5")
        monkeypatch.setenv("AAT_KEEP_FREED_MEMORY", "0")
        tune_process(load_settings())
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        monkeypatch.setenv("AAT_SWITCH_INTERVAL_MS", "2")
        tune_process(load_settings())
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


def test_the_engine_runs_on_the_configured_inference_threads(make_app, store, bundles,
                                                              monkeypatch):
    """``AAT_INFERENCE_THREADS`` reaches the inference thread; unset, cores - 1."""
    from tests.service.helpers import served

    bundles["birds"].save(store / "birds.safetensors")
    for value, want in (("3", 3), (None, inference_threads())):
        kw = {} if value is None else {"inference_threads": int(value)}
        with served(make_app(**kw)) as c:
            engine = c.app.state.service.engine
            assert engine.worker.threads == want
            assert engine.worker.executor.submit(torch.get_num_threads).result(10) == want


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_top_predictions_order_is_torchs_stable_descending_sort(k):
    """Ties (many equal scores), NaN and k beyond the label count: the labels in the order of
    ``torch.sort(descending=True, stable=True)``."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (30,), generator=g).float() / 4  # many ties
    labels = [f"l{i}" for i in range(30)]
    for s in (scores, torch.where(scores == 0.5, torch.nan, scores)):
        want = torch.sort(s, descending=True, stable=True).indices[:k].tolist()
        got = top_predictions(s, labels, k)
        assert [p["label"] for p in got] == [labels[i] for i in want]
    unstable = sorted(range(30), key=lambda i: (-scores[i].item(), -i))[:k]  # ties reversed
    assert [p["label"] for p in top_predictions(scores, labels, k)] != [
        labels[i] for i in unstable] or k == 1


def test_freeze_heap_puts_what_is_alive_out_of_the_collectors_reach():
    import gc

    from aat_serve.service.runtime import freeze_heap

    assert gc.get_freeze_count() == 0
    alive = [[] for _ in range(1000)]
    try:
        freeze_heap()
        frozen = gc.get_freeze_count()
        assert frozen >= len(alive)
        tracked = sum(len(gc.get_objects(generation=g)) for g in range(3))
        assert tracked < frozen  # a full collection now walks far less than the heap
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
