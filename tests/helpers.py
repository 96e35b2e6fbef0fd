"""Test helpers shared across packages: tiny backbones, random task bundles, tool checks."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil

import pytest
import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.methods import get_method
from aat_serve.adapters.model import AudioClassifier

TINY_FEATURES = FeatureConfig(num_mel_bins=32, target_length=64)
"""The features of ``tiny_config``'s backbone."""
TINY_TASKS = [("ms", "aat_ms", 3), ("m", "aat_m", 5), ("hd", "head", 4), ("pr", "prompt", 2),
              ("jt", "joint", 6)]
"""(name, method, classes): every bundle method, each with its own class count."""


def tiny_config(**overrides) -> BackboneConfig:
    """A 2-block, 32-wide AST with 16x16 patches at stride 16 on 32 mel bins x 64 frames."""
    base = dict(embed_dim=32, depth=2, num_heads=2, mlp_hidden=64, patch_freq=16,
                patch_time=16, freq_stride=16, time_stride=16, num_mel_bins=32,
                target_length=64)
    base.update(overrides)
    return BackboneConfig(**base)


def tiny_backbone(seed: int = 0, **overrides) -> AST:
    torch.manual_seed(seed)
    return AST(tiny_config(**overrides)).eval()


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, unless CI demands it (AAT_REQUIRE_TOOLS=1)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("AAT_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} is required (AAT_REQUIRE_TOOLS=1) but not installed")
        pytest.skip(f"{name} not installed")
    return path


def perturb_task_weights(model: torch.nn.Module, seed: int, scale: float = 0.05):
    """Stand-in for training: add N(0, scale^2) noise to every trainable tensor, in place.

    Fresh adapters are the identity (zero up-projection), so tests that compare task outputs
    need non-zero task weights to mean anything. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def random_task_model(backbone: AST, method: str, num_classes: int, *, seed: int,
                      scale: float = 0.3, bottleneck: int | None = None,
                      num_prompts: int | None = None) -> AudioClassifier:
    """A single-task model on a copy of ``backbone`` whose task weights (head, adapters,
    prompts) are their initial values plus N(0, scale^2) noise (``perturb_task_weights``).
    ``bottleneck`` / ``num_prompts`` override the method's default adapter config."""
    overrides = {k: v for k, v in (("bottleneck", bottleneck), ("num_prompts", num_prompts))
                 if v is not None}
    cfg = dataclasses.replace(get_method(method).adapters, **overrides)
    model = AudioClassifier(copy.deepcopy(backbone), method, num_classes, adapter_cfg=cfg).eval()
    return perturb_task_weights(model, seed, scale)


def random_bundle(backbone: AST, task: str, method: str = "aat_ms", num_classes: int = 4, *,
                  seed: int = 0, scale: float = 0.3, bottleneck: int | None = None,
                  num_prompts: int | None = None, features: FeatureConfig | None = None,
                  labels: list[str] | None = None, multi_label: bool = False) -> TaskBundle:
    """The one maker of random task bundles for tests: ``random_task_model`` exported for
    ``task`` (labels ``{task}-{i}`` unless given; ``TINY_FEATURES`` unless given)."""
    model = random_task_model(backbone, method, num_classes, seed=seed, scale=scale,
                              bottleneck=bottleneck, num_prompts=num_prompts)
    labels = labels or [f"{task}-{i}" for i in range(num_classes)]
    return TaskBundle.from_model(model, task, labels, features or TINY_FEATURES,
                                 multi_label=multi_label)
