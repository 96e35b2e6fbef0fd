"""Pager: the resident task slots as a cache over the bundle store (issue 24).

Three tiers: the device (``TaskSlots``: resident tasks, bounded by ``AAT_MAX_TASKS`` and
``AAT_DEVICE_TASK_MB``), host memory (``HostTier``: validated bundles, bounded by
``AAT_HOST_CACHE_MB``) and the store on disk (any number of tasks). This object holds the
mechanics the registry's cold path needs:

* requests in flight per task: counted from the moment a request names its task until it is
  answered, so a task with queued or running clips is never evicted;
* the LRU order (``LruOrder``) and eviction: the least recently used resident task with no
  request in flight, no running batch holding its slot and not pinned (``AAT_PINNED_TASKS``);
  evicting it is an unload (cheap bookkeeping, done on the event loop so that it is atomic
  with the in-flight counts) and a touch in the host tier, which still holds its bundle;
* the loader thread: a load (tensors copied onto the device, pool rows written) runs there,
  never on the inference thread and never through the engine's control queue, so hot tasks'
  batches keep flowing while a cold task loads; the requests of that task wait for it alone.
  One exception (``loads_inline``): a host-tier bundle on a CPU model with a free slot and row
  is a few row copies, done on the event loop without the two thread hand-offs;
* single flight: concurrent requests for one cold task share one load;
* the metrics of all this (``service/metrics.py``, documented in docs/service.md).

The caller (``Registry``) serialises model changes with its lock; the pager keeps no lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.host_tier import HostTier
from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.adapters.residency import LruOrder
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.errors import overloaded
from aat_serve.service.metrics import Metrics


@dataclass(frozen=True)
class Loaded:
    """How a request's cold task was loaded: ``source`` (``host`` or ``disk``) and the seconds
    from the load's start (its first request) to the task being resident."""

    source: str
    seconds: float


IDLE_POLL_S = 0.05
"""How often a cold request waiting for an idle victim looks again (besides being woken when a
task's last request is answered), so a batch pin released late is noticed too."""


class Pager:
    """In-flight counts, LRU eviction, the host tier, the loader thread and single flight."""

    def __init__(self, model: MultiTaskModel, metrics: Metrics, *, host_bytes: int,
                 pinned: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.metrics = metrics
        self.lru = LruOrder(pinned)
        self.host = HostTier(host_bytes)
        self._inflight: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._flights: dict[str, asyncio.Future] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aat-loader")

    def close(self) -> None:
        self._loader.shutdown(wait=True)

    # -- requests in flight ---------------------------------------------------------------
    @contextmanager
    def in_flight(self, task: str) -> Iterator[None]:
        """Count a request of ``task`` while it is being answered (its task is never evicted
        meanwhile)."""
        self._inflight[task] = self._inflight.get(task, 0) + 1
        try:
            yield
        finally:
            n = self._inflight[task] - 1
            if n:
                self._inflight[task] = n
            else:
                del self._inflight[task]
                self._idle.set()

    def inflight(self, task: str) -> int:
        return self._inflight.get(task, 0)

    def idle(self, task: str) -> bool:
        """No request in flight and no running batch holding its slot."""
        return task not in self._inflight and not self.model.slots.busy(task)

    def hit(self, task: str, counted: bool = True) -> None:
        """A request found ``task`` resident (``counted``: its first lookup of the task; a
        front end's second call for the same request only keeps the task recent)."""
        self.lru.touch(task)
        if counted:
            self.metrics.cache_hits.labels("device").inc()

    # -- room on the device ---------------------------------------------------------------
    def has_place(self) -> bool:
        """Whether one more task would likely fit without evicting (a slot free and a row's
        bytes left); ``TaskSlots.room_for`` is the exact check once the bundle is read."""
        slots = self.model.slots
        if len(self.model.tasks) >= slots.max_tasks:
            return False
        return (slots.device_budget is None
                or slots.used_nbytes() + slots.row_nbytes <= slots.device_budget)

    def make_room(self, bundle: TaskBundle) -> bool:
        """Evict idle least recently used tasks until ``bundle`` fits; whether it does. Runs on
        the event loop (atomic with the in-flight counts); the caller holds the registry lock,
        so no load runs meanwhile."""
        task = bundle.manifest.task
        while not self.model.slots.room_for(bundle):
            victim = self.lru.victim(set(self.model.tasks), self.idle, exclude={task})
            if victim is None:
                return False
            self.evicted(victim)
            self.model.unload_task(victim)
            self.metrics.evictions.labels("device").inc()
        return True

    def evicted(self, task: str) -> None:
        """``task`` leaves the device: out of the LRU order, most recent in the host tier."""
        self.lru.forget(task)
        self.host.touch(task)

    def busy_error(self, task: str) -> Exception:
        """503 for a cold task when no resident task can be evicted."""
        n = len(self.model.tasks)
        return overloaded(f"cannot load task {task!r}: all {n} resident tasks are busy (requests "
                          "in flight, or pinned by AAT_PINNED_TASKS) and the device holds no "
                          "more (AAT_MAX_TASKS, AAT_DEVICE_TASK_MB); retry later", 1)

    async def wait_idle(self, task: str, deadline: float) -> None:
        """Wait until some task may have become idle, or 503 once ``deadline`` passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self.busy_error(task)
        self._idle.clear()
        with suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._idle.wait(), min(remaining, IDLE_POLL_S))

    def loads_inline(self, source: str) -> bool:
        """Whether a load from ``source`` runs on the event loop instead of the loader thread:
        a host-tier bundle on a CPU model with a free slot and pool row. That load is a few
        row copies in host memory (0.5 ms for a demo bundle), cheaper than the two thread
        hand-offs around it (each a GIL or scheduler switch on a busy machine: the host-tier
        load p99 was 51 ms through the thread, docs/benchmarks.md). A GPU copy, a disk bundle
        or a load that must wait for a slot or grow the pools goes to the loader thread, so
        the event loop never waits behind a batch."""
        return (source == "host" and self.model.device.type == "cpu"
                and self.model.slots.loads_without_waiting())

    async def load(self, bundle: TaskBundle, source: str, started: float
                   ) -> tuple[TaskInfo, Loaded]:
        """Load ``bundle`` (inline or on the loader thread, ``loads_inline``); counted as a
        load from ``source``."""
        if self.loads_inline(source):
            self.model.load_task(bundle)
        else:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._loader, self.model.load_task, bundle)
        task = bundle.manifest.task
        self.lru.touch(task)
        seconds = time.monotonic() - started
        self.metrics.task_loads.labels(source).inc()
        self.metrics.task_load_seconds.labels(source).observe(seconds)
        self.update_gauges()
        return self.model.tasks[task], Loaded(source, seconds)

    def cache_bundle(self, task: str, key: Any, bundle: TaskBundle) -> None:
        """Keep a validated bundle in the host tier (counting what it pushes out)."""
        for _ in self.host.put(task, key, bundle):
            self.metrics.evictions.labels("host").inc()
        self.update_gauges()

    # -- single flight --------------------------------------------------------------------
    async def single_flight(self, task: str,
                            load: Callable[[], Awaitable[tuple[TaskInfo, Loaded]]]
                            ) -> tuple[TaskInfo, Loaded]:
        """``load()``'s result, shared by every request for ``task`` that arrives while it
        runs (one load per cold task, whoever asks). The load is a task of its own, so a
        request that goes away (a client disconnect) does not cancel it for the others."""
        flight = self._flights.get(task)
        if flight is None:
            flight = asyncio.ensure_future(load())
            self._flights[task] = flight

            def landed(f: asyncio.Future) -> None:
                if self._flights.get(task) is f:
                    del self._flights[task]
                if not f.cancelled():
                    f.exception()  # retrieved: no warning when nobody waited any more

            flight.add_done_callback(landed)
        return await asyncio.shield(flight)

    # -- reporting ------------------------------------------------------------------------
    def update_gauges(self) -> None:
        self.metrics.tasks_resident.set(len(self.model.tasks))
        self.metrics.cache_bytes.labels("device").set(self.model.slots.used_nbytes())
        self.metrics.cache_bytes.labels("host").set(self.host.nbytes)

    def summary(self, stored: int) -> dict[str, Any]:
        """Budgets and usage per tier (``GET /tasks``' ``cache``, the start-up log)."""
        slots = self.model.slots
        return {"resident": len(self.model.tasks), "cached": len(self.host), "stored": stored,
                "max_tasks": slots.max_tasks, "device_budget_bytes": slots.device_budget,
                "device_bytes": slots.used_nbytes(), "host_budget_bytes": self.host.budget_bytes,
                "host_bytes": self.host.nbytes, "pinned": sorted(self.lru.pinned)}
