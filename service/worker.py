"""What runs on the inference thread: a batch's features, then one classify call.

A batch's features (``BatchFeatures``) are computed on a thread of their own (``prep``, torch on
one intra-op thread) as soon as the batch is handed over, so while the model computes one batch
the next one's log-mel is made beside it; the inference thread then only waits for features that
are not ready yet (the first batch after a pause). On a GPU both threads queue work on the same
device in order. A clip past its deadline or given up is not featurised.

``Engine`` (``service.engine``) forms the batches on the event loop and hands them here, in
order, through the one-thread ``executor``; model changes travel the same way, so they run
between batches. A batch's clips are checked once more right before the forward: a clip past its
deadline or given up (504), of a task no longer resident, or whose task changed its feature
settings while it waited, is answered without being featurised or computed.

The scores arrive on the host already: ``MultiTaskModel.classify`` copies a batch's logits off
its device in one transfer.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aat_serve.adapters.errors import UnknownTaskError
from aat_serve.adapters.multitask import ServingModel
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.batch_features import BatchFeatures
from aat_serve.service.errors import ErrorType, ServiceError, task_failed, timed_out
from aat_serve.service.metrics import Metrics
from aat_serve.service.threads import decode_pool, inference_pool

if TYPE_CHECKING:
    from aat_serve.service.engine import Job

log = logging.getLogger(__name__)

Outcome = tuple[torch.Tensor, TaskInfo] | BaseException | None
"""A clip's outcome on the worker thread: (logits, the task that computed them) or an error."""


@dataclass
class Prepared:
    """A batch's features by clip index, and the clips whose features failed (their error)."""

    features: dict[int, torch.Tensor]
    errors: dict[int, BaseException]


@dataclass
class BatchRun:
    """A batch's outcomes (in the batch's order) and when the worker started and ended it."""

    outcomes: list[Outcome]
    started: float
    finished: float


class InferenceWorker:
    """The model, its batched filterbanks and the one thread that uses them."""

    def __init__(self, model: ServingModel, metrics: Metrics, features: BatchFeatures | None,
                 threads: int | None = None) -> None:
        self.model = model
        self.metrics = metrics
        self.features = features or BatchFeatures(getattr(model, "device", "cpu"))
        """The batched filterbanks, on the model's device; used by one thread at a time."""
        self._features_lock = threading.Lock()
        self.threads = threads
        """The inference thread's torch intra-op threads (None: the process's count)."""
        self.executor: ThreadPoolExecutor = inference_pool(threads)
        """One thread; batches and model changes run in the order they were handed to it."""
        self.prep: ThreadPoolExecutor = decode_pool(1, "aat-features")
        """One thread computing handed-over batches' features, in order."""

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
        self.prep.shutdown(wait=True)

    def prepare(self, batch: list[Job]) -> Future:
        """Start ``batch``'s features on the feature thread (a ``Future`` of ``Prepared``)."""
        return self.prep.submit(self.featurise, batch)

    def run(self, batch: list[Job], prepared: Future | None = None) -> BatchRun:
        """``forward`` timed on the worker thread (queue and inference times of the clips)."""
        started = time.monotonic()
        outcomes = self.forward(batch, prepared)
        return BatchRun(outcomes, started, time.monotonic())

    def featurise(self, batch: list[Job]) -> Prepared:
        """Features of every clip of ``batch`` still due; a clip whose samples are too large
        for finite features gets its 400 (``AudioError``), and an unexpected failure is every
        clip's error."""
        now = time.monotonic()
        due = [i for i, j in enumerate(batch) if not j.cancelled and now < j.deadline]
        if not due:
            return Prepared({}, {})
        try:
            with self._features_lock, torch.inference_mode():
                feats, errors = self.features([batch[i].wave for i in due],
                                              [batch[i].config for i in due])
        except Exception as e:  # cannot happen on valid waveforms
            return Prepared({}, {i: e for i in due})
        return Prepared({i: feats[k] for k, i in enumerate(due) if errors[k] is None},
                        {i: err for i, err in zip(due, errors, strict=True) if err is not None})

    def forward(self, batch: list[Job], prepared: Future | None = None) -> list[Outcome]:
        """The batch's features (``prepared``, else computed here), then one classify call for
        every clip still due whose task is resident; a clip past its deadline (or given up) is
        answered 504 and not computed."""
        out: list[Outcome] = [None] * len(batch)
        rows: list[int] = []
        tasks = self.model.tasks
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
            feats = self._features_of(batch, rows, out, prepared)
            if feats is not None:
                self._classify_rows(batch, rows, feats, out, tasks)
        return out

    def _features_of(self, batch: list[Job], rows: list[int], out: list[Outcome],
                     prepared: Future | None) -> dict[int, torch.Tensor] | None:
        """Features of ``rows`` (by row); a clip without them gets its error in ``out`` and
        leaves ``rows``."""
        try:
            ready = prepared.result() if prepared is not None else self.featurise(batch)
        except Exception as e:  # the feature thread was shut down: every clip gets the error
            ready = Prepared({}, {i: e for i in rows})
        for i in list(rows):
            if i not in ready.features:
                out[i] = ready.errors.get(i) or timed_out(batch[i].timeout_s)
                rows.remove(i)
        return {i: ready.features[i] for i in rows} if rows else None

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
            lg = lg.detach().float().cpu()  # already on the host: the model copies once
            if not bool(torch.isfinite(lg).all()):
                self.metrics.nonfinite_outputs.labels(task).inc()
                log.error("non-finite scores from task %s", task, extra={"task": task})
                out[i] = task_failed(task, "its model gave non-finite scores (NaN or infinity) "
                                           "for this clip; its bundle is faulty")
            else:
                out[i] = (lg, tasks[task])

