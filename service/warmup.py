"""Warm-up: one batch of all-zero input through tasks, on the inference thread, per task.

It runs after tasks are loaded at start-up and after a store rescan loads new versions. A
task whose batch raises or gives non-finite scores is reported with the reason, so the
registry can unload it and mark it failed while every other task goes on serving: the tasks of
a failing mixed batch are run again one by one to find the culprit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from aat_serve.adapters.multitask import ServingModel

log = logging.getLogger(__name__)


def warm_up_tasks(model: ServingModel, names: Sequence[str],
                  capacity: Callable[[tuple[int, int]], int]) -> dict[str, str]:
    """Run ``names`` (resident tasks) on zero input, ``capacity(shape)`` clips per batch and
    one batch per feature shape; returns why each failing task failed (empty: all good)."""
    resident = model.tasks
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in sorted(set(names)):
        info = resident.get(name)
        if info is None:
            continue  # unloaded meanwhile: nothing to warm
        f = info.manifest.feature_config
        by_shape.setdefault((f.target_length, f.num_mel_bins), []).append(name)
    failures: dict[str, str] = {}
    for shape, group in by_shape.items():
        step = capacity(shape)
        for i in range(0, len(group), step):
            _run_chunk(model, shape, group[i:i + step], failures)
    return failures


def _run_chunk(model: ServingModel, shape: tuple[int, int], chunk: list[str],
               failures: dict[str, str]) -> None:
    try:
        with torch.inference_mode():
            logits = model.classify(torch.zeros(len(chunk), *shape), chunk)
    except Exception as e:
        if len(chunk) > 1:  # find the culprit: every task alone
            for name in chunk:
                _run_chunk(model, shape, [name], failures)
            return
        log.warning("warm-up failed for task %s", chunk[0], exc_info=True,
                    extra={"task": chunk[0]})
        failures[chunk[0]] = f"its warm-up forward failed: {type(e).__name__}: {e}"
        return
    for name, lg in zip(chunk, logits, strict=True):
        if not bool(torch.isfinite(lg).all()):
            failures[name] = ("its warm-up forward gave non-finite scores (NaN or infinity) on "
                              "an all-zero input")
