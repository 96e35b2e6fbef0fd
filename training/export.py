"""What a finished run hands over: a task bundle, or a whole-model checkpoint for full/partial.

The whole-model checkpoint is one safetensors file in the original AST layout
(``module.v.*`` + ``module.mlp_head.{0,1}.*``), so
``aat_serve.adapters.checkpoints.load_checkpoint``
reads it as a backbone with its head; its ``__metadata__`` carries ``format: aat-model/1``
and a manifest (task, method, labels, features, backbone config, recipe, metrics).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from aat_serve.adapters.bundle import FORMAT as BUNDLE_FORMAT
from aat_serve.adapters.bundle import TaskBundle, check_task_name
from aat_serve.adapters.checkpoints import (
    build_backbone,
    checkpoint_filter_fn,
    to_original_state_dict,
)
from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import BundleError, CheckpointError
from aat_serve.adapters.fileio import atomic_write
from aat_serve.adapters.model import AudioClassifier

MODEL_FORMAT = "aat-model/1"


def save_model_checkpoint(model: AudioClassifier, path: str | os.PathLike, *, task: str,
                          labels: list[str], features: FeatureConfig, multi_label: bool,
                          recipe: dict[str, Any] | None = None,
                          metrics: dict[str, Any] | None = None) -> Path:
    """Write a full/partial model (backbone + head) with its manifest, atomically."""
    if model.method.exports_bundle:
        raise BundleError(f"method {model.method.name!r} keeps the backbone frozen; save a "
                          "task bundle instead")
    canonical = {k: v for k, v in model.backbone.frozen_state_dict().items()}
    for k, v in model.head.state_dict().items():
        canonical[f"head.{k}"] = v
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in to_original_state_dict(canonical).items()}
    manifest = {"task": check_task_name(task), "method": model.method.name,
                "labels": list(labels), "multi_label": bool(multi_label),
                "backbone": model.backbone.cfg.to_dict(), "features": features.to_dict(),
                "recipe": dict(recipe or {}), "metrics": dict(metrics or {}),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    meta = {"format": MODEL_FORMAT, "manifest": json.dumps(manifest, sort_keys=True)}
    return atomic_write(path, st_save(tensors, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty if it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} does not exist") from None
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a safetensors file: {e}") from None


def file_format(path: str | os.PathLike) -> str:
    """``aat-bundle/1``, ``aat-model/1``, or an error for anything else."""
    fmt = read_metadata(path).get("format")
    if fmt not in (BUNDLE_FORMAT, MODEL_FORMAT):
        raise CheckpointError(f"{str(path)!r} is neither a task bundle ({BUNDLE_FORMAT}) nor a "
                              f"whole-model checkpoint ({MODEL_FORMAT}); its format is {fmt!r}")
    return fmt


def load_model_checkpoint(path: str | os.PathLike) -> tuple[AudioClassifier, dict[str, Any]]:
    """The model written by ``save_model_checkpoint`` (eval mode) and its manifest."""
    meta = read_metadata(path)
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an {MODEL_FORMAT} checkpoint")
    try:
        manifest = json.loads(meta["manifest"])
        cfg = BackboneConfig.from_dict(manifest["backbone"])
        labels = list(manifest["labels"])
        method = manifest["method"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} has an invalid manifest: {e}") from None
    from safetensors.torch import load_file

    canon = checkpoint_filter_fn(load_file(str(path)), source_format="ast")
    backbone = build_backbone(cfg, canon, path=str(path))
    model = AudioClassifier(backbone, method, len(labels))
    head = {k.removeprefix("head."): v for k, v in canon.items() if k.startswith("head.")}
    try:
        model.head.load_state_dict(head, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r}: head does not fit {len(labels)} labels: "
                              f"{e}") from None
    return model.eval(), manifest


def load_trained(path: str | os.PathLike, backbone=None) -> tuple[AudioClassifier, dict[str, Any]]:
    """A bundle applied to ``backbone``, or a whole-model checkpoint; plus its manifest dict."""
    if file_format(path) == MODEL_FORMAT:
        return load_model_checkpoint(path)
    bundle = TaskBundle.load(path)
    if backbone is None:
        raise CheckpointError(f"{str(path)!r} is a task bundle; it needs the backbone it was "
                              "trained on (--checkpoint)")
    return bundle.build_model(backbone).eval(), bundle.manifest.to_dict()
