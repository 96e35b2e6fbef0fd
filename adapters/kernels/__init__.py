"""The fused "MLP + per-task adapter" ops: layouts, a torch reference, Triton kernels, dispatch.

``mlp_adapter(x, h, mlp, pool, row_slot)`` computes ``x + MLP(h) + A_{slot}(h)`` per row and
``spatial_adapter(x, a, pool, row_slot)`` ``x + a + A_{slot}(a)``, with the Triton kernels on
CUDA (the fastest measured candidate per shape bucket) and the torch reference elsewhere.
Importing this package never imports Triton; ``aat_serve.adapters.kernels.triton_mlp`` does.
"""

from aat_serve.adapters.kernels.dispatch import (
    BACKENDS,
    mlp_adapter,
    resolve_backend,
    spatial_adapter,
    triton_available,
)
from aat_serve.adapters.kernels.layout import (
    AdapterPool,
    MlpWeights,
    row_slots,
    segments,
    sort_by_slot,
)
from aat_serve.adapters.kernels.plan import Plans, TilePlan, tile_plan
from aat_serve.adapters.kernels.reference import (
    mlp_adapter_reference,
    mlp_adapter_widened,
    widened_weights,
)

__all__ = [
    "BACKENDS",
    "AdapterPool",
    "MlpWeights",
    "Plans",
    "TilePlan",
    "mlp_adapter",
    "mlp_adapter_reference",
    "mlp_adapter_widened",
    "resolve_backend",
    "row_slots",
    "segments",
    "sort_by_slot",
    "spatial_adapter",
    "tile_plan",
    "triton_available",
    "widened_weights",
]
