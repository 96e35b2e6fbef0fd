"""Architecture from tensors: width, depth, patch size and strides of a canonical state dict.

Heads are width / 64 as in the DeiT sizes unless given. The original AST format stores no
strides or clip length, so ``infer_grid`` finds the strides and native length that explain the
positional embedding's token count; SSAST stores its pretraining input size, from which
``ssast_geometry`` derives the grid and the fine-tuning strides. Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from aat_serve.adapters.checkpoints.convert import CanonicalStateDict
from aat_serve.adapters.checkpoints.messages import few_names
from aat_serve.adapters.config import BackboneConfig
from aat_serve.adapters.errors import CheckpointError, ConfigError

STRIDE_PREFERENCE = (10, 16, 12, 14)
"""Strides tried first when inferring them from a positional embedding (the public AST ones)."""

CONVENTIONAL_LENGTHS = (1024, 512, 128, 400, 3000, 998, 1000, 500, 256, 300, 100, 2048)
"""Clip lengths (frames) of the AST/AAT recipes, tried first when inferring the native length."""

ConfigFields = dict[str, int | float | bool]
"""``BackboneConfig`` keyword arguments gathered from a checkpoint."""

_SHAPE_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight",
               "blocks.0.attn.qkv.weight")


def conv_grid(size: int, kernel: int, stride: int) -> int:
    """Output positions of a convolution without padding along one axis."""
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
            f = conv_grid(num_mel_bins, pf, fs)
            if num_patches % f:
                continue
            t = num_patches // f
            if exact:
                for length in lengths:
                    if length >= pt and conv_grid(length, pt, ts) == t:
                        return fs, ts, (f, t), length
            else:
                return fs, ts, (f, t), (t - 1) * ts + pt
    given = (f" with freq_stride={freq_stride}, time_stride={time_stride}"
             if freq_stride or time_stride else "")
    raise CheckpointError(
        f"cannot infer the patch strides: the positional embedding has {num_patches} patch "
        f"tokens, which no stride gives for {num_mel_bins} mel bins and {pf}x{pt} "
        f"patches{given}; pass freq_stride/time_stride explicitly")


def shape_config(canon: CanonicalStateDict, path: str, num_heads: int | None) -> ConfigFields:
    """BackboneConfig fields that tensor shapes determine (width, depth, MLP, patch)."""
    tensors, origin = canon.tensors, canon.origin
    missing = [n for n in _SHAPE_KEYS if n not in tensors]
    if missing:
        raise CheckpointError(
            f"{path!r} does not look like an AST checkpoint: it has no "
            f"{few_names(missing)} (found {few_names(sorted(tensors), 5)})")
    for name in ("cls_token", "pos_embed"):
        t = tensors[name]
        if t.dim() != 3 or t.shape[0] != 1:
            raise CheckpointError(f"{path!r}: {origin.get(name, name)!r} has shape "
                                  f"{tuple(t.shape)}, expected (1, tokens, D)")
    d = int(tensors["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k)))
    w = tensors["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[1] != 1:
        raise CheckpointError(f"{path!r}: patch embedding weight has shape {tuple(w.shape)}, "
                              f"expected (D, 1, patch_freq, patch_time) for 1-channel spectrograms")
    heads = num_heads or d // 64
    if num_heads is None and d % 64:
        raise CheckpointError(f"{path!r}: cannot infer the attention heads of a {d}-wide "
                              "model (DeiT sizes use width / 64); pass num_heads")
    return dict(embed_dim=d, depth=depth, num_heads=heads,
                mlp_hidden=int(tensors["blocks.0.mlp.fc1.weight"].shape[0]),
                patch_freq=int(w.shape[2]), patch_time=int(w.shape[3]),
                num_prefix_tokens=2 if "dist_token" in tensors else 1,
                qkv_bias="blocks.0.attn.qkv.bias" in tensors)


def _positive_scalar(t: torch.Tensor, name: str, path: str) -> int:
    if t.numel() != 1 or float(t.item()) != int(t.item()) or int(t.item()) <= 0:
        raise CheckpointError(f"{path!r}: {name} must be one positive integer, got "
                              f"{t.flatten()[:4].tolist()}")
    return int(t.item())


def ssast_geometry(canon: CanonicalStateDict, fields: ConfigFields, path: str,
                   freq_stride: int | None, time_stride: int | None,
                   ) -> tuple[ConfigFields, tuple[int, int], int]:
    """(fields with strides and mel bins, stored grid, native length) of an SSAST checkpoint.

    Pretraining used non-overlapping patches (stride = patch shape) on a ``p_input_fdim`` x
    ``p_input_tdim`` input; fine-tuning strides default to 10/10 for patch models and
    ``patch_freq``/1 for frame models (patch as tall as the spectrogram), as SSAST does.
    """
    for k in ("p_input_fdim", "p_input_tdim"):
        if k not in canon.extras:
            raise CheckpointError(f"{path!r}: SSAST checkpoint without 'module.{k}'")
    mel = _positive_scalar(canon.extras["p_input_fdim"], "p_input_fdim", path)
    frames = _positive_scalar(canon.extras["p_input_tdim"], "p_input_tdim", path)
    pf, pt = int(fields["patch_freq"]), int(fields["patch_time"])
    if pf > mel or pt > frames:
        raise CheckpointError(f"{path!r}: {pf}x{pt} patches do not fit the pretraining "
                              f"input {mel}x{frames}")
    grid = (conv_grid(mel, pf, pf), conv_grid(frames, pt, pt))
    n_patch = int(canon.tensors["pos_embed"].shape[1]) - int(fields["num_prefix_tokens"])
    if grid[0] * grid[1] != n_patch:
        raise CheckpointError(
            f"{path!r}: positional embedding has {n_patch} patch tokens, but a {mel}x"
            f"{frames} input in {pf}x{pt} patches gives {grid[0]}x{grid[1]}")
    frame_model = pf == mel
    fs = freq_stride or (pf if frame_model else 10)
    ts = time_stride or (1 if frame_model else 10)
    return dict(fields, freq_stride=fs, time_stride=ts, num_mel_bins=mel), grid, frames


def original_geometry(canon: CanonicalStateDict, fields: ConfigFields,
                      freq_stride: int | None, time_stride: int | None,
                      target_length: int | None, num_mel_bins: int
                      ) -> tuple[ConfigFields, tuple[int, int], int]:
    """(fields with strides and mel bins, stored grid, native length) of an original AST file.

    The file stores neither strides nor mel bins: ``infer_grid`` derives the strides for the
    caller's ``num_mel_bins``.
    """
    n_patch = int(canon.tensors["pos_embed"].shape[1]) - int(fields["num_prefix_tokens"])
    fs, ts, grid, native_len = infer_grid(
        n_patch, (int(fields["patch_freq"]), int(fields["patch_time"])), num_mel_bins,
        freq_stride=freq_stride, time_stride=time_stride, target_length=target_length)
    return (dict(fields, freq_stride=fs, time_stride=ts, num_mel_bins=num_mel_bins), grid,
            native_len)


def backbone_config(fields: ConfigFields, native_grid: tuple[int, int], target_length: int
                    ) -> BackboneConfig:
    """The config for ``fields`` at ``target_length``, keeping the stored positional grid."""
    try:
        cfg = BackboneConfig(**fields, target_length=target_length)
        if cfg.grid() != native_grid:
            cfg = dataclasses.replace(cfg, pos_grid=native_grid)
        return cfg
    except ConfigError as e:
        raise CheckpointError(f"inconsistent checkpoint geometry: {e}") from None
