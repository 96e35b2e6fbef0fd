"""Synthetic public-format checkpoints for tests: random weights written as a Hugging Face
directory (config by transformers' own ``ASTConfig``), an original AST ``.pth`` or an SSAST
``.pth``. Nothing is downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.checkpoints import to_hf_state_dict, to_original_state_dict
from aat_serve.adapters.config import BackboneConfig

DATA = Path(__file__).parent / "data"
AUDIOSET_CSV = DATA / "audioset_class_labels_indices.csv"
SPEECHCOMMANDS_CSV = DATA / "speechcommands_class_labels_indices.csv"


def random_canonical(cfg: BackboneConfig, num_classes: int | None, seed: int = 0
                     ) -> dict[str, torch.Tensor]:
    """Random canonical weights with O(1) activations: every tensor non-trivial.

    Linear and conv weights ~ N(0, 1/fan_in) so attention is far from uniform; LayerNorm
    weights 1 + N(0, 0.1^2); biases, tokens and positions N(0, 0.02^2)..N(0, 0.1^2).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AST(cfg).state_dict().items()}
    d = cfg.embed_dim
    if num_classes:
        shapes.update({"head.norm.weight": (d,), "head.norm.bias": (d,),
                       "head.fc.weight": (num_classes, d), "head.fc.bias": (num_classes,)})
    out = {}
    for k, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if "norm" in k and k.endswith(".weight"):
            out[k] = 1.0 + 0.1 * noise
        elif k.endswith(".bias"):
            out[k] = 0.02 * noise
        elif k in ("cls_token", "dist_token", "pos_embed"):
            out[k] = 0.1 * noise
        else:  # (out, in) linear or (out, 1, kf, kt) conv
            fan_in = math.prod(shape[1:])
            out[k] = noise / math.sqrt(fan_in)
    return out


def hf_config_kwargs(cfg: BackboneConfig) -> dict:
    if cfg.patch_freq != cfg.patch_time:
        raise ValueError("Hugging Face AST has square patches only")
    return dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_hidden,
                patch_size=cfg.patch_freq, frequency_stride=cfg.freq_stride,
                time_stride=cfg.time_stride, max_length=cfg.target_length,
                num_mel_bins=cfg.num_mel_bins, qkv_bias=cfg.qkv_bias)


def write_hf_dir(directory: Path, canonical: dict[str, torch.Tensor], cfg: BackboneConfig,
                 labels: list[str] | None = None, preprocessor: dict | None = None,
                 weights: str = "model.safetensors", **config_extra) -> Path:
    """A Hugging Face ``ASTForAudioClassification`` directory in the published layout."""
    from transformers import ASTConfig

    directory.mkdir(parents=True, exist_ok=True)
    num_labels = int(canonical["head.fc.weight"].shape[0])
    labels = labels or [f"class {i}" for i in range(num_labels)]
    config = ASTConfig(**hf_config_kwargs(cfg), num_labels=num_labels,
                       id2label=dict(enumerate(labels)),
                       label2id={v: i for i, v in enumerate(labels)},
                       architectures=["ASTForAudioClassification"], **config_extra)
    config.save_pretrained(directory)
    sd = {k: v.contiguous() for k, v in to_hf_state_dict(canonical).items()}
    if weights == "model.safetensors":
        save_file(sd, str(directory / weights), metadata={"format": "pt"})
    else:
        torch.save(sd, directory / weights)
    if preprocessor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


def write_original(path: Path, canonical: dict[str, torch.Tensor], **kw) -> Path:
    """An original AST ``.pth`` (``module.v.*``, fused qkv, DeiT heads included)."""
    kw.setdefault("deit_head_classes", 10)
    torch.save(to_original_state_dict(canonical, **kw), path)
    return path


def write_ssast(path: Path, *, frame: bool, embed_dim: int = 64, depth: int = 1,
                seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A synthetic SSAST pretraining checkpoint: patch 16x16 (8x64 grid) or frame 128x2 (1x512).

    Returns the path and the canonical backbone tensors written into it.
    """
    pf, pt = (128, 2) if frame else (16, 16)
    cfg = BackboneConfig(embed_dim=embed_dim, depth=depth, num_heads=max(1, embed_dim // 64),
                         mlp_hidden=2 * embed_dim, patch_freq=pf, patch_time=pt,
                         freq_stride=pf, time_stride=pt, num_mel_bins=128, target_length=1024)
    canonical = random_canonical(cfg, None, seed)
    sd = to_original_state_dict(canonical, deit_head_classes=10)
    g = torch.Generator().manual_seed(seed + 1)
    d = embed_dim
    sd["module.p_input_fdim"] = torch.tensor(128)
    sd["module.p_input_tdim"] = torch.tensor(1024)
    sd["module.mask_embed"] = torch.randn(1, 1, d, generator=g)
    for name in ("cpredlayer", "gpredlayer"):
        sd[f"module.{name}.0.weight"] = torch.randn(d, d, generator=g)
        sd[f"module.{name}.0.bias"] = torch.randn(d, generator=g)
        sd[f"module.{name}.2.weight"] = torch.randn(256, d, generator=g)
        sd[f"module.{name}.2.bias"] = torch.randn(256, generator=g)
    torch.save(sd, path)
    return path, canonical
