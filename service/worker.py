"""What runs on the inference thread: a batch's features, then one classify call.

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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aat_serve.adapters.errors import UnknownTaskError
from aat_serve.adapters.multitask import ServingModel
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.batch_features import BatchFeatures
from aat_serve.service.errors import ErrorType, ServiceError, task_failed, timed_out
from aat_serve.service.metrics import Metrics
from aat_serve.service.threads import inference_pool

if TYPE_CHECKING:
    from aat_serve.service.engine import Job

log = logging.getLogger(__name__)

Outcome = tuple[torch.Tensor, TaskInfo] | BaseException | None
"""A clip's outcome on the worker thread: (logits, the task that computed them) or an error."""


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
        """The batched filterbanks, on the model's device; used on the worker thread only."""
        self.threads = threads
        """The inference thread's torch intra-op threads (None: the process's count)."""
        self.executor: ThreadPoolExecutor = inference_pool(threads)
        """One thread; batches and model changes run in the order they were handed to it."""

    def run(self, batch: list[Job]) -> BatchRun:
        """``forward`` timed on the worker thread (queue and inference times of the clips)."""
        started = time.monotonic()
        outcomes = self.forward(batch)
        return BatchRun(outcomes, started, time.monotonic())

    def forward(self, batch: list[Job]) -> list[Outcome]:
        """The batch's features, then one classify call for every clip still due whose task
        is resident; a clip past its deadline (or given up) is answered 504 and neither
        featurised nor computed."""
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
            lg = lg.detach().float().cpu()  # already on the host: the model copies once
            if not bool(torch.isfinite(lg).all()):
                self.metrics.nonfinite_outputs.labels(task).inc()
                log.error("non-finite scores from task %s", task, extra={"task": task})
                out[i] = task_failed(task, "its model gave non-finite scores (NaN or infinity) "
                                           "for this clip; its bundle is faulty")
            else:
                out[i] = (lg, tasks[task])

