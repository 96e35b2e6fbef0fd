"""The batching engine: an asyncio front end feeding one inference worker thread.

Requests are admitted into a bounded queue (``max_queue``; beyond it 503). The batcher takes the
oldest clip, waits at most ``max_wait_ms`` after that clip arrived for others of the same
feature shape, of any task, up to ``max_batch`` clips, orders them by task and runs them as one
``ServingModel.classify`` call (``aat_serve.adapters.multitask``) on the worker thread. Clips
arrive as waveforms (PCM at their task's rate); the worker computes the whole batch's log-mel
features at once on the model's device (``service.batch_features``) right before the forward.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import UnknownTaskError
from aat_serve.adapters.multitask import ServingModel
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.batch_features import BatchFeatures
from aat_serve.service.errors import (
    ErrorType,
    ServiceError,
    not_ready,
    overloaded,
    task_failed,
    timed_out,
)
from aat_serve.service.metrics import Metrics

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


Outcome = tuple[torch.Tensor, TaskInfo] | BaseException | None
"""A clip's outcome on the worker thread: (logits, the task that computed them) or an error."""


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

    def __init__(self, model: ServingModel, metrics: Metrics, *, max_batch: int, max_wait_s: float,
                 max_queue: int, max_batch_frames: int | None = None,
                 features: BatchFeatures | None = None) -> None:
        self.model = model
        self.features = features or BatchFeatures(getattr(model, "device", "cpu"))
        """The batched filterbanks, on the model's device; used on the worker thread only."""
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_batch_frames = max_batch_frames
        """Most input frames per batch; None: no bound beyond ``max_batch``."""
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._pending: deque[Job | Control] = deque()
        self._wakeup = asyncio.Event()
        self._admitted = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aat-infer")
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
        self._worker.shutdown(wait=True)

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
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                head = self._pending[0]
                if isinstance(head, Control):
                    self._pending.popleft()
                    await self._apply(loop, head)
                    continue
                batch = await self._form_batch(head)
                if batch:
                    await self._compute(loop, batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # the batcher must survive anything; the jobs already got errors
                log.exception("batcher: unexpected error")

    async def _apply(self, loop: asyncio.AbstractEventLoop, c: Control) -> None:
        try:
            result = await loop.run_in_executor(self._worker, c.fn)
        except Exception as e:  # handed to the waiting caller
            if not c.future.done():
                c.future.set_exception(e)
        else:
            if not c.future.done():
                c.future.set_result(result)

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
        key = head.key
        cap = self.capacity(key)
        until = head.enqueued + self.max_wait_s
        while True:
            stop = self._barrier()
            ready = sum(1 for i in range(stop) if self._pending[i].key == key)
            if ready >= cap or stop < len(self._pending):
                break
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                break
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
                self._forget(item)  # batched: its place in the queue is free again
            else:
                keep.append(item)
        self._pending = keep
        return batch

    async def _compute(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        batch.sort(key=lambda j: j.task)  # one contiguous segment per task
        start = time.monotonic()
        for j in batch:
            self.metrics.queue_seconds.labels(j.task).observe(start - j.enqueued)
        try:
            outcome = await loop.run_in_executor(self._worker, self._forward, batch)
        except Exception as e:
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            raise
        elapsed = time.monotonic() - start
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

    def _forward(self, batch: list[Job]) -> list[Outcome]:
        """On the worker thread: the batch's features, then one classify call for every clip
        still due whose task is resident; a clip past its deadline (or given up) is answered
        504 and neither featurised nor computed."""
        out: list[Outcome] = [None] * len(batch)
        rows: list[int] = []
        tasks = self.tasks
        now = time.monotonic()
        for i, j in enumerate(batch):
            info = tasks.get(j.task)
            if j.cancelled or now >= j.deadline:
                out[i] = timed_out(j.timeout_s)
            elif info is None:
                out[i] = UnknownTaskError(f"unknown task {j.task!r}")
            elif info.version != j.version and info.manifest.features != j.feature_settings:
                out[i] = ServiceError(ErrorType.TASK_CHANGED,
                                      f"task {j.task!r} changed its feature settings while this "
                                      "request waited; retry", {"Retry-After": "0"})
            else:
                rows.append(i)
        if rows:
            feats = self._featurise(batch, rows, out)
            if feats is not None:
                self._classify_rows(batch, rows, feats, out, tasks)
        return out

    def _featurise(self, batch: list[Job], rows: list[int], out: list[Outcome]
                   ) -> dict[int, torch.Tensor] | None:
        """Features of ``rows`` (by row); a clip whose samples are too large for finite
        features gets its 400 in ``out`` and leaves ``rows``."""
        try:
            with torch.inference_mode():
                feats, errors = self.features([batch[i].wave for i in rows],
                                              [batch[i].config for i in rows])
        except Exception as e:  # cannot happen on valid waveforms; every clip gets the error
            for i in rows:
                out[i] = e
            return None
        by_row: dict[int, torch.Tensor] = {}
        for k, (i, err) in enumerate(zip(list(rows), errors, strict=True)):
            if err is not None:
                out[i] = err
                rows.remove(i)
            else:
                by_row[i] = feats[k]
        return by_row if rows else None

    def _classify_rows(self, batch: list[Job], rows: list[int], feats: dict[int, torch.Tensor],
                       out: list[Outcome], tasks: dict[str, TaskInfo]) -> None:
        """Classify ``rows`` of ``batch`` into ``out``; if the forward raises and the rows span
        several tasks, each task runs again alone so that only the failing one gets the
        error."""
        names = [batch[i].task for i in rows]
        try:
            x = feats[rows[0]][None] if len(rows) == 1 else torch.stack([feats[i] for i in rows])
            with torch.inference_mode():
                logits = self.model.classify(x, names)
        except Exception as e:
            if len(set(names)) > 1:
                for task in sorted(set(names)):
                    self._classify_rows(batch, [i for i in rows if batch[i].task == task],
                                        feats, out, tasks)
                return
            for i in rows:  # one task's own failure: 500, logged with each request's id
                out[i] = e
            return
        for i, lg in zip(rows, logits, strict=True):
            task = batch[i].task
            lg = lg.detach().float().cpu()
            if not bool(torch.isfinite(lg).all()):
                self.metrics.nonfinite_outputs.labels(task).inc()
                log.error("non-finite scores from task %s", task, extra={"task": task})
                out[i] = task_failed(task, "its model gave non-finite scores (NaN or infinity) "
                                           "for this clip; its bundle is faulty")
            else:
                out[i] = (lg, tasks[task])
