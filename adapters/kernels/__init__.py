"""The fused "MLP + per-task adapter" op: layouts, a torch reference, Triton kernels, dispatch.

``mlp_adapter(x, h, mlp, pool, row_slot)`` computes ``x + MLP(h) + A_{slot}(h)`` per row with
the Triton kernels on CUDA and the torch reference elsewhere. Importing this package never
imports Triton; ``aat_serve.adapters.kernels.triton_mlp`` does.
"""

from aat_serve.adapters.kernels.dispatch import (
    BACKENDS,
    mlp_adapter,
    resolve_backend,
    triton_available,
)
from aat_serve.adapters.kernels.layout import (
    AdapterPool,
    MlpWeights,
    row_slots,
    segments,
    sort_by_slot,
)
from aat_serve.adapters.kernels.reference import (
    mlp_adapter_reference,
    mlp_adapter_widened,
    widened_weights,
)

__all__ = [
    "BACKENDS",
    "AdapterPool",
    "MlpWeights",
    "mlp_adapter",
    "mlp_adapter_reference",
    "mlp_adapter_widened",
    "resolve_backend",
    "row_slots",
    "segments",
    "sort_by_slot",
    "triton_available",
    "widened_weights",
]
