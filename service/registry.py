"""The task registry: keeps the model's resident tasks in step with the bundle store.

* ``put`` validates an upload completely (format, manifest, names, shapes, finite values,
  content-hash version, backbone fingerprint) before anything changes, then writes it to the
  store atomically and activates it; a failed activation rolls the store back.
* ``refresh`` rescans the store (periodically, and for one task on a miss), loading new or
  changed bundles and unloading deleted ones, so replicas sharing a store converge.
* With ``preload="lazy"`` a task is loaded on its first request instead of at start-up.
* Isolation: a store file that fails validation, loading or its warm-up batch is logged,
  recorded as failed (``GET /tasks``, ``aat_bundles_failed``) and skipped; every other task
  serves. A version that fails validation or loading never replaces the one serving; one that
  loads but fails its warm-up is unloaded, and the previous version is loaded back when the
  store still holds its file (uploaded versions keep it; a hand-placed file replaced in place
  does not).

Store, model and catalogue changes are serialised by one lock; validation runs before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import Manifest, TaskBundle, content_version, read_manifest
from aat_serve.adapters.errors import AATError, BundleError, SlotsFullError, UnknownTaskError
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.engine import Engine
from aat_serve.service.errors import ErrorType, ServiceError, task_failed
from aat_serve.service.metrics import Metrics
from aat_serve.service.store import BundleStore, StoreEntry
from aat_serve.service.tasks import TaskTable
from aat_serve.service.warmup import warm_up_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PutResult:
    task: str
    version: str
    previous_version: str | None
    created: bool
    unchanged: bool


class Registry:
    """Bundle store <-> resident tasks; per-task state lives in ``tasks`` (``TaskTable``)."""

    def __init__(self, engine: Engine, store: BundleStore | None, backbone: AST,
                 fingerprint: str, metrics: Metrics, *, lazy: bool, max_tasks: int) -> None:
        self.engine = engine
        self.store = store
        self.backbone = backbone
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.lazy = lazy
        self.max_tasks = max_tasks
        self.tasks = TaskTable(engine.model)
        self._lock = asyncio.Lock()

    @property
    def catalogue(self) -> dict[str, Manifest]:
        """Every task the store holds (resident or not), by name."""
        return self.tasks.catalogue

    # -- validation (no side effects; runs in a thread) -----------------------------------
    def validate(self, data: bytes, task: str) -> TaskBundle:
        """Parse and check a bundle for ``task`` against this backbone, or raise."""
        bundle = TaskBundle.from_bytes(data)  # format, manifest, names, shapes, finite values
        m = bundle.manifest
        if m.task != task:
            raise BundleError(f"the bundle is for task {m.task!r}, not {task!r}")
        actual = content_version(bundle.tensors, m)
        if m.version != actual:
            raise BundleError(f"the bundle's version {m.version!r} does not match its content "
                              f"hash {actual!r}")
        bundle.check_backbone(self.backbone, self.fingerprint)  # BackboneMismatchError
        return bundle

    def _read(self, entry: StoreEntry) -> TaskBundle:
        try:
            data = entry.path.read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read {entry.path}: {e.strerror}") from None
        return self.validate(data, entry.task)

    # -- upload and delete ----------------------------------------------------------------
    async def put(self, task: str, data: bytes) -> PutResult:
        """Validate, store and activate an uploaded bundle; nothing changes if it is refused."""
        started = time.monotonic()
        try:
            bundle = await asyncio.to_thread(self.validate, data, task)
        except AATError:
            self.metrics.bundle_loads.labels("upload", "refused").inc()
            raise
        version = bundle.manifest.version
        async with self._lock:
            current = self.engine.tasks.get(task)
            entry = await asyncio.to_thread(self.store.entry, task)
            if (current is not None and current.version == version and entry is not None
                    and entry.version == version):
                return PutResult(task, version, version, created=False, unchanged=True)
            if current is None and len(self.engine.tasks) >= self.max_tasks:
                raise SlotsFullError(f"cannot add task {task!r}: all {self.max_tasks} task "
                                     "slots are in use (AAT_MAX_TASKS); delete a task first")
            stored = self.tasks.record(task).stored
            previous = current.version if current is not None else (
                stored.version if stored is not None else None)
            new_entry = await asyncio.to_thread(self.store.put, task, version, data)
            try:
                await self.engine.load(bundle)
            except BaseException:
                await asyncio.to_thread(self._roll_back, task, entry)
                self.metrics.bundle_loads.labels("upload", "failed").inc()
                raise
            await asyncio.to_thread(self.store.drop_seed, task)
            self.tasks.loaded(task, new_entry.stamp, bundle.manifest)
            self._failed_metric(task, False)
        self.metrics.bundle_loads.labels("upload", "ok").inc()
        self.metrics.bundle_load_seconds.observe(time.monotonic() - started)
        log.info("task activated", extra={"task": task, "version": version,
                                          "previous_version": previous, "source": "upload"})
        return PutResult(task, version, previous, created=previous is None, unchanged=False)

    def _roll_back(self, task: str, previous: StoreEntry | None) -> None:
        try:
            if previous is not None and previous.version:
                self.store.activate(task, previous.version)
            elif previous is None:
                self.store.delete(task)
        except (OSError, AATError):
            log.exception("could not roll back the store for task %s", task)

    async def delete(self, task: str) -> str:
        """Deactivate and remove ``task`` from the store and the model; its last version."""
        async with self._lock:
            entry = await asyncio.to_thread(self.store.entry, task)
            info = self.engine.tasks.get(task)
            if entry is None and info is None:
                raise UnknownTaskError(f"unknown task {task!r}")
            if entry is not None and entry.read_only:
                raise ServiceError(ErrorType.FORBIDDEN, f"task {task!r} is a read-only demo "
                                   "task (AAT_DEMO); upload a bundle of that name to replace "
                                   "it, or serve without the demo tasks (--no-demo)")
            stored = self.tasks.record(task).stored
            if info is not None:
                version = info.version
            elif stored is not None:
                version = stored.version
            else:
                version = entry.version or ""
            await asyncio.to_thread(self.store.delete, task)
            await self.engine.unload(task)
            self.tasks.forget(task)
            self._failed_metric(task, False)
        log.info("task deleted", extra={"task": task, "version": version})
        return version

    # -- lookups --------------------------------------------------------------------------
    async def resolve(self, task: str) -> TaskInfo:
        """The resident task, loading it from the store on a miss; else ``UnknownTaskError``."""
        info = self.engine.tasks.get(task)
        if info is not None:
            return info
        if self.store is not None:
            await self.refresh(only=task)
        info = self.engine.tasks.get(task)
        if info is None:
            reason = self.tasks.record(task).reason
            if reason is not None:
                raise task_failed(task, f"its bundle in the store failed: {reason}")
            if task in self.catalogue and len(self.engine.tasks) >= self.max_tasks:
                raise SlotsFullError(f"cannot load task {task!r}: all {self.max_tasks} task "
                                     "slots are in use (AAT_MAX_TASKS)")
            raise UnknownTaskError(f"unknown task {task!r}")
        return info

    def manifest(self, task: str) -> Manifest | None:
        info = self.engine.tasks.get(task)
        if info is not None:
            return info.manifest
        return self.tasks.record(task).stored

    # -- store synchronisation ------------------------------------------------------------
    async def refresh(self, only: str | None = None) -> None:
        """Bring the catalogue and the resident tasks in line with the store.

        ``only`` limits the scan to one task and loads it even in lazy mode (a miss). Every
        version loaded here runs a warm-up batch before the rescan ends; a failing one is
        unloaded and marked failed.
        """
        if self.store is None:
            return
        async with self._lock:
            if only is None:
                entries = await asyncio.to_thread(self.store.scan)
                names = set(entries) | set(self.engine.tasks) | self.tasks.names()
            else:
                e = await asyncio.to_thread(self.store.entry, only)
                entries = {only: e} if e is not None else {}
                names = {only}
            loaded: dict[str, str | None] = {}  # task -> the version it replaced
            for task in sorted(names):
                entry = entries.get(task)
                if entry is None:
                    await self._forget(task)
                    continue
                previous = self.engine.tasks.get(task)
                if await self._sync(entry, load=not self.lazy or only == task):
                    loaded[task] = previous.version if previous is not None else None
            if loaded:
                await self._warm_up(loaded)

    async def _warm_up(self, loaded: dict[str, str | None]) -> None:
        """Warm the tasks just loaded; unload each that fails, restoring its previous version
        when the store still holds that file."""
        failures = await self.engine.control(
            lambda: warm_up_tasks(self.engine.model, list(loaded), self.engine.capacity))
        for task, reason in sorted(failures.items()):
            await self.engine.unload(task)
            self.tasks.failed(task, reason)
            self._failed_metric(task, True)
            self.metrics.bundle_loads.labels("store", "warm_up_failed").inc()
            log.error("task failed its warm-up; unloaded: %s", reason, extra={"task": task})
            if loaded[task] is not None:
                await self._restore(task, loaded[task])

    async def _restore(self, task: str, version: str) -> None:
        """Load ``task``'s stored ``version`` back (it served before a failed replacement)."""
        path = self.store.version_path(task, version)
        try:
            bundle = await asyncio.to_thread(self.validate, path.read_bytes(), task)
            await self.engine.load(bundle)
        except (OSError, AATError) as e:
            log.error("could not restore version %s of task %s: %s", version, task, e,
                      extra={"task": task})
            return
        log.info("previous version restored", extra={"task": task, "version": version})

    async def _forget(self, task: str) -> None:
        if task in self.engine.tasks:
            await self.engine.unload(task)
            log.info("task removed from the store; unloaded", extra={"task": task})
        self.tasks.forget(task)
        self._failed_metric(task, False)

    def _failed_metric(self, task: str, failed: bool) -> None:
        if failed:
            self.metrics.bundles_failed.labels(task).set(1)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.bundles_failed.remove(task)

    async def _sync(self, entry: StoreEntry, *, load: bool) -> bool:
        """Catalogue (and, with ``load``, load) ``entry``; whether a version was loaded."""
        task = entry.task
        resident = self.engine.tasks.get(task)
        record = self.tasks.record(task)
        if record.stamp == entry.stamp and (resident is not None or not load):
            return False
        if record.refused == entry.stamp:
            return False  # already reported; wait for the file to change
        try:
            manifest = await asyncio.to_thread(read_manifest, entry.path)
            if manifest.task != task:
                raise BundleError(f"the bundle is for task {manifest.task!r}, not {task!r}")
            if resident is not None and resident.version == manifest.version:
                self.tasks.synced(task, entry.stamp, resident.manifest)
                return False
            self.tasks.stored(task, manifest)  # in the store, resident or not
            if resident is None and not load:
                self.tasks.synced(task, entry.stamp, manifest)
                return False
            if resident is None and len(self.engine.tasks) >= self.max_tasks:
                if self.tasks.waiting(task):  # say it once, not on every rescan
                    log.warning("no free task slot for %s (AAT_MAX_TASKS=%d)", task,
                                self.max_tasks, extra={"task": task})
                    self.metrics.bundle_loads.labels("store", "slots_full").inc()
                return False  # the stamp stays old: retried on the next rescan or request
            started = time.monotonic()
            bundle = await asyncio.to_thread(self._read, entry)
            await self.engine.load(bundle)
        except Exception as e:  # one bad file never stops the others
            self._refuse(entry, e)
            return False
        self.metrics.bundle_loads.labels("store", "ok").inc()
        self.metrics.bundle_load_seconds.observe(time.monotonic() - started)
        self.tasks.loaded(task, entry.stamp, bundle.manifest)
        self._failed_metric(task, False)
        log.info("task activated", extra={"task": task, "version": bundle.manifest.version,
                                          "previous_version": resident.version if resident
                                          else None, "source": "store"})
        return True

    def _refuse(self, entry: StoreEntry, e: Exception) -> None:
        """Record ``entry`` as failed: logged, listed with its reason, counted, skipped."""
        task = entry.task
        reason = str(e) if isinstance(e, AATError) else f"{type(e).__name__}: {e}"
        self.tasks.refused(task, entry.stamp, reason)
        self._failed_metric(task, True)
        self.metrics.bundle_loads.labels("store", "refused").inc()
        log.error("store bundle refused: %s", reason, exc_info=not isinstance(e, AATError),
                  extra={"task": task, "path": str(entry.path)})
