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
from aat_serve.adapters.kernels.plan import Plans
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

    def row_slots(self, tokens: int, device: torch.device
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per-token pool rows (int32, -1 = none) for the spatial and the MLP adapters."""
        def rows(segs: list[Segment]) -> torch.Tensor:
            clip = torch.full((len(self.clips),), -1, dtype=torch.int32)
            for c0, c1, r in segs:
                clip[c0:c1] = r
            return clip.repeat_interleave(tokens).to(device)
        return (rows(self.spatial_segs) if self.spatial_segs else None), rows(self.mlp_segs)

    def row_plans(self, tokens: int, device: torch.device) -> tuple[Plans | None, Plans]:
        """``row_slots`` as kernel ``Plans``, bounded by the clip-level task runs (known here,
        so building the tile plans never syncs with the device)."""
        spatial, mlp = self.row_slots(tokens, device)

        def runs(segs: list[Segment]) -> int:
            clip = [-1] * len(self.clips)
            for c0, c1, r in segs:
                clip[c0:c1] = [r] * (c1 - c0)
            return len(segments(clip))
        return (None if spatial is None else Plans(spatial, runs(self.spatial_segs)),
                Plans(mlp, runs(self.mlp_segs)))


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
"""Runs block ``i`` of the backbone on the token sequence ``(B, N, D)`` (fp32 stream)."""


def encode_group(backbone: AST, x: torch.Tensor, group: Group, block: BlockFn) -> torch.Tensor:
    """Pooled embeddings ``(B, D)``: patch embedding, each block through ``block`` with the
    group's deep prompts inserted before it and dropped after it, then the backbone's pooling."""
    n = backbone.num_prefix_tokens
    h = backbone.embed(x)
    p = group.num_prompts
    prompts = group.prompts()
    for i in range(len(backbone.blocks)):
        if prompts is not None:
            h = insert_prompts(h, prompts[:, i], n)
        h = block(i, h)
        if prompts is not None:
            h = drop_prompts(h, p, n)
    return backbone.pool(h)
