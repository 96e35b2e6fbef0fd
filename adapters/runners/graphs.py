"""CUDA graphs of the fused runner's forward, one per batch bucket, over static buffers.

At batch 1 the model is launch-bound: ~190 kernels whose launches cost several times their GPU
work. ``GraphCache`` captures ``FusedRunner.encode`` (patch embedding, every block, pooling) once
per key ``(bucket, frames, prompts, spatial)`` and replays it for every later group of that
shape:

- a group of ``n`` clips runs in the smallest bucket ``>= n`` (``GraphConfig.buckets``); the
  padding clips get zero features and pool row -1 (no adapter) and their outputs are dropped.
  A group larger than the largest bucket runs eagerly (``pooled`` returns None).
- inputs live in static buffers: one fp32 device buffer per graph holding the features, the
  per-clip pool rows and the group's clip indices (int32 bits), filled from a host staging
  buffer of the same layout (pinned on CUDA) with ONE host-to-device copy (only the rows and
  indices when the features are already on the device: they are gathered there); deep prompts
  are copied on the device.
- graphs read the adapter pools in place. Loading a task writes its pool row in place and
  unloading zeroes it, and the rows are inputs, so a hot swap needs no re-capture. Only when
  ``TaskSlots`` grows the pools (new tensors; geometric, so at most ~log2(max_tasks) times) is
  a graph captured again, lazily, on its next use ("re-capture on pool generation change").
- at most ``max_graphs`` graphs are kept (least recently used dropped). The CUDA graphs share
  one memory pool: replays are serialised under a lock and each output is cloned before the
  lock is released, so no graph's intermediates can overwrite another's live result.

A capture that fails (an op that cannot be captured) makes that key run eagerly from then on,
with a warning, when ``GraphConfig.fallback`` is set (``AAT_CUDA_GRAPHS=auto``); with
``fallback`` off (``on``) the error propagates.

The capture backend is a seam: ``CudaCapture`` (``torch.cuda.CUDAGraph``) on a GPU,
``EagerCapture`` (re-runs the function over the same static buffers) on CPU, so the bucketing,
padding and buffer logic is tested without a GPU.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.runners.batch import Group, clip_rows
from aat_serve.adapters.runners.fused import FusedRunner
from aat_serve.adapters.slots import SlotPools

log = logging.getLogger(__name__)

GRAPH_MODES = ("auto", "on", "off")
Key = tuple[int, int, int, bool]
"""(bucket, frames, prompts per block, spatial adapters present)."""


@dataclass(frozen=True)
class GraphConfig:
    """Which batch sizes get a graph, how many graphs may live, and how they are captured."""

    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    max_graphs: int = 16
    capture: Literal["cuda", "eager"] = "cuda"
    """``cuda``: real CUDA graphs; ``eager``: the same buffers, the function re-run (tests)."""
    warmup: int = 2
    """Eager runs on a side stream before a capture (Triton compiles, cuBLAS picks algorithms)."""
    fallback: bool = True
    """A key whose capture fails runs eagerly (with a warning) instead of raising."""

    def __post_init__(self) -> None:
        if not self.buckets or min(self.buckets) < 1 or list(self.buckets) != sorted(
                set(self.buckets)):
            raise ConfigError(f"graph buckets must be increasing positive batch sizes, got "
                              f"{self.buckets}")
        if self.max_graphs < 1 or self.warmup < 0:
            raise ConfigError(f"max_graphs must be at least 1 and warmup at least 0, got "
                              f"{self.max_graphs} and {self.warmup}")
        if self.capture not in ("cuda", "eager"):
            raise ConfigError(f"graph capture must be 'cuda' or 'eager', got {self.capture!r}")

    def bucket(self, n: int) -> int | None:
        """The smallest bucket holding ``n`` clips; None beyond the largest."""
        return next((b for b in self.buckets if b >= n), None)


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: 1, 2, 4, ..., max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def graph_config(mode: str, device: torch.device, backend: str,
                 max_batch: int) -> GraphConfig | None:
    """The graphs for a serving setting (``AAT_CUDA_GRAPHS``): ``off`` none; ``auto`` CUDA
    graphs when the model runs the Triton kernels on a GPU, else none; ``on`` the same, and a
    ``ConfigError`` where they cannot run (the torch runners synchronise with the host)."""
    if mode not in GRAPH_MODES:
        raise ConfigError(f"unknown CUDA graphs mode {mode!r}; expected one of "
                          f"{', '.join(GRAPH_MODES)}")
    able = device.type == "cuda" and backend == "triton"
    if mode == "on" and not able:
        raise ConfigError(f"CUDA graphs need a CUDA device and the triton backend, got "
                          f"{device.type} and {backend}; use auto or off")
    if mode == "off" or not able:
        return None
    return GraphConfig(buckets=default_buckets(max_batch), fallback=mode == "auto")


class CaptureBackend(Protocol):
    """How static buffers are made and filled and how a function becomes a replay."""

    def host_buffer(self, numel: int) -> torch.Tensor: ...

    def upload(self, host: torch.Tensor, dev: torch.Tensor) -> None:
        """Copy ``host`` into ``dev`` (maybe asynchronously; see ``wait_host``)."""

    def wait_host(self) -> None:
        """Return once the last ``upload`` has finished reading its host buffer."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]: ...


class EagerCapture:
    """Runs the function again on every replay (CPU, tests): same buffers, no graph."""

    def host_buffer(self, numel: int) -> torch.Tensor:
        return torch.empty(numel)

    def upload(self, host: torch.Tensor, dev: torch.Tensor) -> None:
        dev.copy_(host)

    def wait_host(self) -> None:
        pass

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return fn


class CudaCapture:
    """``torch.cuda.CUDAGraph`` capture into one shared memory pool; pinned host staging."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device = device
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()
        self._uploaded: torch.cuda.Event | None = None

    def host_buffer(self, numel: int) -> torch.Tensor:
        return torch.empty(numel, pin_memory=True)

    def upload(self, host: torch.Tensor, dev: torch.Tensor) -> None:
        dev.copy_(host, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()

    def wait_host(self) -> None:
        if self._uploaded is not None:
            self._uploaded.synchronize()

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work during a capture is not an error here
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


@dataclass
class _Graph:
    pools: SlotPools  # the pools it reads; a graph of other pools is captured again
    dev: torch.Tensor  # features (B*T*F fp32), then as int32 bits: mlp rows, spatial rows and
    # the group's clip indices (B each)
    host: torch.Tensor  # the same layout, on the host (pinned on CUDA)
    prompts: torch.Tensor | None  # (B, L, P, D) on the device
    replay: Callable[[], torch.Tensor]


class GraphCache:
    """Captured forwards of a ``FusedRunner`` keyed by (bucket, frames, prompts, spatial)."""

    def __init__(self, runner: FusedRunner, cfg: GraphConfig, device: torch.device) -> None:
        if not isinstance(runner, FusedRunner):
            raise ConfigError(f"graphs capture the fused runner (backend triton, torch or "
                              f"interpret), not {runner.backend}")
        if cfg.capture == "cuda" and (device.type != "cuda" or runner.backend != "triton"):
            raise ConfigError(f"CUDA graphs need a CUDA device and the triton backend, got "
                              f"{device.type} and {runner.backend}")
        self.runner = runner
        self.cfg = cfg
        self.device = device
        self.backend: CaptureBackend = (CudaCapture(device, cfg.warmup) if cfg.capture == "cuda"
                                        else EagerCapture())
        self.captures = 0
        """Graphs captured so far (re-captures included)."""
        self.failed: dict[Key, str] = {}
        """Keys whose capture failed (they run eagerly), with the error."""
        self._graphs: OrderedDict[Key, _Graph] = OrderedDict()
        self._lock = threading.Lock()

    def keys(self) -> list[Key]:
        """The live graphs' keys, least recently used first."""
        with self._lock:
            return list(self._graphs)

    def pooled(self, x: torch.Tensor, group: Group, pools: SlotPools) -> torch.Tensor | None:
        """Pooled embeddings ``(n, D)`` of the group's clips of ``x (B, T, F)`` (fp32, on the
        host or the device) by graph replay; None when the group exceeds the largest bucket."""
        n = len(group.clips)
        b = self.cfg.bucket(n)
        if b is None:
            return None
        key = (b, x.shape[1], group.num_prompts, bool(group.spatial_segs))
        with self._lock:
            if key in self.failed:
                return None
            g = self._graphs.pop(key, None)
            if g is None or g.pools is not pools:
                del g  # its memory returns to the pool before the new capture
                while len(self._graphs) >= self.cfg.max_graphs:
                    self._graphs.popitem(last=False)
                try:
                    g = self._capture(key, x.shape[2], pools)
                except Exception as e:
                    if not self.cfg.fallback:
                        raise
                    self.failed[key] = f"{type(e).__name__}: {e}"
                    log.warning("graph capture failed for %s; that shape runs eagerly", key,
                                exc_info=True)
                    return None
            self._graphs[key] = g  # most recently used last
            self._fill(g, key, x, group)
            return g.replay()[:n].clone()

    def _capture(self, key: Key, mel: int, pools: SlotPools) -> _Graph:
        b, frames, p, spatial = key
        size = b * frames * mel
        dev = torch.zeros(size + 3 * b, device=self.device)
        dev[size:size + 2 * b].view(torch.int32).fill_(-1)
        host = self.backend.host_buffer(size + 3 * b)
        prompts = None
        if p:
            cfg = self.runner.backbone.cfg
            prompts = torch.zeros(b, cfg.depth, p, cfg.embed_dim, device=self.device)
        x_static = dev[:size].view(b, frames, mel)
        rows = dev[size:size + 2 * b].view(torch.int32)

        def forward() -> torch.Tensor:
            return self.runner.encode(x_static, prompts, rows[b:] if spatial else None,
                                      rows[:b], pools)

        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            replay = self.backend.capture(forward)
        self.captures += 1
        return _Graph(pools, dev, host, prompts, replay)

    def _fill(self, g: _Graph, key: Key, x: torch.Tensor, group: Group) -> None:
        b, frames, _, _ = key
        n, size = len(group.clips), g.dev.numel() - 3 * b
        self.backend.wait_host()  # the previous upload has read the staging buffer
        ints = g.host[size:].view(torch.int32)  # mlp rows, spatial rows, clip indices
        clip_rows(group.mlp_segs, ints[:b])
        clip_rows(group.spatial_segs, ints[b:2 * b])
        idx = ints[2 * b:2 * b + n]
        idx.copy_(torch.tensor(group.clips, dtype=torch.int32))
        if x.device.type == "cpu":  # features, rows and indices in one upload
            xs = g.host[:size].view(b, frames, -1)
            torch.index_select(x, 0, idx, out=xs[:n])
            xs[n:].zero_()
            self.backend.upload(g.host, g.dev)
        else:  # features already on the device: rows and indices uploaded, features gathered
            self.backend.upload(g.host[size:], g.dev[size:])
            xs = g.dev[:size].view(b, frames, -1)
            dev_idx = g.dev[size + 2 * b:size + 2 * b + n].view(torch.int32)
            torch.index_select(x, 0, dev_idx, out=xs[:n])
            xs[n:].zero_()
        if g.prompts is not None:
            g.prompts[:n].copy_(group.prompts())  # type: ignore[arg-type]
            g.prompts[n:].zero_()
