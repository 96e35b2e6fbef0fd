"""Load the public AST checkpoints into our ``AST``: a Hugging Face directory, an original AST
``.pth`` and an SSAST ``.pth``; convert between their layouts; export a checkpoint's own head.

Every format is first mapped to one canonical state dict (our module names, ``head.*`` for the
classifier), then loaded strictly: each tensor in the file is consumed or explicitly dropped
(DeiT ``head``/``head_dist``, SSAST pretraining modules), and missing, unexpected or misshapen
tensors raise ``CheckpointError`` naming them. ``torch.load`` runs with ``weights_only=True``.

Architecture comes from the tensor shapes (heads = width / 64 as in the DeiT sizes); for the
original format the strides and clip length come from the positional embedding's token count
(``infer_grid``). The positional grid is kept as stored; ``AST.pos_embed_for`` cuts or
interpolates it per input length as AST and SSAST do.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.config import AUDIOSET_MEAN, AUDIOSET_STD, BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import AATError, CheckpointError, ConfigError
from aat_serve.adapters.hub import looks_like_model_id, resolve_checkpoint
from aat_serve.adapters.model import AudioClassifier

HEAD_KEYS = ("norm.weight", "norm.bias", "fc.weight", "fc.bias")
"""Names in ``LoadedCheckpoint.head`` (``head.`` + these in a canonical state dict)."""

STRIDE_PREFERENCE = (10, 16, 12, 14)
"""Strides tried first when inferring them from a positional embedding (the public AST ones)."""

CONVENTIONAL_LENGTHS = (1024, 512, 128, 400, 3000, 998, 1000, 500, 256, 300, 100, 2048)
"""Clip lengths (frames) of the AST/AAT recipes, tried first when inferring the native length."""

DEIT_HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
SSAST_PRETRAIN_PREFIXES = ("mask_embed", "cpredlayer.", "gpredlayer.")
SSAST_DIM_KEYS = ("p_input_fdim", "p_input_tdim")
HF_PREFIX = "audio_spectrogram_transformer."

# Canonical (original AST) block module -> Hugging Face name, legacy on-disk and transformers 5.
_HF_BLOCK = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
_HF_QKV = {"q": ("attention.attention.query", "attention.q_proj"),
           "k": ("attention.attention.key", "attention.k_proj"),
           "v": ("attention.attention.value", "attention.v_proj")}
_HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "dist_token": "embeddings.distillation_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_HEAD = {"head.norm": "classifier.layernorm", "head.fc": "classifier.dense"}
_ORIG_HEAD = {"head.norm": "mlp_head.0", "head.fc": "mlp_head.1"}


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


# -- reading files ----------------------------------------------------------------------------

def _looks_like_safetensors(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100 * 1024 * 1024 and head[8:9] == b"{"


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a safetensors file or a ``torch.save`` file (weights only)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"cannot read safetensors checkpoint {str(path)!r}: {e}") from None
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is an empty file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = ("it holds Python objects other than tensors, which weights_only=True refuses"
               if "weights only" in str(e).lower() else f"bad pickle data ({str(e)[:200]})")
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {why}") from None
    except Exception as e:  # zip, EOF and torch errors all mean "not a readable checkpoint"
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: not a PyTorch or safetensors file "
            f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected "
                              "a non-empty state dict of tensors")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a flat state dict of tensors: "
                              f"entries {_few(bad)} are not tensors")
    return obj


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    return data


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` or ``pytorch_model.bin`` (or their sharded index) of a directory."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return _read_tensor_file(directory / name)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{str(index)!r} has no 'weight_map' object")
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = (directory / str(shard)).resolve()
                if shard_path.parent != directory.resolve():
                    raise CheckpointError(f"{str(index)!r} names a shard outside its directory: "
                                          f"{shard!r}")
                out.update(_read_tensor_file(shard_path))
            return out
    raise CheckpointError(f"Hugging Face directory {str(directory)!r} has no model.safetensors or "
                          "pytorch_model.bin")


def _few(names: list[str] | tuple[str, ...], n: int = 8) -> str:
    names = list(names)
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# -- layouts -> canonical -----------------------------------------------------------------------

def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    """``"hf"``, ``"ssast"`` or ``"ast"`` from the key names of a state dict."""
    keys = [k.removeprefix("module.") for k in state_dict]
    if any(k.startswith((HF_PREFIX, "classifier.", "embeddings.")) for k in keys):
        return "hf"
    if any(k in SSAST_DIM_KEYS or k.startswith(SSAST_PRETRAIN_PREFIXES) for k in keys):
        return "ssast"
    return "ast"


def _hf_to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    qkv: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    top = {v: k for k, v in _HF_TOP.items()}
    head = {v: k for k, v in _HF_HEAD.items()}
    block = {name: canon for canon, names in _HF_BLOCK.items() for name in names}
    qkv_names = {name: part for part, names in _HF_QKV.items() for name in names}
    layer_re = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
    for key, t in sd.items():
        k = key.removeprefix("module.").removeprefix(HF_PREFIX)
        canon = None
        if k in top:
            canon = top[k]
        elif k.rsplit(".", 1)[0] in head:
            canon = f"{head[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}"
        elif (m := layer_re.match(k)) is not None:
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if mod in block:
                canon = f"blocks.{i}.{block[mod]}.{kind}"
            elif mod in qkv_names:
                qkv.setdefault((i, kind), {})[qkv_names[mod]] = (key, t)
                continue
        if canon is None:
            unknown.append(key)
            continue
        out[canon], origin[canon] = t, key
    for (i, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            have = next(iter(parts.values()))[0]
            raise CheckpointError(
                f"attention {kind} of layer {i} is incomplete: have {have!r} but not the "
                f"{'/'.join({'q': 'query', 'k': 'key', 'v': 'value'}[p] for p in missing)} part")
        canon = f"blocks.{i}.attn.qkv.{kind}"
        out[canon] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
        origin[canon] = parts["q"][0]
    return out, origin, unknown


def _orig_to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str], dict]:
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    extras: dict[str, torch.Tensor] = {}
    head = {v: k for k, v in _ORIG_HEAD.items()}
    for key, t in sd.items():
        k = key.removeprefix("module.")
        if k in SSAST_DIM_KEYS:
            extras[k] = t
            dropped.append(key)
            continue
        if k.startswith(SSAST_PRETRAIN_PREFIXES):
            dropped.append(key)
            continue
        if k.rsplit(".", 1)[0] in head:
            canon = f"{head[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}"
        else:
            canon = k.removeprefix("v.")
            if canon in DEIT_HEAD_KEYS:
                dropped.append(key)
                continue
        out[canon], origin[canon] = t, key
    return out, origin, dropped, extras


def _to_canonical(state_dict: dict[str, torch.Tensor], source_format: str | None = None,
                  path: str = "state dict"):
    """(canonical, origin names, dropped keys, extras, format) for a state dict of any layout."""
    fmt = source_format or detect_format(state_dict)
    if fmt == "hf":
        canon, origin, unknown = _hf_to_canonical(state_dict)
        dropped: list[str] = []
        extras: dict[str, torch.Tensor] = {}
        if unknown:
            raise CheckpointError(f"{path!r}: unexpected tensors in a Hugging Face AST "
                                  f"checkpoint: {_few(sorted(unknown))}")
    elif fmt in ("ast", "ssast"):
        canon, origin, dropped, extras = _orig_to_canonical(state_dict)
    else:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected hf, ast or ssast")
    return canon, origin, dropped, extras, fmt


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], *,
                         source_format: str | None = None) -> dict[str, torch.Tensor]:
    """Any supported layout -> canonical names (timm style), dropping unused tensors.

    Backbone tensors keep our module names (``blocks.3.attn.qkv.weight``); the classifier
    becomes ``head.norm.*`` / ``head.fc.*``. Hugging Face query/key/value are fused into
    ``qkv`` (rows q, k, v). DeiT heads and SSAST pretraining modules are dropped. Names this
    does not know pass through unchanged, for the strict loader to report.
    """
    return _to_canonical(state_dict, source_format)[0]


def to_original_state_dict(canonical: dict[str, torch.Tensor], *, prefix: str = "module.",
                           deit_head_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Canonical -> the original AST layout (``module.v.*``, ``module.mlp_head.{0,1}.*``).

    ``deit_head_classes`` adds the unused DeiT ``head``/``head_dist`` the real files carry.
    """
    out: dict[str, torch.Tensor] = {}
    for k, t in canonical.items():
        mod, _, kind = k.rpartition(".")
        if mod in _ORIG_HEAD:
            out[f"{prefix}{_ORIG_HEAD[mod]}.{kind}"] = t
        else:
            out[f"{prefix}v.{k}"] = t
    if deit_head_classes:
        d = canonical["cls_token"].shape[-1]
        g = torch.Generator().manual_seed(0)
        for name in ("head", "head_dist"):
            out[f"{prefix}v.{name}.weight"] = torch.randn(deit_head_classes, d, generator=g)
            out[f"{prefix}v.{name}.bias"] = torch.randn(deit_head_classes, generator=g)
    return out


def to_hf_state_dict(canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical -> ``ASTForAudioClassification`` names as published (query/key/value split)."""
    out: dict[str, torch.Tensor] = {}
    block_re = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
    for k, t in canonical.items():
        mod, _, kind = k.rpartition(".")
        if k in _HF_TOP:
            out[HF_PREFIX + _HF_TOP[k]] = t
        elif mod in _HF_HEAD:
            out[f"{_HF_HEAD[mod]}.{kind}"] = t
        elif (m := block_re.match(k)) is not None:
            i, sub = m.group(1), m.group(2)
            base = f"{HF_PREFIX}encoder.layer.{i}."
            if sub == "attn.qkv":
                for part, chunk in zip("qkv", t.chunk(3, dim=0), strict=True):
                    out[f"{base}{_HF_QKV[part][0]}.{kind}"] = chunk.clone()
            elif sub in _HF_BLOCK:
                out[f"{base}{_HF_BLOCK[sub][0]}.{kind}"] = t
            else:
                raise CheckpointError(f"tensor {k!r} has no Hugging Face equivalent")
        else:
            raise CheckpointError(f"tensor {k!r} has no Hugging Face equivalent")
    return out


def canonical_state_dict(ckpt: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The loaded backbone's frozen tensors plus ``head.*`` (when there is a head)."""
    out = dict(ckpt.backbone.frozen_state_dict())
    if ckpt.head is not None:
        out.update({f"head.{k}": v for k, v in ckpt.head.items()})
    return out


# -- architecture ------------------------------------------------------------------------------

def _conv_grid(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def infer_grid(num_patches: int, patch: tuple[int, int], num_mel_bins: int = 128, *,
               freq_stride: int | None = None, time_stride: int | None = None,
               target_length: int | None = None) -> tuple[int, int, tuple[int, int], int]:
    """(freq_stride, time_stride, (f, t) grid, native length) explaining ``num_patches``.

    Equal strides are assumed unless given. First pass: a preferred stride (10, 16, 12, 14,
    then the rest up to the patch size) whose grid matches a conventional clip length (the
    given ``target_length`` first); second pass: any stride whose frequency rows divide the
    count, with the shortest length giving that many time steps.
    """
    pf, pt = patch
    lengths = ([target_length] if target_length else []) + list(CONVENTIONAL_LENGTHS)
    if freq_stride or time_stride:
        strides = [int(freq_stride or time_stride)]
    else:
        strides = list(STRIDE_PREFERENCE) + [s for s in range(1, max(pf, pt) + 1)
                                             if s not in STRIDE_PREFERENCE]
    if num_patches < 1 or pf > num_mel_bins:
        raise CheckpointError(f"a positional embedding of {num_patches} patch tokens with "
                              f"{pf}x{pt} patches cannot cover {num_mel_bins} mel bins")
    for exact in (True, False):
        for fs in strides:
            ts = int(time_stride or fs)
            f = _conv_grid(num_mel_bins, pf, fs)
            if num_patches % f:
                continue
            t = num_patches // f
            if exact:
                for length in lengths:
                    if length >= pt and _conv_grid(length, pt, ts) == t:
                        return fs, ts, (f, t), length
            else:
                return fs, ts, (f, t), (t - 1) * ts + pt
    given = (f" with freq_stride={freq_stride}, time_stride={time_stride}"
             if freq_stride or time_stride else "")
    raise CheckpointError(
        f"cannot infer the patch strides: the positional embedding has {num_patches} patch "
        f"tokens, which no stride gives for {num_mel_bins} mel bins and {pf}x{pt} "
        f"patches{given}; pass freq_stride/time_stride explicitly")


def _require(canon: dict, names: tuple[str, ...], path: str) -> None:
    missing = [n for n in names if n not in canon]
    if missing:
        raise CheckpointError(
            f"{path!r} does not look like an AST checkpoint: it has no "
            f"{_few(missing)} (found {_few(sorted(canon), 5)})")


def _shape_config(canon: dict[str, torch.Tensor], path: str, num_heads: int | None,
                  origin: dict[str, str]) -> dict[str, Any]:
    """BackboneConfig fields that tensor shapes determine (width, depth, MLP, patch)."""
    _require(canon, ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight",
                     "blocks.0.attn.qkv.weight"), path)
    for name in ("cls_token", "pos_embed"):
        t = canon[name]
        if t.dim() != 3 or t.shape[0] != 1:
            raise CheckpointError(f"{path!r}: {origin.get(name, name)!r} has shape "
                                  f"{tuple(t.shape)}, expected (1, tokens, D)")
    d = int(canon["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in canon if (m := re.match(r"blocks\.(\d+)\.", k)))
    w = canon["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[1] != 1:
        raise CheckpointError(f"{path!r}: patch embedding weight has shape {tuple(w.shape)}, "
                              f"expected (D, 1, patch_freq, patch_time) for 1-channel spectrograms")
    heads = num_heads or d // 64
    if num_heads is None and d % 64:
        raise CheckpointError(f"{path!r}: cannot infer the attention heads of a {d}-wide "
                              "model (DeiT sizes use width / 64); pass num_heads")
    return dict(embed_dim=d, depth=depth, num_heads=heads,
                mlp_hidden=int(canon["blocks.0.mlp.fc1.weight"].shape[0]),
                patch_freq=int(w.shape[2]), patch_time=int(w.shape[3]),
                num_prefix_tokens=2 if "dist_token" in canon else 1,
                qkv_bias="blocks.0.attn.qkv.bias" in canon)


def _hf_config(config: dict[str, Any], path: str) -> dict[str, Any]:
    """BackboneConfig fields from a Hugging Face ``config.json`` (ASTConfig defaults)."""
    mt = config.get("model_type", "audio-spectrogram-transformer")
    if mt != "audio-spectrogram-transformer":
        raise CheckpointError(f"{path!r}: config.json model_type is {mt!r}, expected "
                              "'audio-spectrogram-transformer'")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path!r}: hidden_act {act!r} is not supported, expected 'gelu'")
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
        raise CheckpointError(f"{path!r}: invalid value in config.json: {e}") from None


def _hf_labels(config: dict[str, Any], path: str) -> list[str] | None:
    id2label = config.get("id2label")
    if not id2label:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(f"{path!r}: config.json id2label must map integer ids to names"
                              ) from None
    if [i for i, _ in items] != list(range(len(items))):
        raise CheckpointError(f"{path!r}: config.json id2label ids are not 0..{len(items) - 1}")
    return [v for _, v in items]


def _hf_features(directory: Path, cfg: BackboneConfig, target_length: int | None
                 ) -> FeatureConfig:
    pre_path = directory / "preprocessor_config.json"
    pre = _read_json(pre_path) if pre_path.is_file() else {}
    try:
        mel = int(pre.get("num_mel_bins", cfg.num_mel_bins))
        if mel != cfg.num_mel_bins:
            raise CheckpointError(f"{str(pre_path)!r}: num_mel_bins {mel} does not match the "
                                  f"model's {cfg.num_mel_bins}")
        mean, std = float(pre.get("mean", AUDIOSET_MEAN)), float(pre.get("std", AUDIOSET_STD))
        if pre.get("do_normalize", True) is False:
            mean, std = 0.0, 0.5  # (x - 0) / (2 * 0.5) is the identity
        return FeatureConfig(sample_rate=int(pre.get("sampling_rate", 16000)), num_mel_bins=mel,
                             target_length=int(target_length or pre.get("max_length",
                                                                        cfg.target_length)),
                             mean=mean, std=std)
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{str(pre_path)!r}: invalid feature settings: {e}") from None


# -- strict loading ----------------------------------------------------------------------------

def _source_name(canon: str, fmt: str, origin: dict[str, str]) -> str:
    if canon in origin:
        return origin[canon]
    if fmt == "hf":
        try:
            return next(iter(to_hf_state_dict({canon: torch.zeros(3)})))
        except CheckpointError:
            return canon
    prefix = "module." if any(v.startswith("module.") for v in origin.values()) else ""
    return next(iter(to_original_state_dict({canon: torch.zeros(0)}, prefix=prefix)))


def build_backbone(cfg: BackboneConfig, canon: dict[str, torch.Tensor], *, fmt: str = "ast",
                   origin: dict[str, str] | None = None, path: str = "<state dict>") -> AST:
    """An eval-mode, frozen ``AST(cfg)`` holding exactly the canonical backbone tensors."""
    origin = origin or {}
    with torch.device("meta"):
        model = AST(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: v for k, v in canon.items() if not k.startswith("head.")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few([_source_name(k, fmt, origin) for k in missing])}")
        if unexpected:
            parts.append(f"unexpected tensors {_few([origin.get(k, k) for k in unexpected])}")
        raise CheckpointError(f"{path!r} does not match the AST layout: " + "; ".join(parts))
    for k, shape in expected.items():
        t = given[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{path!r}: tensor {origin.get(k, k)!r} has shape {tuple(t.shape)}, expected "
                f"{shape} for a {cfg.embed_dim}-wide, {cfg.depth}-block model with a "
                f"{cfg.stored_grid[0]}x{cfg.stored_grid[1]} positional grid")
        if not t.is_floating_point():
            raise CheckpointError(f"{path!r}: tensor {origin.get(k, k)!r} has dtype {t.dtype}, "
                                  "expected floating point")
    model.load_state_dict({k: given[k].to(torch.float32).contiguous() for k in expected},
                          strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


def _extract_head(canon: dict[str, torch.Tensor], d: int, origin: dict[str, str], fmt: str,
                  path: str, num_labels: int | None = None) -> dict[str, torch.Tensor] | None:
    present = {k.removeprefix("head."): v for k, v in canon.items() if k.startswith("head.")}
    if not present:
        return None
    unknown = sorted(set(present) - set(HEAD_KEYS))
    if unknown:
        raise CheckpointError(f"{path!r}: unexpected classifier tensors "
                              f"{_few([origin.get('head.' + k, k) for k in unknown])}")
    missing = [k for k in HEAD_KEYS if k not in present]
    if missing:
        names = [_source_name("head." + k, fmt, origin) for k in missing]
        raise CheckpointError(f"{path!r}: the classifier is incomplete, missing {_few(names)}")
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


def _scalar(t: torch.Tensor, name: str, path: str) -> int:
    if t.numel() != 1 or float(t.item()) != int(t.item()) or int(t.item()) <= 0:
        raise CheckpointError(f"{path!r}: {name} must be one positive integer, got "
                              f"{t.flatten()[:4].tolist()}")
    return int(t.item())


def _backbone_cfg(fields: dict[str, Any], native_grid: tuple[int, int], target_length: int
                  ) -> BackboneConfig:
    try:
        cfg = BackboneConfig(**fields, target_length=target_length)
        if cfg.grid() != native_grid:
            cfg = dataclasses.replace(cfg, pos_grid=native_grid)
        return cfg
    except ConfigError as e:
        raise CheckpointError(f"inconsistent checkpoint geometry: {e}") from None


def load_checkpoint(path: str | os.PathLike, *, target_length: int | None = None,
                    freq_stride: int | None = None, time_stride: int | None = None,
                    num_heads: int | None = None) -> LoadedCheckpoint:
    """Load a Hugging Face directory, an original AST or an SSAST checkpoint, strictly.

    ``target_length`` sets the clip length the features use (the positional grid stays as
    stored and is cut or interpolated per input). ``freq_stride``/``time_stride`` override the
    inferred strides of an original AST file, and set SSAST's fine-tuning strides (default 10/10
    for patch models, ``patch_freq``/1 for frame models as SSAST does).
    """
    p = Path(path)
    spath = str(path)
    for name, v in (("target_length", target_length), ("freq_stride", freq_stride),
                    ("time_stride", time_stride), ("num_heads", num_heads)):
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise CheckpointError(f"{name} must be a positive integer, got {v!r}")
    if not p.exists() and looks_like_model_id(spath):  # e.g. MIT/ast-finetuned-audioset-...
        p = resolve_checkpoint(spath)
    if p.is_dir():
        return _load_hf_dir(p, target_length, freq_stride, time_stride)
    if not p.exists():
        raise CheckpointError(f"checkpoint {spath!r} does not exist")
    sd = _read_tensor_file(p)
    canon, origin, dropped, extras, fmt = _to_canonical(sd, path=spath)
    fields = _shape_config(canon, spath, num_heads, origin)
    n_patch = int(canon["pos_embed"].shape[1]) - fields["num_prefix_tokens"]
    if fmt == "ssast":
        for k in SSAST_DIM_KEYS:
            if k not in extras:
                raise CheckpointError(f"{spath!r}: SSAST checkpoint without 'module.{k}'")
        mel = _scalar(extras["p_input_fdim"], "p_input_fdim", spath)
        frames = _scalar(extras["p_input_tdim"], "p_input_tdim", spath)
        pf, pt = fields["patch_freq"], fields["patch_time"]
        if pf > mel or pt > frames:
            raise CheckpointError(f"{spath!r}: {pf}x{pt} patches do not fit the pretraining "
                                  f"input {mel}x{frames}")
        # Pretraining used non-overlapping patches (stride = patch shape).
        grid = (_conv_grid(mel, pf, pf), _conv_grid(frames, pt, pt))
        if grid[0] * grid[1] != n_patch:
            raise CheckpointError(
                f"{spath!r}: positional embedding has {n_patch} patch tokens, but a {mel}x"
                f"{frames} input in {pf}x{pt} patches gives {grid[0]}x{grid[1]}")
        frame_model = pf == mel
        fs = freq_stride or (pf if frame_model else 10)
        ts = time_stride or (1 if frame_model else 10)
        fields.update(freq_stride=fs, time_stride=ts, num_mel_bins=mel)
        native_len = frames
    else:
        fs, ts, grid, native_len = infer_grid(
            n_patch, (fields["patch_freq"], fields["patch_time"]), 128,
            freq_stride=freq_stride, time_stride=time_stride, target_length=target_length)
        fields.update(freq_stride=fs, time_stride=ts, num_mel_bins=128)
    length = target_length or native_len
    cfg = _backbone_cfg(dict(fields, norm_eps=1e-12 if fmt == "hf" else 1e-6,
                             head_norm_eps=1e-12 if fmt == "hf" else 1e-5), grid, length)
    backbone = build_backbone(cfg, canon, fmt=fmt, origin=origin, path=spath)
    head = _extract_head(canon, cfg.embed_dim, origin, fmt, spath)
    features = FeatureConfig(num_mel_bins=cfg.num_mel_bins, target_length=length)
    return LoadedCheckpoint(backbone=backbone, head=head, labels=None, features=features,
                            source_format=fmt, path=spath, dropped=tuple(sorted(dropped)))


def _load_hf_dir(directory: Path, target_length: int | None, freq_stride: int | None,
                 time_stride: int | None) -> LoadedCheckpoint:
    spath = str(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"directory {spath!r} is not a Hugging Face checkpoint: "
                              "no config.json")
    config = _read_json(directory / "config.json")
    fields = _hf_config(config, spath)
    for name, v in (("freq_stride", freq_stride), ("time_stride", time_stride)):
        if v is not None and v != fields[name]:
            raise CheckpointError(f"{spath!r}: config.json sets {name} "
                                  f"{fields[name]}, not {v}")
    native_len = fields.pop("target_length")
    try:
        native = BackboneConfig(**fields, target_length=native_len).grid()
    except ConfigError as e:
        raise CheckpointError(f"{spath!r}: inconsistent config.json: {e}") from None
    sd = _read_hf_weights(directory)
    canon, origin, dropped, _, fmt = _to_canonical(sd, "hf", spath)
    cfg = _backbone_cfg(fields, native, target_length or native_len)
    backbone = build_backbone(cfg, canon, fmt=fmt, origin=origin, path=spath)
    labels = _hf_labels(config, spath)
    num_labels = len(labels) if labels is not None else None
    head = _extract_head(canon, cfg.embed_dim, origin, fmt, spath, num_labels)
    problem = config.get("problem_type")
    multi = {"multi_label_classification": True, "single_label_classification": False}
    return LoadedCheckpoint(backbone=backbone, head=head, labels=labels,
                            features=_hf_features(directory, cfg, target_length),
                            source_format="hf", path=spath, dropped=tuple(dropped),
                            multi_label=multi.get(problem))


# -- labels and the head bundle ----------------------------------------------------------------

def read_label_csv(path: str | os.PathLike) -> list[str]:
    """Display names, in index order, from AST's ``class_labels_indices.csv``.

    Columns ``index,mid,display_name``; names are quoted and may contain commas.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read label file {str(path)!r}: {e}") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows or [c.strip() for c in rows[0]] != ["index", "mid", "display_name"]:
        raise ConfigError(f"label file {str(path)!r} must start with the header "
                          "'index,mid,display_name'")
    labels: dict[int, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 3:
            raise ConfigError(f"label file {str(path)!r} line {line}: expected 3 columns "
                              f"(index,mid,display_name), got {len(row)}")
        try:
            idx = int(row[0])
        except ValueError:
            raise ConfigError(f"label file {str(path)!r} line {line}: index {row[0]!r} is not "
                              "an integer") from None
        if idx in labels:
            raise ConfigError(f"label file {str(path)!r} line {line}: index {idx} repeated")
        labels[idx] = row[2].strip()
    if sorted(labels) != list(range(len(labels))) or not labels:
        raise ConfigError(f"label file {str(path)!r}: indices must be 0..N-1 without gaps")
    return [labels[i] for i in range(len(labels))]


AUDIOSET_CLASSES = 527


def head_bundle(ckpt: LoadedCheckpoint, task: str, labels: list[str] | None = None, *,
                multi_label: bool | None = None) -> TaskBundle:
    """The checkpoint's own classifier as a ``head`` task bundle on its backbone.

    Labels: ``labels``, else the checkpoint's ``id2label``, else ``"0".."C-1"``. Multi-label:
    as given, else the Hugging Face ``problem_type``, else True for the 527 AudioSet classes.
    """
    if ckpt.head is None:
        raise CheckpointError(f"checkpoint {ckpt.path!r} ({ckpt.source_format}) has no "
                              "classification head to export")
    c = int(ckpt.head["fc.weight"].shape[0])
    names = list(labels) if labels is not None else ckpt.labels or [str(i) for i in range(c)]
    if len(names) != c:
        raise ConfigError(f"{len(names)} labels given for a head with {c} classes")
    if multi_label is None:
        multi_label = ckpt.multi_label if ckpt.multi_label is not None else c == AUDIOSET_CLASSES
    # AudioClassifier (re)sets the blocks' adapters; put back whatever the backbone carried.
    attached = [(b.mlp_adapter, b.spatial_adapter) for b in ckpt.backbone.blocks]
    try:
        model = AudioClassifier(ckpt.backbone, "head", c)
        model.load_task_state_dict({f"head.{k}": v for k, v in ckpt.head.items()})
        return TaskBundle.from_model(
            model, task, names, ckpt.features, multi_label=multi_label,
            recipe={"origin": "checkpoint head", "source_format": ckpt.source_format})
    except AATError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot export the head of {ckpt.path!r}: {e}") from None
    finally:
        for block, (mlp, spatial) in zip(ckpt.backbone.blocks, attached, strict=True):
            block.mlp_adapter, block.spatial_adapter = mlp, spatial
