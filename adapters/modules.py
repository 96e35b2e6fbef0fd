"""The task-specific modules of AAT: the bottleneck adapter, deep prompts and the head.

Adapter (Liang et al., "AAT: Adapting Audio Transformer for Various Acoustics Recognition
Tasks", arXiv 2401.10544)::

    A(z) = W_up · GELU(W_down · z + b_down) + b_up          (768 -> 192 -> 768)

``fc2`` (W_up, b_up) starts at zero, so a fresh adapter outputs exactly zero and the adapted
model starts as the frozen backbone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Adapter(nn.Module):
    """Bottleneck adapter without its own shortcut: returns ``fc2(GELU(fc1(z)))``."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, bottleneck)
        self.fc2 = nn.Linear(bottleneck, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As in the AAT code under timm's init: fc1 ~ TruncNormal(0, 0.02), zero bias; fc2 = 0.
        nn.init.trunc_normal_(self.fc1.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(z)))


class DeepPrompt(nn.Module):
    """VPT-deep prompts: ``num_prompts`` learned tokens for each of ``depth`` blocks.

    Each block gets its prompts inserted right after the prefix tokens and removes them at its
    output, so the sequence seen by the head is unchanged.
    """

    def __init__(self, depth: int, num_prompts: int, dim: int, patch_area: int = 256) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(depth, num_prompts, dim))
        # Uniform init of VPT / the AAT code: U(-v, v), v = sqrt(6 / (3 * patch_area + dim)).
        val = math.sqrt(6.0 / float(3 * patch_area + dim))
        nn.init.uniform_(self.tokens, -val, val)

    @property
    def num_prompts(self) -> int:
        return self.tokens.shape[1]


class ClassifierHead(nn.Module):
    """LayerNorm + Linear on the pooled (cls + dist) / 2 token, as AST's ``mlp_head``."""

    def __init__(self, dim: int, num_classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.zeros_(self.fc.bias)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))
