"""A Hugging Face AST directory's JSON files -> our configs: ``config.json`` gives the backbone
geometry, class names and problem type; ``preprocessor_config.json`` the feature settings.

Missing keys take ``ASTConfig`` / ``ASTFeatureExtractor`` defaults. Pure functions of the parsed
JSON (reading the files is ``files.read_json``'s job); errors are ``CheckpointError`` naming
``source``, the file the values came from.
"""

from __future__ import annotations

from typing import Any

from aat_serve.adapters.checkpoints.geometry import ConfigFields
from aat_serve.adapters.config import AUDIOSET_MEAN, AUDIOSET_STD, BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import CheckpointError, ConfigError

HF_MODEL_TYPE = "audio-spectrogram-transformer"
_PROBLEM_TYPES = {"multi_label_classification": True, "single_label_classification": False}


def backbone_fields(config: dict[str, Any], source: str) -> ConfigFields:
    """BackboneConfig fields from ``config.json``, with ``target_length`` = its ``max_length``."""
    mt = config.get("model_type", HF_MODEL_TYPE)
    if mt != HF_MODEL_TYPE:
        raise CheckpointError(f"{source!r}: config.json model_type is {mt!r}, expected "
                              f"{HF_MODEL_TYPE!r}")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{source!r}: hidden_act {act!r} is not supported, expected 'gelu'")
    try:
        patch = int(config.get("patch_size", 16))
        eps = float(config.get("layer_norm_eps", 1e-12))
        return dict(embed_dim=int(config.get("hidden_size", 768)),
                    depth=int(config.get("num_hidden_layers", 12)),
                    num_heads=int(config.get("num_attention_heads", 12)),
                    mlp_hidden=int(config.get("intermediate_size", 3072)),
                    patch_freq=patch, patch_time=patch,
                    freq_stride=int(config.get("frequency_stride", 10)),
                    time_stride=int(config.get("time_stride", 10)),
                    num_mel_bins=int(config.get("num_mel_bins", 128)),
                    target_length=int(config.get("max_length", 1024)),
                    norm_eps=eps, head_norm_eps=eps, num_prefix_tokens=2,
                    qkv_bias=bool(config.get("qkv_bias", True)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source!r}: invalid value in config.json: {e}") from None


def labels(config: dict[str, Any], source: str) -> list[str] | None:
    """Class names in index order from ``id2label``; None when the config has none."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(f"{source!r}: config.json id2label must map integer ids to names"
                              ) from None
    if [i for i, _ in items] != list(range(len(items))):
        raise CheckpointError(f"{source!r}: config.json id2label ids are not "
                              f"0..{len(items) - 1}")
    return [v for _, v in items]


def multi_label(config: dict[str, Any]) -> bool | None:
    """From ``problem_type``; None when the config does not say."""
    return _PROBLEM_TYPES.get(config.get("problem_type"))


def feature_config(pre: dict[str, Any], cfg: BackboneConfig, target_length: int | None,
                   source: str) -> FeatureConfig:
    """Feature settings from ``preprocessor_config.json`` values (``{}`` when it is absent).

    The clip length is ``target_length`` when given, else the preprocessor's ``max_length``,
    else the model's; ``do_normalize: false`` becomes the identity normalisation.
    """
    try:
        mel = int(pre.get("num_mel_bins", cfg.num_mel_bins))
        if mel != cfg.num_mel_bins:
            raise CheckpointError(f"{source!r}: num_mel_bins {mel} does not match the "
                                  f"model's {cfg.num_mel_bins}")
        mean, std = float(pre.get("mean", AUDIOSET_MEAN)), float(pre.get("std", AUDIOSET_STD))
        if pre.get("do_normalize", True) is False:
            mean, std = 0.0, 0.5  # (x - 0) / (2 * 0.5) is the identity
        return FeatureConfig(sample_rate=int(pre.get("sampling_rate", 16000)), num_mel_bins=mel,
                             target_length=int(target_length or pre.get("max_length",
                                                                        cfg.target_length)),
                             mean=mean, std=std)
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{source!r}: invalid feature settings: {e}") from None
