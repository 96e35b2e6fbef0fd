"""Row-tile plans: a batch's rows cut into tiles that each hold exactly one task slot.

The kernels of ``triton_fused``, ``triton_sgmv`` and ``triton_spatial`` give every program a
row tile of at most ``block_m`` rows that lies inside one run of equal ``row_slot`` values
(a task segment), so the adapter part of a tile has one slot and one accumulator, with no
per-row slot loop and no mask merge. A segment of ``n`` rows becomes ``cdiv(n, block_m)``
tiles (the last one ragged), so a batch of ``M`` rows and ``S`` segments has at most
``cdiv(M, block_m) + S - 1`` tiles.

The plan is built with tensor ops on ``row_slot``'s device and fixed shapes (no host sync),
so it can be captured in a CUDA graph and replayed with another task mix: it is sized for at
most ``max_segments`` segments and unused tiles are empty (``start == M``, skipped by the
kernels). Rows need not be sorted; unsorted rows only make more (smaller) tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aat_serve.adapters.errors import ConfigError


@dataclass(frozen=True)
class TilePlan:
    """One-slot row tiles: ``start``, ``end`` (exclusive) and ``slot`` per tile, int32."""

    start: torch.Tensor  # (T,) first row; M for an unused tile
    end: torch.Tensor  # (T,) one past the last row; M for an unused tile
    slot: torch.Tensor  # (T,) the tile's slot; -1 for rows without adapter and unused tiles
    block_m: int
    rows: int

    @property
    def tiles(self) -> int:
        return self.start.numel()


def max_tiles(rows: int, block_m: int, max_segments: int) -> int:
    """Upper bound on the tiles of ``rows`` rows in at most ``max_segments`` segments."""
    return -(-rows // block_m) + max(0, min(max_segments, rows) - 1)


def count_segments(row_slot: torch.Tensor) -> int:
    """Runs of equal values in ``row_slot`` (one device-to-host sync on CUDA)."""
    if row_slot.numel() == 0:
        return 0
    return int((row_slot[1:] != row_slot[:-1]).sum()) + 1


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _segments_bound(row_slot: torch.Tensor) -> int:
    """The exact count, or every row its own segment while a CUDA graph is captured (a sync
    is not allowed then; the plan has more, empty, tiles)."""
    return row_slot.numel() if _capturing(row_slot) else count_segments(row_slot)


def tile_plan(row_slot: torch.Tensor, block_m: int, max_segments: int | None = None
              ) -> TilePlan:
    """Cut ``row_slot``'s rows into one-slot tiles of at most ``block_m`` rows.

    ``max_segments`` bounds the number of segments (e.g. the number of clips, since a task
    owns whole clips); ``None`` counts them, which syncs with the device (during CUDA-graph
    capture, where it cannot, every row counts as a segment). Too small a bound
    raises ``ConfigError`` when it can be checked (not during CUDA-graph capture).
    """
    if block_m <= 0:
        raise ConfigError(f"block_m must be positive, got {block_m}")
    m = row_slot.numel()
    dev = row_slot.device
    if m == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=dev)
        return TilePlan(empty, empty, empty, block_m, 0)
    if max_segments is None:
        max_segments = _segments_bound(row_slot)
    t = max_tiles(m, block_m, max_segments)
    slot = row_slot.to(torch.int32)
    idx = torch.arange(m, dtype=torch.int64, device=dev)
    new = torch.ones(m, dtype=torch.bool, device=dev)
    new[1:] = slot[1:] != slot[:-1]
    seg_start = torch.where(new, idx, 0).cummax(0).values
    seg_id = new.cumsum(0) - 1
    seg_end = torch.zeros(m, dtype=torch.int64, device=dev).scatter_reduce_(
        0, seg_id, idx + 1, reduce="amax")
    first = (idx - seg_start) % block_m == 0  # this row starts a tile
    tile_id = first.cumsum(0) - 1
    # rows that start no tile (and tiles past the bound) write into a spare last element
    dest = torch.where(first & (tile_id < t), tile_id, t)
    start = torch.full((t + 1,), m, dtype=torch.int64, device=dev).scatter_(0, dest, idx)[:t]
    used = start < m
    s = start.clamp(max=m - 1)
    end = torch.where(used, torch.minimum(s + block_m, seg_end[seg_id[s]]), m)
    tslot = torch.where(used, slot[s], -1)
    if not _capturing(row_slot):
        needed = int(first.sum())
        if needed > t:
            raise ConfigError(f"the rows need {needed} tiles of {block_m} but max_segments="
                              f"{max_segments} allows {t}; pass a larger max_segments")
    return TilePlan(start.to(torch.int32), end.to(torch.int32), tslot.to(torch.int32),
                    block_m, m)


def tile_plan_reference(row_slot: list[int], block_m: int) -> list[tuple[int, int, int]]:
    """The used tiles ``(start, end, slot)`` by a plain Python loop (for tests)."""
    tiles = []
    start = 0
    for i in range(1, len(row_slot) + 1):
        if i == len(row_slot) or row_slot[i] != row_slot[start]:
            for t0 in range(start, i, block_m):
                tiles.append((t0, min(t0 + block_m, i), row_slot[start]))
            start = i
    return tiles


@dataclass
class Plans:
    """The tile plans of one ``row_slot`` for each row-tile height, built on first use.

    The model builds one ``Plans`` per forward pass and every layer's kernels share it.
    """

    row_slot: torch.Tensor
    max_segments: int | None = None
    _by_block: dict[int, TilePlan] = field(default_factory=dict)

    def get(self, block_m: int) -> TilePlan:
        plan = self._by_block.get(block_m)
        if plan is None:
            if self.max_segments is None:  # count once, not once per tile height
                self.max_segments = _segments_bound(self.row_slot)
            plan = tile_plan(self.row_slot, block_m, self.max_segments)
            self._by_block[block_m] = plan
        return plan

    @property
    def segments(self) -> int:
        """The number of segments (or the bound the plans were given)."""
        if self.max_segments is None:
            self.max_segments = _segments_bound(self.row_slot)
        return self.max_segments
