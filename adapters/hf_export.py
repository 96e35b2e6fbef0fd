"""A backbone plus one task as a stock ``ASTForAudioClassification`` directory, exactly.

An ``aat_m`` task's MLP adapter reads the same ``h2 = LN2(x)`` as the block's MLP and uses the
same GELU, and both outputs are added to the residual stream::

    x + fc2(GELU(fc1(h2))) + W_up(GELU(W_down(h2) + b_down)) + b_up

which is one wider MLP: ``fc1`` gains the ``r`` rows of ``W_down`` (and ``b_down``), ``fc2``
gains the ``r`` columns of ``W_up``, and ``b_up`` adds to ``fc2``'s bias. So the task exports
as a plain AST with ``intermediate_size = mlp_hidden + r`` that transformers loads without
custom code, with the same logits up to float rounding. A ``head`` task needs no widening.

The other methods cannot be written this way: a spatial adapter (``aat_ms``, ``joint``) is a
non-linear function of the attention output added after the output projection, and deep
prompts (``prompt``, ``joint``) add tokens to every block; neither exists in the stock model.

The Hugging Face format has one ``layer_norm_eps`` for every LayerNorm; the blocks' value is
written. Original AST checkpoints use 1e-6 in the blocks and 1e-5 in the head, a difference
of a few parts per million in the head's normalised input, far below the 1e-4 the tests allow.

The dictionaries here are pure; ``write_hf_directory`` is the only I/O.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints.convert import to_hf_state_dict
from aat_serve.adapters.checkpoints.hf_config import HF_MODEL_TYPE
from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.layout import MlpWeights

_MLP_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
EXACT_METHODS = ("head", "aat_m")
"""Task methods whose bundle plus the backbone is exactly a stock AST."""

_WHY_NOT = {
    "aat_ms": "its spatial adapters act on the attention output after the output projection, "
              "which the stock AST block has no place for",
    "joint": "its spatial adapters and deep prompts have no place in the stock AST block",
    "prompt": "its deep prompts add tokens to every block, which the stock AST cannot do",
}


def hf_config(cfg: BackboneConfig, labels: list[str], *, multi_label: bool | None = None,
              intermediate_size: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` of an ``ASTForAudioClassification`` with this geometry and labels
    (``problem_type`` only when ``multi_label`` is given)."""
    if cfg.patch_freq != cfg.patch_time:
        raise ConfigError(f"the Hugging Face AST format needs square patches; this backbone's "
                          f"are {cfg.patch_freq}x{cfg.patch_time}")
    config = {
        "architectures": ["ASTForAudioClassification"],
        "model_type": HF_MODEL_TYPE,
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": intermediate_size or cfg.mlp_hidden,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": cfg.norm_eps, "qkv_bias": cfg.qkv_bias,
        "patch_size": cfg.patch_freq, "frequency_stride": cfg.freq_stride,
        "time_stride": cfg.time_stride, "max_length": cfg.target_length,
        "num_mel_bins": cfg.num_mel_bins, "torch_dtype": dtype,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    if multi_label is not None:
        config["problem_type"] = ("multi_label_classification" if multi_label
                                  else "single_label_classification")
    return config


def hf_preprocessor_config(features: FeatureConfig) -> dict[str, Any]:
    """``preprocessor_config.json`` of ``ASTFeatureExtractor`` for these feature settings."""
    return {"feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1,
            "sampling_rate": features.sample_rate, "num_mel_bins": features.num_mel_bins,
            "max_length": features.target_length, "mean": features.mean, "std": features.std,
            "do_normalize": True, "padding_value": 0.0, "return_attention_mask": False}


@dataclass
class HFModel:
    """What a Hugging Face AST directory holds: weights (HF names), config, preprocessor."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    preprocessor: dict[str, Any]


def _check_exportable(bundle: TaskBundle, backbone: AST) -> None:
    method = bundle.manifest.method
    if method not in EXACT_METHODS:
        raise ConfigError(f"task {bundle.manifest.task!r} (method {method!r}) cannot be exported "
                          f"exactly as a stock ASTForAudioClassification: {_WHY_NOT[method]}; "
                          f"methods that can: {', '.join(EXACT_METHODS)}")
    cfg = backbone.cfg
    if cfg.num_prefix_tokens != 2:
        raise ConfigError("the Hugging Face AST format has two prefix tokens (cls and "
                          f"distillation); this backbone has {cfg.num_prefix_tokens}")


def widened_mlps(canonical: dict[str, torch.Tensor], task: dict[str, torch.Tensor],
                 depth: int) -> dict[str, torch.Tensor]:
    """Each block's ``mlp.fc1``/``mlp.fc2`` with the block's MLP adapter folded in."""
    out = dict(canonical)
    for i in range(depth):
        mlp, ad = f"blocks.{i}.mlp", f"blocks.{i}.mlp_adapter"
        wide = MlpWeights(*(canonical[f"{mlp}.{n}"] for n in _MLP_NAMES)).widened(
            *(task[f"{ad}.{n}"] for n in _MLP_NAMES))
        out.update(zip((f"{mlp}.{n}" for n in _MLP_NAMES),
                       (wide.w1, wide.b1, wide.w2, wide.b2), strict=True))
    return out


def task_as_hf(backbone: AST, bundle: TaskBundle, *, dtype: torch.dtype = torch.float32
               ) -> HFModel:
    """The backbone with ``bundle`` applied, as a stock AST (``head`` and ``aat_m`` only).

    Raises ``ConfigError`` naming why for other methods, ``BackboneMismatchError`` when the
    bundle was trained on another backbone.
    """
    bundle.check_backbone(backbone)
    _check_exportable(bundle, backbone)
    m, cfg = bundle.manifest, backbone.cfg
    task = {k: v.detach().float() for k, v in bundle.tensors.items()}
    canonical = {k: v.detach().float() for k, v in backbone.frozen_state_dict().items()}
    extra = 0
    if m.method == "aat_m":
        canonical = widened_mlps(canonical, task, cfg.depth)
        extra = task["blocks.0.mlp_adapter.fc1.weight"].shape[0]
    canonical.update({k: v for k, v in task.items() if k.startswith("head.")})
    tensors = {k: v.to(dtype).contiguous() for k, v in to_hf_state_dict(canonical).items()}
    config = hf_config(cfg, m.labels, multi_label=m.multi_label,
                       intermediate_size=cfg.mlp_hidden + extra,
                       dtype=str(dtype).removeprefix("torch."))
    return HFModel(tensors, config, hf_preprocessor_config(m.feature_config))


def write_hf_directory(model: HFModel, out: str | Path) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``preprocessor_config.json`` into
    ``out``, replacing it whole (built in a sibling temporary folder, then renamed)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model.tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name, data in (("config.json", model.config),
                       ("preprocessor_config.json", model.preprocessor)):
        (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out
