"""A single-task audio classifier: the AST backbone plus one method's task modules."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.config import AdapterConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.methods import MethodSpec, get_method
from aat_serve.adapters.modules import Adapter, ClassifierHead, DeepPrompt


class AudioClassifier(nn.Module):
    """Backbone + (adapters, prompts) + head for one task, trained with one method.

    The classifier works on its own copy of the backbone it is given (``self.backbone``, see
    ``own_backbone``) and leaves the caller's untouched. Adapters live on that copy's blocks
    (``blocks[i].mlp_adapter`` and ``blocks[i].spatial_adapter``) so the block's forward stays
    the paper's formula.
    """

    def __init__(self, backbone: AST, method: str | MethodSpec, num_classes: int,
                 adapter_cfg: AdapterConfig | None = None, head_norm_eps: float | None = None,
                 ) -> None:
        super().__init__()
        spec = method if isinstance(method, MethodSpec) else get_method(method)
        if num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        cfg = adapter_cfg if adapter_cfg is not None else spec.adapters
        # The method decides which modules exist; a caller may only resize them.
        cfg = dataclasses.replace(cfg, mlp=spec.adapters.mlp, spatial=spec.adapters.spatial,
                                  num_prompts=cfg.num_prompts if spec.adapters.num_prompts else 0)
        self.method = spec
        self.adapter_cfg = cfg
        self.backbone = own_backbone(backbone, spec)
        d = backbone.cfg.embed_dim
        for block in self.backbone.blocks:
            block.mlp_adapter = Adapter(d, cfg.bottleneck) if cfg.mlp else None
            block.spatial_adapter = Adapter(d, cfg.bottleneck) if cfg.spatial else None
        bcfg = backbone.cfg
        self.prompts = (DeepPrompt(bcfg.depth, cfg.num_prompts, d,
                                   patch_area=bcfg.patch_freq * bcfg.patch_time)
                        if cfg.num_prompts else None)
        eps = head_norm_eps if head_norm_eps is not None else bcfg.head_norm_eps
        self.head = ClassifierHead(d, num_classes, eps=eps)
        set_trainable(self)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, D)``."""
        return self.backbone(x, prompts=self.prompts.tokens if self.prompts is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` for features ``(B, T, F)``."""
        return self.head(self.forward_features(x))

    def task_state_dict(self) -> dict[str, torch.Tensor]:
        """The task's own tensors (head, adapters, prompts) under stable bundle names."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.head.state_dict().items():
            out[f"head.{name}"] = t
        if self.prompts is not None:
            out["prompts"] = self.prompts.tokens.data
        for i, block in enumerate(self.backbone.blocks):
            for kind in ("mlp_adapter", "spatial_adapter"):
                mod = getattr(block, kind)
                if mod is not None:
                    for name, t in mod.state_dict().items():
                        out[f"blocks.{i}.{kind}.{name}"] = t
        return {k: v.detach() for k, v in out.items()}

    def load_task_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors named as ``task_state_dict`` returns them; strict on names and shapes."""
        own = self.task_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ConfigError(f"task tensors do not fit method {self.method.name!r}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, dst in own.items():
                src = tensors[name]
                if tuple(src.shape) != tuple(dst.shape):
                    raise ConfigError(f"task tensor {name!r} has shape {tuple(src.shape)}, "
                                      f"expected {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))


def own_backbone(backbone: AST, method: MethodSpec) -> AST:
    """A copy of ``backbone`` for one classifier to attach its adapters to and train.

    The module tree (blocks, their adapter slots) and every parameter object are new, so the
    caller's backbone keeps its modules, values and ``requires_grad`` flags. A method that
    trains the backbone gets a full copy of its tensors; a frozen-backbone method shares them
    (frozen parameters viewing the same storage), which costs no memory: the AAT premise of one
    frozen backbone under many small tasks. Those shared tensors are read-only by contract: an
    in-place write into them (which no frozen method makes) would reach the caller's backbone.
    """
    if not method.exports_bundle:
        return copy.deepcopy(backbone)
    shared = {id(p): nn.Parameter(p.detach(), requires_grad=False)
              for p in backbone.parameters()}
    return copy.deepcopy(backbone, memo=shared)


def set_trainable(model: AudioClassifier) -> None:
    """Freeze everything outside the method's trainable set (``requires_grad=False``)."""
    spec = model.method
    depth = len(model.backbone.blocks)
    for name, p in model.named_parameters():
        task_param = name.startswith(("head.", "prompts.")) or "adapter" in name
        if task_param or spec.trains_backbone == "all":
            p.requires_grad_(True)
        elif spec.trains_backbone == "last_half":
            p.requires_grad_(any(name.startswith(f"backbone.blocks.{i}.")
                                 for i in range(depth // 2, depth)))
        else:
            p.requires_grad_(False)


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
