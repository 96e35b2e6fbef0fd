"""The two entry points behind ``aat train`` and ``aat eval``, usable from Python.

``train(...)`` reads a data set, picks its recipe (with overrides), loads the backbone, builds
the method's model and runs the trainer (or cross-validation); ``evaluate(...)`` scores a task
bundle or a whole-model checkpoint on a data set's test split with a per-class report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import check_task_name
from aat_serve.adapters.checkpoints import LoadedCheckpoint, load_checkpoint
from aat_serve.adapters.checkpoints.load import checkpoint_path
from aat_serve.adapters.config import AdapterConfig, FeatureConfig
from aat_serve.adapters.device import resolve_device
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.methods import get_method
from aat_serve.adapters.model import AudioClassifier
from aat_serve.training.cv import CVResult, run_cv
from aat_serve.training.data import load_source
from aat_serve.training.data.base import BadAudioRule, DataSource
from aat_serve.training.evaluate import evaluate_examples
from aat_serve.training.export import load_trained
from aat_serve.training.feature_defaults import resolve_features
from aat_serve.training.recipes import Recipe, default_recipe, get_recipe, with_method_rate
from aat_serve.training.trainer import RunOptions, Trainer, TrainResult

FEATURE_SOURCE_FIELDS = ("sample_rate", "num_mel_bins", "target_length", "mean", "std")

log = logging.getLogger(__name__)


def default_task_name(dataset: str, root: str | os.PathLike) -> str:
    """The data set's name, or for folder/CSV sources a name made from the root's name."""
    if dataset not in ("folder", "csv"):
        return dataset
    stem = Path(root).resolve()
    stem = stem.parent if stem.is_file() else stem
    name = re.sub(r"[^a-z0-9_-]+", "-", stem.name.lower()).strip("-_")[:64]
    return name or dataset


def resolve_recipe(dataset: str, method: str, multi_label: bool, name: str | None = None,
                   overrides: dict[str, Any] | None = None) -> Recipe:
    """A named (or the data set's default) recipe with command-line overrides applied."""
    base = (with_method_rate(get_recipe(name), method) if name
            else default_recipe(dataset, method, multi_label))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return base.replace(**overrides) if overrides else base


def feature_config(backbone: AST, recipe: Recipe) -> FeatureConfig:
    """16 kHz Kaldi fbank with the backbone's mel bins and the recipe's length and statistics."""
    return FeatureConfig(num_mel_bins=backbone.cfg.num_mel_bins,
                         target_length=recipe.target_length, mean=recipe.mean, std=recipe.std)


def model_factory(backbone: AST, method: str, num_classes: int, *, seed: int = 0,
                  bottleneck: int | None = None, num_prompts: int | None = None,
                  ) -> Callable[[], AudioClassifier]:
    """Builds a fresh model on ``backbone`` (each model works on its own copy of it).

    The adapter bottleneck defaults to a quarter of the width (AAT: 768 -> 192).
    """
    spec = get_method(method)
    r = bottleneck if bottleneck is not None else max(1, backbone.cfg.embed_dim // 4)
    prompts = num_prompts if num_prompts is not None else spec.adapters.num_prompts
    cfg = AdapterConfig(bottleneck=r, mlp=spec.adapters.mlp, spatial=spec.adapters.spatial,
                        num_prompts=prompts if spec.adapters.num_prompts else 0)

    def make() -> AudioClassifier:
        torch.manual_seed(seed)
        return AudioClassifier(backbone, spec, num_classes, adapter_cfg=cfg)

    return make


def _load_backbone(checkpoint: str | os.PathLike | AST
                   ) -> tuple[AST, LoadedCheckpoint | None, str]:
    """The backbone, its loaded checkpoint (None for an in-process one) and its name."""
    if isinstance(checkpoint, AST):
        return checkpoint, None, "<in-process backbone>"
    ckpt = load_checkpoint(checkpoint)
    return ckpt.backbone, ckpt, str(checkpoint_path(checkpoint).resolve())


def _set_length(backbone: AST, target_length: int) -> None:
    """Record the run's clip length in the backbone's config (the stored grid stays)."""
    cfg = backbone.cfg
    if cfg.target_length == target_length:
        return
    new = dataclasses.replace(cfg, target_length=target_length, pos_grid=None)
    if new.grid() != cfg.stored_grid:
        new = dataclasses.replace(new, pos_grid=cfg.stored_grid)
    backbone.cfg = new


def train(dataset: str, root: str | os.PathLike, checkpoint: str | os.PathLike | AST,
          method: str, out: str | os.PathLike | None, *, task: str | None = None,
          recipe: str | Recipe | None = None, overrides: dict[str, Any] | None = None,
          fold: int | None = None, cv: bool = False, run_dir: str | os.PathLike | None = None,
          options: RunOptions | None = None, on_bad_audio: BadAudioRule = "error",
          allow_pickle: bool = False, bottleneck: int | None = None,
          num_prompts: int | None = None, source: DataSource | None = None,
          all_labels: bool = False) -> TrainResult | CVResult:
    """Train ``method`` on a data set from a backbone checkpoint; write ``out``."""
    get_method(method)
    if fold is not None and cv:
        raise ConfigError("choose either --fold K or --cv, not both")
    if out is None and run_dir is None:
        raise ConfigError("give an output path (--out) or a run directory (--run-dir)")
    task = check_task_name(task or default_task_name(dataset, root))
    src = source or load_source(dataset, root, on_bad_audio=on_bad_audio,
                                allow_pickle=allow_pickle, all_labels=all_labels)
    backbone, ckpt, ckpt_name = _load_backbone(checkpoint)
    if isinstance(recipe, Recipe):  # a caller's own recipe is taken as it is
        rec = recipe.replace(**(overrides or {}))
        features = feature_config(backbone, rec)
        sources = {n: {"value": v, "source": f"recipe {rec.name}"}
                   for n, v in features.to_dict().items() if n in FEATURE_SOURCE_FIELDS}
    else:
        rec = resolve_recipe(dataset, method, src.multi_label, recipe, overrides)
        given = {k for k, v in (overrides or {}).items() if v is not None}
        rec, features, sources = resolve_features(rec, given, ckpt, backbone.cfg.num_mel_bins)
    _set_length(backbone, rec.target_length)
    make = model_factory(backbone, method, src.num_classes, seed=rec.seed,
                         bottleneck=bottleneck, num_prompts=num_prompts)
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{Path(out).with_suffix('')}.run")
    config = {"dataset": dataset, "root": str(Path(root).resolve()), "checkpoint": ckpt_name,
              "backbone_fingerprint": backbone.fingerprint(), "feature_sources": sources}
    if cv:
        return run_cv(make, src, recipe=rec, features=features, run_dir=run_dir, task=task,
                      options=options, config=config, out_path=out)
    if src.folds and fold is None:
        src.splits(fold)  # raises the "choose a fold or --cv" error
    splits = src.splits(fold)
    warn_empty_splits(src.name, splits)
    trainer = Trainer(make(), splits, src.labels, recipe=rec, features=features,
                      run_dir=run_dir, task=task, multi_label=src.multi_label, options=options,
                      config={**config, "fold": fold})
    return trainer.train(out)


def warn_empty_splits(name: str, splits: dict) -> list[str]:
    """Log once, before any training, which of the valid and test splits hold no clip (a small
    folder data set split 80/10/10 by file name can leave one empty; the run then reports no
    figure for it); returns their names."""
    empty = [s for s in ("valid", "test") if not splits.get(s)]
    if empty:
        log.warning("%s: the %s split%s empty (%d training clips): no %s figures for this run; "
                    "give the split explicitly (train.txt/valid.txt/test.txt lists, or a CSV "
                    "split column) or add clips", name, " and ".join(empty),
                    " is" if len(empty) == 1 else "s are", len(splits.get("train", [])),
                    "/".join(empty))
    return empty


def evaluate(dataset: str, root: str | os.PathLike, bundle: str | os.PathLike, *,
             checkpoint: str | os.PathLike | AST | None = None, fold: int | None = None,
             split: str = "test", device: str = "auto", batch_size: int = 32,
             num_workers: int = 0, on_bad_audio: BadAudioRule = "error",
             allow_pickle: bool = False, source: DataSource | None = None,
             all_labels: bool = False) -> dict[str, Any]:
    """Metrics and a per-class report of a trained bundle/model on a split of a data set."""
    src = source or load_source(dataset, root, on_bad_audio=on_bad_audio,
                                allow_pickle=allow_pickle, all_labels=all_labels)
    backbone = None
    if checkpoint is not None:
        backbone = checkpoint if isinstance(checkpoint, AST) else load_checkpoint(
            checkpoint).backbone
    model, manifest = load_trained(bundle, backbone)
    labels = list(manifest["labels"])
    if labels != src.labels:
        diff = next((i for i, (a, b) in enumerate(zip(labels, src.labels, strict=False))
                     if a != b), min(len(labels), len(src.labels)))
        raise ConfigError(
            f"{bundle} was trained on {len(labels)} labels that differ from {src.name}'s "
            f"{src.num_classes} (first difference at index {diff})")
    recipe = manifest.get("recipe") or {}
    if src.folds and fold is None:
        fold = recipe.get("fold")
        if fold is None:
            raise ConfigError(f"{src.name} is evaluated per fold and {bundle} records none; "
                              "pass --fold K")
    splits = src.splits(fold if src.folds else None)
    if split not in splits or not splits[split]:
        raise ConfigError(f"the {split} split of {src.name} is empty")
    features = FeatureConfig.from_dict(manifest["features"])
    loss = recipe.get("loss", "bce" if manifest.get("multi_label") else "ce")
    dev = resolve_device(device)
    out = evaluate_examples(model, splits[split], len(labels), features, device=dev,
                            loss_kind=loss, batch_size=batch_size, num_workers=num_workers)
    masked = any(e.mask is not None for e in splits[split])
    multi = bool(manifest.get("multi_label"))
    return {"dataset": src.name, "split": split, "fold": fold, "clips": len(splits[split]),
            "task": manifest.get("task"), "method": manifest.get("method"),
            "metric": recipe.get("metric", "mAP" if multi else "acc"),
            "metrics": out.metrics(masked), "per_class": out.report(labels, multi, masked)}
