"""The kernel dispatcher: measure the candidate implementations once per shape bucket, keep
the fastest, and never run anything slower than the unfused torch path.

A *bucket* groups calls that want the same implementation: the op (``mlp`` = MLP + adapter,
``spatial`` = bare adapter with residual), widths (D, H, rank), dtypes, the rows rounded up to a
power of two and the number of task segments (1, 2, 4, 8+). On the first call of a bucket the
dispatcher runs every candidate once, rejects any whose output differs from the unfused
path's beyond the dtype's tolerance (or that fails, e.g. out of shared memory), times the rest
and records the choice and the timings in a ``KernelTable``. The unfused candidate is always
timed and wins ties, so the choice is never slower than unfused as measured.

A ``KernelTable`` can be a JSON file, keyed by the environment (device name, torch and
Triton versions): a second process on the same machine reads the choices instead of measuring,
and another GPU or another Triton measures afresh. This module imports neither Triton nor CUDA;
the candidates and the timer are given (``candidates.py`` builds the real ones).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aat_serve.adapters.errors import ConfigError

UNFUSED = "unfused"
TABLE_FORMAT = 1
# Relative Frobenius distance a candidate may have from the unfused output (both round once
# per stored tensor; bf16 has an 8-bit mantissa).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

Run = Callable[..., torch.Tensor]
Timer = Callable[[Callable[[], Any]], float]


@dataclass(frozen=True)
class Candidate:
    """One implementation: ``run(*operands)`` returns the op's result; ``graph_safe`` means it
    does not sync with the host (can run inside CUDA-graph capture)."""

    name: str
    run: Run
    graph_safe: bool = True


@dataclass(frozen=True)
class Bucket:
    op: str
    dim: int
    hidden: int
    rank: int
    dtype: str
    x_dtype: str
    rows: int
    segments: int

    @property
    def key(self) -> str:
        return (f"{self.op}|d{self.dim}|h{self.hidden}|r{self.rank}|{self.dtype}|x{self.x_dtype}"
                f"|m{self.rows}|s{self.segments}")


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bucket_of(op: str, x: torch.Tensor, h: torch.Tensor, hidden: int, rank: int,
              segments: int) -> Bucket:
    """The bucket of a call with rows ``x``/``h`` ``(M, D)`` and ``segments`` task segments."""
    return Bucket(op, x.shape[1], hidden, rank, _dtype_name(h.dtype), _dtype_name(x.dtype),
                  _pow2(x.shape[0]), min(_pow2(max(segments, 1)), 8))


def pick(timings: dict[str, float]) -> str:
    """The fastest finite timing; the unfused path wins ties and is the answer when nothing
    else was timed. ``timings`` must hold the unfused path's."""
    if UNFUSED not in timings or not math.isfinite(timings[UNFUSED]):
        raise ConfigError(f"the {UNFUSED} path must be timed before choosing; got "
                          f"{sorted(timings)}")
    best = UNFUSED
    for name, ms in sorted(timings.items()):
        if math.isfinite(ms) and ms < timings[best]:
            best = name
    return best


class KernelTable:
    """Choices per bucket for one environment, optionally backed by a JSON file.

    File layout: ``{"format": 1, "environments": {env: {bucket key: {"choice": name,
    "timings_ms": {...}, "rejected": {...}}}}}``; other environments' entries are kept.
    """

    def __init__(self, environment: str, path: str | Path | None = None) -> None:
        self.environment = environment
        self.path = Path(path) if path else None
        self._all: dict[str, dict[str, dict]] = {}
        if self.path is not None and self.path.exists():
            self._all = self._read(self.path)

    @staticmethod
    def _read(path: Path) -> dict[str, dict[str, dict]]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"kernel table {path} is not readable JSON ({e}); delete it to "
                              "measure again") from e
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise ConfigError(f"kernel table {path} has format {data.get('format')!r}, "
                              f"expected {TABLE_FORMAT}; delete it to measure again"
                              if isinstance(data, dict) else
                              f"kernel table {path} is not a JSON object")
        envs = data.get("environments", {})
        return envs if isinstance(envs, dict) else {}

    @property
    def entries(self) -> dict[str, dict]:
        return self._all.setdefault(self.environment, {})

    def choice(self, key: str) -> str | None:
        entry = self.entries.get(key)
        return entry.get("choice") if isinstance(entry, dict) else None

    def record(self, key: str, choice: str, timings: dict[str, float],
               rejected: dict[str, str]) -> None:
        self.entries[key] = {"choice": choice, "timings_ms": timings, "rejected": rejected}
        self.save()

    def save(self) -> None:
        """Write the file atomically (a temporary file renamed over it), if there is one."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"format": TABLE_FORMAT, "environments": self._all}, indent=1,
                          sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kernels-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, self.path)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


class Dispatcher:
    """Runs each call with its bucket's chosen candidate, measuring on first use.

    ``candidates(bucket)`` lists the implementations (one named ``unfused``); ``timer(fn)``
    returns milliseconds per call; ``capturing()`` says whether a CUDA graph is being
    captured (then nothing is measured and only graph-safe candidates run).
    """

    def __init__(self, table: KernelTable, candidates: Callable[[Bucket], list[Candidate]],
                 timer: Timer, capturing: Callable[[], bool] = lambda: False) -> None:
        self.table = table
        self.candidates = candidates
        self.timer = timer
        self.capturing = capturing
        self._lists: dict[Bucket, dict[str, Candidate]] = {}

    def _by_name(self, bucket: Bucket) -> dict[str, Candidate]:
        found = self._lists.get(bucket)
        if found is None:
            found = {c.name: c for c in self.candidates(bucket)}
            if UNFUSED not in found:
                raise ConfigError(f"the candidates of {bucket.key} lack the {UNFUSED} path")
            self._lists[bucket] = found
        return found

    def choose(self, bucket: Bucket, operands: tuple) -> Candidate:
        cands = self._by_name(bucket)
        name = self.table.choice(bucket.key)
        if self.capturing():
            return self._graph_safe(bucket, cands, name)
        if name not in cands:
            name = self.measure(bucket, cands, operands)
        return cands[name]

    def run(self, bucket: Bucket, *operands) -> torch.Tensor:
        return self.choose(bucket, operands).run(*operands)

    def _graph_safe(self, bucket: Bucket, cands: dict[str, Candidate],
                    name: str | None) -> Candidate:
        if name in cands and cands[name].graph_safe:
            return cands[name]
        timings = (self.table.entries.get(bucket.key) or {}).get("timings_ms", {})
        safe = [c for c in cands.values() if c.graph_safe]
        if not safe:
            raise ConfigError(f"no candidate of {bucket.key} can run in CUDA-graph capture")
        timed = [c for c in safe if c.name in timings]
        if timed:
            return min(timed, key=lambda c: timings[c.name])
        return safe[0]  # not measured: the first listed (the default configuration)

    def measure(self, bucket: Bucket, cands: dict[str, Candidate], operands: tuple) -> str:
        """Check every candidate against the unfused output, time the good ones, record."""
        ref = cands[UNFUSED].run(*operands)
        tol = TOLERANCE.get(getattr(torch, bucket.dtype, None), 3e-2)
        timings: dict[str, float] = {}
        rejected: dict[str, str] = {}
        for name, cand in cands.items():
            try:
                if name != UNFUSED:
                    err = relative_error(cand.run(*operands), ref)
                    if not err <= tol:
                        rejected[name] = f"differs from {UNFUSED} by {err:.2e} (> {tol:.0e})"
                        continue
                timings[name] = float(self.timer(lambda c=cand: c.run(*operands)))
            except Exception as e:  # a candidate that cannot run here is skipped, not fatal
                if name == UNFUSED:
                    raise
                rejected[name] = f"{type(e).__name__}: {e}"[:300]
        choice = pick(timings)
        self.table.record(bucket.key, choice, timings, rejected)
        return choice
