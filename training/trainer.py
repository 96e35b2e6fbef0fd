"""One training run: a method's model on one split (or fold) of a data set, as the AAT code.

- AdamW (weight decay 0.05, betas 0.9/0.999) over the trainable parameters only;
  MultiStepLR stepped per epoch; AAT's optional linear warm-up; mixed precision on CUDA;
  gradient accumulation.
- After each epoch: validation metrics, ``metrics.csv``/``metrics.json``, the best checkpoint
  (task bundle or whole-model file) when the recipe's metric improves, the training-state
  checkpoint and ``curves.png``. Optionally also a state checkpoint every N steps.
- A run directory that already holds a state continues from it: data order and augmentation
  depend only on (seed, epoch, index), so an interrupted run resumes to the same result.
- At the end the best checkpoint is evaluated on the test split, single-label tasks get
  ``confusion.png``, and the output (bundle or whole-model checkpoint) carries the metrics.

The run directory's files (config check, state checkpoint, metrics) are ``run_dir``'s job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from aat_serve.adapters import bundle_checks
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import checkpoint_filter_fn
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.device import resolve_device
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.model import AudioClassifier, count_trainable
from aat_serve.training.data.base import Example
from aat_serve.training.dataset import Augment, ClipDataset, EpochSampler
from aat_serve.training.evaluate import EvalOutput, score_batches
from aat_serve.training.export import save_model_checkpoint
from aat_serve.training.losses import compute_loss
from aat_serve.training.metrics import confusion_matrix
from aat_serve.training.plots import plot_confusion
from aat_serve.training.recipes import Recipe, check_fits
from aat_serve.training.run_dir import (
    BEST_FILE,
    json_safe,
    open_run_dir,
    save_state,
    split_digest,
    write_json,
    write_metrics,
)

log = logging.getLogger(__name__)

_EVAL_CACHE_BYTES = 512 * 1024 * 1024


def is_better(valid: dict[str, Any], best: dict[str, Any], metric: str) -> bool:
    """Whether an epoch's validation beats the best so far: a higher ``metric``, or the same
    with a lower loss. On a small validation set the accuracy saturates within an epoch or two;
    without the tie-break the first such epoch would be kept however far the loss still fell."""
    if valid[metric] != best["metric"]:
        return valid[metric] > best["metric"]
    return valid["loss"] < best["valid"]["loss"]


@dataclass
class RunOptions:
    """How to run (not what to learn): device, workers, progress, checkpoint frequency."""

    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    checkpoint_every: int = 0
    """Also save the training state every this many optimiser steps (0: after each epoch)."""
    cache_waveforms: bool = False
    """Keep each training clip's log-mel (and, with mixup, its waveform) in memory: fast for
    small data sets, the fbank is then computed once per clip instead of once per epoch."""
    fresh: bool = False
    """Discard a previous run in the run directory instead of resuming it."""


@dataclass
class TrainResult:
    """What a run produced and how it went."""

    best_epoch: int
    metric: str
    best_metric: float
    valid: dict[str, Any]
    test: dict[str, Any] | None
    history: list[dict[str, Any]]
    run_dir: Path
    out_path: Path | None
    trainable_params: int
    total_params: int
    epoch_time_s: float
    clips_per_s: float
    peak_memory_mb: float
    test_report: list[dict[str, Any]] = field(default_factory=list)
    feature_sources: dict[str, Any] = field(default_factory=dict)
    """Each feature setting's value and where it came from (backbone, recipe, flag)."""

    def to_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "metric": self.metric,
                "best_metric": self.best_metric, "valid": self.valid, "test": self.test,
                "run_dir": str(self.run_dir),
                "out": str(self.out_path) if self.out_path else None,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "epoch_time_s": self.epoch_time_s, "clips_per_s": self.clips_per_s,
                "peak_memory_mb": self.peak_memory_mb, "epochs": len(self.history),
                "feature_sources": self.feature_sources}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fresh_running() -> dict[str, float]:
    """The running sums of an epoch before its first batch."""
    return {"loss_sum": 0.0, "clips": 0, "seconds": 0.0}


@dataclass
class _Progress:
    """Where a run is: the epoch to run next, batches and optimiser steps done, the running
    sums of the current epoch, the epochs' history and the best epoch so far (the fields of
    the saved training state)."""

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    running: dict[str, float] = field(default_factory=_fresh_running)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(
        default_factory=lambda: {"epoch": 0, "metric": -math.inf, "valid": {}})


class Trainer:
    """Train ``model`` on ``splits`` (``train``/``valid``/``test`` examples) with ``recipe``."""

    def __init__(self, model: AudioClassifier, splits: dict[str, list[Example]],
                 labels: list[str], *, recipe: Recipe, features: FeatureConfig,
                 run_dir: str | os.PathLike, task: str, multi_label: bool = False,
                 options: RunOptions | None = None, config: dict[str, Any] | None = None,
                 ) -> None:
        recipe.validate()
        self.masked = any(e.mask is not None for s in splits.values() for e in s)
        check_fits(recipe, multi_label, self.masked)
        if not splits.get("train"):
            raise ConfigError("the training split is empty")
        if not splits.get("valid"):
            raise ConfigError("the validation split is empty; the best epoch cannot be chosen")
        if model.num_classes != len(labels):
            raise ConfigError(f"model has {model.num_classes} classes but the data set has "
                              f"{len(labels)} labels")
        if features.target_length != recipe.target_length:
            raise ConfigError(f"features.target_length {features.target_length} differs from "
                              f"the recipe's {recipe.target_length}")
        # The bounds an upload is checked against, before hours of training, not at export.
        bundle_checks.check_features(features.to_dict(), model.backbone.cfg)
        self.model = model
        self.splits = splits
        self.labels = list(labels)
        self.recipe = recipe
        self.features = features
        self.run_dir = Path(run_dir)
        self.task = task
        self.multi_label = multi_label
        self.options = options or RunOptions()
        self.device = resolve_device(self.options.device)
        self.config = dict(config or {})
        self.callbacks: list[Callable[[Trainer, dict[str, Any]], None]] = []
        self._eval_cache: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._setup()

    # -- setup --------------------------------------------------------------------------
    def _setup(self) -> None:
        r = self.recipe
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(f"method {self.model.method.name!r} leaves nothing to train")
        self.optimizer = torch.optim.AdamW(self.params, lr=r.lr, weight_decay=r.weight_decay,
                                           betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=r.milestones(), gamma=r.lr_scheduler_decay)
        cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if r.amp and cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        aug = Augment(freqm=r.freqm, timem=r.timem, mixup=r.mixup, noise=r.noise,
                      freq_warp=r.freq_warp)
        n = len(self.labels)
        self.train_set = ClipDataset(self.splits["train"], n, self.features, aug, seed=r.seed,
                                     cache_waveforms=self.options.cache_waveforms)
        self.sampler = EpochSampler(len(self.train_set), seed=r.seed)
        self.train_loader = DataLoader(
            self.train_set, batch_size=r.batch_size, sampler=self.sampler,
            num_workers=self.options.num_workers, pin_memory=cuda)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    # -- run directory ------------------------------------------------------------------
    def _prepare_run_dir(self) -> dict[str, Any] | None:
        """Write or check ``config.json``; return the saved state to resume from, if any."""
        config = {**self.config, "recipe": self.recipe.to_dict(),
                  "method": self.model.method.name, "task": self.task, "labels": self.labels,
                  "features": self.features.to_dict(),
                  "examples": {k: split_digest(v) for k, v in self.splits.items()}}
        return open_run_dir(self.run_dir, config, fresh=self.options.fresh)

    def _state(self, epoch: int, batches_done: int, global_step: int, running: dict[str, float],
               history: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any]:
        return {"epoch": epoch, "batches_done": batches_done, "global_step": global_step,
                "running": dict(running), "history": history, "best": dict(best),
                "model": {n: p.detach().to("cpu").clone()
                          for n, p in self.model.named_parameters() if p.requires_grad},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def _restore(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in state["model"].items():
                if name not in params or not params[name].requires_grad:
                    raise ConfigError(f"saved state has parameter {name!r}, which this "
                                      "method does not train")
                params[name].copy_(t.to(params[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    # -- outputs ------------------------------------------------------------------------
    def manifest_recipe(self) -> dict[str, Any]:
        keep = ("dataset", "fold", "checkpoint")
        return {**self.recipe.to_dict(), **{k: self.config[k] for k in keep if k in self.config}}

    def save_trained(self, path: str | os.PathLike, metrics: dict[str, Any]) -> Path:
        """Task bundle for frozen-backbone methods, whole-model checkpoint otherwise."""
        recipe = self.manifest_recipe()
        metrics = json_safe(metrics)
        if self.model.method.exports_bundle:
            bundle = TaskBundle.from_model(self.model, self.task, self.labels, self.features,
                                           multi_label=self.multi_label, recipe=recipe,
                                           metrics=metrics)
            return bundle.save(path)
        return save_model_checkpoint(self.model, path, task=self.task, labels=self.labels,
                                     features=self.features, multi_label=self.multi_label,
                                     recipe=recipe, metrics=metrics)

    def load_trained_weights(self, path: str | os.PathLike) -> None:
        """Put the weights of a file written by ``save_trained`` back into the model."""
        if self.model.method.exports_bundle:
            self.model.load_task_state_dict(TaskBundle.load(path).tensors)
            return
        canon = checkpoint_filter_fn(load_file(str(path)), source_format="ast")
        with torch.no_grad():
            head = {k.removeprefix("head."): v for k, v in canon.items() if k.startswith("head.")}
            self.model.head.load_state_dict(head, strict=True)
            body = {k: v for k, v in canon.items() if not k.startswith("head.")}
            self.model.backbone.load_state_dict(body, strict=True)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, split: str) -> EvalOutput:
        """Scores, targets and loss of the model on ``split`` (no augmentation)."""
        examples = self.splits.get(split) or []
        if not examples:
            raise ConfigError(f"the {split} split is empty")
        batches = self._eval_cache.get(id(examples))  # valid and test may be one list
        if batches is None:
            ds = ClipDataset(examples, len(self.labels), self.features)
            loader = DataLoader(ds, batch_size=self.recipe.batch_size,
                                num_workers=self.options.num_workers)
            batches = list(loader) if self._cacheable(len(ds)) else None
            if batches is not None:
                self._eval_cache[id(examples)] = batches
            else:
                batches = loader
        return score_batches(self.model, batches, self.device, self.recipe.loss, self.masked,
                             self.amp_dtype)

    def _cacheable(self, n: int) -> bool:
        per_item = self.features.target_length * self.features.num_mel_bins * 4
        return n * per_item <= _EVAL_CACHE_BYTES

    # -- training -----------------------------------------------------------------------
    def train(self, out_path: str | os.PathLike | None = None) -> TrainResult:
        """Run (or resume) every epoch, then test the best checkpoint and write ``out_path``."""
        progress = _Progress()
        state = self._prepare_run_dir()
        if state is not None:
            self._restore(state)
            progress = _Progress(state["epoch"], state["batches_done"], state["global_step"],
                                 state["running"], state["history"], state["best"])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for epoch in range(progress.epoch, self.recipe.epochs):
            seconds = self._train_epoch(epoch, progress)
            self._end_epoch(epoch, seconds, progress)
        return self._finish(progress.history, progress.best, out_path)

    def _train_epoch(self, epoch: int, p: _Progress) -> float:
        """One pass over the training split (from ``p.batches_done`` on, when resuming);
        return its seconds (a resumed epoch counts its earlier part)."""
        r = self.recipe
        self.model.train()
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=p.batches_done * r.batch_size)
        total_batches = math.ceil(len(self.train_set) / r.batch_size)
        bar = tqdm(total=total_batches, initial=p.batches_done, unit="batch", leave=False,
                   desc=f"epoch {epoch + 1}/{r.epochs}", disable=not self.options.progress,
                   dynamic_ncols=True)
        t0 = time.perf_counter() - p.running["seconds"]
        self.optimizer.zero_grad(set_to_none=True)
        pending = 0
        for batch in self.train_loader:
            x = batch["features"].to(self.device, non_blocking=True)
            y = batch["target"].to(self.device, non_blocking=True)
            m = batch["mask"].to(self.device, non_blocking=True) if self.masked else None
            with self._autocast():
                logits = self.model(x)
            loss = compute_loss(r.loss, logits, y, m)
            loss_value = loss.detach().item()  # a float, so no autograd warning below
            if not math.isfinite(loss_value):
                raise ConfigError(f"loss became {loss_value} at epoch {epoch + 1}, step "
                                  f"{p.global_step}; lower the learning rate (--lr)")
            self.scaler.scale(loss / r.grad_accum).backward()
            pending += 1
            p.batches_done += 1
            p.running["loss_sum"] += loss_value * len(x)
            p.running["clips"] += len(x)
            if pending == r.grad_accum or p.batches_done == total_batches:
                p.global_step = self._step(p.global_step)
                pending = 0
                p.running["seconds"] = time.perf_counter() - t0
                self._after_step(epoch, p, total_batches, loss_value)
            bar.update(1)
            if self.options.progress:
                rate = p.running["clips"] / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", clips_s=f"{rate:.1f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        return time.perf_counter() - t0

    def _after_step(self, epoch: int, p: _Progress, total_batches: int, loss: float) -> None:
        """The mid-epoch state checkpoint (``checkpoint_every``), then the callbacks."""
        info = {"epoch": epoch, "global_step": p.global_step,
                "batches_done": p.batches_done, "loss": loss}
        if (self.options.checkpoint_every
                and p.global_step % self.options.checkpoint_every == 0
                and p.batches_done < total_batches):
            save_state(self.run_dir, self._state(epoch, p.batches_done, p.global_step,
                                                 p.running, p.history, p.best))
        for cb in self.callbacks:
            cb(self, info)

    def _end_epoch(self, epoch: int, seconds: float, p: _Progress) -> None:
        """Validate, record the epoch, keep the best checkpoint, step the schedule, save."""
        r = self.recipe
        valid = self.evaluate("valid").metrics(self.masked)
        row = {"epoch": epoch + 1, "train_loss": p.running["loss_sum"] / p.running["clips"],
               "valid_loss": valid["loss"], "acc": valid["acc"], "mAP": valid["mAP"],
               "mAUC": valid["mAUC"], "d_prime": valid["d_prime"],
               "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": seconds,
               "clips_per_s": p.running["clips"] / max(seconds, 1e-9),
               "global_step": p.global_step}
        p.history.append(row)
        log.info("epoch %d/%d: train loss %.4f, valid loss %.4f, %s %.4f (%.1f s)",
                 epoch + 1, r.epochs, row["train_loss"], row["valid_loss"], r.metric,
                 valid[r.metric], seconds)
        if p.best["epoch"] == 0 or is_better(valid, p.best, r.metric):
            p.best = {"epoch": epoch + 1, "metric": valid[r.metric], "valid": valid}
            self.save_trained(self.run_dir / BEST_FILE,
                              {"valid": valid, "best_epoch": epoch + 1})
        self.scheduler.step()
        p.batches_done = 0
        p.running = _fresh_running()
        save_state(self.run_dir, self._state(epoch + 1, 0, p.global_step, p.running,
                                             p.history, p.best))
        # The curve is redrawn after slow epochs only (a plot costs about a second).
        write_metrics(self.run_dir, p.history, r.metric,
                      plot=seconds > 30 or epoch + 1 == r.epochs)

    def _step(self, global_step: int) -> int:
        r = self.recipe
        if r.warmup and global_step <= r.warmup_steps and global_step % r.warmup_every == 0:
            for g in self.optimizer.param_groups:  # AAT: lr = step / warmup_steps * base lr
                g["lr"] = global_step / r.warmup_steps * r.lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return global_step + 1

    def _finish(self, history: list[dict[str, Any]], best: dict[str, Any],
                out_path: str | os.PathLike | None) -> TrainResult:
        r = self.recipe
        if history and not (self.run_dir / "curves.png").exists():
            write_metrics(self.run_dir, history, r.metric, plot=True)
        self.load_trained_weights(self.run_dir / BEST_FILE)
        test, report = None, []
        if self.splits.get("test"):
            out = self.evaluate("test")
            test = out.metrics(self.masked)
            report = out.report(self.labels, self.multi_label, self.masked)
            if not self.multi_label:
                cm = confusion_matrix(out.scores, out.targets, len(self.labels))
                try:
                    plot_confusion(cm, self.labels, self.run_dir / "confusion.png",
                                   title=f"{self.task}: test, epoch {best['epoch']}")
                except Exception as e:  # a plot must never cost a run
                    log.warning("could not plot the confusion matrix: %s", e)
        metrics = {"valid": best["valid"], "best_epoch": best["epoch"], "metric": r.metric}
        if test is not None:
            metrics["test"] = test
        written = None
        if out_path is not None:
            written = self.save_trained(out_path, metrics)
        total = sum(p.numel() for p in self.model.parameters())
        times = [h["epoch_time_s"] for h in history] or [float("nan")]
        result = TrainResult(
            best_epoch=best["epoch"], metric=r.metric, best_metric=best["metric"],
            valid=best["valid"], test=test, history=history, run_dir=self.run_dir,
            out_path=written, trainable_params=count_trainable(self.model), total_params=total,
            epoch_time_s=float(np.mean(times)),
            clips_per_s=float(np.mean([h["clips_per_s"] for h in history] or [float("nan")])),
            peak_memory_mb=peak_memory_mb(self.device), test_report=report,
            feature_sources=self.config.get("feature_sources", {}))
        write_json(self.run_dir / "summary.json", {**result.to_dict(), "test_report": report})
        return result
