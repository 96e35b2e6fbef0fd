"""What every benchmark shares: the machine description, interleaved timing, one table printer.

Each report names the machine it was measured on (``machine``) and prints its figures with
``table``: fixed-width text for the terminal, or a Markdown table to paste into the docs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from aat_serve.adapters.errors import ConfigError


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """What the numbers were measured on (named in every report).

    ``gpu`` is the measured CUDA device's name, or, without ``device``, the first CUDA
    device's when there is one; None otherwise.
    """
    info: dict[str, Any] = {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": sys.version.split()[0],
        "torch": torch.__version__, "load_average": load_average(), "gpu": None,
    }
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_summary(info: dict[str, Any]) -> str:
    """One line for a report's header: the GPU or CPU, its cores and torch's threads."""
    return (f"{info.get('gpu') or info['cpu']} ({info['cpu_count']} CPUs, "
            f"{info['torch_threads']} torch threads, torch {info['torch']})")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                warmup: int = 1, progress: Callable[[], None] | None = None
                ) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each function, timed round-robin so that a
    drifting machine load hits every function alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            if progress:
                progress()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            synchronize(device)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
            if progress:
                progress()
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], *, markdown: bool = False,
          right: Sequence[bool] | None = None) -> str:
    """A table of ``rows`` under ``header``: fixed-width text, or Markdown with ``markdown``.

    ``right`` says which columns are right-aligned (numbers); by default every column but the
    first.
    """
    align = list(right) if right is not None else [i > 0 for i in range(len(header))]
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    if markdown:
        rule = "|" + "|".join("---:" if a else "---" for a in align) + "|"
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, rule)
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in
                       zip(r, widths, align, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def positive_ints(text: str, flag: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; a clear ``ConfigError`` naming ``flag`` otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be a comma-separated list of integers, got "
                          f"{text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} needs positive integers, got {text!r}")
    return values


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
