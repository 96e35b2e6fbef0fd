"""The implementations the dispatcher measures per bucket, and the process's dispatchers.

For ``mlp`` (x + MLP(h) + A_s(h)): the unfused torch path, route (a) ``triton_fused`` in a few
tile configurations (narrow M tiles and split-K for one or two clips, wide and persistent ones
for many) and route (b) ``triton_sgmv`` (cuBLAS MLP + segmented shrink/expand). For
``spatial`` (x + a + A_s(a)): the unfused torch path, the one-launch ``triton_spatial`` kernel,
and both generic routes with no MLP. The first candidate after ``unfused`` is each op's
default, used when a CUDA graph is captured before anything was measured.

``AAT_KERNEL_TABLE`` (a file path) makes the choices persist across processes; unset, each
process measures on first use. Importing this module needs Triton.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from aat_serve.adapters.kernels.autotune import (
    UNFUSED,
    Bucket,
    Candidate,
    Dispatcher,
    KernelTable,
)
from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights
from aat_serve.adapters.kernels.plan import Plans
from aat_serve.adapters.kernels.reference import mlp_adapter_eager
from aat_serve.adapters.kernels.triton_fused import FusedConfig, fused_route
from aat_serve.adapters.kernels.triton_sgmv import SgmvConfig, sgmv_route
from aat_serve.adapters.kernels.triton_spatial import SpatialConfig, spatial_adapter

ONE_CLIP_ROWS = 2048  # buckets up to here hold one clip of 1214 tokens


def tma_available() -> bool:
    """Tensor descriptors (TMA) exist on Hopper and newer, with a Triton that has them."""
    import triton.language as tl

    return (hasattr(tl, "make_tensor_descriptor") and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9)


def fused_configs(bucket: Bucket, tma: bool | None = None) -> list[FusedConfig]:
    """Route (a) tile configurations worth timing for ``bucket`` (Hopper starting points);
    ``tma`` (default: where available) adds tensor-descriptor variants."""
    bk = 32 if bucket.dtype == "float32" else 64
    if bucket.rows <= ONE_CLIP_ROWS:  # few row tiles: narrow tiles, split K2's K range
        configs = [FusedConfig(64, 128, 64, bk, 8, 4, 4),
                   FusedConfig(64, 128, 64, bk, 8, 4, 4, split_k=2),
                   FusedConfig(64, 64, 64, bk, 8, 4, 4, split_k=4),
                   FusedConfig(128, 128, 64, bk, 8, 8, 3, split_k=4)]
        with_tma = [FusedConfig(64, 128, 64, bk, 8, 4, 4, split_k=2, tma=True)]
    else:
        configs = [FusedConfig(128, 128, 64, bk, 8, 8, 3),
                   FusedConfig(128, 256, 64, bk, 8, 8, 3),
                   FusedConfig(128, 128, 64, bk, 8, 8, 4, per_sm=1),
                   FusedConfig(128, 128, 64, bk, 8, 8, 3, per_sm=2),
                   FusedConfig(64, 128, 64, bk, 8, 4, 4)]
        with_tma = [FusedConfig(128, 128, 64, bk, 8, 8, 3, tma=True),
                    FusedConfig(128, 128, 64, bk, 8, 8, 4, per_sm=1, tma=True)]
    if tma is None:
        tma = tma_available()
    return configs + (with_tma if tma else [])


def sgmv_configs(bucket: Bucket) -> list[SgmvConfig]:
    bk = 32 if bucket.dtype == "float32" else 64
    if bucket.rows <= ONE_CLIP_ROWS:
        return [SgmvConfig(64, 64, 64, bk, 8, 4, 3), SgmvConfig(32, 64, 64, bk, 8, 4, 3)]
    return [SgmvConfig(64, 128, 64, bk, 8, 4, 3), SgmvConfig(128, 128, 64, bk, 8, 8, 3)]


def spatial_configs(bucket: Bucket) -> list[SpatialConfig]:
    bk = 32 if bucket.dtype == "float32" else 64
    return [SpatialConfig(64, 64, bk, 8, 2), SpatialConfig(32, 64, bk, 4, 2),
            SpatialConfig(64, 128, bk, 8, 2), SpatialConfig(128, 64, bk, 8, 2)]


def _unfused_mlp(x, h, mlp: MlpWeights | None, pool: AdapterPool, plans: Plans):
    return mlp_adapter_eager(x, h, mlp, pool, plans.row_slot)


def _unfused_spatial(x, a, pool: AdapterPool, plans: Plans):
    return mlp_adapter_eager(x + a, a, None, pool, plans.row_slot)


def mlp_candidates(bucket: Bucket) -> list[Candidate]:
    cands = [Candidate(UNFUSED, _unfused_mlp, graph_safe=False)]
    for f in fused_configs(bucket):
        cands.append(Candidate(f.name, functools.partial(_fused, config=f)))
    for s in sgmv_configs(bucket):
        cands.append(Candidate(s.name, functools.partial(_sgmv, config=s)))
    return cands


def spatial_candidates(bucket: Bucket) -> list[Candidate]:
    cands = [Candidate(UNFUSED, _unfused_spatial, graph_safe=False)]
    for s in spatial_configs(bucket):
        cands.append(Candidate(s.name, functools.partial(_spatial, config=s)))
    f = fused_configs(bucket)[0]
    cands.append(Candidate("generic-" + f.name, functools.partial(_spatial_generic, config=f)))
    g = sgmv_configs(bucket)[0]
    cands.append(Candidate("generic-" + g.name, functools.partial(_spatial_generic, config=g)))
    return cands


def _fused(x, h, mlp, pool, plans, *, config: FusedConfig):
    return fused_route(x, h, mlp, pool, plans, config)


def _sgmv(x, h, mlp, pool, plans, *, config: SgmvConfig):
    return sgmv_route(x, h, mlp, pool, plans, config)


def _spatial(x, a, pool, plans, *, config: SpatialConfig):
    return spatial_adapter(x, a, pool, plans, config)


def _spatial_generic(x, a, pool, plans, *, config: FusedConfig | SgmvConfig):
    route = fused_route if isinstance(config, FusedConfig) else sgmv_route
    return route(x + a, a, None, pool, plans, config)


def all_candidates(bucket: Bucket) -> list[Candidate]:
    return spatial_candidates(bucket) if bucket.op == "spatial" else mlp_candidates(bucket)


def environment(device: torch.device) -> str:
    """The key of a table's entries: the device's name and the torch and Triton versions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|torch {torch.__version__}|triton {triton.__version__}"


def cuda_timer(fn) -> float:
    """Median milliseconds per call (``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_DISPATCHERS: dict[str, Dispatcher] = {}


def dispatcher(device: torch.device) -> Dispatcher:
    """This process's dispatcher for a CUDA device (one per device; table from
    ``AAT_KERNEL_TABLE`` if set)."""
    key = str(device)
    found = _DISPATCHERS.get(key)
    if found is None:
        table = KernelTable(environment(device), os.environ.get("AAT_KERNEL_TABLE") or None)
        found = Dispatcher(table, all_candidates, cuda_timer, _capturing)
        _DISPATCHERS[key] = found
    return found
