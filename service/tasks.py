"""TaskTable: the service's per-task state, one record per task, one owner.

What is loaded (and its version and manifest) is the model's (``TaskSlots``, read through
``ServingModel.tasks``); everything the service knows about a task beyond that lives in one
``TaskRecord`` here: the manifest of the bundle the store holds, the store stamp last synced,
and whether that file was refused and why; whether its bundle is in the host tier is the
pager's (``cached``). Forgetting
a task drops its whole record, so no fact about a deleted task can outlive the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from aat_serve.adapters.bundle import Manifest
from aat_serve.adapters.multitask import ServingModel
from aat_serve.adapters.slots import TaskInfo

Stamp = tuple[int, int]
"""A store file's identity (``StoreEntry.stamp``)."""


@dataclass(frozen=True)
class TaskRecord:
    """What the service knows about a task beyond its residency."""

    stored: Manifest | None = None
    """The manifest of the bundle the store holds (the catalogue), when read."""
    stamp: Stamp | None = None
    """The store file last synced (loaded, or catalogued without loading)."""
    refused: Stamp | None = None
    """The store file that was refused; not retried until the file changes."""
    reason: str | None = None
    """Why it was refused."""


class TaskTable:
    """Per-task records plus the model's resident tasks; read and written on the event loop."""

    def __init__(self, model: ServingModel,
                 cached: Callable[[str], bool] = lambda task: False) -> None:
        self._model = model
        self._cached = cached
        self._records: dict[str, TaskRecord] = {}

    # -- queries ------------------------------------------------------------------------------
    @property
    def resident(self) -> dict[str, TaskInfo]:
        """The loaded tasks, from the model (a snapshot)."""
        return self._model.tasks

    def record(self, task: str) -> TaskRecord:
        """``task``'s record (an empty one for a task the service knows nothing about)."""
        return self._records.get(task, TaskRecord())

    @property
    def catalogue(self) -> dict[str, Manifest]:
        """Every task the store holds (resident or not), by name."""
        return {t: r.stored for t, r in self._records.items() if r.stored is not None}

    def names(self) -> set[str]:
        return set(self._records)

    def failed_names(self) -> set[str]:
        """Tasks whose latest store file was refused (some may still serve an older one)."""
        return {t for t, r in self._records.items() if r.reason is not None}

    # -- changes ------------------------------------------------------------------------------
    def _update(self, task: str, **changes: object) -> None:
        self._records[task] = dataclasses.replace(self.record(task), **changes)

    def stored(self, task: str, manifest: Manifest) -> None:
        """The store holds ``manifest`` for ``task``."""
        self._update(task, stored=manifest)

    def synced(self, task: str, stamp: Stamp, manifest: Manifest) -> None:
        """The store file ``stamp`` holding ``manifest`` is catalogued (or already resident)."""
        self._update(task, stored=manifest, stamp=stamp)

    def loaded(self, task: str, stamp: Stamp, manifest: Manifest) -> None:
        """The store file ``stamp`` holding ``manifest`` was loaded: it is in effect and not
        refused any more."""
        self._update(task, stored=manifest, stamp=stamp, refused=None, reason=None)

    def refused(self, task: str, stamp: Stamp, reason: str) -> None:
        """The store file ``stamp`` failed validation or loading: not retried until it changes."""
        self._update(task, refused=stamp, reason=reason)

    def failed(self, task: str, reason: str) -> None:
        """The file last loaded (``stamp``) failed its warm-up and was unloaded."""
        self._update(task, refused=self.record(task).stamp, reason=reason)

    def state(self, task: str) -> str:
        """What ``GET /tasks`` says of ``task`` (docs/service.md): ``active`` (resident and
        serving), ``failed`` (its store file was refused and no version of it serves),
        ``cached`` (in the store and in host memory: loads without reading its file) or
        ``stored`` (in the store, loaded on its next request)."""
        if task in self.resident:
            return "active"
        record = self.record(task)
        if record.reason is not None:
            return "failed"
        return "cached" if self._cached(task) else "stored"

    def forget(self, task: str) -> None:
        """Drop everything recorded about ``task`` (deleted, or gone from the store)."""
        self._records.pop(task, None)
