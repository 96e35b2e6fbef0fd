"""The serving benchmark's tools: the service on a local port, and a closed-loop load on it.

``LocalServer`` runs the real application (uvicorn) in a background thread of this process;
``run_load`` sends requests from C client threads, each sending its next request when one
returns, and reads the batch sizes from the server's metrics; ``summarize`` turns samples into
throughput, latency percentiles and batch means.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from aat_serve.adapters.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """The service on 127.0.0.1 in a background thread (its own event loop)."""

    def __init__(self, **settings: Any) -> None:
        import uvicorn

        from aat_serve.service.app import create_app
        from aat_serve.service.settings import Settings

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(Settings(host="127.0.0.1", port=self.port, **settings))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()),
                                       name="aat-bench-server", daemon=True)

    def __enter__(self) -> LocalServer:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise ConfigError("the benchmark server failed to start")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ConfigError("the benchmark server was not ready within 600 s")

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def _metric_totals(text: str) -> dict[str, float]:
    out = {}
    for name in ("aat_batch_size_sum", "aat_batch_size_count", "aat_batch_tasks_sum"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


@dataclass
class Sample:
    """Raw figures of one closed-loop run."""

    latencies: list[float]
    errors: dict[int, int]
    seconds: float
    batch_clips: float
    batches: float
    batch_tasks: float


def run_load(url: str, tasks: list[str], clips: list[bytes], clients: int, requests: int,
             max_seconds: float, top_k: int = 1) -> Sample:
    """Closed loop: ``clients`` threads, each sending its next request when one returns."""
    import httpx

    lock = threading.Lock()
    counter = {"next": 0}
    latencies: list[float] = []
    errors: dict[int, int] = {}
    stop_at = time.monotonic() + max_seconds

    def take() -> int | None:
        with lock:
            i = counter["next"]
            if i >= requests or time.monotonic() >= stop_at:
                return None
            counter["next"] = i + 1
            return i

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while (i := take()) is not None:
                task = tasks[i % len(tasks)]
                t0 = time.perf_counter()
                r = c.post(f"/classify/{task}?top_k={top_k}", content=clips[i % len(clips)],
                           headers={"content-type": "audio/wav"})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[r.status_code] = errors.get(r.status_code, 0) + 1

    before = _metric_totals(httpx.get(url + "/metrics").text)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    elapsed = time.perf_counter() - started
    after = _metric_totals(httpx.get(url + "/metrics").text)
    return Sample(latencies, errors, elapsed,
                  after["aat_batch_size_sum"] - before["aat_batch_size_sum"],
                  after["aat_batch_size_count"] - before["aat_batch_size_count"],
                  after["aat_batch_tasks_sum"] - before["aat_batch_tasks_sum"])


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Throughput (all requests / all time), latency percentiles and batch means."""
    lat = np.array([x for s in samples for x in s.latencies]) * 1000
    n, seconds = lat.size, sum(s.seconds for s in samples)
    batches = sum(s.batches for s in samples)
    errors: dict[int, int] = {}
    for s in samples:
        for k, v in s.errors.items():
            errors[k] = errors.get(k, 0) + v
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if n else (lambda q: 0.0)
    return {
        "requests": int(n), "errors": errors, "seconds": round(seconds, 3),
        "throughput_rps": round(n / seconds, 3) if seconds > 0 else 0.0,
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "mean_batch": round(sum(s.batch_clips for s in samples) / batches, 2) if batches else 0.0,
        "mean_tasks_per_batch": round(sum(s.batch_tasks for s in samples) / batches, 2)
        if batches else 0.0,
    }
