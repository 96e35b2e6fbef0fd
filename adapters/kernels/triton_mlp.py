"""Fused "MLP + per-task adapter" as two Triton GEMM kernels (contract: ``reference.py``).

K1 (up):   act = GELU(h [W1 | W_down[slot]] + [b1 | b_down[slot]])        (M, H + R)
K2 (down): out = x + act [W2 ; W_up[slot]] + b2 + b_up[slot]               (M, D)

The widened weight matrices are never materialised: the first ``cdiv(H, BLOCK_N)`` column tiles
of K1 read the shared ``W1``, the rest read the slot pool; K2 runs its K loop over the shared
``W2`` and then a short K tail over ``W_up[slot]``. Rows are ordered by slot, so an M tile holds
one slot or a few; the adapter parts loop over the distinct slots of the tile and merge with a
row mask (``-1`` rows get no adapter). Accumulation, bias, GELU (exact erf) and the residual are
fp32; each stored tensor is rounded once.

Importing this module needs Triton. Set ``TRITON_INTERPRET=1`` *before* importing it to get the
interpreter (CPU tensors); ``CAST_F32`` upcasts tiles before ``tl.dot`` because the interpreter
multiplies bf16 bit patterns (triton#11584).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
import triton.runtime.errors

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights

_END = tl.constexpr(2**30)  # "no further slot" sentinel, larger than any slot id


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of both kernels."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def default_config(m: int, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """H100 starting points from the kernel notes: a narrower M tile for one or two clips.

    Each kernel has two pipelined K loops (shared and adapter part), so shared memory holds
    two sets of stages; 4-byte operands get a shorter K tile and fewer stages to fit.
    """
    wide = dtype == torch.float32
    if m <= 2 * 1214:
        return KernelConfig(block_m=64, block_n=128, block_k=32 if wide else 64, num_warps=4,
                            num_stages=2 if wide else 4)
    return KernelConfig(block_k=32 if wide else 64, num_stages=2 if wide else 3)


def is_interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1)."""
    return type(_k1_up).__name__ == "InterpretedFunction"


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _tile(pid, M, num_n, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row tiles share each column tile, for L2 reuse of weights.
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _k1_up(
    h_ptr,  # (M, K) LayerNorm output
    w1_ptr,  # (H, K) shared fc1 weight, nn.Linear layout (unused when H == 0)
    b1_ptr,  # (H,)
    wd_ptr,  # (S, K, R) adapter down-projection pool
    bd_ptr,  # (S, R)
    slot_ptr,  # (M,) int32 slot per row, -1 = no adapter
    act_ptr,  # (M, H + R) output
    M, K, H, R,
    stride_hm, stride_hk,
    stride_w1n, stride_w1k,
    stride_wds, stride_wdk, stride_wdr,
    stride_bds,
    stride_am, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """act[:, :H] = GELU(h W1^T + b1); act[:, H:] = GELU(h W_down[s] + b_down[s]) per row slot."""
    n_h = tl.cdiv(H, BLOCK_N)
    pid_m, pid_n = _tile(tl.program_id(0), M, n_h + tl.cdiv(R, BLOCK_N), BLOCK_M, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if pid_n < n_h:  # shared columns
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(h_ptr + rows[:, None] * stride_hm + kk[None, :] * stride_hk,
                        mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
            b = tl.load(w1_ptr + kk[:, None] * stride_w1k + offs_n[None, :] * stride_w1n,
                        mask=(kk[:, None] < K) & n_mask[None, :], other=0.0)
            if CAST_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        acc += tl.load(b1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc = _gelu(acc)
        tl.store(act_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an,
                 acc.to(act_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:  # adapter columns: loop over the distinct slots of this row tile
        offs_r = (pid_n - n_h) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_mask = offs_r < R
        slots = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1)
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        cur = tl.min(tl.where(slots >= 0, slots, _END), axis=0)
        while cur < _END:
            w_base = wd_ptr + cur.to(tl.int64) * stride_wds
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                a = tl.load(h_ptr + rows[:, None] * stride_hm + kk[None, :] * stride_hk,
                            mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
                b = tl.load(w_base + kk[:, None] * stride_wdk + offs_r[None, :] * stride_wdr,
                            mask=(kk[:, None] < K) & r_mask[None, :], other=0.0)
                if CAST_F32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            bias = tl.load(bd_ptr + cur.to(tl.int64) * stride_bds + offs_r, mask=r_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
            out = tl.where((slots == cur)[:, None], _gelu(acc), out)
            cur = tl.min(tl.where(slots > cur, slots, _END), axis=0)
        tl.store(act_ptr + rows[:, None] * stride_am + (H + offs_r)[None, :] * stride_an,
                 out.to(act_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _k2_down(
    act_ptr,  # (M, H + R) output of K1
    w2_ptr,  # (N, H) shared fc2 weight, nn.Linear layout (unused when H == 0)
    b2_ptr,  # (N,) shared fc2 bias (zeros when there is no MLP)
    wu_ptr,  # (S, R, N) adapter up-projection pool
    bu_ptr,  # (S, N)
    x_ptr,  # (M, N) residual
    slot_ptr,  # (M,) int32 slot per row, -1 = no adapter
    out_ptr,  # (M, N) output
    M, N, H, R,
    stride_am, stride_ak,
    stride_w2n, stride_w2k,
    stride_wus, stride_wur, stride_wun,
    stride_bus,
    stride_xm, stride_xn,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = x + act[:, :H] W2^T + b2 + act[:, H:] W_up[s] + b_up[s] per row slot."""
    pid_m, pid_n = _tile(tl.program_id(0), M, tl.cdiv(N, BLOCK_N), BLOCK_M, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):  # shared K range
        kk = k0 + offs_k
        a = tl.load(act_ptr + rows[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=m_mask[:, None] & (kk[None, :] < H), other=0.0)
        b = tl.load(w2_ptr + kk[:, None] * stride_w2k + offs_n[None, :] * stride_w2n,
                    mask=(kk[:, None] < H) & n_mask[None, :], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    slots = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1)
    cur = tl.min(tl.where(slots >= 0, slots, _END), axis=0)
    while cur < _END:  # adapter K tail, once per distinct slot of the tile (rows masked)
        sel = m_mask & (slots == cur)
        w_base = wu_ptr + cur.to(tl.int64) * stride_wus
        for k0 in range(0, R, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(act_ptr + rows[:, None] * stride_am + (H + kk)[None, :] * stride_ak,
                        mask=sel[:, None] & (kk[None, :] < R), other=0.0)
            b = tl.load(w_base + kk[:, None] * stride_wur + offs_n[None, :] * stride_wun,
                        mask=(kk[:, None] < R) & n_mask[None, :], other=0.0)
            if CAST_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        cur = tl.min(tl.where(slots > cur, slots, _END), axis=0)
    mask = m_mask[:, None] & n_mask[None, :]
    acc += tl.load(b2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    bu = tl.load(bu_ptr + slots.to(tl.int64)[:, None] * stride_bus + offs_n[None, :],
                 mask=(slots >= 0)[:, None] & n_mask[None, :], other=0.0)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask,
                other=0.0)
    acc += bu.to(tl.float32) + x.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None, pool: AdapterPool,
           row_slot: torch.Tensor) -> None:
    if x.dim() != 2 or h.shape != x.shape:
        raise ConfigError(f"x and h must both be (M, D); got {tuple(x.shape)} and "
                          f"{tuple(h.shape)}")
    tensors = [*pool.tensors()] + ([mlp.w1, mlp.b1, mlp.w2, mlp.b2] if mlp else [])
    for t in tensors:
        if t.dtype != h.dtype or t.device != h.device:
            raise ConfigError(f"all kernel operands must be {h.dtype} on {h.device}; got "
                              f"{t.dtype} on {t.device}")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"kernel dtype must be float32, float16 or bfloat16, got {h.dtype}")
    if x.dtype not in (h.dtype, torch.float32) or x.device != h.device:
        raise ConfigError(f"the residual x must be {h.dtype} or float32 on {h.device}, got "
                          f"{x.dtype} on {x.device}")
    if pool.dim != x.shape[1]:
        raise ConfigError(f"adapter pool width {pool.dim} does not match rows of width "
                          f"{x.shape[1]}")
    if row_slot.shape != (x.shape[0],) or row_slot.dtype != torch.int32:
        raise ConfigError(f"row_slot must be int32 of shape ({x.shape[0]},), got "
                          f"{row_slot.dtype} {tuple(row_slot.shape)}")


def fused_mlp_adapter(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None,
                      pool: AdapterPool, row_slot: torch.Tensor,
                      config: KernelConfig | None = None, cast_f32: bool | None = None,
                      ) -> torch.Tensor:
    """Launch K1 and K2; returns a new ``(M, D)`` tensor of ``x``'s dtype (``x`` is unchanged).

    ``h``, the MLP and the pool share one dtype; the residual ``x`` (and the output) may be
    float32 instead, for a model that keeps its residual stream in fp32.

    ``cast_f32`` upcasts tiles to fp32 before ``tl.dot`` (default: on under the interpreter
    for bf16, whose interpreted dot is wrong, off otherwise).
    """
    _check(x, h, mlp, pool, row_slot)
    row_slot = row_slot.contiguous()
    m, d = x.shape
    cfg = config or default_config(m, h.dtype)
    interp = is_interpreted()
    if cast_f32 is None:
        cast_f32 = interp and h.dtype == torch.bfloat16
    fp32_exact = h.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if fp32_exact else "tf32"
    hidden = mlp.hidden if mlp is not None else 0
    rank = pool.rank
    if mlp is None:  # a bare adapter: placeholders for the unused shared operands
        w1, b1, w2 = h, h, h
        b2 = torch.zeros(d, dtype=h.dtype, device=h.device)
    else:
        w1, b1, w2, b2 = mlp.w1, mlp.b1, mlp.w2, mlp.b2
    launch = {} if interp else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m, CAST_F32=bool(cast_f32), PRECISION=precision)

    try:
        return _launch(x, h, w1, b1, w2, b2, pool, row_slot, cfg, meta, launch, hidden, rank,
                       has_mlp=mlp is not None)
    except triton.runtime.errors.OutOfResources:
        if interp or cfg.num_stages <= 2:
            raise
        small = replace(cfg, block_k=32, num_stages=2)  # fit shared memory on smaller GPUs
        launch = dict(num_warps=small.num_warps, num_stages=small.num_stages)
        meta.update(BLOCK_K=small.block_k)
        return _launch(x, h, w1, b1, w2, b2, pool, row_slot, small, meta, launch, hidden, rank,
                       has_mlp=mlp is not None)


def _launch(x, h, w1, b1, w2, b2, pool: AdapterPool, row_slot, cfg: KernelConfig, meta: dict,
            launch: dict, hidden: int, rank: int, has_mlp: bool) -> torch.Tensor:
    m, d = x.shape
    act = torch.empty(m, hidden + rank, dtype=h.dtype, device=h.device)
    n_tiles = triton.cdiv(hidden, cfg.block_n) + triton.cdiv(rank, cfg.block_n)
    grid1 = (triton.cdiv(m, cfg.block_m) * n_tiles,)
    _k1_up[grid1](
        h, w1, b1, pool.w_down, pool.b_down, row_slot, act,
        m, d, hidden, rank,
        h.stride(0), h.stride(1),
        w1.stride(0) if has_mlp else 0, w1.stride(1) if has_mlp else 0,
        *pool.w_down.stride(),
        pool.b_down.stride(0),
        act.stride(0), act.stride(1),
        **meta, **launch)

    out = torch.empty_like(x)
    grid2 = (triton.cdiv(m, cfg.block_m) * triton.cdiv(d, cfg.block_n),)
    _k2_down[grid2](
        act, w2, b2, pool.w_up, pool.b_up, x, row_slot, out,
        m, d, hidden, rank,
        act.stride(0), act.stride(1),
        w2.stride(0) if has_mlp else 0, w2.stride(1) if has_mlp else 0,
        *pool.w_up.stride(),
        pool.b_up.stride(0),
        x.stride(0), x.stride(1),
        out.stride(0), out.stride(1),
        **meta, **launch)
    return out
