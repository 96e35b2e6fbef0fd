"""The engine's pipelining: the next full batch waits on the worker thread while the current one
computes, without reordering anything.

The model here is a stand-in whose ``classify`` records each call's clips and can be held (a
gate), so every queue state is exact: the tasks are named ``c00``, ``c01``, ... so a batch's
clips (sorted by task) read in the order they were submitted.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.engine import Engine, Job
from aat_serve.service.errors import ServiceError
from aat_serve.service.metrics import Metrics


class HeldModel:
    """A ``ServingModel`` stand-in: records calls (``log``) and holds them while closed."""

    def __init__(self, manifest, names: list[str]) -> None:
        self.tasks = {n: TaskInfo(n, i, manifest.version, manifest.method, 3, manifest)
                      for i, n in enumerate(names)}
        self.log: list[list[str]] = []
        self.entered = threading.Semaphore(0)
        self.opened = threading.Event()

    def classify(self, features, tasks):
        self.log.append(list(tasks))
        self.entered.release()
        assert self.opened.wait(20), "never opened"
        return [torch.zeros(3) for _ in tasks]


NAMES = [f"c{i:02d}" for i in range(12)]


@pytest.fixture
def manifest(bundles):
    return bundles["birds"].manifest


def _job(engine: Engine, m, task: str, deadline_s: float = 60.0) -> Job:
    return Job(task, torch.zeros(4000), m.feature_config, m.version, m.features,
               time.monotonic() + deadline_s, deadline_s, future=engine.new_future())


async def _until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def _entered(model: HeldModel) -> None:
    assert await asyncio.to_thread(model.entered.acquire, True, 10), "no forward started"


def _run(manifest, scenario, **engine_kw):
    async def main():
        model = HeldModel(manifest, NAMES)
        engine = Engine(model, Metrics(), **{"max_batch": 4, "max_wait_s": 0.02,
                                             "max_queue": 64, **engine_kw})
        engine.start()
        try:
            return await scenario(engine, model)
        finally:
            model.opened.set()
            await engine.stop()

    return asyncio.run(main())


def _submit(engine: Engine, m, tasks: list[str], **kw) -> list[asyncio.Task]:
    return [asyncio.ensure_future(engine.submit(_job(engine, m, t, **kw), engine.admit()))
            for t in tasks]


def test_a_full_batch_waits_on_the_worker_and_keeps_its_queue_places(manifest):
    async def scenario(engine, model):
        first = _submit(engine, manifest, NAMES[:1])
        await _entered(model)  # the worker holds the first batch
        nxt = _submit(engine, manifest, NAMES[1:5])  # a full batch of four
        await _until(lambda: engine._in_flight == 2)
        assert len(engine._handed) == 2 and not engine._pending
        assert engine._admitted == 4  # handed over, not started: still in the queue
        engine.max_queue = 4
        with pytest.raises(ServiceError) as full:  # max_queue counts them
            engine.admit()
        assert full.value.type == "overloaded"
        model.opened.set()
        await asyncio.gather(*first, *nxt)
        assert engine._admitted == 0
        return model.log

    assert _run(manifest, scenario) == [NAMES[:1], NAMES[1:5]]


def test_a_partial_batch_waits_for_the_worker_and_keeps_growing(manifest):
    async def scenario(engine, model):
        first = _submit(engine, manifest, NAMES[:1])
        await _entered(model)
        two = _submit(engine, manifest, NAMES[1:3])
        await asyncio.sleep(0.1)  # five times max_wait: still not handed over (worker busy)
        assert engine._in_flight == 1 and len(engine._pending) == 2
        one = _submit(engine, manifest, NAMES[3:4])
        await _until(lambda: len(engine._pending) == 3)
        model.opened.set()
        await asyncio.gather(*first, *two, *one)
        # differs: with the worker free, a partial batch leaves after max_wait on its own
        alone = _submit(engine, manifest, NAMES[4:6])
        await asyncio.gather(*alone)
        return model.log

    assert _run(manifest, scenario) == [NAMES[:1], NAMES[1:4], NAMES[4:6]]


def test_a_model_change_runs_after_the_clips_before_it_and_before_those_after(manifest):
    order: list[str] = []

    async def scenario(engine, model):
        first = _submit(engine, manifest, NAMES[:1])
        await _entered(model)
        before = _submit(engine, manifest, NAMES[1:5])  # full: handed over at once
        await _until(lambda: engine._in_flight == 2)
        change = asyncio.ensure_future(engine.control(lambda: order.append("change") or 7))
        await _until(lambda: len(engine._pending) == 1)  # both worker places are taken
        after = _submit(engine, manifest, NAMES[5:9])
        await _until(lambda: len(engine._pending) == 5)
        model.opened.set()
        await asyncio.gather(*first, *before, *after)
        assert await change == 7
        return model.log

    real_log = _run(manifest, scenario)
    assert real_log == [NAMES[:1], NAMES[1:5], NAMES[5:9]]
    assert order == ["change"]


def test_the_change_is_applied_between_the_batches(manifest):
    """The clips behind a change see its effect, those before it do not (the change removes a
    task: the clip after it is answered unknown task, the one before it is computed)."""

    async def scenario(engine, model):
        first = _submit(engine, manifest, NAMES[:1])
        await _entered(model)
        before = _submit(engine, manifest, NAMES[1:5])
        await _until(lambda: engine._in_flight == 2)
        change = asyncio.ensure_future(engine.control(lambda: model.tasks.pop("c02")))
        await _until(lambda: len(engine._pending) == 1)
        after = _submit(engine, manifest, ["c02"])
        model.opened.set()
        done = await asyncio.gather(*first, *before, return_exceptions=True)
        late = await asyncio.gather(*after, return_exceptions=True)
        await change
        return done, late

    done, late = _run(manifest, scenario)
    assert [r.task.name for r in done] == NAMES[:5]  # computed, c02 among them
    assert type(late[0]).__name__ == "UnknownTaskError"


def test_a_clip_that_expires_behind_the_running_batch_is_504_and_not_computed(manifest):
    async def scenario(engine, model):
        first = _submit(engine, manifest, NAMES[:1])
        await _entered(model)
        doomed = _submit(engine, manifest, NAMES[1:5], deadline_s=0.3)
        await _until(lambda: engine._in_flight == 2)
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)  # 504 at 0.3 s
        model.opened.set()
        await asyncio.gather(*first)
        fresh = await asyncio.gather(*_submit(engine, manifest, NAMES[5:6]))  # differs
        return outcomes, fresh, model.log

    outcomes, fresh, log = _run(manifest, scenario)
    assert [getattr(o, "type", None) for o in outcomes] == ["timeout"] * 4
    assert fresh[0].task.name == "c05"
    assert log == [NAMES[:1], NAMES[5:6]]  # the expired batch never reached the model


def test_the_next_batchs_features_are_made_while_the_current_batch_computes(manifest):
    made: list[tuple[str, int]] = []

    async def scenario(engine, model):
        real = engine.worker.features

        def recording(waves, cfgs):
            made.append((threading.current_thread().name, len(waves)))
            return real(waves, cfgs)

        engine.worker.features = recording
        first = _submit(engine, manifest, NAMES[:1])
        await _entered(model)
        nxt = _submit(engine, manifest, NAMES[1:5])
        await _until(lambda: len(made) == 2)  # the held batch's and the next one's
        assert model.log == [NAMES[:1]]  # made while the first batch is still computing
        model.opened.set()
        await asyncio.gather(*first, *nxt)
        return model.log

    assert _run(manifest, scenario) == [NAMES[:1], NAMES[1:5]]
    assert [n for _, n in made] == [1, 4]
    assert all(name.startswith("aat-features") for name, _ in made)
