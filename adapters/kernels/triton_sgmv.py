"""Route (b): cuBLAS for the frozen MLP, segmented shrink/expand Triton kernels for adapters.

The S-LoRA / Punica SGMV pattern, on one-slot row tiles (``plan.py``)::

    base = GELU(h W1^T + b1) W2^T + b2                 torch (cuBLAS), h's dtype
    a    = GELU(h W_down[s] + b_down[s])               shrink: (M, R), rows with a slot only
    out  = x + base + a W_up[s] + b_up[s]              expand: adds into base, one rounding

The expand kernel's epilogue also adds the residual, so the adapter costs two launches over
the MLP's cuBLAS calls and no extra pass. Rows without a slot (-1) get ``x + base``. With no
MLP the same kernels compute ``x + A_s(h)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights
from aat_serve.adapters.kernels.plan import Plans
from aat_serve.adapters.kernels.triton_common import (
    TileConfig,
    dot_options,
    dot_tile,
    gelu,
    grouped_tile,
    launch_options,
    persistent_programs,
    unit_stride,
)


@dataclass(frozen=True)
class SgmvConfig(TileConfig):
    """Tiles of the shrink (``block_r`` adapter columns) and expand (``block_n``) kernels."""

    KERNEL = "sgmv"

    block_m: int = 64
    block_n: int = 128
    block_r: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    per_sm: int = 0


@triton.jit
def _shrink(
    h_ptr, wd_ptr, bd_ptr, a_ptr, t_start, t_end, t_slot, T, K, R, NUM_PROGS,
    stride_hm, stride_wds, stride_wdk, stride_bds, stride_am,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """a[rows] = GELU(h[rows] W_down[s] + b_down[s]) for each tile with a slot."""
    n_cols = tl.cdiv(R, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    for item in range(tl.program_id(0), T * n_cols, NUM_PROGS):
        tile, col = grouped_tile(item, T, n_cols, GROUP_M)
        row0 = tl.load(t_start + tile)
        row1 = tl.load(t_end + tile)
        slot = tl.load(t_slot + tile)
        if (row0 < row1) & (slot >= 0):
            offs_m = row0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < row1
            rows = offs_m.to(tl.int64)
            offs_r = col * BLOCK_R + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            w_base = wd_ptr + slot.to(tl.int64) * stride_wds
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                acc = dot_tile(acc, h_ptr, rows, stride_hm, m_mask, w_base, stride_wdk, 1,
                               offs_r, r_mask, k0 + offs_k, K, CAST_F32, PRECISION)
            bias = tl.load(bd_ptr + slot.to(tl.int64) * stride_bds + offs_r, mask=r_mask,
                           other=0.0)
            acc = gelu(acc + bias.to(tl.float32)[None, :])
            tl.store(a_ptr + rows[:, None] * stride_am + offs_r[None, :],
                     acc.to(a_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand(
    a_ptr, wu_ptr, bu_ptr, base_ptr, x_ptr, out_ptr, t_start, t_end, t_slot, T, N, R,
    NUM_PROGS, stride_am, stride_wus, stride_wur, stride_bus, stride_bm, stride_xm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BASE: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[rows] = x + base + a W_up[s] + b_up[s] (the adapter terms only where s >= 0)."""
    n_cols = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for item in range(tl.program_id(0), T * n_cols, NUM_PROGS):
        tile, col = grouped_tile(item, T, n_cols, GROUP_M)
        row0 = tl.load(t_start + tile)
        row1 = tl.load(t_end + tile)
        slot = tl.load(t_slot + tile)
        if row0 < row1:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < row1
            rows = offs_m.to(tl.int64)
            offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            mask = m_mask[:, None] & n_mask[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if slot >= 0:
                w_base = wu_ptr + slot.to(tl.int64) * stride_wus
                for k0 in range(0, R, BLOCK_K):
                    acc = dot_tile(acc, a_ptr, rows, stride_am, m_mask, w_base, stride_wur, 1,
                                   offs_n, n_mask, k0 + offs_k, R, CAST_F32, PRECISION)
                bu = tl.load(bu_ptr + slot.to(tl.int64) * stride_bus + offs_n, mask=n_mask,
                             other=0.0)
                acc += bu.to(tl.float32)[None, :]
            if HAS_BASE:
                acc += tl.load(base_ptr + rows[:, None] * stride_bm + offs_n[None, :],
                               mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :], mask=mask,
                           other=0.0).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)


def frozen_mlp(h: torch.Tensor, mlp: MlpWeights) -> torch.Tensor:
    """``GELU(h W1^T + b1) W2^T + b2`` in torch (cuBLAS on CUDA), exact-erf GELU."""
    return F.linear(F.gelu(F.linear(h, mlp.w1, mlp.b1)), mlp.w2, mlp.b2)


def sgmv_route(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None, pool: AdapterPool,
               plans: Plans, config: SgmvConfig, cast_f32: bool | None = None
               ) -> torch.Tensor:
    """``x + MLP(h) + A_s(h)``: torch for the MLP, shrink + expand for the adapters."""
    cfg = config
    m, d = x.shape
    h, x = unit_stride(h), unit_stride(x)
    plan = plans.get(cfg.block_m)
    rank = pool.rank
    wd, wu = unit_stride(pool.w_down), unit_stride(pool.w_up)
    bd, bu = unit_stride(pool.b_down), unit_stride(pool.b_up)
    dots = dot_options(h.dtype, cast_f32)
    launch = launch_options(cfg.num_warps, cfg.num_stages)
    base = frozen_mlp(h, mlp) if mlp is not None else None
    a = torch.empty(m, rank, dtype=h.dtype, device=h.device)
    n_cols = triton.cdiv(rank, cfg.block_r)
    progs = persistent_programs(h.device, plan.tiles * n_cols, cfg.per_sm)
    _shrink[(progs,)](
        h, wd, bd, a, plan.start, plan.end, plan.slot, plan.tiles, d, rank, progs,
        h.stride(0), wd.stride(0), wd.stride(1), bd.stride(0), a.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        **dots, **launch)
    out = torch.empty_like(x)
    n_cols = triton.cdiv(d, cfg.block_n)
    progs = persistent_programs(h.device, plan.tiles * n_cols, cfg.per_sm)
    _expand[(progs,)](
        a, wu, bu, base if base is not None else x, x, out, plan.start, plan.end, plan.slot,
        plan.tiles, d, rank, progs,
        a.stride(0), wu.stride(0), wu.stride(1), bu.stride(0),
        base.stride(0) if base is not None else 0, x.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=min(cfg.block_k, 64),
        GROUP_M=cfg.group_m, HAS_BASE=base is not None, **dots, **launch)
    return out
