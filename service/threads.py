"""Threads of the service and how many torch threads each runs: decode pool and inference.

A decode thread decodes and resamples one short clip at a time; torch's intra-op parallelism on
such small tensors buys nothing and, with several decode threads and the inference thread
sharing the cores, oversubscribes them (each decode thread would start an OpenMP team as large
as the machine). So every decode thread sets its own OpenMP/MKL team to one thread when it
starts.

The inference thread runs ``inference_threads(cores)`` intra-op threads: every core but one, so
the event loop, the decode threads (and, on a benchmark machine, the load generator) keep a core
of their own. On two cores that is one thread: an OpenMP team of two meets at a barrier after
every op, and each time the event loop or a decode thread holds one of the two cores the whole
op waits for it (docs/benchmarks.md, "Serving at the model's speed").

``torch.set_num_threads`` also stores the count as the default that threads created later pick
up on their first torch op; that default is put back at once (from a short-lived helper thread,
so the calling thread keeps its own setting).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def inference_threads(cores: int | None = None) -> int:
    """The inference thread's torch intra-op threads by default: ``cores - 1``, at least 1
    (``cores``: ``usable_cores()`` when None)."""
    return max(1, (cores or usable_cores()) - 1)


def torch_threads(n: int) -> None:
    """Run this thread's torch ops on ``n`` intra-op threads, leaving the process default as it
    was for threads started later."""
    previous = torch.get_num_threads()  # also fixes this thread's own setting from now on
    torch.set_num_threads(n)
    if previous != n:
        restore = threading.Thread(target=torch.set_num_threads, args=(previous,),
                                   name="aat-restore-threads")
        restore.start()
        restore.join()


def single_threaded_torch() -> None:
    """Run this thread's torch ops on one intra-op thread (the decode threads)."""
    torch_threads(1)


def decode_pool(workers: int | None, name: str = "aat-decode") -> ThreadPoolExecutor:
    """``workers`` decode threads (None: one per usable core), each single-threaded in torch."""
    return ThreadPoolExecutor(workers or usable_cores(), thread_name_prefix=name,
                              initializer=single_threaded_torch)


def inference_pool(threads: int | None, name: str = "aat-infer") -> ThreadPoolExecutor:
    """The one inference thread, running torch on ``threads`` intra-op threads (None: the
    process's count as it is, e.g. in tests and tools that set it themselves)."""
    if threads is None:
        return ThreadPoolExecutor(1, thread_name_prefix=name)
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=torch_threads,
                              initargs=(threads,))
