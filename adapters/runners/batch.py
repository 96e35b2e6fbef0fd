"""A batch as the runners see it: grouped by sequence length, then by task.

A batch is ordered by task when it is grouped (stable), so each task is one contiguous run of
clips and the adapters apply per run; results come back in the caller's order. Clips of tasks
with deep prompts (prompt, joint) have a longer sequence and form their own group per prompt
count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from aat_serve.adapters.backbone import AST, drop_prompts, insert_prompts
from aat_serve.adapters.kernels.layout import segments
from aat_serve.adapters.slots import TaskEntry

Segment = tuple[int, int, int]
"""(first clip, end clip, pool row) of a contiguous run of one task's clips."""


@dataclass
class Group:
    """Clips sharing one sequence length, ordered by task; ``clips`` index the caller's batch."""

    clips: list[int]
    entries: list[TaskEntry | None]
    mlp_segs: list[Segment]
    spatial_segs: list[Segment]
    single: TaskEntry | None
    """The only adapter task when one MLP-adapter task covers the whole group, else None."""

    @property
    def num_prompts(self) -> int:
        first = self.entries[0]
        return first.num_prompts if first is not None else 0

    def prompts(self) -> torch.Tensor | None:
        """Each clip's prompts ``(B, L, P, D)``, or None without prompts."""
        if not self.num_prompts:
            return None
        return torch.stack([e.prompts for e in self.entries])  # type: ignore[misc]


def clip_rows(segs: Sequence[Segment], out: torch.Tensor) -> torch.Tensor:
    """Each clip's pool row from ``segs`` written into ``out`` (int32, one entry per clip of
    the group; -1 where no segment covers it); returns ``out``."""
    out.fill_(-1)
    for c0, c1, r in segs:
        out[c0:c1] = r
    return out


def group_batch(entries: Sequence[TaskEntry | None]) -> list[Group]:
    """The groups of a batch whose clip ``i`` runs with ``entries[i]`` (None: no task)."""
    def key(i: int) -> tuple[int, int, int]:
        e = entries[i]
        return (0, -1, -1) if e is None else (e.num_prompts, e.row, e.info.slot)

    order = sorted(range(len(entries)), key=key)  # stable
    groups: list[Group] = []
    for p in sorted({key(i)[0] for i in order}):
        clips = [i for i in order if key(i)[0] == p]
        ents = [entries[i] for i in clips]
        rows = [e.row if e is not None else -1 for e in ents]
        runs = segments(rows)
        kinds = [(e.mlp, e.spatial) if e is not None else (False, False) for e in ents]
        mlp = [s for s in runs if s[2] >= 0 and kinds[s[0]][0]]
        spatial = [s for s in runs if s[2] >= 0 and kinds[s[0]][1]]
        single = len(mlp) == 1 and mlp[0][:2] == (0, len(clips))
        groups.append(Group(clips, ents, mlp, spatial, ents[0] if single else None))
    return groups


BlockFn = Callable[[int, torch.Tensor], torch.Tensor]
"""Runs block ``i`` of the backbone on the token sequence ``(B, N, D)`` (the residual stream,
in the runner's residual dtype)."""


def encode(backbone: AST, x: torch.Tensor, prompts: torch.Tensor | None, block: BlockFn,
           residual: torch.dtype = torch.float32) -> torch.Tensor:
    """Pooled embeddings ``(B, D)`` (fp32): patch embedding, the stream cast to ``residual``,
    each block through ``block`` with the clips' deep prompts ``(B, L, P, D)`` (or None)
    inserted before it and dropped after it, then the backbone's pooling in fp32.

    The blocks' LayerNorms keep fp32 weights; given a bf16 stream they normalise in fp32 and
    return bf16 (torch's mixed-dtype LayerNorm), so only the stream itself is rounded.
    """
    n = backbone.num_prefix_tokens
    h = backbone.embed(x).to(residual)
    if prompts is not None:
        prompts = prompts.to(residual)
    for i in range(len(backbone.blocks)):
        if prompts is not None:
            h = insert_prompts(h, prompts[:, i], n)
        h = block(i, h)
        if prompts is not None:
            h = drop_prompts(h, prompts.shape[2], n)
    return backbone.pool(h.float())


def encode_group(backbone: AST, x: torch.Tensor, group: Group, block: BlockFn,
                 residual: torch.dtype = torch.float32) -> torch.Tensor:
    """``encode`` with the group's prompts."""
    return encode(backbone, x, group.prompts(), block, residual)
