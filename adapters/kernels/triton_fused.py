"""Route (a): "MLP + per-task adapter" as two Triton GEMMs over one-slot row tiles.

K1 (up):   act = GELU(h [W1 | W_down[s]] + [b1 | b_down[s]])         (M, H + R)
K2 (down): out = x + act [W2 ; W_up[s]] + b2 + b_up[s]                (M, D)

The adapter is one extra group of fc1 column tiles (``BLOCK_R`` wide, so r = 192 is three
64-wide tiles with no padding) and one K tail of fc2. Rows come as a ``TilePlan`` (``plan.py``):
every row tile lies inside one task segment, so each program has one slot and one fp32
accumulator. Work items are (row tile, column tile) in grouped order; ``per_sm > 0`` launches a
persistent grid of ``per_sm`` programs per SM that strides over the items. ``split_k > 1``
splits K2's K range over programs that write fp32 partials, summed with the epilogue (biases,
residual, one rounding) by a small reduce kernel: more programs when one clip gives only a few
row tiles times D / BLOCK_N column tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights
from aat_serve.adapters.kernels.plan import Plans
from aat_serve.adapters.kernels.triton_common import (
    TileConfig,
    dot_options,
    dot_tile,
    gelu,
    grouped_tile,
    is_interpreted,
    launch_options,
    mma,
    persistent_programs,
    unit_stride,
)


@dataclass(frozen=True)
class FusedConfig(TileConfig):
    """Tiles and launch options of K1/K2 (one candidate of the dispatcher)."""

    KERNEL = "fused"

    block_m: int = 128
    block_n: int = 128
    block_r: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    split_k: int = 1
    per_sm: int = 0
    tma: bool = False


@triton.jit
def _k1_up(
    h_ptr, w1_ptr, b1_ptr, wd_ptr, bd_ptr, act_ptr,
    t_start, t_end, t_slot, T, M, K, H, R, S, NUM_PROGS,
    stride_hm, stride_w1n, stride_wds, stride_wdk, stride_bds, stride_am,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, USE_TMA: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """act[:, :H] = GELU(h W1^T + b1); act[:, H:] = GELU(h W_down[s] + b_down[s]).

    Contiguous last dimensions (h, W1 rows, W_down rows, act) are assumed by the launcher;
    with USE_TMA the operand tiles come through tensor descriptors (TMA on Hopper), rows past
    the tile and columns past K reading as zero or being discarded, and the pool is one
    contiguous (S * K, R) matrix.
    """
    if USE_TMA:
        h_desc = tl.make_tensor_descriptor(h_ptr, [M, K], [stride_hm, 1], [BLOCK_M, BLOCK_K])
        w1_desc = tl.make_tensor_descriptor(w1_ptr, [H, K], [stride_w1n, 1],
                                            [BLOCK_N, BLOCK_K])
        wd_desc = tl.make_tensor_descriptor(wd_ptr, [S * K, R], [stride_wdk, 1],
                                            [BLOCK_K, BLOCK_R])
    n_h = tl.cdiv(H, BLOCK_N)
    n_cols = n_h + tl.cdiv(R, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    for item in range(tl.program_id(0), T * n_cols, NUM_PROGS):
        tile, col = grouped_tile(item, T, n_cols, GROUP_M)
        row0 = tl.load(t_start + tile)
        row1 = tl.load(t_end + tile)
        slot = tl.load(t_slot + tile)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row1
        rows = offs_m.to(tl.int64)
        if (row0 < row1) & (col < n_h):  # shared fc1 columns
            offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < H
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if USE_TMA:
                    acc = mma(acc, h_desc.load([row0, k0]), w1_desc.load([col * BLOCK_N, k0]).T,
                              CAST_F32, PRECISION)
                else:
                    acc = dot_tile(acc, h_ptr, rows, stride_hm, m_mask, w1_ptr, 1, stride_w1n,
                                   offs_n, n_mask, k0 + offs_k, K, CAST_F32, PRECISION)
            acc += tl.load(b1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(act_ptr + rows[:, None] * stride_am + offs_n[None, :],
                     gelu(acc).to(act_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])
        if (row0 < row1) & (col >= n_h) & (slot >= 0):  # the tile's adapter columns
            offs_r = (col - n_h) * BLOCK_R + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            w_base = wd_ptr + slot.to(tl.int64) * stride_wds
            acc_r = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if USE_TMA:
                    acc_r = mma(acc_r, h_desc.load([row0, k0]),
                                wd_desc.load([slot * K + k0, (col - n_h) * BLOCK_R]),
                                CAST_F32, PRECISION)
                else:
                    acc_r = dot_tile(acc_r, h_ptr, rows, stride_hm, m_mask, w_base, stride_wdk,
                                     1, offs_r, r_mask, k0 + offs_k, K, CAST_F32, PRECISION)
            bias = tl.load(bd_ptr + slot.to(tl.int64) * stride_bds + offs_r, mask=r_mask,
                           other=0.0)
            acc_r += bias.to(tl.float32)[None, :]
            tl.store(act_ptr + rows[:, None] * stride_am + (H + offs_r)[None, :],
                     gelu(acc_r).to(act_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _k2_down(
    act_ptr, w2_ptr, b2_ptr, wu_ptr, bu_ptr, x_ptr, out_ptr, part_ptr,
    t_start, t_end, t_slot, T, M, N, H, R, S, NUM_PROGS,
    stride_am, stride_w2n, stride_wus, stride_wur, stride_bus, stride_xm, stride_om,
    stride_ps, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, HAS_B2: tl.constexpr,
    USE_TMA: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = x + act[:, :H] W2^T + b2 + act[:, H:] W_up[s] + b_up[s]; with SPLIT_K > 1 each
    split writes its fp32 partial sum to ``part`` and ``_reduce`` adds the epilogue.

    With USE_TMA, K blocks past H read W2 as zero and past H + R read act as zero, so a block
    that straddles into the adapter columns (or a pool block into the next slot) adds 0."""
    if USE_TMA:
        act_desc = tl.make_tensor_descriptor(act_ptr, [M, H + R], [stride_am, 1],
                                             [BLOCK_M, BLOCK_K])
        w2_desc = tl.make_tensor_descriptor(w2_ptr, [N, H], [stride_w2n, 1],
                                            [BLOCK_N, BLOCK_K])
        wu_desc = tl.make_tensor_descriptor(wu_ptr, [S * R, N], [stride_wur, 1],
                                            [BLOCK_K, BLOCK_N])
    n_cols = tl.cdiv(N, BLOCK_N)
    k_blocks = tl.cdiv(H, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    offs_k = tl.arange(0, BLOCK_K)
    for item in range(tl.program_id(0), T * n_cols * SPLIT_K, NUM_PROGS):
        split = item % SPLIT_K
        tile, col = grouped_tile(item // SPLIT_K, T, n_cols, GROUP_M)
        row0 = tl.load(t_start + tile)
        row1 = tl.load(t_end + tile)
        slot = tl.load(t_slot + tile)
        if row0 < row1:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < row1
            rows = offs_m.to(tl.int64)
            offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            k_lo = split * per_split * BLOCK_K
            k_hi = min(H, k_lo + per_split * BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):  # this split's part of the shared K range
                if USE_TMA:
                    acc = mma(acc, act_desc.load([row0, k0]),
                              w2_desc.load([col * BLOCK_N, k0]).T, CAST_F32, PRECISION)
                else:
                    acc = dot_tile(acc, act_ptr, rows, stride_am, m_mask, w2_ptr, 1, stride_w2n,
                                   offs_n, n_mask, k0 + offs_k, k_hi, CAST_F32, PRECISION)
            if (slot >= 0) & (split == SPLIT_K - 1):  # the adapter K tail, last split
                w_base = wu_ptr + slot.to(tl.int64) * stride_wus
                for k0 in range(0, R, BLOCK_K):
                    if USE_TMA:
                        acc = mma(acc, act_desc.load([row0, H + k0]),
                                  wu_desc.load([slot * R + k0, col * BLOCK_N]), CAST_F32,
                                  PRECISION)
                    else:  # the adapter columns of act start at H
                        acc = dot_tile(acc, act_ptr + H, rows, stride_am, m_mask, w_base,
                                       stride_wur, 1, offs_n, n_mask, k0 + offs_k, R, CAST_F32,
                                       PRECISION)
            mask = m_mask[:, None] & n_mask[None, :]
            if SPLIT_K == 1:
                _epilogue(acc, b2_ptr, bu_ptr, x_ptr, out_ptr, slot, rows, offs_n, n_mask, mask,
                          stride_bus, stride_xm, stride_om, HAS_B2)
            else:
                tl.store(part_ptr + split * stride_ps + rows[:, None] * stride_pm
                         + offs_n[None, :], acc, mask=mask)


@triton.jit
def _epilogue(acc, b2_ptr, bu_ptr, x_ptr, out_ptr, slot, rows, offs_n, n_mask, mask,
              stride_bus, stride_xm, stride_om, HAS_B2: tl.constexpr):
    """out = acc + b2 + b_up[slot] + x, rounded once to out's dtype."""
    if HAS_B2:
        acc += tl.load(b2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if slot >= 0:
        bu = tl.load(bu_ptr + slot.to(tl.int64) * stride_bus + offs_n, mask=n_mask, other=0.0)
        acc += bu.to(tl.float32)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :], mask=mask, other=0.0)
    acc += x.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce(part_ptr, b2_ptr, bu_ptr, x_ptr, slot_ptr, out_ptr, M, N,
            stride_ps, stride_pm, stride_bus, stride_xm, stride_om,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
            HAS_B2: tl.constexpr):
    """out = x + sum of the split partials + b2 + b_up[slot of the row]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)
    acc = tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :], mask=mask,
                  other=0.0).to(tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + rows[:, None] * stride_pm + offs_n[None, :],
                       mask=mask, other=0.0)
    if HAS_B2:
        acc += tl.load(b2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    slots = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1)
    bu = tl.load(bu_ptr + slots.to(tl.int64)[:, None] * stride_bus + offs_n[None, :],
                 mask=(slots >= 0)[:, None] & n_mask[None, :], other=0.0)
    acc += bu.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


_ALLOCATOR_SET = False


def _tma_operands(tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ConfigError`` unless every tensor can back a tensor descriptor: 16-byte aligned
    base, 16-byte multiple row stride (e.g. a rank whose rows are not 16 bytes wide cannot).
    Installs Triton's allocator for device-side descriptors once (CUDA)."""
    global _ALLOCATOR_SET
    for name, t in tensors.items():
        size = t.element_size()
        if t.data_ptr() % 16 or (t.dim() > 1 and (t.stride(-2) * size) % 16):
            raise ConfigError(f"the TMA kernels need 16-byte aligned rows; {name} of shape "
                              f"{tuple(t.shape)} {t.dtype} has row stride {t.stride(-2)}")
    if not _ALLOCATOR_SET and not is_interpreted():
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def fused_route(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None, pool: AdapterPool,
                plans: Plans, config: FusedConfig, cast_f32: bool | None = None
                ) -> torch.Tensor:
    """Launch K1 and K2 (and the split-K reduce); a new ``(M, D)`` tensor of ``x``'s dtype.

    Operands are assumed checked (``triton_common.check_operands``).
    """
    cfg = config
    m, d = x.shape
    h, x = unit_stride(h), unit_stride(x)
    plan = plans.get(cfg.block_m)
    hidden = mlp.hidden if mlp is not None else 0
    rank = pool.rank
    w1, b1, w2, b2 = (mlp.w1, mlp.b1, mlp.w2, mlp.b2) if mlp is not None else (h, h, h, h)
    w1, w2 = unit_stride(w1), unit_stride(w2)
    tma = cfg.tma and mlp is not None  # (the bare adapter has no W1/W2 to describe)
    wd, wu = pool.w_down, pool.w_up
    wd, wu = (wd.contiguous(), wu.contiguous()) if tma else (unit_stride(wd), unit_stride(wu))
    bd, bu = unit_stride(pool.b_down), unit_stride(pool.b_up)
    dots = dot_options(h.dtype, cast_f32)
    launch = launch_options(cfg.num_warps, cfg.num_stages)
    act = torch.empty(m, hidden + rank, dtype=h.dtype, device=h.device)
    if tma:
        if hidden % cfg.block_k:  # K2's last shared block would read unwritten act columns
            raise ConfigError(f"the TMA kernels need the MLP width {hidden} to be a multiple "
                              f"of block_k {cfg.block_k}")
        _tma_operands({"h": h, "fc1": w1, "fc2": w2, "W_down": wd, "W_up": wu, "act": act})
    n_cols = triton.cdiv(hidden, cfg.block_n) + triton.cdiv(rank, cfg.block_r)
    progs = persistent_programs(h.device, plan.tiles * n_cols, cfg.per_sm)
    _k1_up[(progs,)](
        h, w1, b1, wd, bd, act, plan.start, plan.end, plan.slot,
        plan.tiles, m, d, hidden, rank, pool.slots, progs,
        h.stride(0), w1.stride(0), wd.stride(0), wd.stride(1), bd.stride(0),
        act.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, USE_TMA=tma, **dots, **launch)
    out = torch.empty_like(x)
    split = cfg.split_k if hidden >= cfg.split_k * cfg.block_k else 1
    part = torch.empty(split, m, d, dtype=torch.float32, device=h.device) if split > 1 else out
    n_cols = triton.cdiv(d, cfg.block_n)
    progs = persistent_programs(h.device, plan.tiles * n_cols * split, cfg.per_sm)
    _k2_down[(progs,)](
        act, w2, b2, wu, bu, x, out, part, plan.start, plan.end, plan.slot,
        plan.tiles, m, d, hidden, rank, pool.slots, progs,
        act.stride(0), w2.stride(0), wu.stride(0), wu.stride(1), bu.stride(0),
        x.stride(0), out.stride(0),
        part.stride(0) if split > 1 else 0, part.stride(1) if split > 1 else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SPLIT_K=split, HAS_B2=mlp is not None, USE_TMA=tma, **dots, **launch)
    if split > 1:
        bm, bn = 64, 64
        _reduce[(triton.cdiv(m, bm), triton.cdiv(d, bn))](
            part, b2, bu, x, plans.row_slot, out, m, d,
            part.stride(0), part.stride(1), bu.stride(0), x.stride(0), out.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split, HAS_B2=mlp is not None,
            **launch_options(4, 1))
    return out
