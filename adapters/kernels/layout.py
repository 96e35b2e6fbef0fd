"""Weight and batch layouts shared by the torch reference, the Triton kernels and the model.

Shared MLP weights keep ``nn.Linear`` layouts (``w1 (H, D)``, ``w2 (D, H)``). Per-task adapter
weights live in stacked slot pools indexed by an integer slot, zero where no task is loaded
(a zero adapter is the identity)::

    w_down [S, D, R]   b_down [S, R]   w_up [S, R, D]   b_up [S, D]

A batch is described per row by ``row_slot[M]`` (int32, ``-1`` = no adapter). Clips are
ordered by slot when a batch is assembled, so each task is one contiguous run of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aat_serve.adapters.errors import ConfigError


@dataclass(frozen=True)
class MlpWeights:
    """A block's frozen MLP, ``fc2(GELU(fc1(h)))``, in ``nn.Linear`` layouts."""

    w1: torch.Tensor  # (H, D)
    b1: torch.Tensor  # (H,)
    w2: torch.Tensor  # (D, H)
    b2: torch.Tensor  # (D,)

    @property
    def hidden(self) -> int:
        return self.w1.shape[0]

    def widened(self, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor,
                up_b: torch.Tensor) -> MlpWeights:
        """This MLP plus one adapter in parallel (``nn.Linear`` layouts: ``down_w (R, D)``,
        ``up_w (D, R)``) as one wider MLP of hidden width ``H + R``: the adapter reads the same
        input and uses the same GELU, so ``fc1`` gains its rows, ``fc2`` its columns and ``b2``
        its output bias."""
        return MlpWeights(torch.cat([self.w1, down_w], dim=0), torch.cat([self.b1, down_b]),
                          torch.cat([self.w2, up_w], dim=1), self.b2 + up_b)


@dataclass(frozen=True)
class AdapterPool:
    """Bottleneck adapters of up to ``slots`` tasks for one layer, stacked by slot."""

    w_down: torch.Tensor  # (S, D, R)
    b_down: torch.Tensor  # (S, R)
    w_up: torch.Tensor  # (S, R, D)
    b_up: torch.Tensor  # (S, D)

    @classmethod
    def zeros(cls, slots: int, dim: int, rank: int, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> AdapterPool:
        kw = dict(dtype=dtype, device=device)
        return cls(torch.zeros(slots, dim, rank, **kw), torch.zeros(slots, rank, **kw),
                   torch.zeros(slots, rank, dim, **kw), torch.zeros(slots, dim, **kw))

    @property
    def slots(self) -> int:
        return self.w_down.shape[0]

    @property
    def dim(self) -> int:
        return self.w_down.shape[1]

    @property
    def rank(self) -> int:
        return self.w_down.shape[2]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.w_down, self.b_down, self.w_up, self.b_up

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def write(self, slot: int, fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor,
              fc2_b: torch.Tensor) -> None:
        """Copy an ``Adapter``'s ``fc1 (r, D)`` / ``fc2 (D, r)`` into ``slot``; zero-pad to R."""
        r = fc1_w.shape[0]
        if r > self.rank or fc1_w.shape[1] != self.dim:
            raise ConfigError(f"adapter of shape {tuple(fc1_w.shape)} does not fit a pool of "
                              f"rank {self.rank} and width {self.dim}")
        with torch.no_grad():
            self.clear(slot)
            self.w_down[slot, :, :r].copy_(fc1_w.t())
            self.b_down[slot, :r].copy_(fc1_b)
            self.w_up[slot, :r, :].copy_(fc2_w.t())
            self.b_up[slot].copy_(fc2_b)

    def clear(self, slot: int) -> None:
        with torch.no_grad():
            for t in self.tensors():
                t[slot].zero_()

    def grown(self, slots: int) -> AdapterPool:
        """A new pool with ``slots`` slots holding this pool's slots first (zeros after)."""
        new = AdapterPool.zeros(slots, self.dim, self.rank, self.w_down.dtype, self.w_down.device)
        n = min(slots, self.slots)
        with torch.no_grad():
            for dst, src in zip(new.tensors(), self.tensors(), strict=True):
                dst[:n].copy_(src[:n])
        return new


def sort_by_slot(clip_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order that makes equal slots contiguous, and its inverse permutation."""
    order = torch.sort(clip_slots.cpu(), stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order, inverse


def segments(sorted_slots: list[int]) -> list[tuple[int, int, int]]:
    """``(start, end, slot)`` runs of equal values in an already sorted list of clip slots."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(sorted_slots) + 1):
        if i == len(sorted_slots) or sorted_slots[i] != sorted_slots[start]:
            runs.append((start, i, sorted_slots[start]))
            start = i
    return runs


def row_slots(clip_slots: torch.Tensor, tokens_per_clip: int) -> torch.Tensor:
    """Per-row slot ids ``(B * N,)`` int32 for clips of ``N`` tokens each."""
    return clip_slots.to(torch.int32).repeat_interleave(tokens_per_clip)
