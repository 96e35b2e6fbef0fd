"""A training run's directory: its file names, the config check that decides whether a run
resumes, the training-state checkpoint and the metrics files.

A run directory holds ``config.json`` (what is being learned, with a digest of each split's
data), ``state.pt`` (everything needed to continue), ``best.safetensors`` (the best epoch's
output), ``metrics.csv``/``metrics.json``, ``summary.json`` and the plots. A directory whose
config matches resumes from its state; one whose config differs is refused, never mixed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.fileio import atomic_write
from aat_serve.training.data.base import Example
from aat_serve.training.plots import plot_curves

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
BEST_FILE = "best.safetensors"
RUN_FILES = (STATE_FILE, BEST_FILE, "config.json", "metrics.csv", "metrics.json",
             "summary.json", "curves.png", "confusion.png")


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as JSON (non-finite floats become null)."""
    atomic_write(path, (json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n").encode())


def split_digest(examples: list[Example]) -> dict[str, Any]:
    """Count and hash of a split's clips and labels (to recognise the same data on resume)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.key or e.path}|{e.labels}|{e.mask}\n".encode())
    return {"count": len(examples), "sha256": h.hexdigest()[:16]}


def describe_config_diff(key: str, old: Any, new: Any) -> str:
    """One config key's change, for the error that refuses to resume a different run."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])
    if isinstance(old, list) or isinstance(new, list):
        return f"{key} differs"
    return f"{key}: {old!r} -> {new!r}"


def open_run_dir(run_dir: Path, config: dict[str, Any], *, fresh: bool,
                 ) -> dict[str, Any] | None:
    """Write or check ``config.json``; return the saved state to resume from, if any.

    ``fresh`` discards a previous run first. A saved run whose config differs from ``config``
    (paths aside: the data digest and backbone fingerprint say what matters) is a
    ``ConfigError`` naming the first differences.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config = json_safe(config)
    cfg_path = run_dir / "config.json"
    if fresh:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    if cfg_path.exists() and (run_dir / STATE_FILE).exists():
        old = json.loads(cfg_path.read_text())
        diff = sorted(k for k in set(old) | set(config)
                      if k not in ("root", "checkpoint") and old.get(k) != config.get(k))
        if diff:
            detail = "; ".join(describe_config_diff(k, old.get(k), config.get(k))
                               for k in diff[:4])
            raise ConfigError(
                f"run directory {run_dir} holds a run with a different configuration "
                f"({detail}); pass --fresh to start over or choose another --run-dir")
        state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True)
        log.info("resuming %s at epoch %d, step %d", run_dir, state["epoch"] + 1,
                 state["global_step"])
        return state
    write_json(cfg_path, config)
    return None


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the training state to ``state.pt`` atomically (a crash leaves the old one)."""
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=run_dir)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, run_dir / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_metrics(run_dir: Path, history: list[dict[str, Any]], metric: str,
                  plot: bool) -> None:
    """``metrics.json`` and ``metrics.csv`` (one row per epoch), and ``curves.png`` if ``plot``."""
    write_json(run_dir / "metrics.json", history)
    cols = list(history[0])
    tmp = run_dir / ".metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, run_dir / "metrics.csv")
    if not plot:
        return
    try:
        plot_curves(history, metric, run_dir / "curves.png")
    except Exception as e:  # a plot must never cost a run
        log.warning("could not plot training curves: %s", e)
