"""Pick an implementation of the fused ops: Triton on CUDA, torch elsewhere.

Two ops: ``mlp_adapter`` (``x + MLP(h) + A_s(h)``, a block's MLP with its task's adapter) and
``spatial_adapter`` (``x + a + A_s(a)``, the spatial adapter on the attention output ``a``).
On CUDA the Triton layer's dispatcher (``candidates.py``, ``autotune.py``) measures the
candidate kernels per shape bucket and runs the fastest, the unfused torch path included.

``backend``:
- ``"auto"`` (default): the Triton kernels for CUDA tensors when Triton imports, else torch.
- ``"triton"``: the compiled kernels (CUDA tensors).
- ``"interpret"``: the kernels under Triton's interpreter, on CPU tensors. The interpreter is
  chosen when the kernel module is imported, so ``TRITON_INTERPRET=1`` must be in the
  environment before anything imports ``aat_serve.adapters.kernels.triton_mlp`` (in practice: before
  Python starts); otherwise this raises ``ConfigError`` rather than run compiled kernels.
- ``"torch"``: ``reference.mlp_adapter_reference`` in the operands' dtype.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Literal

import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights
from aat_serve.adapters.kernels.reference import mlp_adapter_reference

Backend = Literal["auto", "triton", "interpret", "torch"]
BACKENDS = ("auto", "triton", "interpret", "torch")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels() -> ModuleType:
    if not triton_available():
        raise ConfigError("the Triton backend needs the 'triton' package, which is not installed")
    return importlib.import_module("aat_serve.adapters.kernels.triton_mlp")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``"triton"``, ``"interpret"`` or ``"torch"`` for tensors on device."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {backend!r}; expected one of "
                          f"{', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and device.type != "cuda":
        raise ConfigError(f"the triton backend needs CUDA tensors, got {device.type}; use "
                          "backend='interpret' (with TRITON_INTERPRET=1) or 'torch'")
    if backend == "interpret":
        if device.type != "cpu":
            raise ConfigError(f"the interpreter runs on CPU tensors, got {device.type}")
        if not _kernels().is_interpreted():
            raise ConfigError("backend 'interpret' needs TRITON_INTERPRET=1 in the environment "
                              "before the kernels are first imported")
    return backend


def mlp_adapter(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None, pool: AdapterPool,
                row_slot: torch.Tensor, backend: Backend = "auto", **kernel_kw) -> torch.Tensor:
    """``x + MLP(h) + A_{row_slot}(h)`` (see ``reference`` for the exact semantics).

    ``kernel_kw`` (``config``, ``cast_f32``, ``plans``) go to the Triton launcher.
    """
    which = resolve_backend(backend, x.device)
    if which == "torch":
        return mlp_adapter_reference(x, h, mlp, pool, row_slot)
    return _kernels().fused_mlp_adapter(x, h, mlp, pool, row_slot, **kernel_kw)


def spatial_adapter(x: torch.Tensor, a: torch.Tensor, pool: AdapterPool, row_slot: torch.Tensor,
                    backend: Backend = "auto", **kernel_kw) -> torch.Tensor:
    """``x + a + A_{row_slot}(a)``: ``mlp_adapter(x + a, a, None, pool, row_slot)`` as one op
    (one kernel launch per layer on CUDA). ``kernel_kw`` as for ``mlp_adapter``."""
    which = resolve_backend(backend, x.device)
    if which == "torch":
        return mlp_adapter_reference(x + a, a, None, pool, row_slot)
    return _kernels().spatial(x, a, pool, row_slot, **kernel_kw)
