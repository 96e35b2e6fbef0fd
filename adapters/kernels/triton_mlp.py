"""Entry points of the Triton kernel layer (importing this module needs Triton).

- ``fused_mlp_adapter``: ``x + MLP(h) + A_s(h)``; ``spatial``: ``x + a + A_s(a)``.
- With ``config`` (a ``FusedConfig``, ``SgmvConfig`` or ``SpatialConfig``) that one
  implementation runs; without, the dispatcher (``candidates.dispatcher``) picks the
  measured-fastest for the call's bucket on CUDA, and the default route (a) / spatial kernel
  run under the interpreter.

The kernels live in ``triton_fused`` (route a: widened GEMMs on one-slot row tiles),
``triton_sgmv`` (route b: cuBLAS MLP + segmented shrink/expand) and ``triton_spatial``
(one-launch spatial adapter); tile plans in ``plan``. Operands are validated once per
signature (``triton_common.check_operands``), not on every launch.
"""

from __future__ import annotations

import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.autotune import bucket_of
from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights
from aat_serve.adapters.kernels.plan import Plans
from aat_serve.adapters.kernels.triton_common import check_operands, is_interpreted
from aat_serve.adapters.kernels.triton_fused import FusedConfig, fused_route
from aat_serve.adapters.kernels.triton_sgmv import SgmvConfig, sgmv_route
from aat_serve.adapters.kernels.triton_spatial import SpatialConfig, spatial_adapter

KernelConfig = FusedConfig  # the earlier name of route (a)'s configuration

__all__ = ["FusedConfig", "KernelConfig", "SgmvConfig", "SpatialConfig", "default_config",
           "fused_mlp_adapter", "is_interpreted", "spatial"]


def default_config(m: int, dtype: torch.dtype = torch.bfloat16) -> FusedConfig:
    """Route (a)'s configuration when nothing was measured: narrow row tiles and split-K for
    one or two clips, 128 x 128 tiles otherwise; 4-byte operands get a shorter K tile."""
    bk = 32 if dtype == torch.float32 else 64
    if m <= 2 * 1214:
        return FusedConfig(64, 128, 64, bk, 8, 4, 4 if bk == 64 else 2, split_k=2)
    return FusedConfig(128, 128, 64, bk, 8, 8, 3 if bk == 64 else 2)


def _plans(row_slot: torch.Tensor, plans: Plans | None) -> Plans:
    if plans is None:
        return Plans(row_slot.contiguous())
    if plans.row_slot.shape != row_slot.shape:
        raise ConfigError(f"plans were built for {tuple(plans.row_slot.shape)} rows, the call "
                          f"has {tuple(row_slot.shape)}")
    return plans


def fused_mlp_adapter(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None,
                      pool: AdapterPool, row_slot: torch.Tensor,
                      config: FusedConfig | SgmvConfig | None = None,
                      cast_f32: bool | None = None, plans: Plans | None = None) -> torch.Tensor:
    """``x + MLP(h) + A_{row_slot}(h)``, a new ``(M, D)`` tensor of ``x``'s dtype.

    ``h``, the MLP and the pool share one dtype; the residual ``x`` may be float32 instead.
    ``plans`` (one per forward pass, shared by the layers) saves rebuilding the tile plans.
    ``cast_f32`` upcasts tiles before ``tl.dot`` (default: under the interpreter for bf16).
    """
    check_operands(x, h, mlp, pool, row_slot)
    plans = _plans(row_slot, plans)
    if config is None and not is_interpreted():
        from aat_serve.adapters.kernels.candidates import dispatcher

        bucket = bucket_of("mlp", x, h, mlp.hidden if mlp else 0, pool.rank, plans.segments)
        return dispatcher(x.device).run(bucket, x, h, mlp, pool, plans)
    if isinstance(config, SgmvConfig):
        return sgmv_route(x, h, mlp, pool, plans, config, cast_f32)
    return fused_route(x, h, mlp, pool, plans, config or default_config(x.shape[0], h.dtype),
                       cast_f32)


def spatial(x: torch.Tensor, a: torch.Tensor, pool: AdapterPool, row_slot: torch.Tensor,
            config: SpatialConfig | None = None, cast_f32: bool | None = None,
            plans: Plans | None = None) -> torch.Tensor:
    """``x + a + A_{row_slot}(a)``: the spatial adapter with the attention residual."""
    check_operands(x, a, None, pool, row_slot)
    plans = _plans(row_slot, plans)
    if config is None and not is_interpreted():
        from aat_serve.adapters.kernels.candidates import dispatcher

        bucket = bucket_of("spatial", x, a, 0, pool.rank, plans.segments)
        return dispatcher(x.device).run(bucket, x, a, pool, plans)
    return spatial_adapter(x, a, pool, plans, config or SpatialConfig(), cast_f32)
