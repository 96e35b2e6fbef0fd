"""The batching engine: an asyncio front end feeding one inference worker thread.

Requests are admitted into a bounded queue (``max_queue``; beyond it 503). The batcher takes the
oldest clip, waits at most ``max_wait_ms`` after that clip arrived for others of the same
feature shape, of any task, up to ``max_batch`` clips, orders them by task and runs them as one
``ServingModel.classify`` call (``aat_serve.adapters.multitask``) on the worker thread
(``service.worker``). Clips arrive as waveforms (PCM at their task's rate); the whole batch's
log-mel features are computed at once on the model's device (``service.batch_features``) when
the batch is handed to the worker, on a feature thread beside the batch the worker computes.

Pipelining: while the worker computes a batch, the next one forms on the event loop and, once
full, waits on the worker thread itself (at most ``LOOKAHEAD`` items handed over), so the worker
starts on it the moment the current one ends instead of after a round trip through the event
loop. A batch that is not full is handed over only when the worker is free (as before), so
pipelining never makes batches smaller (``InferenceWorker.prepare`` starts its features at
once). A handed-over batch's clips keep their queue places (``max_queue``) until the worker
starts on it.

Model changes (load, replace, unload a task) travel through the same queue as clips and run on
the same thread between batches. A clip queued before a change is computed before it, a clip
queued after it is computed after it; no batch ever sees a half-applied change, and the version
that computed each clip is known exactly. The resident tasks are the model's own record
(``ServingModel.tasks``); the engine keeps no copy. Paging (``service/paging.py``) changes the
resident set without this queue, but only by adding a task no queued clip names or removing one
with no request in flight, so no clip's version changes under it.

Deadlines and bounds: a clip whose deadline has passed when its batch forms, or on the worker
thread right before the forward, is answered 504 and not computed. A batch holds at most
``max_batch`` clips and ``max_batch_frames`` input frames (one longer clip runs alone). One
task's failure stays its own: if a forward over several tasks raises, each task's clips are run
again on their own, and only the failing task's clips get the error (500); a clip whose scores
are NaN or infinite gets 500 ``task_failed`` naming the task (``aat_nonfinite_outputs_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.multitask import ServingModel
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.batch_features import BatchFeatures
from aat_serve.service.errors import (
    not_ready,
    overloaded,
    timed_out,
)
from aat_serve.service.metrics import Metrics
from aat_serve.service.worker import BatchRun, InferenceWorker

log = logging.getLogger(__name__)


@dataclass
class Result:
    """One clip's answer and how it was computed."""

    logits: torch.Tensor
    task: TaskInfo
    """The version that computed it (labels, multi-label flag)."""
    queue_s: float
    inference_s: float
    batch_size: int
    batch_tasks: int


@dataclass(eq=False)
class Job:
    """One clip waiting for its batch."""

    task: str
    wave: torch.Tensor
    """1-D float32 PCM at ``config.sample_rate``: this clip (one window of a request)."""
    config: FeatureConfig
    """How ``wave`` becomes model input (the task's settings, the service's limits applied)."""
    version: str
    """The version whose feature settings ``config`` comes from."""
    feature_settings: dict[str, Any]
    """Those settings (``Manifest.features``)."""
    deadline: float
    """``time.monotonic()`` after which the clip is answered 504 and not computed."""
    timeout_s: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def key(self) -> tuple[int, ...]:
        """The feature shape (frames, mel bins): clips of one key share a batch."""
        return (self.config.target_length, self.config.num_mel_bins)


@dataclass(eq=False)
class Control:
    """A model change, applied on the worker thread between batches, in queue order."""

    fn: Callable[[], Any]
    future: asyncio.Future


class Admission:
    """A place in the bounded queue, held from admission until the clip is batched or fails."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._engine._admitted -= 1
            self._engine.metrics.queue_depth.set(self._engine._admitted)


class Engine:
    """Dynamic batching over a ``ServingModel``; all methods are called on the event loop."""

    LOOKAHEAD = 2
    """Items (batches, model changes) handed to the worker thread at once: the one it computes
    and the next."""

    def __init__(self, model: ServingModel, metrics: Metrics, *, max_batch: int, max_wait_s: float,
                 max_queue: int, max_batch_frames: int | None = None,
                 features: BatchFeatures | None = None, threads: int | None = None) -> None:
        self.model = model
        self.worker = InferenceWorker(model, metrics, features, threads)
        """The inference thread (``threads`` torch intra-op threads; None: as the process)."""
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_batch_frames = max_batch_frames
        """Most input frames per batch; None: no bound beyond ``max_batch``."""
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._pending: deque[Job | Control] = deque()
        self._wakeup = asyncio.Event()
        self._admitted = 0
        self._in_flight = 0
        self._handed: deque[list[Job] | Control] = deque()
        """Handed to the worker, not yet finished, in order (the first is being computed)."""
        self._task: asyncio.Task | None = None
        self._admissions: dict[Job, Admission] = {}

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        """The resident tasks (a snapshot of the model's). Versions change only on the worker
        thread, between batches, so a batch and the changes queued around it agree; paging
        adds and removes only tasks no queued clip is using (module doc)."""
        return self.model.tasks

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="aat-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        err = not_ready("the service is shutting down")
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(err)
        self.worker.shutdown()

    @property
    def alive(self) -> bool:
        """The batcher runs (it only stops on shutdown)."""
        return self._task is not None and not self._task.done()

    # -- front end ------------------------------------------------------------------------
    def admit(self) -> Admission:
        """Reserve a place in the queue or raise 503 ``overloaded``."""
        if self._admitted >= self.max_queue:
            raise overloaded(f"the queue is full ({self.max_queue} requests, AAT_MAX_QUEUE); "
                             "retry later")
        self._admitted += 1
        self.metrics.queue_depth.set(self._admitted)
        return Admission(self)

    async def submit(self, job: Job, admission: Admission) -> Result:
        """Queue an admitted clip and wait for its result (or 504 at its deadline)."""
        return (await self.submit_many([job], admission))[0]

    async def submit_many(self, jobs: list[Job], admission: Admission) -> list[Result]:
        """Queue the clips of one admitted request (its windows; one deadline) and wait for
        all their results. The request's queue place is freed when its last clip is batched;
        the first error (or 504 at the deadline) answers the request and its other clips are
        given up (not computed if not yet batched)."""
        self._admissions[jobs[-1]] = admission  # batched in order: the last one goes last
        self._pending.extend(jobs)
        self._wakeup.set()
        try:
            remaining = jobs[0].deadline - time.monotonic()
            waits = asyncio.gather(*(asyncio.shield(j.future) for j in jobs))
            return await asyncio.wait_for(waits, max(remaining, 0.0))
        except (asyncio.TimeoutError, TimeoutError):
            raise timed_out(jobs[0].timeout_s) from None
        finally:
            for j in jobs:
                if not j.future.done():
                    j.cancelled = True
                self._forget(j)

    def new_future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def control(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread after every clip queued before it."""
        c = Control(fn, self.new_future())
        self._pending.append(c)
        self._wakeup.set()
        return await asyncio.shield(c.future)

    # -- model changes (run on the worker thread through ``control``) ----------------------
    async def load(self, bundle: TaskBundle) -> None:
        """Make ``bundle`` its task's active version (after the clips queued before it)."""
        await self.control(lambda: self._load(bundle))

    async def unload(self, task: str) -> bool:
        return await self.control(lambda: self._unload(task))

    def _load(self, bundle: TaskBundle) -> None:
        self.model.load_task(bundle)
        self.metrics.tasks_resident.set(len(self.tasks))

    def _unload(self, task: str) -> bool:
        if task not in self.tasks:
            return False
        self.model.unload_task(task)
        self.metrics.tasks_resident.set(len(self.tasks))
        return True

    # -- the batcher ----------------------------------------------------------------------
    def _forget(self, job: Job) -> None:
        adm = self._admissions.pop(job, None)
        if adm is not None:
            adm.release()

    async def _run(self) -> None:
        while True:
            try:
                if not self._pending or self._in_flight >= self.LOOKAHEAD:
                    await self._wait(None)  # a clip, a change or a finished batch wakes it
                    continue
                head = self._pending[0]
                if isinstance(head, Control):
                    self._pending.popleft()
                    self._hand_over(head, head.fn)
                    continue
                batch = await self._form_batch(head)
                if batch:
                    batch.sort(key=lambda j: j.task)  # one contiguous segment per task
                    # its features start on the feature thread now, beside the running batch
                    self._hand_over(batch, self.worker.run, batch, self.worker.prepare(batch))
            except asyncio.CancelledError:
                raise
            except Exception:  # the batcher must survive anything; the jobs already got errors
                log.exception("batcher: unexpected error")

    async def _wait(self, timeout: float | None) -> None:
        """Until something is queued or a handed-over item finishes, or ``timeout`` s."""
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _hand_over(self, item: list[Job] | Control, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``item`` (a batch or a change) on the worker thread behind those already
        there. A batch's clips keep their queue places until the worker starts on it."""
        self._in_flight += 1
        self._handed.append(item)
        if len(self._handed) == 1:
            self._started(item)
        work = asyncio.get_running_loop().run_in_executor(self.worker.executor, fn, *args)
        work.add_done_callback(lambda f: self._finished(item, f))

    def _started(self, item: list[Job] | Control) -> None:
        if isinstance(item, list):
            for j in item:
                self._forget(j)  # computing: its place in the queue is free again

    def _finished(self, item: list[Job] | Control, work: asyncio.Future) -> None:
        """On the loop when the worker is done with ``item``: answer it, start the next."""
        self._in_flight -= 1
        self._handed.popleft()
        if self._handed:
            self._started(self._handed[0])
        self._wakeup.set()
        try:
            if isinstance(item, Control):
                _settle(item.future, work)
            else:
                self._deliver(item, work)
        except Exception:  # a callback must not raise; the clips' waiters time out
            log.exception("batcher: delivering a batch failed")

    def _barrier(self) -> int:
        """Index of the first model change in the queue (clips behind it must wait)."""
        for i, item in enumerate(self._pending):
            if isinstance(item, Control):
                return i
        return len(self._pending)

    def capacity(self, key: tuple[int, ...]) -> int:
        """Clips of feature shape ``key`` in one batch: ``max_batch``, fewer when their frames
        would exceed ``max_batch_frames``, and at least one (a longer clip runs alone)."""
        if self.max_batch_frames is None:
            return self.max_batch
        frames = max(1, key[0]) if key else 1
        return max(1, min(self.max_batch, self.max_batch_frames // frames))

    async def _form_batch(self, head: Job) -> list[Job]:
        """The batch of ``head``: when ``capacity`` clips of its shape are queued (before any
        model change), or ``max_wait_s`` after ``head`` arrived once the worker is free. While
        the worker computes, only a full batch forms: it waits on the worker thread, and the
        worker starts on it the moment the current batch ends."""
        key = head.key
        cap = self.capacity(key)
        until = head.enqueued + self.max_wait_s
        while True:
            stop = self._barrier()
            ready = sum(1 for i in range(stop) if self._pending[i].key == key)
            if ready >= cap or stop < len(self._pending):
                break
            remaining = until - time.monotonic()
            if remaining <= 0 and self._in_flight == 0:
                break
            await self._wait(remaining if remaining > 0 else None)
            if not self._pending or self._pending[0] is not head:
                return []  # the head left (given up, or the queue was cleared): start over
        now = time.monotonic()
        batch: list[Job] = []
        keep: deque[Job | Control] = deque()
        stop = self._barrier()
        for i, item in enumerate(self._pending):
            if i >= stop:
                keep.append(item)
                continue
            if item.cancelled or item.future.done():
                self._forget(item)
                continue
            if now >= item.deadline:  # too old: answer 504, do not compute
                item.future.set_exception(timed_out(item.timeout_s))
                self._forget(item)
                continue
            if item.key == key and len(batch) < cap:
                batch.append(item)
            else:
                keep.append(item)
        self._pending = keep
        return batch

    def _deliver(self, batch: list[Job], work: asyncio.Future) -> None:
        if work.cancelled() or work.exception() is not None:
            err = not_ready("the service is shutting down") if work.cancelled() \
                else work.exception()
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        run: BatchRun = work.result()
        outcome, start, elapsed = run.outcomes, run.started, run.finished - run.started
        for j in batch:
            self.metrics.queue_seconds.labels(j.task).observe(start - j.enqueued)
        done = [o for o in outcome if not isinstance(o, BaseException)]
        n_tasks = len({j.task for j, o in zip(batch, outcome, strict=True)
                       if not isinstance(o, BaseException)})
        if done:
            self.metrics.inference_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(done))
            self.metrics.batch_tasks.observe(n_tasks)
        for j, o in zip(batch, outcome, strict=True):
            if j.future.done() or j.cancelled:  # given up: nobody waits for it
                continue
            if isinstance(o, BaseException):
                j.future.set_exception(o)
            else:
                logits, info = o
                j.future.set_result(Result(logits, info, start - j.enqueued, elapsed,
                                           len(done), n_tasks))


def _settle(future: asyncio.Future, work: asyncio.Future) -> None:
    """Hand a model change's outcome to its waiting caller."""
    if future.done():
        return
    if work.cancelled():
        future.set_exception(not_ready("the service is shutting down"))
    elif work.exception() is not None:
        future.set_exception(work.exception())
    else:
        future.set_result(work.result())
