"""Strict loading: a public checkpoint -> an eval-mode, frozen ``AST`` plus its own head.

Every format is first renamed to the canonical layout (``convert``), its architecture read from
the tensor shapes or ``config.json`` (``geometry``, ``hf_config``), then loaded strictly: each
tensor of the file is consumed or explicitly dropped, and missing, unexpected or misshapen
tensors raise ``CheckpointError`` naming them as the file names them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.checkpoints import hf_config
from aat_serve.adapters.checkpoints.aat_model import ModelManifest, read_model_manifest
from aat_serve.adapters.checkpoints.convert import CanonicalStateDict, source_name, to_canonical
from aat_serve.adapters.checkpoints.files import read_hf_weights, read_json, read_tensor_file
from aat_serve.adapters.checkpoints.geometry import (
    backbone_config,
    original_geometry,
    shape_config,
    ssast_geometry,
)
from aat_serve.adapters.checkpoints.hub import looks_like_model_id, resolve_checkpoint
from aat_serve.adapters.checkpoints.messages import few_names
from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.demo_assets import BACKBONE_DIR as DEMO_BACKBONE_DIR
from aat_serve.adapters.errors import CheckpointError, ConfigError

HEAD_KEYS = ("norm.weight", "norm.bias", "fc.weight", "fc.bias")
"""Names in ``LoadedCheckpoint.head`` (``head.`` + these in a canonical state dict)."""

DEMO_CHECKPOINT = "demo"
"""The checkpoint name that means the demo backbone shipped inside the package."""

ORIGINAL_AST_MEL_BINS = 128
"""Mel bins assumed for an original AST ``.pth``, which does not record them (every public
one uses 128); ``load_checkpoint(num_mel_bins=...)`` says otherwise."""


def checkpoint_path(path: str | os.PathLike) -> Path:
    """Where a checkpoint name points: ``demo`` (when no such file exists) is the demo backbone."""
    p = Path(path)
    if str(path) == DEMO_CHECKPOINT and not p.exists():
        return DEMO_BACKBONE_DIR
    return p


@dataclass
class LoadedCheckpoint:
    """A public checkpoint as our backbone, its own head (if any), labels and feature settings."""

    backbone: AST
    """Eval mode, frozen weights, positional embedding at its native (stored) grid."""
    head: dict[str, torch.Tensor] | None
    """``norm.weight``, ``norm.bias``, ``fc.weight``, ``fc.bias``; None when there is none."""
    labels: list[str] | None
    """Class names from Hugging Face ``id2label``; None for the ``.pth`` formats."""
    features: FeatureConfig
    """``preprocessor_config.json`` values when present, else AudioSet stats at the length."""
    source_format: str
    """``"hf"``, ``"ast"`` or ``"ssast"``."""
    path: str
    dropped: tuple[str, ...] = ()
    """Tensors of the file that were deliberately not loaded (DeiT heads, SSAST pretraining)."""
    multi_label: bool | None = None
    """From a Hugging Face ``problem_type`` when the config states one."""
    features_recorded: bool = False
    """True when ``features`` were read from the checkpoint (``preprocessor_config.json`` or
    a whole-model manifest); False when they are defaults (AudioSet statistics)."""
    manifest: dict | None = None
    """The manifest of a whole-model (``aat-model/1``) checkpoint; None for the others."""

    @property
    def num_classes(self) -> int | None:
        return None if self.head is None else int(self.head["fc.weight"].shape[0])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The checkpoint's own logits ``(B, C)`` for features ``(B, T, F)``."""
        if self.head is None:
            raise CheckpointError(f"checkpoint {self.path!r} has no classification head")
        h = self.head
        pooled = self.backbone(features)
        x = F.layer_norm(pooled, (pooled.shape[-1],), h["norm.weight"], h["norm.bias"],
                         self.backbone.cfg.head_norm_eps)
        return F.linear(x, h["fc.weight"], h["fc.bias"])


def canonical_state_dict(ckpt: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The loaded backbone's frozen tensors plus ``head.*`` (when there is a head)."""
    out = dict(ckpt.backbone.frozen_state_dict())
    if ckpt.head is not None:
        out.update({f"head.{k}": v for k, v in ckpt.head.items()})
    return out


def _layout_error(canon: CanonicalStateDict, expected: set[str], given: set[str], path: str
                  ) -> CheckpointError | None:
    """The error for missing / unexpected backbone tensors, None when the names match."""
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if not missing and not unexpected:
        return None
    parts = []
    if missing:
        parts.append(f"missing tensors {few_names([source_name(canon, k) for k in missing])}")
    if unexpected:
        parts.append(f"unexpected tensors "
                     f"{few_names([canon.origin.get(k, k) for k in unexpected])}")
    return CheckpointError(f"{path!r} does not match the AST layout: " + "; ".join(parts))


def build_backbone(cfg: BackboneConfig, canon: dict[str, torch.Tensor], *, fmt: str = "ast",
                   origin: dict[str, str] | None = None, path: str = "<state dict>") -> AST:
    """An eval-mode, frozen ``AST(cfg)`` holding exactly the canonical backbone tensors.

    ``fmt`` and ``origin`` (canonical -> file name) only shape the error messages.
    """
    named = CanonicalStateDict(tensors=canon, source_format=fmt, origin=origin or {})
    with torch.device("meta"):
        model = AST(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: v for k, v in canon.items() if not k.startswith("head.")}
    error = _layout_error(named, set(expected), set(given), path)
    if error is not None:
        raise error
    for k, shape in expected.items():
        t = given[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{path!r}: tensor {named.origin.get(k, k)!r} has shape {tuple(t.shape)}, "
                f"expected {shape} for a {cfg.embed_dim}-wide, {cfg.depth}-block model with a "
                f"{cfg.stored_grid[0]}x{cfg.stored_grid[1]} positional grid")
        if not t.is_floating_point():
            raise CheckpointError(f"{path!r}: tensor {named.origin.get(k, k)!r} has dtype "
                                  f"{t.dtype}, expected floating point")
    model.load_state_dict({k: given[k].to(torch.float32).contiguous() for k in expected},
                          strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


def extract_head(canon: CanonicalStateDict, d: int, path: str, num_labels: int | None = None
                 ) -> dict[str, torch.Tensor] | None:
    """The checkpoint's classifier (``HEAD_KEYS``, fp32) for width ``d``; None without one."""
    origin = canon.origin
    present = {k.removeprefix("head."): v for k, v in canon.tensors.items()
               if k.startswith("head.")}
    if not present:
        return None
    unknown = sorted(set(present) - set(HEAD_KEYS))
    if unknown:
        raise CheckpointError(f"{path!r}: unexpected classifier tensors "
                              f"{few_names([origin.get('head.' + k, k) for k in unknown])}")
    missing = [k for k in HEAD_KEYS if k not in present]
    if missing:
        names = [source_name(canon, "head." + k) for k in missing]
        raise CheckpointError(f"{path!r}: the classifier is incomplete, missing "
                              f"{few_names(names)}")
    c = int(present["fc.weight"].shape[0])
    shapes = {"norm.weight": (d,), "norm.bias": (d,), "fc.weight": (c, d), "fc.bias": (c,)}
    for k, shape in shapes.items():
        if tuple(present[k].shape) != shape:
            raise CheckpointError(f"{path!r}: classifier tensor {origin.get('head.' + k, k)!r} "
                                  f"has shape {tuple(present[k].shape)}, expected {shape}")
    if num_labels is not None and num_labels != c:
        raise CheckpointError(f"{path!r}: config.json names {num_labels} labels but the "
                              f"classifier has {c} outputs")
    return {k: present[k].to(torch.float32).contiguous() for k in HEAD_KEYS}


def _check_positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise CheckpointError(f"{name} must be a positive integer, got {v!r}")


def load_checkpoint(path: str | os.PathLike, *, target_length: int | None = None,
                    freq_stride: int | None = None, time_stride: int | None = None,
                    num_heads: int | None = None, num_mel_bins: int | None = None
                    ) -> LoadedCheckpoint:
    """Load a Hugging Face directory, an original AST or an SSAST checkpoint, strictly.

    ``path`` may also be a Hugging Face model id (``owner/name``), resolved through the hub
    cache. ``target_length`` sets the clip length the features use (the positional grid stays
    as stored and is cut or interpolated per input). ``freq_stride``/``time_stride`` override
    the inferred strides of an original AST file, and set SSAST's fine-tuning strides (default
    10/10 for patch models, ``patch_freq``/1 for frame models as SSAST does).
    ``num_mel_bins`` is for an original AST file, which does not record it (default
    ``ORIGINAL_AST_MEL_BINS``). ``demo`` names the demo backbone; a whole-model checkpoint
    written by ``aat train`` (``full``/``partial``) loads with its own labels and features.
    """
    p = checkpoint_path(path)
    spath = str(p) if str(path) == DEMO_CHECKPOINT else str(path)
    _check_positive(target_length=target_length, freq_stride=freq_stride,
                    time_stride=time_stride, num_heads=num_heads, num_mel_bins=num_mel_bins)
    if not p.exists() and looks_like_model_id(spath):  # e.g. MIT/ast-finetuned-audioset-...
        p = resolve_checkpoint(spath)
    if p.is_dir():
        return _load_hf_dir(p, target_length, freq_stride, time_stride)
    if not p.exists():
        raise CheckpointError(f"checkpoint {spath!r} does not exist")
    if p.is_file():
        model = read_model_manifest(p)
        if model is not None:
            return _load_aat_model(p, spath, model, target_length)
    return _load_tensor_file(p, spath, target_length, freq_stride, time_stride, num_heads,
                             num_mel_bins)


def _load_aat_model(p: Path, spath: str, model: ModelManifest, target_length: int | None
                    ) -> LoadedCheckpoint:
    """A whole-model checkpoint: geometry, labels and features from its manifest."""
    canon = to_canonical(read_tensor_file(p), "ast", spath)
    cfg = model.backbone
    if target_length is not None:
        cfg = backbone_config({k: v for k, v in cfg.to_dict().items()
                               if k not in ("target_length", "pos_grid")},
                              cfg.stored_grid, target_length)
    backbone = build_backbone(cfg, canon.tensors, fmt="ast", origin=canon.origin, path=spath)
    head = extract_head(canon, cfg.embed_dim, spath, len(model.labels))
    features = model.features
    if target_length is not None:
        features = FeatureConfig.from_dict({**features.to_dict(), "target_length": target_length})
    if features.num_mel_bins != cfg.num_mel_bins:
        raise CheckpointError(f"{spath!r}: its manifest's features have "
                              f"{features.num_mel_bins} mel bins, its backbone "
                              f"{cfg.num_mel_bins}")
    return LoadedCheckpoint(backbone=backbone, head=head, labels=list(model.labels),
                            features=features, source_format="aat-model", path=spath,
                            dropped=tuple(sorted(canon.dropped)),
                            multi_label=model.multi_label, features_recorded=True,
                            manifest=model.raw)


def _load_tensor_file(p: Path, spath: str, target_length: int | None, freq_stride: int | None,
                      time_stride: int | None, num_heads: int | None,
                      num_mel_bins: int | None) -> LoadedCheckpoint:
    """An original AST or SSAST file (or a single Hugging Face weights file)."""
    canon = to_canonical(read_tensor_file(p), path=spath)
    fmt = canon.source_format
    fields = shape_config(canon, spath, num_heads)
    if fmt == "ssast":
        fields, grid, native_len = ssast_geometry(canon, fields, spath, freq_stride, time_stride)
    else:
        fields, grid, native_len = original_geometry(
            canon, fields, freq_stride, time_stride, target_length,
            num_mel_bins or ORIGINAL_AST_MEL_BINS)
    length = target_length or native_len
    cfg = backbone_config(dict(fields, norm_eps=1e-12 if fmt == "hf" else 1e-6,
                               head_norm_eps=1e-12 if fmt == "hf" else 1e-5), grid, length)
    backbone = build_backbone(cfg, canon.tensors, fmt=fmt, origin=canon.origin, path=spath)
    head = extract_head(canon, cfg.embed_dim, spath)
    features = FeatureConfig(num_mel_bins=cfg.num_mel_bins, target_length=length)
    return LoadedCheckpoint(backbone=backbone, head=head, labels=None, features=features,
                            source_format=fmt, path=spath, dropped=tuple(sorted(canon.dropped)))


def _load_hf_dir(directory: Path, target_length: int | None, freq_stride: int | None,
                 time_stride: int | None) -> LoadedCheckpoint:
    """A Hugging Face ``ASTForAudioClassification`` directory."""
    spath = str(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"directory {spath!r} is not a Hugging Face checkpoint: "
                              "no config.json")
    config = read_json(directory / "config.json")
    fields = hf_config.backbone_fields(config, spath)
    for name, v in (("freq_stride", freq_stride), ("time_stride", time_stride)):
        if v is not None and v != fields[name]:
            raise CheckpointError(f"{spath!r}: config.json sets {name} "
                                  f"{fields[name]}, not {v}")
    native_len = int(fields.pop("target_length"))
    try:
        native = BackboneConfig(**fields, target_length=native_len).grid()
    except ConfigError as e:
        raise CheckpointError(f"{spath!r}: inconsistent config.json: {e}") from None
    canon = to_canonical(read_hf_weights(directory), "hf", spath)
    cfg = backbone_config(fields, native, target_length or native_len)
    backbone = build_backbone(cfg, canon.tensors, fmt="hf", origin=canon.origin, path=spath)
    labels = hf_config.labels(config, spath)
    num_labels = len(labels) if labels is not None else None
    head = extract_head(canon, cfg.embed_dim, spath, num_labels)
    pre_path = directory / "preprocessor_config.json"
    pre = read_json(pre_path) if pre_path.is_file() else {}
    features = hf_config.feature_config(pre, cfg, target_length, str(pre_path))
    return LoadedCheckpoint(backbone=backbone, head=head, labels=labels, features=features,
                            source_format="hf", path=spath, dropped=tuple(canon.dropped),
                            multi_label=hf_config.multi_label(config),
                            features_recorded=pre_path.is_file())
