"""The two losses of the AAT recipes, with OpenMIC's observation mask.

- ``ce``: cross-entropy against ``argmax(target)`` (single-label recipes without mixup);
- ``bce``: binary cross-entropy on logits against the (possibly mixup-soft) target vector, for
  multi-label tasks and the mixup recipes. Entries with mask 0 (labels never annotated, as in
  OpenMIC) contribute nothing; the mean runs over all ``B x C`` entries as in PaSST.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

from aat_serve.adapters.errors import ConfigError

LossName = Literal["ce", "bce"]
LOSSES = ("ce", "bce")


def compute_loss(kind: str, logits: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar loss for logits and targets ``(B, C)``; ``mask`` ``(B, C)`` 1 = observed."""
    logits = logits.float()
    if kind == "ce":
        if mask is not None and not bool((mask == 1).all()):
            raise ConfigError("the ce loss cannot use a label mask; use bce for partially "
                              "observed labels")
        return F.cross_entropy(logits, target.argmax(dim=1))
    if kind == "bce":
        loss = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        if mask is not None:
            loss = loss * mask.float()
        return loss.mean()
    raise ConfigError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")
