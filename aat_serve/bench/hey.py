"""Load from other processes: ``hey`` (the Debian package) against a real ``aat serve``.

``ServeProcess`` starts ``aat serve`` as a child process on a free 127.0.0.1 port and stops it;
``hey_load`` runs one or several ``hey`` processes at once (a task mix is one ``hey`` per task,
the connections split between them) and reads each request's latency and status from hey's CSV
output, so p50/p99 and errors come from every request, not from hey's summary. The batch sizes
come from the server's own metrics (``metric_totals`` before and after a run). Every serving
benchmark (``aat bench serve``, with or without ``--zipf``) uses these: the load never comes from
threads inside the server's process.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aat_serve.adapters.errors import ConfigError

HEY_MISSING = "the load generator `hey` is not installed (Debian/Ubuntu: apt-get install hey)"
BATCH_METRICS = ("aat_batch_size_sum", "aat_batch_size_count", "aat_batch_tasks_sum")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a child server to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_totals(text: str) -> dict[str, float]:
    """The batch histograms' running totals (``BATCH_METRICS``) in a ``/metrics`` text; a
    series the server has not written yet (no batch so far) reads 0."""
    out = {}
    for name in BATCH_METRICS:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def hey_path() -> str:
    path = shutil.which("hey")
    if path is None:
        raise ConfigError(HEY_MISSING)
    return path


class ServeProcess:
    """``aat serve`` in a child process (its own interpreter, GIL and event loop)."""

    def __init__(self, *, checkpoint: str | None, bundle_dir: str | None,
                 env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "aat_serve.cli.main", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning"]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        if bundle_dir is not None:
            cmd += ["--bundle-dir", str(bundle_dir)]
        self.cmd = cmd
        self.env = {**os.environ, **env}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.proc: subprocess.Popen | None = None

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def start(self) -> ServeProcess:
        """Start the child without waiting for it (several servers can start at once)."""
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        return self

    def wait_ready(self) -> ServeProcess:
        """Wait until ``/readyz`` answers 200; a child that exits or stays unready for 600 s
        is stopped and reported with the tail of its log."""
        import httpx

        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"aat serve exited with {self.proc.returncode}: "
                                  f"{self._log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise ConfigError("aat serve was not ready within 600 s")

    def __enter__(self) -> ServeProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclass
class HeyRun:
    """Every request of one load run: latencies (s) of 2xx answers, other outcomes counted."""

    latencies: list[float]
    errors: dict[str, int]
    seconds: float
    batch: dict[str, float]


def _hey_cmd(url: str, requests: int, clients: int, body: Path | None) -> list[str]:
    cmd = [hey_path(), "-n", str(requests), "-c", str(clients), "-t", "120", "-o", "csv"]
    if body is not None:
        cmd += ["-m", "POST", "-D", str(body), "-T", "audio/wav"]
    return [*cmd, url]


def _parse(out: str, requested: int) -> tuple[list[float], dict[str, int], float]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    end = 0.0
    rows = 0
    for row in csv.DictReader(io.StringIO(out)):
        rows += 1
        took, code = float(row["response-time"]), row["status-code"]
        end = max(end, float(row["offset"]) + took)
        if code.startswith("2"):
            lat.append(took)
        else:
            errors[code] = errors.get(code, 0) + 1
    if rows < requested:  # hey leaves failed connections out of its CSV
        errors["connection"] = requested - rows
    return lat, errors, end


def hey_load(base: str, paths: list[str], requests: int, clients: int, body: Path | None,
             max_seconds: float) -> HeyRun:
    """``requests`` over ``clients`` connections, split evenly over ``paths`` (one ``hey``
    process per path, all at once); the batch histograms' change over the run."""
    import httpx

    n = len(paths)
    per_req = [requests // n + (1 if i < requests % n else 0) for i in range(n)]
    per_conn = [max(1, clients // n + (1 if i < clients % n else 0)) for i in range(n)]
    before = metric_totals(httpx.get(base + "/metrics").text)
    # hey sends requests // connections per connection: ask for what it will send
    per_conn = [min(c, r) for c, r in zip(per_conn, per_req, strict=True)]
    per_req = [r // c * c if r > 0 else 0 for c, r in zip(per_conn, per_req, strict=True)]
    procs = [subprocess.Popen(_hey_cmd(base + p, r, c, body), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for p, r, c in zip(paths, per_req, per_conn, strict=True) if r > 0]
    lat: list[float] = []
    errors: dict[str, int] = {}
    seconds = 0.0
    for proc, r in zip(procs, [r for r in per_req if r > 0], strict=True):
        try:
            out, err = proc.communicate(timeout=max_seconds)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise ConfigError(f"hey did not finish {r} requests within {max_seconds:g} s "
                              "(--max-seconds)") from None
        if proc.returncode != 0:
            raise ConfigError(f"hey failed ({proc.returncode}): {err.strip()[:500]}")
        one_lat, one_err, end = _parse(out, r)
        lat += one_lat
        seconds = max(seconds, end)
        for k, v in one_err.items():
            errors[k] = errors.get(k, 0) + v
    after = metric_totals(httpx.get(base + "/metrics").text)
    batch = {k: after[k] - before[k] for k in after}
    return HeyRun(lat, errors, seconds, batch)
