"""Pure state-dict layout conversion (no I/O): the public AST layouts <-> our canonical names.

Canonical names are our ``AST`` module names (``blocks.3.attn.qkv.weight``) plus ``head.norm.*``
/ ``head.fc.*`` for the classifier. The public layouts are:

- original AST and SSAST: ``module.v.*`` for the backbone, ``module.mlp_head.{0,1}.*`` for the
  head; SSAST adds ``module.p_input_{f,t}dim`` and its pretraining modules;
- Hugging Face ``ASTForAudioClassification``: ``audio_spectrogram_transformer.*`` with
  query/key/value split (legacy on-disk names and the transformers 5 names both read).

Every function here maps dictionaries of tensors to dictionaries of tensors, in the spirit of
timm's ``checkpoint_filter_fn``; reading files is ``files.py``'s job, validating shapes
``load.py``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from aat_serve.adapters.checkpoints.messages import few_names
from aat_serve.adapters.errors import CheckpointError

DEIT_HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
"""DeiT's unused classifier tensors, which the original AST files still carry."""
SSAST_PRETRAIN_PREFIXES = ("mask_embed", "cpredlayer.", "gpredlayer.")
"""SSAST's pretraining-only modules (dropped on load)."""
SSAST_DIM_KEYS = ("p_input_fdim", "p_input_tdim")
"""SSAST's stored pretraining input size (mel bins, frames)."""
HF_PREFIX = "audio_spectrogram_transformer."
"""The Hugging Face backbone's name prefix."""

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
_FROM_HF_TOP = {v: k for k, v in _HF_TOP.items()}
_FROM_HF_HEAD = {v: k for k, v in _HF_HEAD.items()}
_FROM_HF_BLOCK = {name: canon for canon, names in _HF_BLOCK.items() for name in names}
_FROM_HF_QKV = {name: part for part, names in _HF_QKV.items() for name in names}
_FROM_ORIG_HEAD = {v: k for k, v in _ORIG_HEAD.items()}
_HF_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")

Tensors = dict[str, torch.Tensor]
_QKVParts = dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]]
"""(layer, "weight" | "bias") -> "q" | "k" | "v" -> (file name, tensor), fused after reading."""


@dataclass
class CanonicalStateDict:
    """A state dict of any public layout, renamed to canonical names."""

    tensors: Tensors
    """Canonical name -> tensor (Hugging Face q/k/v already fused into ``qkv``)."""
    source_format: str
    """``"hf"``, ``"ast"`` or ``"ssast"``."""
    origin: dict[str, str] = field(default_factory=dict)
    """Canonical name -> the name it had in the file, for error messages."""
    dropped: list[str] = field(default_factory=list)
    """File names deliberately not kept (DeiT heads, SSAST pretraining and size tensors)."""
    extras: Tensors = field(default_factory=dict)
    """SSAST's ``p_input_fdim`` / ``p_input_tdim`` scalars (file names without ``module.``)."""


def detect_format(state_dict: Tensors) -> str:
    """``"hf"``, ``"ssast"`` or ``"ast"`` from the key names of a state dict."""
    keys = [k.removeprefix("module.") for k in state_dict]
    if any(k.startswith((HF_PREFIX, "classifier.", "embeddings.")) for k in keys):
        return "hf"
    if any(k in SSAST_DIM_KEYS or k.startswith(SSAST_PRETRAIN_PREFIXES) for k in keys):
        return "ssast"
    return "ast"


def _split_module(key: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``."""
    mod, _, kind = key.rpartition(".")
    return mod, kind


def _hf_canonical_name(key: str, t: torch.Tensor, qkv: _QKVParts) -> str | None:
    """The canonical name of a Hugging Face key, or None when unknown.

    A query/key/value part is collected into ``qkv`` (fused later) and returns ``""``.
    """
    k = key.removeprefix("module.").removeprefix(HF_PREFIX)
    mod, kind = _split_module(k)
    if k in _FROM_HF_TOP:
        return _FROM_HF_TOP[k]
    if mod in _FROM_HF_HEAD:
        return f"{_FROM_HF_HEAD[mod]}.{kind}"
    if (m := _HF_LAYER_RE.match(k)) is not None:
        i, sub, kind = int(m.group(1)), m.group(2), m.group(3)
        if sub in _FROM_HF_BLOCK:
            return f"blocks.{i}.{_FROM_HF_BLOCK[sub]}.{kind}"
        if sub in _FROM_HF_QKV:
            qkv.setdefault((i, kind), {})[_FROM_HF_QKV[sub]] = (key, t)
            return ""
    return None


def _hf_to_canonical(sd: Tensors) -> tuple[Tensors, dict[str, str], list[str]]:
    """(canonical tensors, origin names, unknown keys) of a Hugging Face state dict."""
    out: Tensors = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    qkv: _QKVParts = {}
    for key, t in sd.items():
        canon = _hf_canonical_name(key, t, qkv)
        if canon is None:
            unknown.append(key)
        elif canon:
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


def _orig_to_canonical(sd: Tensors) -> CanonicalStateDict:
    """An original AST or SSAST state dict renamed; drops DeiT heads and SSAST pretraining."""
    out = CanonicalStateDict(tensors={}, source_format="ast")
    for key, t in sd.items():
        k = key.removeprefix("module.")
        mod, kind = _split_module(k)
        if k in SSAST_DIM_KEYS:
            out.extras[k] = t
            out.dropped.append(key)
            continue
        if k.startswith(SSAST_PRETRAIN_PREFIXES):
            out.dropped.append(key)
            continue
        if mod in _FROM_ORIG_HEAD:
            canon = f"{_FROM_ORIG_HEAD[mod]}.{kind}"
        else:
            canon = k.removeprefix("v.")
            if canon in DEIT_HEAD_KEYS:
                out.dropped.append(key)
                continue
        out.tensors[canon], out.origin[canon] = t, key
    return out


def to_canonical(state_dict: Tensors, source_format: str | None = None,
                 path: str = "state dict") -> CanonicalStateDict:
    """A state dict of any supported layout renamed to canonical names.

    ``source_format`` defaults to ``detect_format``. A Hugging Face key this does not know is a
    ``CheckpointError`` naming it; unknown original-layout names pass through unchanged for the
    strict loader to report.
    """
    fmt = source_format or detect_format(state_dict)
    if fmt == "hf":
        tensors, origin, unknown = _hf_to_canonical(state_dict)
        if unknown:
            raise CheckpointError(f"{path!r}: unexpected tensors in a Hugging Face AST "
                                  f"checkpoint: {few_names(sorted(unknown))}")
        return CanonicalStateDict(tensors=tensors, source_format=fmt, origin=origin)
    if fmt in ("ast", "ssast"):
        canon = _orig_to_canonical(state_dict)
        canon.source_format = fmt
        return canon
    raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected hf, ast or ssast")


def checkpoint_filter_fn(state_dict: Tensors, *, source_format: str | None = None) -> Tensors:
    """Any supported layout -> canonical names (timm style), dropping unused tensors.

    Backbone tensors keep our module names (``blocks.3.attn.qkv.weight``); the classifier
    becomes ``head.norm.*`` / ``head.fc.*``. Hugging Face query/key/value are fused into
    ``qkv`` (rows q, k, v). DeiT heads and SSAST pretraining modules are dropped. Names this
    does not know pass through unchanged, for the strict loader to report.
    """
    return to_canonical(state_dict, source_format).tensors


def to_original_state_dict(canonical: Tensors, *, prefix: str = "module.",
                           deit_head_classes: int | None = None) -> Tensors:
    """Canonical -> the original AST layout (``module.v.*``, ``module.mlp_head.{0,1}.*``).

    ``deit_head_classes`` adds the unused DeiT ``head``/``head_dist`` the real files carry.
    """
    out: Tensors = {}
    for k, t in canonical.items():
        mod, kind = _split_module(k)
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


def to_hf_state_dict(canonical: Tensors) -> Tensors:
    """Canonical -> ``ASTForAudioClassification`` names as published (query/key/value split)."""
    out: Tensors = {}
    for k, t in canonical.items():
        mod, kind = _split_module(k)
        if k in _HF_TOP:
            out[HF_PREFIX + _HF_TOP[k]] = t
        elif mod in _HF_HEAD:
            out[f"{_HF_HEAD[mod]}.{kind}"] = t
        elif (m := _BLOCK_RE.match(k)) is not None:
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


def source_name(canon: CanonicalStateDict, name: str) -> str:
    """What a canonical tensor is called in the layout ``canon`` came from (for messages).

    The file's own name when it has the tensor; otherwise the name that layout would give it,
    so a "missing" error names what the user should look for in their file.
    """
    if name in canon.origin:
        return canon.origin[name]
    if canon.source_format == "hf":
        try:
            return next(iter(to_hf_state_dict({name: torch.zeros(3)})))
        except CheckpointError:
            return name
    prefix = "module." if any(v.startswith("module.") for v in canon.origin.values()) else ""
    return next(iter(to_original_state_dict({name: torch.zeros(0)}, prefix=prefix)))
