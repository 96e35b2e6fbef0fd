"""Which feature settings a run uses, and where each came from.

A backbone that records its own settings (a Hugging Face ``preprocessor_config.json``, or the
manifest of a whole-model checkpoint) was trained on them: clip length, mean and std default
to those. The paper's named recipes (``esc50``, ``sc2``, ...) keep their values, with one
warning listing where they differ from the backbone's; a flag (``--target-length``, ``--mean``,
``--std``) always wins. Mel bins and sample rate are the backbone's. Every run records the
answer as ``{"target_length": {"value": 100, "source": "backbone"}, ...}``.
"""

from __future__ import annotations

import logging
from typing import Any

from aat_serve.adapters.checkpoints import LoadedCheckpoint
from aat_serve.adapters.config import FeatureConfig
from aat_serve.training.recipes import Recipe

log = logging.getLogger(__name__)

RECIPE_FEATURES = ("target_length", "mean", "std")
"""Feature settings that are also recipe fields (overridable by flag)."""


def is_paper_recipe(recipe: Recipe) -> bool:
    """True for the data sets' published recipes; False for ``generic*`` and custom ones."""
    return not recipe.name.startswith(("generic", "custom"))


def _differs(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) > 1e-4 * max(1.0, abs(float(b)))


def resolve_features(recipe: Recipe, overrides: dict[str, Any], ckpt: LoadedCheckpoint | None,
                     num_mel_bins: int) -> tuple[Recipe, FeatureConfig, dict[str, dict]]:
    """(recipe with the chosen feature values, the run's features, each setting's source).

    ``recipe`` already carries ``overrides``; ``ckpt`` is None for an in-process backbone.
    """
    own = ckpt.features if ckpt is not None and ckpt.features_recorded else None
    paper = is_paper_recipe(recipe)
    chosen: dict[str, Any] = {}
    sources: dict[str, dict[str, Any]] = {}
    differences = []
    for name in RECIPE_FEATURES:
        value = getattr(recipe, name)
        if name in overrides:
            source = f"--{name.replace('_', '-')}"
        elif own is not None and not paper:
            value, source = getattr(own, name), "backbone"
        else:
            source = f"recipe {recipe.name}"
            if own is not None and _differs(value, getattr(own, name)):
                differences.append(f"{name} {value} (backbone: {getattr(own, name)})")
        chosen[name] = value
        sources[name] = {"value": value, "source": source}
    if differences:
        log.warning("recipe %r differs from the backbone's own feature settings: %s; pass "
                    "--target-length/--mean/--std to use the backbone's", recipe.name,
                    ", ".join(differences))
    rate = own.sample_rate if own is not None else FeatureConfig().sample_rate
    sources["num_mel_bins"] = {"value": num_mel_bins, "source": "backbone"}
    sources["sample_rate"] = {"value": rate,
                              "source": "backbone" if own is not None else "default"}
    if any(chosen[n] != getattr(recipe, n) for n in RECIPE_FEATURES):
        recipe = recipe.replace(**chosen)
    features = FeatureConfig(sample_rate=rate, num_mel_bins=num_mel_bins,
                             target_length=int(chosen["target_length"]),
                             mean=float(chosen["mean"]), std=float(chosen["std"]))
    return recipe, features, sources
