"""Paging through the service (issue 24): cold loads off the inference thread, single flight,
busy tasks never evicted, pinned tasks, exact cache metrics, many tasks on few slots."""

from __future__ import annotations

import logging
import re
import threading

import pytest

from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.service.registry import Registry
from tests.service.helpers import error, make_bundle, served, wait_until, wav_bytes

WAV = {"content-type": "audio/wav"}


def _classify(c, task, seed=0):
    return c.post(f"/classify/{task}", content=wav_bytes(0.3, seed=seed), headers=WAV)


def _states(c) -> dict[str, str]:
    return {t["task"]: t["state"] for t in c.get("/tasks").json()["tasks"]}


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{{?{re.escape(labels)}}}? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def load_gate(monkeypatch):
    """Holds ``MultiTaskModel.load_task`` for the task names in ``held`` until ``opened``."""

    class LoadGate:
        def __init__(self) -> None:
            self.held: set[str] = set()
            self.opened = threading.Event()
            self.entered = threading.Event()
            self.threads: list[str] = []

    gate = LoadGate()
    real = MultiTaskModel.load_task

    def load_task(model, bundle):
        if bundle.manifest.task in gate.held:
            gate.threads.append(threading.current_thread().name)
            gate.entered.set()
            assert gate.opened.wait(20), "load gate never opened"
        return real(model, bundle)

    monkeypatch.setattr(MultiTaskModel, "load_task", load_task)
    yield gate
    gate.opened.set()


def _save(store, bundles, *names):
    for n in names:
        bundles[n].save(store / f"{n}.safetensors")


def test_a_cold_load_does_not_block_a_hot_task(make_app, store, bundles, load_gate):
    _save(store, bundles, "birds", "words")
    with served(make_app(preload="lazy")) as c:
        assert _classify(c, "birds").status_code == 200  # birds hot
        load_gate.held = {"words"}
        cold: list = []
        t = threading.Thread(target=lambda: cold.append(_classify(c, "words")))
        t.start()
        assert load_gate.entered.wait(10)  # words is loading, held
        for seed in range(3):  # the hot task answers while the cold load is held
            r = _classify(c, "birds", seed)
            assert (r.status_code, r.json()["version"]) == (200,
                                                            bundles["birds"].manifest.version)
        assert cold == [] and t.is_alive()
        assert load_gate.threads == ["aat-loader_0"]  # not the inference thread
        load_gate.opened.set()
        t.join(20)
        assert (cold[0].status_code, cold[0].headers["x-aat-task-load"]) == (200, "disk")
        assert cold[0].json()["version"] == bundles["words"].manifest.version


def test_concurrent_requests_for_a_cold_task_share_one_load(make_app, store, bundles,
                                                            load_gate, monkeypatch):
    _save(store, bundles, "words")
    reads = []
    real_read = Registry._read
    monkeypatch.setattr(Registry, "_read", lambda self, e: reads.append(e.task)
                        or real_read(self, e))
    with served(make_app(preload="lazy")) as c:
        load_gate.held = {"words"}
        out: list = []
        threads = [threading.Thread(target=lambda s=s: out.append(_classify(c, "words", s)))
                   for s in range(3)]
        for t in threads:
            t.start()
        svc = c.app.state.service
        wait_until(lambda: svc.pager.inflight("words") == 3, 10)
        load_gate.opened.set()
        for t in threads:
            t.join(20)
        assert sorted((r.status_code, r.headers["x-aat-task-load"]) for r in out) == \
            [(200, "disk")] * 3
        text = c.get("/metrics").text
        assert _metric(text, "aat_task_loads_total", 'source="disk"') == 1.0
        assert _metric(text, "aat_task_cache_misses_total", 'tier="device"') == 3.0
        assert reads == ["words"]


def test_cache_metrics_count_a_scripted_sequence_exactly(make_app, store, bundles,
                                                         monkeypatch):
    """max_tasks=1: a (disk), a (hit), b (disk, evicts a), a (host, evicts b)."""
    _save(store, bundles, "birds", "words")
    reads = []
    real_read = Registry._read
    monkeypatch.setattr(Registry, "_read", lambda self, e: reads.append(e.task)
                        or real_read(self, e))
    with served(make_app(preload="lazy", max_tasks=1)) as c:
        loads = [_classify(c, t).headers.get("x-aat-task-load")
                 for t in ("birds", "birds", "words", "birds")]
        assert loads == ["disk", None, "disk", "host"]
        assert reads == ["birds", "words"]  # the host hit read no file
        text = c.get("/metrics").text
        expected = {("aat_task_cache_hits_total", 'tier="device"'): 1,
                    ("aat_task_cache_misses_total", 'tier="device"'): 3,
                    ("aat_task_cache_hits_total", 'tier="host"'): 1,
                    ("aat_task_cache_misses_total", 'tier="host"'): 2,
                    ("aat_task_loads_total", 'source="disk"'): 2,
                    ("aat_task_loads_total", 'source="host"'): 1,
                    ("aat_task_evictions_total", 'tier="device"'): 2,
                    ("aat_task_evictions_total", 'tier="host"'): 0,
                    ("aat_task_load_seconds_count", 'source="disk"'): 2,
                    ("aat_tasks_resident", ""): 1}
        assert {k: _metric(text, *k) for k in expected} == expected
        host = sum(t.numel() * t.element_size() for n in ("birds", "words")
                   for t in bundles[n].tensors.values())
        assert _metric(text, "aat_task_cache_bytes", 'tier="host"') == host
        cache = c.get("/tasks").json()["cache"]
        assert (cache["resident"], cache["cached"], cache["stored"], cache["host_bytes"]) == (
            1, 2, 2, host)
        assert _states(c) == {"birds": "active", "words": "cached"}


def test_a_task_with_a_request_in_flight_is_never_evicted(make_app, store, bundles):
    """max_tasks=1 and a request of birds in flight (as a slow upload of its audio would be):
    words cannot take its place; it gets 503 at its deadline, or loads once birds is idle."""
    _save(store, bundles, "birds", "words")
    with served(make_app(max_tasks=1, request_timeout_s=3.0)) as c:
        pager = c.app.state.service.pager
        request = pager.in_flight("birds")
        c.portal.call(request.__enter__)  # on the event loop, as a request does
        r = _classify(c, "words")
        assert (r.status_code, r.json()) == error(
            503, "overloaded", "cannot load task 'words': all 1 resident tasks are busy "
            "(requests in flight, or pinned by AAT_PINNED_TASKS) and the device holds no more "
            "(AAT_MAX_TASKS, AAT_DEVICE_TASK_MB); retry later")
        assert r.headers["retry-after"] == "1"
        assert _states(c) == {"birds": "active", "words": "cached"}
        waiting: list = []
        w = threading.Thread(target=lambda: waiting.append(_classify(c, "words")))
        w.start()
        wait_until(lambda: pager.inflight("words") == 1, 10)
        assert _states(c)["birds"] == "active"
        c.portal.call(request.__exit__, None, None, None)  # birds answered: idle now
        w.join(20)
        assert (waiting[0].status_code, waiting[0].headers["x-aat-task-load"]) == (200, "host")
        assert waiting[0].json()["version"] == bundles["words"].manifest.version
        assert _states(c) == {"birds": "cached", "words": "active"}


def test_pinned_tasks_are_never_evicted(make_app, store, bundles):
    _save(store, bundles, "birds", "words", "tags")
    with served(make_app(preload="lazy", max_tasks=2, pinned_tasks="birds")) as c:
        for t in ("birds", "words", "tags"):  # birds is the least recently used
            assert _classify(c, t).status_code == 200
        assert _states(c) == {"birds": "active", "words": "cached", "tags": "active"}
        assert c.get("/tasks").json()["cache"]["pinned"] == ["birds"]
    with served(make_app(preload="lazy", max_tasks=2)) as c:  # unpinned: birds goes
        for t in ("birds", "words", "tags"):
            assert _classify(c, t).status_code == 200
        assert _states(c) == {"birds": "cached", "words": "active", "tags": "active"}


def test_many_tasks_on_few_slots_answer_every_request_with_its_version(make_app, store, ckpt):
    """200 tiny tasks, 8 resident, a device and host budget: 0 errors, each response's
    version the stored one, budgets never exceeded."""
    versions = {}
    for i in range(200):
        b = make_bundle(ckpt, f"t{i:03d}", method="aat_ms" if i % 2 else "head",
                        num_classes=2 + i % 5, seed=100 + i)
        b.save(store / f"t{i:03d}.safetensors")
        versions[b.manifest.version] = f"t{i:03d}"
    with served(make_app(preload="lazy", max_tasks=8, device_task_mb=2.0,
                         host_cache_mb=0.5)) as c:
        order = [f"t{(i * 37) % 200:03d}" for i in range(240)] + ["t000", "t001"] * 10
        seen = set()
        for k, task in enumerate(order):
            r = _classify(c, task, seed=k % 4)
            assert r.status_code == 200, (task, r.text)
            assert versions[r.json()["version"]] == task
            seen.add(task)
            if k % 40 == 0:
                cache = c.get("/tasks").json()["cache"]
                assert cache["resident"] <= 8
                assert cache["device_bytes"] <= cache["device_budget_bytes"]
                assert cache["host_bytes"] <= cache["host_budget_bytes"]
        assert len(seen) == 200
        text = c.get("/metrics").text
        assert _metric(text, "aat_requests_total", 'outcome="ok",task="t000"') > 0
        assert _metric(text, "aat_task_evictions_total", 'tier="device"') >= 192
        assert _metric(text, "aat_task_evictions_total", 'tier="host"') > 0
        assert 'outcome="overloaded"' not in text and 'outcome="internal_error"' not in text


def test_an_upload_that_finds_every_task_busy_is_503_and_changes_nothing(make_app, store,
                                                                        bundles, caplog):
    from tests.service.helpers import ADMIN, auth

    _save(store, bundles, "birds")
    with caplog.at_level(logging.INFO, logger="aat_serve"), \
            served(make_app(max_tasks=1, admin_token=ADMIN)) as c:
        summary = next(r for r in caplog.records if r.getMessage() == "task cache")
        assert (summary.resident, summary.stored, summary.max_tasks) == (1, 1, 1)
        assert summary.host_budget_bytes == 512 << 20
        pager = c.app.state.service.pager
        request = pager.in_flight("birds")
        c.portal.call(request.__enter__)
        put = {"content-type": "application/octet-stream", **auth(ADMIN)}
        r = c.put("/tasks/words", content=bundles["words"].to_bytes(), headers=put)
        assert (r.status_code, r.json()["error"]["type"]) == (503, "overloaded")
        assert r.json()["error"]["message"].startswith("cannot load task 'words': all 1 "
                                                       "resident tasks are busy")
        assert not (store / "words").exists() and _states(c) == {"birds": "active"}
        c.portal.call(request.__exit__, None, None, None)
        r = c.put("/tasks/words", content=bundles["words"].to_bytes(), headers=put)
        assert r.status_code == 201
        assert _states(c) == {"birds": "cached", "words": "active"}


@pytest.mark.parametrize("room", [True, False])
def test_a_host_tier_load_on_cpu_runs_inline_unless_it_must_wait(make_app, store, bundles,
                                                                 monkeypatch, room):
    """Disk loads run on the loader thread; a host-tier load on a CPU model with a free slot and
    row runs on the event loop (no thread hand-off); one that would wait for a slot or grow the
    pools goes to the loader thread as well."""
    import asyncio

    from aat_serve.adapters.slots import TaskSlots

    _save(store, bundles, "birds", "words")
    calls: list[tuple[str, bool]] = []
    real = MultiTaskModel.load_task

    def load_task(model, bundle):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((bundle.manifest.task, on_loop))
        return real(model, bundle)

    monkeypatch.setattr(MultiTaskModel, "load_task", load_task)
    if not room:
        monkeypatch.setattr(TaskSlots, "loads_without_waiting", lambda self: False)
    with served(make_app(preload="lazy", max_tasks=1)) as c:
        loads = [_classify(c, t).headers.get("x-aat-task-load") for t in
                 ("birds", "words", "birds")]
        assert loads == ["disk", "disk", "host"]
        assert _states(c) == {"birds": "active", "words": "cached"}
    assert calls == [("birds", False), ("words", False), ("birds", room)]
