"""Score a trained model on a split: sigmoid scores (as AAT), targets, masks and mean loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.training.data.base import Example
from aat_serve.training.dataset import ClipDataset
from aat_serve.training.losses import compute_loss
from aat_serve.training.metrics import class_report, compute_metrics


@dataclass
class EvalOutput:
    """Per-clip scores ``(N, C)``, targets, masks, and the mean loss over the clips."""

    scores: np.ndarray
    targets: np.ndarray
    masks: np.ndarray
    loss: float

    def metrics(self, masked: bool) -> dict[str, Any]:
        out = compute_metrics(self.scores, self.targets, self.masks if masked else None)
        out["loss"] = self.loss
        return out

    def report(self, labels: list[str], multi_label: bool, masked: bool) -> list[dict[str, Any]]:
        return class_report(self.scores, self.targets, labels, multi_label,
                            self.masks if masked else None)


def score_batches(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                  device: torch.device, loss_kind: str, masked: bool,
                  autocast_dtype: torch.dtype | None = None) -> EvalOutput:
    """Run ``model`` over ClipDataset batches without gradients."""
    model.eval()
    scores, targets, masks = [], [], []
    loss_sum, n = 0.0, 0
    ctx = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    with torch.no_grad():
        for batch in batches:
            x = batch["features"].to(device)
            with ctx:
                logits = model(x).float()
            y, m = batch["target"].to(device), batch["mask"].to(device)
            loss = compute_loss(loss_kind, logits, y, m if masked else None)
            loss_sum += float(loss) * len(x)
            n += len(x)
            scores.append(torch.sigmoid(logits).cpu().numpy())
            targets.append(batch["target"].numpy())
            masks.append(batch["mask"].numpy())
    if n == 0:
        raise ConfigError("nothing to evaluate: the split is empty")
    return EvalOutput(np.concatenate(scores), np.concatenate(targets), np.concatenate(masks),
                      loss_sum / n)


def evaluate_examples(model: torch.nn.Module, examples: list[Example], num_classes: int,
                      features: FeatureConfig, *, device: torch.device, loss_kind: str,
                      batch_size: int = 32, num_workers: int = 0) -> EvalOutput:
    """Decode, featurise (no augmentation) and score ``examples``."""
    if not examples:
        raise ConfigError("nothing to evaluate: the split is empty")
    masked = any(e.mask is not None for e in examples)
    loader = DataLoader(ClipDataset(examples, num_classes, features), batch_size=batch_size,
                        num_workers=num_workers)
    return score_batches(model.to(device), loader, device, loss_kind, masked)
