"""CPU time a server's processes spend per request, read from ``/proc`` (Linux).

A serving host needs a core for each event loop that is busy: the model process's (batching,
the front ends' calls) and each front end's (HTTP, tokens, bodies), besides the threads that
decode, featurise and compute. ``aat bench serve`` reads the CPU time of the server it started
before and after each scenario and divides by the requests: microseconds per request of the
model process's main thread (its event loop), its other threads, the front ends' main threads
and their other threads. How many front ends a host needs follows: a front end's loop at
``L`` us per request serves at most ``1e6 / L`` requests per second on its own core.
"""

from __future__ import annotations

import os
from pathlib import Path

GROUPS = ("model_loop", "model_threads", "front_end_loops", "front_end_threads")
"""The model process's main thread, its other threads, the front ends' main threads, theirs."""


def _stat_fields(path: Path) -> list[str] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry / "stat")
            if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return sorted(out)


def _threads(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return out
    for tid in tids:
        fields = _stat_fields(Path(f"/proc/{pid}/task/{tid}/stat"))
        if fields is not None:
            out[tid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of ``pid`` (the model process, or the one process) and its children
    (the front ends), by ``GROUPS``; the main thread of a process has its pid as thread id."""
    out = dict.fromkeys(GROUPS, 0.0)
    for proc, loop, rest in [(pid, "model_loop", "model_threads"),
                             *((c, "front_end_loops", "front_end_threads")
                               for c in children(pid))]:
        for tid, seconds in _threads(proc).items():
            out[loop if tid == proc else rest] += seconds
    return out


def per_request_us(spent: list[tuple[dict[str, float], dict[str, float]]], requests: int
                   ) -> dict[str, float]:
    """Microseconds per request of each group over runs given as (before, after) pairs."""
    if requests <= 0:
        return dict.fromkeys(GROUPS, 0.0)
    return {g: round(sum(max(0.0, a[g] - b[g]) for b, a in spent) * 1e6 / requests, 1)
            for g in GROUPS}
