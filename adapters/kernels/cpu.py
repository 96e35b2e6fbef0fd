"""Linear layers with fused epilogues for the CPU path: oneDNN where it applies, torch elsewhere.

``linear(x, w, b, gelu=True)`` is ``GELU(x w^T + b)`` and ``linear_add(x, w, b, r)`` is
``r + x w^T + b``, each one oneDNN call (fp32 accumulation, exact-erf GELU) for fp32/bf16 CPU
tensors with a contiguous weight. On the AVX-512 machine of docs/benchmarks.md, oneDNN runs
the fp32 MLP GEMMs about a quarter faster than ``F.linear``'s BLAS. oneDNN is slow on strided
*weights*, so those (and other devices and dtypes) take the plain torch route.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

import torch
from torch.nn import functional as F


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.dim() == 2 and x.stride(-1) == 1 and w.is_contiguous() and onednn_available())


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
           gelu: bool = False) -> torch.Tensor:
    """``x w^T + b``, optionally followed by exact GELU; ``x`` is ``(M, K)``, ``w`` ``(N, K)``."""
    if _use_onednn(x, w):
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    y = F.linear(x, w, b)
    return F.gelu(y) if gelu else y


def linear_add(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               residual: torch.Tensor) -> torch.Tensor:
    """``residual + x w^T + b`` as a new tensor."""
    if _use_onednn(x, w) and residual.dtype == x.dtype and residual.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
    return torch.addmm(residual if b is None else residual + b, x, w.t())


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the OS.

    Every torch op allocates its output; with glibc's defaults, blocks of a few MB are mapped
    fresh and unmapped on free, so each op pays page faults for its output (costly in a VM:
    see docs/benchmarks.md). This raises the mmap threshold to
    1 GiB and the trim threshold to 1 GiB for the whole process, so the resident set stays at
    its high-water mark. A process-wide choice for servers and benchmarks to make (nothing in
    ``adapters`` calls it). Returns False where it does not apply (not glibc).
    """
    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return all(libc.mallopt(p, v) == 1 for p, v in (
            (_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 1 << 28)))
    except (OSError, AttributeError):
        return False
