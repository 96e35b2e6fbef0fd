"""The ONNX Runtime runner: a group's backbone pass in ``OrtBackbone`` (AAT_RUNTIME=onnxruntime).

The graph takes each clip's adapters as inputs (``aat_serve.adapters.onnx_runtime``), so a new
or replaced task only changes what is bound, never the session. Each task's adapter weights are
gathered from the slot pools once per load (keyed by the load's generation) into the graph's
layout; entries no longer published are dropped from that cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.onnx_runtime import OrtBackbone, TaskArrays
from aat_serve.adapters.runners.batch import Group
from aat_serve.adapters.slots import SlotPools, TaskEntry


def entry_tensors(entry: TaskEntry | None, pools: SlotPools) -> dict[str, torch.Tensor]:
    """``entry``'s adapters (read back from its pool row) and prompts, by bundle tensor name."""
    tensors: dict[str, torch.Tensor] = {}
    if entry is None:
        return tensors
    if entry.row >= 0:
        for kind, on, layer_pools in (("mlp_adapter", entry.mlp, pools.mlp),
                                      ("spatial_adapter", entry.spatial, pools.spatial)):
            if not on:
                continue
            for i, pool in enumerate(layer_pools):
                w_down, b_down, w_up, b_up = (t[entry.row].float().cpu() for t in pool.tensors())
                tensors[f"blocks.{i}.{kind}.fc1.weight"] = w_down.t()
                tensors[f"blocks.{i}.{kind}.fc1.bias"] = b_down
                tensors[f"blocks.{i}.{kind}.fc2.weight"] = w_up.t()
                tensors[f"blocks.{i}.{kind}.fc2.bias"] = b_up
    if entry.prompts is not None:
        tensors["prompts"] = entry.prompts
    return tensors


class OnnxRunner:
    """The backbone pass in ONNX Runtime (fp32); ``backend`` is the execution provider."""

    runtime = "onnxruntime"

    def __init__(self, backbone: AST, bottleneck: int, live: Callable[[], list[TaskEntry]],
                 providers: list[str] | None = None, threads: int | None = None) -> None:
        self.backbone = backbone
        self.ort = OrtBackbone(backbone, bottleneck=bottleneck, providers=providers,
                               threads=threads)
        self._live = live
        self._arrays: dict[int, TaskArrays] = {}
        self._arrays_lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self.ort.provider

    def extra_bytes(self) -> int:
        return 0

    def pooled(self, x: torch.Tensor, group: Group, pools: SlotPools) -> torch.Tensor:
        index: dict[int, int] = {}
        tasks: list[TaskArrays] = []
        rows: list[int] = []
        for e in group.entries:
            key = -1 if e is None else e.gen
            if key not in index:
                index[key] = len(tasks)
                tasks.append(self._task_arrays(e, pools))
            rows.append(index[key])
        return self.ort.pooled(x, tasks, rows).to(x.device)

    def _task_arrays(self, entry: TaskEntry | None, pools: SlotPools) -> TaskArrays:
        key = -1 if entry is None else entry.gen
        with self._arrays_lock:
            cached = self._arrays.get(key)
            if cached is not None:
                return cached
            cfg = self.backbone.cfg
            arrays = TaskArrays.from_tensors(entry_tensors(entry, pools), cfg.depth,
                                             cfg.embed_dim, self.ort.bottleneck)
            live = {e.gen for e in self._live()} | {-1}
            for stale in [k for k in self._arrays if k not in live]:
                del self._arrays[stale]
            self._arrays[key] = arrays
            return arrays
