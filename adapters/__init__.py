"""aat-serve's model package: the AST backbone, AAT adapters, task bundles, multi-task model.

Knows nothing of HTTP or training loops.
"""

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import Manifest, TaskBundle
from aat_serve.adapters.config import AdapterConfig, BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import (
    AATError,
    AudioError,
    AudioTooLongError,
    BackboneMismatchError,
    BundleError,
    CheckpointError,
    ConfigError,
)
from aat_serve.adapters.methods import METHODS, get_method
from aat_serve.adapters.model import AudioClassifier, count_trainable

__all__ = [
    "AST",
    "METHODS",
    "AATError",
    "AdapterConfig",
    "AudioClassifier",
    "AudioError",
    "AudioTooLongError",
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
