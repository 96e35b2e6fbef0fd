"""Shared fixtures: tiny backbones that run in milliseconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.config import BackboneConfig
from tests.helpers import tiny_backbone, tiny_config

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_cfg() -> BackboneConfig:
    return tiny_config()


@pytest.fixture
def backbone() -> AST:
    return tiny_backbone()
