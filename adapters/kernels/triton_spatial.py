"""The spatial adapter in one launch per layer: ``out = x + a + A_s(a)`` for every segment.

``a`` is the attention output of a block, ``A_s(a) = GELU(a W_down[s] + b_down[s]) W_up[s]
+ b_up[s]`` the task's bottleneck adapter. One program owns a one-slot row tile
(``plan.py``): it computes the tile's whole bottleneck ``(BLOCK_M, R_PAD)`` in registers
(R_PAD = the rank rounded up to a power of two; padded columns are masked to zero), rounds it
once to the operand dtype (as the act of the unfused path), then walks the D output columns
adding ``x + a`` in the epilogue. So the residual add, both GEMMs and both biases are one
kernel instead of two generic MLP kernels with H = 0 plus a torch add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from aat_serve.adapters.kernels.layout import AdapterPool
from aat_serve.adapters.kernels.plan import Plans
from aat_serve.adapters.kernels.triton_common import (
    TileConfig,
    dot_options,
    dot_tile,
    gelu,
    launch_options,
    persistent_programs,
    unit_stride,
)


@dataclass(frozen=True)
class SpatialConfig(TileConfig):
    """Tiles of the spatial adapter's kernel."""

    KERNEL = "spatial"

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 2
    per_sm: int = 0


@triton.jit
def _spatial(
    x_ptr, a_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, out_ptr, t_start, t_end, t_slot,
    T, D, R, NUM_PROGS,
    stride_xm, stride_am, stride_wds, stride_wdk, stride_bds, stride_wus, stride_wur,
    stride_bus, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    for tile in range(tl.program_id(0), T, NUM_PROGS):
        row0 = tl.load(t_start + tile)
        row1 = tl.load(t_end + tile)
        slot = tl.load(t_slot + tile)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row1
        rows = offs_m.to(tl.int64)
        s64 = tl.maximum(slot, 0).to(tl.int64)
        has = slot >= 0
        if row0 < row1:
            # the tile's whole bottleneck, fp32 accumulation (no K loop for slot -1: zeros)
            acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            for k0 in range(0, tl.where(has, D, 0), BLOCK_K):
                acc = dot_tile(acc, a_ptr, rows, stride_am, m_mask, wd_ptr + s64 * stride_wds,
                               stride_wdk, 1, offs_r, r_mask, k0 + offs_k, D, CAST_F32,
                               PRECISION)
            bias = tl.load(bd_ptr + s64 * stride_bds + offs_r, mask=r_mask & has, other=0.0)
            hid = gelu(acc + bias.to(tl.float32)[None, :]).to(a_ptr.dtype.element_ty)
            if CAST_F32:
                hid = hid.to(tl.float32)
            for n0 in range(0, D, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_mask = offs_n < D
                mask = m_mask[:, None] & n_mask[None, :]
                y = tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :], mask=mask,
                            other=0.0).to(tl.float32)
                y += tl.load(a_ptr + rows[:, None] * stride_am + offs_n[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                if slot >= 0:
                    w = tl.load(wu_ptr + s64 * stride_wus + offs_r[:, None] * stride_wur
                                + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :],
                                other=0.0)
                    if CAST_F32:
                        w = w.to(tl.float32)
                    up = tl.dot(hid, w, input_precision=PRECISION)
                    bu = tl.load(bu_ptr + s64 * stride_bus + offs_n, mask=n_mask, other=0.0)
                    y += up + bu.to(tl.float32)[None, :]
                tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :],
                         y.to(out_ptr.dtype.element_ty), mask=mask)


def rank_pad(rank: int) -> int:
    """The bottleneck width the kernel computes: a power of two, at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(rank))


def spatial_adapter(x: torch.Tensor, a: torch.Tensor, pool: AdapterPool, plans: Plans,
                    config: SpatialConfig = SpatialConfig(), cast_f32: bool | None = None
                    ) -> torch.Tensor:
    """``x + a + A_s(a)`` per row (slot -1: ``x + a``), a new tensor of ``x``'s dtype.

    Operands as for ``mlp_adapter(x + a, a, None, pool, row_slot)``, assumed checked.
    """
    cfg = config
    d = x.shape[1]
    x, a = unit_stride(x), unit_stride(a)
    plan = plans.get(cfg.block_m)
    wd, wu = unit_stride(pool.w_down), unit_stride(pool.w_up)
    bd, bu = unit_stride(pool.b_down), unit_stride(pool.b_up)
    out = torch.empty_like(x)
    progs = persistent_programs(x.device, plan.tiles, cfg.per_sm)
    _spatial[(progs,)](
        x, a, wd, bd, wu, bu, out, plan.start, plan.end, plan.slot, plan.tiles, d, pool.rank,
        progs, x.stride(0), a.stride(0), wd.stride(0), wd.stride(1), bd.stride(0),
        wu.stride(0), wu.stride(1), bu.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        R_PAD=rank_pad(pool.rank), **dot_options(a.dtype, cast_f32),
        **launch_options(cfg.num_warps, cfg.num_stages))
    return out
