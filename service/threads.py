"""The decode pool: one thread per core, each running torch on one intra-op thread.

A decode thread resamples and computes features for one short clip at a time; torch's intra-op
parallelism on such small tensors buys nothing and, with several decode threads and the
inference thread sharing the cores, oversubscribes them (each decode thread would start an
OpenMP team as large as the machine). So every decode thread sets its own OpenMP/MKL team to one
thread when it starts.

``torch.set_num_threads`` also stores the count as the default that threads created later pick
up on their first torch op; that default is put back at once (from a short-lived helper thread,
so the decode thread keeps its own setting), and the inference thread, started and warmed up
before any decode thread exists, keeps torch's full count.
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


def single_threaded_torch() -> None:
    """Run this thread's torch ops on one intra-op thread, leaving the process default as it
    was for threads started later."""
    previous = torch.get_num_threads()  # also fixes this thread's own setting from now on
    torch.set_num_threads(1)
    if previous != 1:
        restore = threading.Thread(target=torch.set_num_threads, args=(previous,),
                                   name="aat-restore-threads")
        restore.start()
        restore.join()


def decode_pool(workers: int | None, name: str = "aat-decode") -> ThreadPoolExecutor:
    """``workers`` decode threads (None: one per usable core), each single-threaded in torch."""
    return ThreadPoolExecutor(workers or usable_cores(), thread_name_prefix=name,
                              initializer=single_threaded_torch)
