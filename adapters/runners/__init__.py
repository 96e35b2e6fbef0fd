"""Runners: how a grouped batch is executed, apart from which tasks are loaded where.

A ``Runner`` turns one ``Group`` of a batch (clips of one sequence length, ordered by task) and
the pinned slot pools into pooled embeddings; ``TaskSlots`` (``aat_serve.adapters.slots``)
owns tasks, slots and pools, and ``MultiTaskModel`` composes the two and applies the heads. So
a runner can be swapped (or a new one written) without touching slot management.

Runners (``make_runner``'s ``name``):

- ``segments``: torch ops per contiguous task run, the widened MLP for one-task groups (CPU, or
  CUDA without Triton); ``torch_segments``.
- ``triton`` / ``interpret`` / ``torch``: the fused kernels of ``aat_serve.adapters.kernels``,
  compiled, under Triton's interpreter, or their torch reference; ``fused``.
- ``onnxruntime``: the backbone pass in ONNX Runtime (fp32, CPU tensors); ``onnx``.
- ``auto``: ``triton`` on CUDA when Triton imports, else ``segments``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.dispatch import triton_available
from aat_serve.adapters.runners.batch import Group, group_batch
from aat_serve.adapters.runners.fused import FusedRunner
from aat_serve.adapters.runners.torch_segments import SegmentsRunner
from aat_serve.adapters.slots import SlotPools, TaskEntry

RUNNERS = ("auto", "segments", "triton", "interpret", "torch", "onnxruntime")

__all__ = ["RUNNERS", "Group", "Runner", "group_batch", "make_runner", "resolve_runner"]


class Runner(Protocol):
    """Executes one group of a batch; ``runtime`` and ``backend`` describe it (``/readyz``)."""

    @property
    def runtime(self) -> str:
        """``torch`` or ``onnxruntime``."""
        ...

    @property
    def backend(self) -> str:
        """The kernel path (``segments``, ``triton``, ...) or the ONNX execution provider."""
        ...

    def pooled(self, x: torch.Tensor, group: Group, pools: SlotPools) -> torch.Tensor:
        """Pooled embeddings ``(len(group.clips), D)`` of the group's clips ``x (B, T, F)``."""
        ...

    def extra_bytes(self) -> int:
        """Bytes the runner holds beyond the backbone and the pools (e.g. widened rows)."""
        ...


def resolve_runner(name: str, device: torch.device) -> str:
    """The concrete runner for ``name`` on ``device`` (``auto`` resolved; ``ConfigError``)."""
    if name not in RUNNERS:
        raise ConfigError(f"unknown backend {name!r}; expected one of {', '.join(RUNNERS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "segments"
    if name == "onnxruntime" and device.type != "cpu":
        raise ConfigError("the onnxruntime runner takes CPU tensors; its execution provider "
                          "picks the accelerator")
    return name


def make_runner(name: str, backbone: AST, dtype: torch.dtype, device: torch.device,
                bottleneck: int, live: Callable[[], list[TaskEntry]], *,
                providers: list[str] | None = None, threads: int | None = None,
                residual: torch.dtype = torch.float32) -> Runner:
    """The runner ``name`` (already resolved) over ``backbone`` (prepared: on ``device``, its
    GEMM weights in ``dtype``). ``live`` lists the published task entries (cache eviction).
    ``residual`` is the dtype of the residual stream: float32, or ``dtype`` itself."""
    if residual not in (torch.float32, dtype):
        raise ConfigError(f"the residual stream must be float32 or the GEMM dtype {dtype}, got "
                          f"{residual}")
    if name == "segments":
        return SegmentsRunner(backbone, dtype, bottleneck, residual)
    if name == "onnxruntime":
        if dtype != torch.float32:
            raise ConfigError("the onnxruntime runner computes in float32")
        from aat_serve.adapters.runners.onnx import OnnxRunner  # optional dependency

        return OnnxRunner(backbone, bottleneck, live, providers=providers, threads=threads)
    return FusedRunner(backbone, dtype, device, name, residual)
