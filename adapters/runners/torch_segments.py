"""The ``segments`` runner: torch ops, the shared MLP once over all rows, adapters per task run.

The shared MLP runs once over all rows and each task's adapters over its contiguous run of
rows. A group with a single adapter task instead uses the widened MLP,
``act = GELU(h [W1 | W_down] + [b1 | b_down])``: one GEMM (GELU fused) for fc1 and the adapter's
down-projection, then ``x + act [W2 ; W_up] + b2 + b_up`` as fc2's GEMM (residual fused) plus the
R-row K tail accumulated into the same output. The widened fc1 lives in one buffer per layer
whose first H rows *are* the backbone's fc1 (no copy of the backbone); the R adapter rows are
rewritten when the single task changes (a few MB, under a lock; a group that finds the buffer
busy takes the shared path). fc2 is not concatenated because oneDNN needs contiguous weights
and a second copy of W2 would cost 113 MB (fp32). GEMMs go through oneDNN with fused epilogues
where available (``aat_serve.adapters.kernels.cpu``).
"""

from __future__ import annotations

import threading

import torch
from torch.nn import functional as F

from aat_serve.adapters.backbone import AST, Block
from aat_serve.adapters.kernels import cpu
from aat_serve.adapters.kernels.layout import MlpWeights
from aat_serve.adapters.runners.batch import Group, encode_group
from aat_serve.adapters.slots import SlotPools, TaskEntry


def mlp_weights(backbone: AST) -> list[MlpWeights]:
    """Each block's MLP weights in the kernels' layout (views of the backbone's)."""
    return [MlpWeights(b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight, b.mlp.fc2.bias)
            for b in backbone.blocks]


class WidenedFc1:
    """Per-layer fc1 widened by one task's MLP adapter.

    ``w1[i]`` is ``[W1 ; W_down[row].T]`` ``(H + R, D)`` and ``b1[i]`` ``[b1 | b_down[row]]``; the
    first H rows *are* the backbone's ``fc1`` (its parameters become views into the buffers), so
    widening costs R rows per layer, not a copy of the MLP.
    """

    def __init__(self, backbone: AST, rank: int) -> None:
        self.lock = threading.Lock()
        self.gen = -1
        self.rank = rank
        self.w1: list[torch.Tensor] = []
        self.b1: list[torch.Tensor] = []
        for blk in backbone.blocks:
            fc1 = blk.mlp.fc1
            hid, d = fc1.weight.shape
            kw = dict(dtype=fc1.weight.dtype, device=fc1.weight.device)
            w1 = torch.zeros(hid + rank, d, **kw)
            b1 = torch.zeros(hid + rank, **kw)
            with torch.no_grad():
                w1[:hid].copy_(fc1.weight)
                b1[:hid].copy_(fc1.bias)
            fc1.weight.data = w1[:hid]
            fc1.bias.data = b1[:hid]
            self.w1.append(w1)
            self.b1.append(b1)

    def nbytes_extra(self) -> int:
        """Bytes of the adapter rows (the shared rows belong to the backbone)."""
        return sum(self.rank * (w.shape[1] + 1) * w.element_size() for w in self.w1)

    def fill(self, pools: SlotPools, entry: TaskEntry) -> None:
        """Write ``entry``'s down-projections into the adapter rows (caller holds ``lock``)."""
        if self.gen == entry.gen:
            return
        self.gen = -1  # invalid while half-written
        with torch.no_grad():
            for i, (w1, b1) in enumerate(zip(self.w1, self.b1, strict=True)):
                pool, r = pools.mlp[i], entry.row
                hid = w1.shape[0] - pool.rank
                w1[hid:].copy_(pool.w_down[r].t())
                b1[hid:].copy_(pool.b_down[r])
        self.gen = entry.gen


class SegmentsRunner:
    """Torch ops per contiguous task run, the widened MLP for single-task groups (CPU path)."""

    runtime = "torch"
    backend = "segments"

    def __init__(self, backbone: AST, dtype: torch.dtype, bottleneck: int,
                 residual: torch.dtype = torch.float32) -> None:
        self.backbone = backbone
        self.dtype = dtype
        self.residual = residual
        self.widened = WidenedFc1(backbone, bottleneck)
        self._mlp = mlp_weights(backbone)

    def extra_bytes(self) -> int:
        return self.widened.nbytes_extra()

    def pooled(self, x: torch.Tensor, group: Group, pools: SlotPools) -> torch.Tensor:
        single = group.single
        widened = single is not None and self.widened.lock.acquire(blocking=False)
        try:
            if widened:
                self.widened.fill(pools, single)  # type: ignore[arg-type]
            blocks = self.backbone.blocks
            return encode_group(self.backbone, x, group, lambda i, h: self._block(
                i, blocks[i], h, group, pools, widened), self.residual)
        finally:
            if widened:
                self.widened.lock.release()

    def _block(self, i: int, blk: Block, x: torch.Tensor, g: Group, pools: SlotPools,
               widened: bool) -> torch.Tensor:
        b, n, d = x.shape
        dt, heads = self.dtype, blk.attn.num_heads
        x2 = x.reshape(-1, d)  # the residual stream (fp32, or bf16 with bf16 GEMMs)
        qkv = cpu.linear(blk.norm1(x2).to(dt), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, d)
        proj = blk.attn.proj
        if g.spatial_segs:
            a = cpu.linear(o, proj.weight, proj.bias)
            sp = pools.spatial[i]
            for c0, c1, r in g.spatial_segs:  # a <- a + A_s(a), per task
                a_s = a[c0 * n:c1 * n]
                t = F.gelu(torch.addmm(sp.b_down[r], a_s, sp.w_down[r]))
                a_s.addmm_(t, sp.w_up[r]).add_(sp.b_up[r])
            x2 = x2 + a
        else:
            x2 = _add_linear(x2, o, proj.weight, proj.bias)
        h = blk.norm2(x2).to(dt)
        mlp, mp = self._mlp[i], pools.mlp[i]
        if widened:  # one GEMM for fc1 and the adapter's down-projection, GELU fused
            act = cpu.linear(h, self.widened.w1[i], self.widened.b1[i], gelu=True)
            hid, r = mlp.hidden, g.single.row  # type: ignore[union-attr]
            y, inc = _add_linear_open(x2, act[:, :hid], mlp.w2, mlp.b2)
            inc.addmm_(act[:, hid:], mp.w_up[r]).add_(mp.b_up[r])  # the K tail of fc2
        else:
            act = cpu.linear(h, mlp.w1, mlp.b1, gelu=True)
            y, inc = _add_linear_open(x2, act, mlp.w2, mlp.b2)
            for c0, c1, r in g.mlp_segs:  # adapters on each task's contiguous rows
                h_s, inc_s = h[c0 * n:c1 * n], inc[c0 * n:c1 * n]
                t = F.gelu(torch.addmm(mp.b_down[r], h_s, mp.w_down[r]))
                inc_s.addmm_(t, mp.w_up[r]).add_(mp.b_up[r])
        if y is not inc:
            y = y.add_(inc)
        return y.view(b, n, d)


def _add_linear(resid: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """``resid + x w^T + b`` in ``resid``'s dtype (fused into the GEMM when dtypes agree)."""
    if resid.dtype == x.dtype:
        return cpu.linear_add(x, w, b, resid)
    return resid + cpu.linear(x, w, b)


def _add_linear_open(resid: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, inc)``: more terms may be accumulated into ``inc`` (in the GEMM dtype); the result
    is ``y`` when ``y is inc`` (fp32: residual fused into the GEMM), else ``y + inc``."""
    if resid.dtype == x.dtype:
        y = cpu.linear_add(x, w, b, resid)
        return y, y
    return resid, cpu.linear(x, w, b)
