"""Test helpers shared across packages: tiny backbones and external-tool checks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.config import BackboneConfig


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
