"""MultiTaskModel: one frozen AST serving many tasks, with clips of different tasks in one batch.

The model is a composition of two parts:

- ``TaskSlots`` (``aat_serve.adapters.slots``) owns the resident tasks: slots, per-layer adapter
  pools, reference counts and copy-on-write hot swap (a batch sees a task's old weights or its
  new ones, never a mix, and never waits for a load).
- a ``Runner`` (``aat_serve.adapters.runners``) executes a grouped batch: ``segments`` (torch
  ops per task run, the widened MLP for one-task groups), ``triton`` / ``interpret`` / ``torch``
  (the fused kernels of ``aat_serve.adapters.kernels``) or ``onnxruntime``.

This class validates the configuration, prepares the backbone (device, dtype), groups each
batch (``runners.group_batch``), has the runner pool each group and applies the task heads,
which differ in class count, per task after pooling. Results come back in the caller's order.

Dtypes: ``float32``, or ``bfloat16`` for the GEMMs (block weights, adapter pools, GEMM and
attention inputs) with fp32 accumulation. The residual stream is fp32 by default
(``residual_dtype``); with bf16 GEMMs it may be bf16 too, as transformers' bf16 model keeps it,
which saves a cast per block and half the stream's memory traffic on a GPU. LayerNorms always
normalise in fp32; embeddings, prompts, pooling and heads stay fp32. The bf16 stream's top-1
agreement with the fp32 stream is measured by ``aat bench model`` (docs/benchmarks.md).

``graphs`` (a ``runners.graphs.GraphConfig``) replays the fused runner's forward from CUDA
graphs per batch bucket. Each batch's results leave the device in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch.nn import functional as F

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import Manifest, TaskBundle
from aat_serve.adapters.config import DEFAULT_BOTTLENECK
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.layout import segments
from aat_serve.adapters.runners import RUNNERS, Runner, group_batch, make_runner, resolve_runner
from aat_serve.adapters.runners.graphs import GraphCache, GraphConfig
from aat_serve.adapters.slots import Snapshot, TaskInfo, TaskSlots

BACKENDS = RUNNERS
__all__ = ["BACKENDS", "MultiTaskModel", "ServingModel", "TaskInfo"]


class ServingModel(Protocol):
    """What the service's engine and runtime need of a multi-task model."""

    @property
    def tasks(self) -> dict[str, TaskInfo]: ...

    @property
    def runtime(self) -> str: ...

    @property
    def backend(self) -> str: ...

    def load_task(self, bundle: TaskBundle) -> int: ...

    def unload_task(self, task: str) -> None: ...

    def classify(self, features: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]: ...


def _prepare_backbone(backbone: AST, dtype: torch.dtype, device: torch.device) -> AST:
    """``backbone`` frozen on ``device`` with its blocks' GEMM weights in ``dtype``."""
    for blk in backbone.blocks:
        if blk.mlp_adapter is not None or blk.spatial_adapter is not None:
            raise ConfigError("the backbone has adapters attached (it is part of a "
                              "single-task model); pass a plain backbone")
    backbone = backbone.to(device=device).eval().requires_grad_(False)
    for blk in backbone.blocks:  # the GEMMs' weights; norms and embeddings stay fp32
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            lin.to(dtype)
    return backbone


class MultiTaskModel(torch.nn.Module):
    """A frozen AST backbone plus per-layer adapter slot pools and per-task heads.

    Args:
        backbone: the shared backbone; moved to ``device`` in place, frozen, and its blocks'
            linear layers cast to ``dtype``.
        max_tasks: how many tasks may be resident at once.
        dtype: ``torch.float32`` or ``torch.bfloat16`` for the GEMM weights and adapter pools.
        device: where everything runs.
        fingerprint: the backbone's fingerprint if already known (computed otherwise, before
            any dtype change).
        bottleneck: width R of a pool row; bundles with a smaller adapter are zero-padded.
        backend: the runner, one of ``BACKENDS`` (see ``aat_serve.adapters.runners``).
        providers, threads: ONNX Runtime execution providers and intra-op threads
            (``backend="onnxruntime"`` only).
        residual_dtype: the residual stream's dtype, ``torch.float32`` (default) or ``dtype``.
        graphs: replay the forward from graphs per batch bucket (fused runners only).
        device_budget: most bytes of adapter pools plus heads and prompts on ``device``
            (``TaskSlots``); None: bounded by ``max_tasks`` only.
    """

    def __init__(self, backbone: AST, max_tasks: int = 64, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", fingerprint: str | None = None,
                 bottleneck: int = DEFAULT_BOTTLENECK, backend: str = "auto",
                 providers: list[str] | None = None, threads: int | None = None,
                 residual_dtype: torch.dtype = torch.float32,
                 graphs: GraphConfig | None = None, device_budget: int | None = None) -> None:
        super().__init__()
        if max_tasks < 1:
            raise ConfigError(f"max_tasks must be at least 1, got {max_tasks}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if bottleneck < 1:
            raise ConfigError(f"bottleneck must be positive, got {bottleneck}")
        device = torch.device(device)
        backend = resolve_runner(backend, device)
        self.fingerprint = fingerprint if fingerprint is not None else backbone.fingerprint()
        self.backbone = _prepare_backbone(backbone, dtype, device)
        self.max_tasks = max_tasks
        self.dtype = dtype
        self.device = device
        self.bottleneck = bottleneck
        if device_budget is not None and device_budget < 0:
            raise ConfigError(f"device_budget must be >= 0 bytes, got {device_budget}")
        self.slots = TaskSlots(self.backbone, self.fingerprint, max_tasks, dtype, device,
                               bottleneck, device_budget)
        self.residual_dtype = residual_dtype
        self.runner: Runner = make_runner(backend, self.backbone, dtype, device, bottleneck,
                                          self.slots.live_entries, providers=providers,
                                          threads=threads, residual=residual_dtype)
        self.graphs = GraphCache(self.runner, graphs, device) if graphs else None  # type: ignore[arg-type]

    # -- what the runner is -------------------------------------------------------------------
    @property
    def runtime(self) -> str:
        """``torch`` or ``onnxruntime``."""
        return self.runner.runtime

    @property
    def backend(self) -> str:
        """The runner's kernel path, or its ONNX execution provider."""
        return self.runner.backend

    # -- task management (``TaskSlots``) ------------------------------------------------------
    @property
    def tasks(self) -> dict[str, TaskInfo]:
        return self.slots.tasks

    def has_task(self, task: str) -> bool:
        return self.slots.has(task)

    def task_manifest(self, task: str) -> Manifest:
        return self.slots.entry(task).info.manifest

    def load_task(self, bundle: TaskBundle) -> int:
        """Validate ``bundle`` and make it resident (replacing its task atomically); its slot.

        Raises ``BackboneMismatchError``, ``BundleError`` or ``SlotsFullError``.
        """
        return self.slots.load(bundle)

    def unload_task(self, task: str) -> None:
        """Remove a task; batches already holding it finish first (``UnknownTaskError``)."""
        self.slots.unload(task)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by the backbone, the adapter pools and the heads/prompts."""
        backbone = sum(t.numel() * t.element_size() for t in self.backbone.state_dict().values())
        backbone += self.runner.extra_bytes()
        pools, tasks = self.slots.nbytes()
        return {"backbone": backbone, "pools": pools, "tasks": tasks,
                "total": backbone + pools + tasks}

    # -- inference ----------------------------------------------------------------------------
    def classify(self, features: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """Logits ``(C_task,)`` (fp32, CPU; from a GPU in one copy per batch) for each clip of
        ``features (B, T, F)`` and its task.

        All task names are resolved at once, so a concurrent hot swap never mixes old and new
        weights inside one call. Raises ``UnknownTaskError``.
        """
        self._check_features(features, len(tasks))
        with self.slots.pinned(tasks) as snapshot:
            return self._run(features, snapshot)

    def forward(self, features: torch.Tensor, slots: Sequence[int]) -> list[torch.Tensor]:
        """Per-clip outputs for ``features (B, T, F)`` run with the tasks in ``slots``.

        A clip whose slot holds a task gets that task's logits ``(C,)``; a clip whose slot is
        free (or ``-1``) runs with no adapters and gets the pooled embedding ``(D,)``.
        """
        slots = [int(s) for s in slots]
        self._check_features(features, len(slots))
        with self.slots.pinned_slots(slots) as snapshot:
            return self._run(features, snapshot)

    def _check_features(self, features: torch.Tensor, n: int) -> None:
        f = self.backbone.cfg.num_mel_bins
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != f:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
            raise ConfigError(f"expected features of shape (batch, frames, {f}), got {shape}")
        if features.shape[0] != n:
            raise ConfigError(f"got {features.shape[0]} clips but {n} task names/slots")

    def _run(self, features: torch.Tensor, snapshot: Snapshot) -> list[torch.Tensor]:
        # The dtypes are this model's own choice: a caller's autocast must not change them.
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            return self._run_groups(features, snapshot)

    def _run_groups(self, features: torch.Tensor, snapshot: Snapshot) -> list[torch.Tensor]:
        entries = snapshot.entries
        if not entries:
            return []
        x = features.to(dtype=torch.float32)
        x_dev: torch.Tensor | None = None  # moved to the device for the first eager group
        pieces: list[tuple[list[int], torch.Tensor]] = []  # (clips, their rows on the device)
        for g in group_batch(entries):
            pooled = self.graphs.pooled(x, g, snapshot.pools) if self.graphs else None
            if pooled is None:
                if x_dev is None:
                    x_dev = x.to(self.device)
                idx = torch.tensor(g.clips, device=self.device)
                pooled = self.runner.pooled(x_dev.index_select(0, idx), g, snapshot.pools)
            pooled = pooled.float()
            for c0, c1, _ in segments([e.info.slot if e else -1 for e in g.entries]):
                e = g.entries[c0]
                seg = pooled[c0:c1]
                if e is not None:
                    lw, lb, fw, fb = e.head
                    seg = F.linear(F.layer_norm(seg, (seg.shape[-1],), lw, lb, e.head_eps), fw, fb)
                pieces.append((g.clips[c0:c1], seg))
        if self.device.type != "cpu":
            pieces = pieces_to_host(pieces)  # the batch's one device-to-host copy
        out: list[torch.Tensor | None] = [None] * len(entries)
        for clips, seg in pieces:
            for j, c in enumerate(clips):
                out[c] = seg[j]
        return out  # type: ignore[return-value]


def pieces_to_host(pieces: list[tuple[list[int], torch.Tensor]]
                   ) -> list[tuple[list[int], torch.Tensor]]:
    """The same pieces on the host in one device-to-host copy: a batch's rows (logits of each
    task, of different widths, or pooled embeddings) are flattened into one tensor, copied
    once and split again, instead of one synchronising copy per task segment."""
    if not pieces:
        return []
    flat = torch.cat([seg.reshape(-1) for _, seg in pieces]).cpu()
    host = flat.split([seg.numel() for _, seg in pieces])
    return [(clips, h.view(seg.shape)) for (clips, seg), h in zip(pieces, host, strict=True)]
