"""Pure-torch reference of the fused "MLP + per-task adapter" op: the contract the kernels meet.

Semantics, for row ``i`` with ``s = row_slot[i]`` (``-1`` = no adapter)::

    act[i, :H]    = GELU(h[i] @ W1.T + b1)                      (shared MLP, if any)
    act[i, H:]    = GELU(h[i] @ W_down[s] + b_down[s])           (0 when s = -1)
    out[i]        = x[i] + act[i, :H] @ W2.T + b2 + act[i, H:] @ W_up[s] + b_up[s]

i.e. the adapter is a few extra hidden columns of a wider MLP ("virtual widening"). With no
MLP (``mlp=None``, H = 0) the same op is a bare adapter with a residual, which is how the
spatial adapter ``x + a + A_s(a)`` runs (``x + a`` as residual, ``a`` as input).

``mlp_adapter_reference`` is the per-slot masked loop in the two-branch form; it doubles as the
runtime path where Triton cannot run. ``mlp_adapter_widened`` builds the concatenated weights
per slot and exists to pin the widening identity in tests. ``mlp_adapter_eager`` is the
unfused eager path (MLP over all rows, adapters on slices of rows), the dispatcher's baseline.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def mlp_adapter_reference(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None,
                          pool: AdapterPool, row_slot: torch.Tensor,
                          compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x + MLP(h) + A_{slot}(h)`` row by row; computed in ``compute_dtype`` (default: x's).

    ``x``, ``h`` are ``(M, D)``; the result has ``x``'s dtype. Use ``compute_dtype=torch.float64``
    for a reference that is exact at the precision the kernels are tested to.
    """
    dt = compute_dtype or x.dtype
    hc = _cast(h, dt)
    out = _cast(x, dt).clone()
    if mlp is not None:
        act = F.gelu(F.linear(hc, _cast(mlp.w1, dt), _cast(mlp.b1, dt)))
        out += F.linear(act, _cast(mlp.w2, dt), _cast(mlp.b2, dt))
    slots = row_slot.to(torch.long).cpu()
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        rows = (slots == s).nonzero().squeeze(1).to(x.device)
        hs = hc.index_select(0, rows)
        a = F.gelu(hs @ _cast(pool.w_down[s], dt) + _cast(pool.b_down[s], dt))
        out.index_add_(0, rows, a @ _cast(pool.w_up[s], dt) + _cast(pool.b_up[s], dt))
    return out.to(x.dtype)


def widened_weights(mlp: MlpWeights, pool: AdapterPool, slot: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[W1 ; W_down[s].T]``, ``[b1 | b_down[s]]``, ``[W2 | W_up[s].T]``, ``b2 + b_up[s]``.

    ``nn.Linear`` layouts of the MLP widened by one task's adapter (hidden width H + R).
    """
    w1 = torch.cat([mlp.w1, pool.w_down[slot].t()], dim=0)
    b1 = torch.cat([mlp.b1, pool.b_down[slot]])
    w2 = torch.cat([mlp.w2, pool.w_up[slot].t()], dim=1)
    b2 = mlp.b2 + pool.b_up[slot]
    return w1.contiguous(), b1, w2.contiguous(), b2


def mlp_adapter_widened(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights, pool: AdapterPool,
                        row_slot: torch.Tensor) -> torch.Tensor:
    """Same result as ``mlp_adapter_reference`` through one widened MLP per slot."""
    out = x.clone()
    slots = row_slot.to(torch.long).cpu()
    for s in torch.unique(slots).tolist():
        rows = (slots == s).nonzero().squeeze(1).to(x.device)
        hs = h.index_select(0, rows)
        if s < 0:
            y = F.linear(F.gelu(F.linear(hs, mlp.w1, mlp.b1)), mlp.w2, mlp.b2)
        else:
            w1, b1, w2, b2 = widened_weights(mlp, pool, s)
            y = F.linear(F.gelu(F.linear(hs, w1, b1)), w2, b2)
        out.index_add_(0, rows, y)
    return out


def mlp_adapter_eager(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None,
                      pool: AdapterPool, row_slot: torch.Tensor) -> torch.Tensor:
    """The unfused eager path, as a model without the kernels runs it: the MLP over all rows
    in ``h``'s dtype (cuBLAS on CUDA), then each run of equal slots adds its task's adapter on
    a slice of rows. Same result as ``mlp_adapter_reference`` up to rounding; one
    device-to-host copy of ``row_slot`` (the runs), so not for CUDA-graph capture."""
    out = x.clone() if mlp is None else x + F.linear(F.gelu(F.linear(h, mlp.w1, mlp.b1)),
                                                     mlp.w2, mlp.b2)
    slots = row_slot.cpu().tolist()
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            s = slots[start]
            if s >= 0:
                hs = h[start:i]
                a = F.gelu(hs @ pool.w_down[s] + pool.b_down[s]) @ pool.w_up[s] + pool.b_up[s]
                out[start:i] += a
            start = i
    return out
