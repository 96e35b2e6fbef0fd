"""The paging benchmark's load: client processes sending Zipf-drawn tasks, closed loop.

Each worker is its own process (``multiprocessing`` spawn: its own interpreter, nothing shared
with the server) and imports only numpy and httpx. It draws task ranks from a Zipf law over N
tasks (``p(k) ~ 1 / k**s``), maps each rank to a task name through the given order, sends its
next request when the previous one returns, and records per request: latency, status, whether
the request waited for a load (``X-AAT-Task-Load``: host or disk, and ``X-AAT-Task-Load-Ms``)
and whether the answer named the version the store holds for that task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientJob:
    """What one client process does."""

    url: str
    names: list[str]
    """Task names by Zipf rank (most frequent first)."""
    versions: dict[str, str]
    """The version the store holds for each task."""
    zipf_s: float
    clip: bytes
    requests: int
    start_at: float
    """``time.time()`` at which every client begins (so they start together)."""
    stop_at: float
    """``time.time()`` after which no new request is sent."""
    seed: int


@dataclass(frozen=True)
class Record:
    """One request as the client saw it."""

    seconds: float
    status: int
    load: str
    """``host``, ``disk`` or "" (the task was resident)."""
    load_ms: float
    version_ok: bool


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """``p(k) ~ 1 / k**s`` for ranks 1..n, normalised."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


def draw_tasks(names: list[str], s: float, count: int, seed: int) -> list[str]:
    """``count`` task names drawn by Zipf rank (reproducible for a seed)."""
    rng = np.random.default_rng(seed)
    ranks = rng.choice(len(names), size=count, p=zipf_probabilities(len(names), s))
    return [names[k] for k in ranks]


def run_client(job: ClientJob) -> list[Record]:
    """Closed loop over ``job.requests`` Zipf-drawn requests (fewer if ``stop_at`` comes)."""
    import httpx

    tasks = draw_tasks(job.names, job.zipf_s, job.requests, job.seed)
    out: list[Record] = []
    with httpx.Client(base_url=job.url, timeout=600) as c:
        time.sleep(max(0.0, job.start_at - time.time()))
        for task in tasks:
            if time.time() >= job.stop_at:
                break
            t0 = time.perf_counter()
            r = c.post(f"/classify/{task}?top_k=1", content=job.clip,
                       headers={"content-type": "audio/wav"})
            dt = time.perf_counter() - t0
            ok = r.status_code == 200 and r.json().get("version") == job.versions[task]
            out.append(Record(dt, r.status_code, r.headers.get("x-aat-task-load", ""),
                              float(r.headers.get("x-aat-task-load-ms", "-1")), ok))
    return out


def warm(_: int) -> int:
    """A no-op run in every pool process first, so the measured start is not the spawn's."""
    return 0
