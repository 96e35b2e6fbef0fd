"""Prometheus metrics (prefix ``aat_``), one registry per app so several apps can share a process.

Labels are bounded: ``task`` is a task the server knows (anything else is reported as
``_unknown``), ``outcome`` and ``reason`` come from the fixed error types.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

UNKNOWN_TASK = "_unknown"

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TASKS = (1, 2, 3, 4, 6, 8, 16, 32, 64)


class Metrics:
    """The service's metric catalogue."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # The standard series every Prometheus user expects (process_cpu_seconds_total,
        # process_resident_memory_bytes, python_gc_*, python_info): the library's own
        # collectors, shared by every app in the process since they describe the process.
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(standard)
        self.requests = Counter("aat_requests_total", "Classification requests by task and "
                                "outcome (ok or the error type).", ["task", "outcome"], registry=r)
        self.request_seconds = Histogram("aat_request_seconds", "Classification request time "
                                         "from body received to answer.", ["task"],
                                         buckets=_SECONDS, registry=r)
        self.queue_seconds = Histogram("aat_queue_seconds", "Time a clip waited for its batch.",
                                       ["task"], buckets=_SECONDS, registry=r)
        self.inference_seconds = Histogram("aat_inference_seconds", "Forward time of one batch.",
                                           buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("aat_batch_size", "Clips per forward batch.",
                                    buckets=_BATCH, registry=r)
        self.batch_tasks = Histogram("aat_batch_tasks", "Distinct tasks per forward batch "
                                     "(above 1 means batches mix tasks).", buckets=_TASKS,
                                     registry=r)
        self.queue_depth = Gauge("aat_queue_depth", "Requests admitted and not yet computed.",
                                 registry=r)
        self.tasks_resident = Gauge("aat_tasks_resident", "Tasks loaded in the model.",
                                    registry=r)
        self.bundle_loads = Counter("aat_bundle_loads_total", "Bundle loads into the model by "
                                    "source (upload, store) and outcome.", ["source", "outcome"],
                                    registry=r)
        self.bundle_load_seconds = Histogram("aat_bundle_load_seconds", "Time to validate and "
                                             "activate a bundle.", buckets=_SECONDS, registry=r)
        self.bundles_failed = Gauge("aat_bundles_failed", "1 for each task whose bundle in the "
                                    "store failed validation, loading or warm-up (skipped; a "
                                    "previous version, if any, still serves).", ["task"],
                                    registry=r)
        self.nonfinite_outputs = Counter("aat_nonfinite_outputs_total", "Clips whose scores "
                                         "were NaN or infinite (answered 500 task_failed).",
                                         ["task"], registry=r)
        # -- the task cache (service/paging.py): device <- host tier <- store on disk
        self.cache_hits = Counter("aat_task_cache_hits_total", "Task lookups that hit a tier: "
                                  "device (a request found its task resident), host (a cold "
                                  "task's bundle was in host memory).", ["tier"], registry=r)
        self.cache_misses = Counter("aat_task_cache_misses_total", "Task lookups that missed a "
                                    "tier: device (a request's task was not resident), host (a "
                                    "cold task's bundle was read from the store).", ["tier"],
                                    registry=r)
        self.evictions = Counter("aat_task_evictions_total", "Tasks evicted: device (an idle "
                                 "task unloaded to make room), host (a bundle dropped from host "
                                 "memory).", ["tier"], registry=r)
        self.task_loads = Counter("aat_task_loads_total", "Cold tasks loaded onto the device by "
                                  "source (host or disk).", ["source"], registry=r)
        self.task_load_seconds = Histogram("aat_task_load_seconds", "Time from a cold task's "
                                           "first request to its task being resident, by "
                                           "source.", ["source"], buckets=_SECONDS, registry=r)
        self.cache_bytes = Gauge("aat_task_cache_bytes", "Bytes of task weights held per tier: "
                                 "device (adapter pools, heads, prompts) and host (bundles).",
                                 ["tier"], registry=r)
        self.rejections = Counter("aat_rejections_total", "Requests refused, by reason (the "
                                  "error type).", ["reason"], registry=r)
        self.ready = Gauge("aat_ready", "1 once the backbone and preloaded tasks are warm.",
                           registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
