"""The manifest of a whole-model checkpoint (``format: aat-model/1``, written by ``aat train``
for the ``full`` and ``partial`` methods): backbone geometry, labels and feature settings.

The file's tensors are in the original AST layout, which records neither the mel bins nor the
strides; the manifest does, so such a file loads as a backbone with its own labels and
features instead of a guessed 128-bin geometry and labels ``"0".."C-1"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import CheckpointError, ConfigError

MODEL_FORMAT = "aat-model/1"


@dataclass(frozen=True)
class ModelManifest:
    """What a whole-model checkpoint says about itself."""

    backbone: BackboneConfig
    features: FeatureConfig
    labels: list[str]
    multi_label: bool
    raw: dict[str, Any]
    """The manifest as stored (task, method, recipe, metrics, created_at, ...)."""


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file; empty for any other file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # not a safetensors file: other readers report what is wrong with it
        return {}


def read_model_manifest(path: Path) -> ModelManifest | None:
    """The manifest of an ``aat-model/1`` file; None for any other file."""
    meta = safetensors_metadata(path)
    if meta.get("format") != MODEL_FORMAT:
        return None
    try:
        raw = json.loads(meta["manifest"])
        return ModelManifest(backbone=BackboneConfig.from_dict(raw["backbone"]),
                             features=FeatureConfig.from_dict(raw["features"]),
                             labels=[str(v) for v in raw["labels"]],
                             multi_label=bool(raw.get("multi_label", False)), raw=raw)
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{str(path)!r} has an invalid {MODEL_FORMAT} manifest: "
                              f"{e}") from None
