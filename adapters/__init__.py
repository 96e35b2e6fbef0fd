"""aat-serve's model package: the AST backbone, AAT adapters, task bundles, multi-task model.

Knows nothing of HTTP or training loops.
"""

from adapters.backbone import AST
from adapters.bundle import Manifest, TaskBundle
from adapters.config import AdapterConfig, BackboneConfig, FeatureConfig
from adapters.errors import (
    AATError,
    AudioError,
    BackboneMismatchError,
    BundleError,
    CheckpointError,
    ConfigError,
)
from adapters.methods import METHODS, get_method
from adapters.model import AudioClassifier, count_trainable

__all__ = [
    "AST",
    "METHODS",
    "AATError",
    "AdapterConfig",
    "AudioClassifier",
    "AudioError",
    "BackboneConfig",
    "BackboneMismatchError",
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "FeatureConfig",
    "Manifest",
    "TaskBundle",
    "count_trainable",
    "get_method",
]
