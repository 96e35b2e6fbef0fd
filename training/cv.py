"""K-fold cross-validation for ESC-50 and UrbanSound8K, as AST reports it.

Each fold trains on the other folds and validates on itself, every epoch. The reported figure
takes the epoch with the best metric *averaged over the folds* (not each fold's own best, which
would be optimistic), and gives each fold's metric at that epoch and their mean.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.model import AudioClassifier
from aat_serve.training.data.base import DataSource
from aat_serve.training.recipes import Recipe
from aat_serve.training.run_dir import write_json
from aat_serve.training.trainer import RunOptions, Trainer, TrainResult

log = logging.getLogger(__name__)


def select_cv_epoch(histories: dict[int, list[dict[str, Any]]], metric: str) -> dict[str, Any]:
    """Best epoch on the fold-averaged ``metric``; each fold's value there; their mean."""
    if not histories:
        raise ConfigError("no folds to summarise")
    n = min(len(h) for h in histories.values())
    if n == 0:
        raise ConfigError("a fold has no finished epoch")
    table = np.array([[h[e][metric] for e in range(n)] for h in histories.values()], dtype=float)
    mean = table.mean(axis=0)
    best = int(np.nanargmax(mean))
    folds = list(histories)
    return {"metric": metric, "best_epoch": best + 1, "mean": float(mean[best]),
            "per_fold": {str(k): float(table[i, best]) for i, k in enumerate(folds)},
            "per_epoch_mean": [float(v) for v in mean],
            "per_fold_best_mean": float(np.nanmax(table, axis=1).mean())}


@dataclass
class CVResult:
    """Cross-validation summary and each fold's run."""

    summary: dict[str, Any]
    folds: dict[int, TrainResult]
    out_path: Path | None

    def to_dict(self) -> dict[str, Any]:
        return {"cv": self.summary, "out": str(self.out_path) if self.out_path else None,
                "folds": {str(k): v.to_dict() for k, v in self.folds.items()}}


def run_cv(make_model: Callable[[], AudioClassifier], source: DataSource, *, recipe: Recipe,
           features: FeatureConfig, run_dir: str | os.PathLike, task: str,
           options: RunOptions | None = None, config: dict[str, Any] | None = None,
           out_path: str | os.PathLike | None = None,
           folds: list[int] | None = None) -> CVResult:
    """Train one model per held-out fold (each in ``run_dir/fold{k}``, resumable) and summarise.

    ``out_path`` receives the model trained with the first fold held out, at its own best
    epoch, with the cross-validation summary in its metrics.
    """
    if not source.folds:
        raise ConfigError(f"{source.name} has fixed splits; cross-validation needs a data set "
                          "with folds (esc50, us8k)")
    if folds is None:
        present = {e.fold for e in source.examples}
        folds = [k for k in source.folds if k in present]
        missing = [k for k in source.folds if k not in present]
        if missing:
            log.warning("%s: fold(s) %s have no clips and are left out of cross-validation",
                        source.name, missing)
    folds = list(folds)
    if len(folds) < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds with clips; {source.name} "
                          f"has {folds}")
    run_dir = Path(run_dir)
    results: dict[int, TrainResult] = {}
    first: Trainer | None = None
    for k in folds:
        log.info("cross-validation: fold %d of %s", k, folds)
        trainer = Trainer(make_model(), source.splits(fold=k), source.labels, recipe=recipe,
                          features=features, run_dir=run_dir / f"fold{k}", task=task,
                          multi_label=source.multi_label, options=options,
                          config={**(config or {}), "fold": k})
        results[k] = trainer.train()
        if first is None:
            first = trainer
        else:
            trainer.model.cpu()
    summary = select_cv_epoch({k: r.history for k, r in results.items()}, recipe.metric)
    write_json(run_dir / "cv.json", summary)
    with (run_dir / "cv.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", *[f"fold{k}" for k in folds], "mean"])
        for e, m in enumerate(summary["per_epoch_mean"]):
            w.writerow([e + 1, *[results[k].history[e][recipe.metric] for k in folds], m])
    written = None
    if out_path is not None and first is not None:
        r0 = results[folds[0]]
        metrics = {"valid": r0.valid, "best_epoch": r0.best_epoch, "metric": recipe.metric,
                   "held_out_fold": folds[0], "cv": summary}
        written = first.save_trained(out_path, metrics)
    log.info("cross-validation %s: %.4f at epoch %d (folds %s)", recipe.metric,
             summary["mean"], summary["best_epoch"], summary["per_fold"])
    return CVResult(summary, results, written)
