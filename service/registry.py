"""The task registry: keeps the model's resident tasks in step with the bundle store.

* ``put`` validates an upload completely (format, manifest, names, shapes, finite values,
  content-hash version, backbone fingerprint) before anything changes, then writes it to the
  store atomically and activates it; a failed activation rolls the store back.
* ``refresh`` rescans the store periodically: a resident task whose file changed is replaced,
  a deleted one unloaded, the others catalogued, so replicas sharing a store converge.
* Paging (issue 24, ``service/paging.py``): the store may hold any number of tasks; the
  resident ones are a cache over it. Start-up (``preload="eager"``) loads the store in name
  order while there is room without evicting (a deterministic choice: there is no usage history
  yet) and catalogues the rest from their headers; ``preload="lazy"`` loads nothing ahead.
  Every bundle read and validated is kept in the host tier. A request for a task that is not
  resident loads it (``resolve``): from the host tier, else from its file (read and validated
  in a thread), into a free place or in place of the least recently used idle task, on the
  pager's loader thread, one load per task however many requests wait. If every resident task
  is busy, the request waits (until its deadline) for one to become idle, else 503. A store
  task is never refused for lack of slots. A paged load runs no warm-up batch (it would queue
  behind the hot tasks' clips); the engine's per-clip check still answers non-finite scores
  with 500 ``task_failed``.
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
from aat_serve.adapters.errors import AATError, BundleError, UnknownTaskError
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.engine import Engine
from aat_serve.service.errors import ErrorType, ServiceError, task_failed
from aat_serve.service.metrics import Metrics
from aat_serve.service.paging import Loaded, Pager
from aat_serve.service.store import BundleStore, StoreEntry
from aat_serve.service.tasks import Stamp, TaskTable
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
                 fingerprint: str, metrics: Metrics, pager: Pager, *, lazy: bool,
                 timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.store = store
        self.backbone = backbone
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.pager = pager
        self.lazy = lazy
        self.timeout_s = timeout_s
        """How long a cold request waits for an idle task to evict (AAT_REQUEST_TIMEOUT_S)."""
        self.tasks = TaskTable(engine.model, cached=pager.host.__contains__)
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
            if not self.pager.make_room(bundle):
                raise self.pager.busy_error(task)
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
            self.pager.lru.touch(task)
            self.pager.cache_bundle(task, new_entry.stamp, bundle)
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
            self._drop(task)
        log.info("task deleted", extra={"task": task, "version": version})
        return version

    # -- lookups --------------------------------------------------------------------------
    async def resolve(self, task: str, *, again: bool = False) -> tuple[TaskInfo, Loaded | None]:
        """The resident task and how this request got it: None (it was resident), or the load
        it waited for (from ``host`` or ``disk``, and its seconds). ``UnknownTaskError`` for a
        task the store lacks, 500 ``task_failed`` for a refused file, 503 when no task can make
        room. The caller counts the request in flight (``Pager.in_flight``) while this runs.
        ``again``: the request already looked the task up (a front end's second call), so
        finding it resident is no new cache hit."""
        info = self.engine.tasks.get(task)
        if info is not None:
            self.pager.hit(task, counted=not again)
            return info, None
        self.metrics.cache_misses.labels("device").inc()
        if self.store is None:
            raise UnknownTaskError(f"unknown task {task!r}")
        return await self.pager.single_flight(task, lambda: self._page_in(task))

    async def _page_in(self, task: str) -> tuple[TaskInfo, Loaded]:
        """Load the store's ``task`` onto the device (the cold path; see the module doc)."""
        started = time.monotonic()
        deadline = started + self.timeout_s
        for _ in range(3):
            bundle, stamp, source = await self._cold_bundle(task)
            while True:
                async with self._lock:
                    placed = await self._place(task, bundle, stamp, source, started)
                if placed == "changed":  # its file changed meanwhile: read it again
                    break
                if placed is not None:
                    return placed
                await self.pager.wait_idle(task, deadline)
        raise task_failed(task, "its store file kept changing while it loaded")

    async def _cold_bundle(self, task: str) -> tuple[TaskBundle, Stamp, str]:
        """(bundle, its file's stamp, ``host`` or ``disk``). The host tier is asked for the
        file last synced without touching the store (a changed file is noticed by the next
        rescan, as it is for resident tasks); otherwise the file is looked up and read."""
        record = self.tasks.record(task)
        if record.stamp is not None and record.refused != record.stamp:
            bundle = self.pager.host.get(task, record.stamp)
            if bundle is not None:
                self.metrics.cache_hits.labels("host").inc()
                return bundle, record.stamp, "host"
        entry = await asyncio.to_thread(self.store.entry, task)
        if entry is None:
            async with self._lock:
                await self._forget(task)
            raise UnknownTaskError(f"unknown task {task!r}")
        record = self.tasks.record(task)
        if record.refused == entry.stamp:
            raise task_failed(task, f"its bundle in the store failed: {record.reason}")
        bundle = self.pager.host.get(task, entry.stamp)
        if bundle is not None:
            self.metrics.cache_hits.labels("host").inc()
            return bundle, entry.stamp, "host"
        self.metrics.cache_misses.labels("host").inc()
        return await self._read_cold(entry), entry.stamp, "disk"

    async def _place(self, task: str, bundle: TaskBundle, stamp: Stamp, source: str,
                     started: float) -> tuple[TaskInfo, Loaded] | str | None:
        """Under the lock: make room and load; None when every resident task is busy,
        ``"changed"`` when the store's file changed since it was read."""
        record = self.tasks.record(task)
        if record.stored is None:  # deleted meanwhile
            raise UnknownTaskError(f"unknown task {task!r}")
        if record.stamp not in (None, stamp):
            return "changed"
        info = self.engine.tasks.get(task)
        if info is not None:  # loaded meanwhile (an upload or a rescan)
            return info, Loaded(source, time.monotonic() - started)
        if not self.pager.make_room(bundle):
            return None
        try:
            info, loaded = await self.pager.load(bundle, source, started)
        except AATError as e:  # e.g. adapters wider than this model's slots
            self._refuse_stamp(task, stamp, e)
            raise task_failed(task, f"its bundle in the store failed: {e}") from None
        self.tasks.loaded(task, stamp, bundle.manifest)
        self._failed_metric(task, False)
        return info, loaded

    async def _read_cold(self, entry: StoreEntry) -> TaskBundle:
        """Read and validate ``entry`` in a thread into the host tier; a bad file is refused
        (recorded failed) and answered 500 ``task_failed``."""
        try:
            bundle = await asyncio.to_thread(self._read, entry)
        except AATError as e:
            async with self._lock:
                self._refuse(entry, e)
            raise task_failed(entry.task, f"its bundle in the store failed: {e}") from None
        self.tasks.stored(entry.task, bundle.manifest)
        self.pager.cache_bundle(entry.task, entry.stamp, bundle)
        return bundle

    def manifest(self, task: str) -> Manifest | None:
        info = self.engine.tasks.get(task)
        if info is not None:
            return info.manifest
        return self.tasks.record(task).stored

    # -- store synchronisation ------------------------------------------------------------
    async def refresh(self) -> None:
        """Bring the catalogue and the resident tasks in line with the store.

        A resident task whose file changed is replaced; a task not resident is catalogued, and
        loaded only by eager preload while the device has room without evicting. Every version
        loaded here runs a warm-up batch before the rescan ends; a failing one is unloaded and
        marked failed.
        """
        if self.store is None:
            return
        async with self._lock:
            entries = await asyncio.to_thread(self.store.scan)
            names = set(entries) | set(self.engine.tasks) | self.tasks.names()
            loaded: dict[str, str | None] = {}  # task -> the version it replaced
            for task in sorted(names):
                entry = entries.get(task)
                if entry is None:
                    await self._forget(task)
                    continue
                previous = self.engine.tasks.get(task)
                if await self._sync(entry, load=not self.lazy):
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
        self._drop(task)

    def _drop(self, task: str) -> None:
        """Forget everything about ``task`` (deleted, or gone from the store)."""
        self.tasks.forget(task)
        self.pager.lru.forget(task)
        self.pager.host.discard(task)
        self.pager.update_gauges()
        self._failed_metric(task, False)

    def _failed_metric(self, task: str, failed: bool) -> None:
        if failed:
            self.metrics.bundles_failed.labels(task).set(1)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.bundles_failed.remove(task)

    async def _sync(self, entry: StoreEntry, *, load: bool) -> bool:
        """Catalogue ``entry``; load it when it replaces a resident version, or with ``load``
        (eager preload) when it fits without evicting; whether a version was loaded."""
        task = entry.task
        resident = self.engine.tasks.get(task)
        record = self.tasks.record(task)
        load = load and self.pager.has_place()
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
            if record.stamp not in (None, entry.stamp):
                self.pager.host.discard(task)  # the file changed: its cached copy is stale
            if resident is None and not load:
                self.tasks.synced(task, entry.stamp, manifest)
                return False
            started = time.monotonic()
            bundle = (self.pager.host.get(task, entry.stamp)
                      or await asyncio.to_thread(self._read, entry))
            self.pager.cache_bundle(task, entry.stamp, bundle)
            if resident is None and not self.pager.model.slots.room_for(bundle):
                self.tasks.synced(task, entry.stamp, manifest)  # cached; loads on a request
                return False
            if resident is not None and not self.pager.make_room(bundle):
                return False  # every other task busy: the stamp stays old, retried next time
            await self.engine.load(bundle)
        except Exception as e:  # one bad file never stops the others
            self._refuse(entry, e)
            return False
        self.metrics.bundle_loads.labels("store", "ok").inc()
        self.metrics.bundle_load_seconds.observe(time.monotonic() - started)
        self.tasks.loaded(task, entry.stamp, bundle.manifest)
        self._failed_metric(task, False)
        self.pager.update_gauges()
        log.info("task activated", extra={"task": task, "version": bundle.manifest.version,
                                          "previous_version": resident.version if resident
                                          else None, "source": "store"})
        return True

    def _refuse(self, entry: StoreEntry, e: Exception) -> None:
        """Record ``entry`` as failed: logged, listed with its reason, counted, skipped."""
        self._refuse_stamp(entry.task, entry.stamp, e, str(entry.path))

    def _refuse_stamp(self, task: str, stamp: Stamp, e: Exception, path: str = "") -> None:
        reason = str(e) if isinstance(e, AATError) else f"{type(e).__name__}: {e}"
        self.tasks.refused(task, stamp, reason)
        self._failed_metric(task, True)
        self.metrics.bundle_loads.labels("store", "refused").inc()
        log.error("store bundle refused: %s", reason, exc_info=not isinstance(e, AATError),
                  extra={"task": task, "path": path})
