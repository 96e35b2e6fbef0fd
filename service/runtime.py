"""The running service: backbone, multi-task model, engine, registry, pools; start and stop.

Start-up has two phases. ``Service.create`` loads the backbone and builds the model (errors
here stop the server with a clear message). ``Service.start`` then loads the store's bundles,
runs one warm-up batch of every preloaded task and only then reports ready; it runs in the
background so ``/healthz`` answers (and ``/readyz`` says 503) while it works.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from typing import Any

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.checkpoints import LoadedCheckpoint, load_checkpoint
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.device import onnx_providers, resolve_device
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.multitask import MultiTaskModel, ServingModel
from aat_serve.adapters.runners import resolve_runner
from aat_serve.adapters.runners.graphs import graph_config
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.batch_features import BatchFeatures
from aat_serve.service.decoding import Decoder
from aat_serve.service.engine import Engine
from aat_serve.service.errors import overloaded
from aat_serve.service.metrics import Metrics
from aat_serve.service.paging import Pager
from aat_serve.service.process import freeze_heap  # noqa: F401 (aat serve's, from here)
from aat_serve.service.registry import Registry
from aat_serve.service.settings import Settings
from aat_serve.service.store import BundleStore
from aat_serve.service.threads import inference_threads

log = logging.getLogger(__name__)

NO_CHECKPOINT = (
    "no backbone configured: set AAT_CHECKPOINT (or pass --checkpoint) to an AST/SSAST .pth "
    "file or a Hugging Face AST directory, and AAT_BUNDLE_DIR (or --bundle-dir) to the "
    "directory holding the task bundles; or build the embedded demo with `aat demo build`")


def with_embedded_defaults(settings: Settings) -> Settings:
    """Without AAT_CHECKPOINT, the embedded demo backbone (``aat demo build``) when it ships,
    and, without AAT_BUNDLE_DIR too, its task bundles as a read-only store. ``AAT_DEMO``
    resolved: unset means on exactly when the backbone is the demo's; on with another
    backbone is a ``ConfigError`` (the demo tasks would all fail its fingerprint check)."""
    from aat_serve.adapters import demo_assets

    update: dict[str, Any] = {}
    if settings.checkpoint is None and demo_assets.available():
        update["checkpoint"] = demo_assets.BACKBONE_DIR
        if settings.bundle_dir is None:
            update["bundle_dir"] = demo_assets.TASKS_DIR
        log.info("no AAT_CHECKPOINT: serving the embedded demo backbone",
                 extra={k: str(v) for k, v in update.items()})
    checkpoint = update.get("checkpoint", settings.checkpoint)
    on_demo = checkpoint is not None and _is_demo_backbone(checkpoint)
    if settings.demo is None:
        update["demo"] = on_demo
    elif settings.demo and not on_demo:
        raise ConfigError(f"AAT_DEMO (--demo) serves the demo tasks, which need the demo "
                          f"backbone, but the checkpoint is {str(checkpoint)!r}; drop --demo "
                          "or pass --checkpoint demo")
    return settings.model_copy(update=update) if update else settings


def _is_demo_backbone(checkpoint: Any) -> bool:
    from aat_serve.adapters import demo_assets
    from aat_serve.adapters.checkpoints.load import checkpoint_path

    try:
        return checkpoint_path(checkpoint).resolve() == demo_assets.BACKBONE_DIR.resolve()
    except OSError:
        return False


def demo_tasks_dir(settings: Settings) -> Any:
    """The read-only layer beneath the store: the demo's tasks when ``AAT_DEMO`` is on and the
    store is not already that folder; else None."""
    from aat_serve.adapters import demo_assets

    if not settings.demo or not demo_assets.available() or settings.bundle_dir is None:
        return None
    if settings.bundle_dir.resolve() == demo_assets.TASKS_DIR.resolve():
        return None
    return demo_assets.TASKS_DIR


def tune_process(settings: Settings) -> bool:
    """Process-wide choices of a server (not of ``adapters``): Python's thread switch interval
    (``AAT_SWITCH_INTERVAL_MS``); the glibc allocator keeps freed blocks when
    ``AAT_KEEP_FREED_MEMORY`` is on. Returns whether the allocator setting applied."""
    sys.setswitchinterval(settings.switch_interval_ms / 1000.0)
    if not settings.keep_freed_memory:
        return False
    from aat_serve.adapters.kernels.cpu import keep_freed_memory

    return keep_freed_memory()


def load_backbone(settings: Settings) -> LoadedCheckpoint:
    """The configured checkpoint, or ``ConfigError`` saying what to configure."""
    if settings.checkpoint is None:
        raise ConfigError(NO_CHECKPOINT)
    return load_checkpoint(settings.checkpoint)


def build_model(settings: Settings, backbone: AST, device: torch.device, dtype: torch.dtype,
                fingerprint: str) -> MultiTaskModel:
    """The multi-task model for the configured runtime (``AAT_RUNTIME``): the ONNX Runtime
    runner (fp32, CPU tensors; ``device`` picks its execution provider) or the torch default,
    with the residual stream of ``AAT_RESIDUAL_DTYPE`` and CUDA graphs per ``AAT_CUDA_GRAPHS``
    (``ConfigError`` when ``on`` cannot be honoured)."""
    if settings.runtime == "onnxruntime":
        model = MultiTaskModel(backbone, max_tasks=settings.max_tasks, fingerprint=fingerprint,
                               bottleneck=settings.slot_width,
                               backend="onnxruntime", providers=onnx_providers(device),
                               device_budget=settings.device_task_bytes)
        log.info("runtime onnxruntime", extra={"provider": model.backend})
        return model
    graphs = graph_config(settings.cuda_graphs, device, resolve_runner("auto", device),
                          settings.max_batch)
    residual = torch.bfloat16 if settings.residual_dtype == "bfloat16" else torch.float32
    return MultiTaskModel(backbone, max_tasks=settings.max_tasks, dtype=dtype, device=device,
                          bottleneck=settings.slot_width,
                          fingerprint=fingerprint, residual_dtype=residual, graphs=graphs,
                          device_budget=settings.device_task_bytes)


def runtime_info(model: ServingModel) -> tuple[str, str]:
    """(runtime, execution provider or backend) for /readyz and logs."""
    return model.runtime, model.backend


class Service:
    """Everything a request needs, owned by the app's lifespan."""

    def __init__(self, settings: Settings, checkpoint: LoadedCheckpoint,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.checkpoint = checkpoint
        self.metrics = metrics or Metrics()
        self.device = resolve_device(settings.device, "AAT_DEVICE")
        self.dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
        self.backbone = checkpoint.backbone
        self.fingerprint = self.backbone.fingerprint()
        self.model = build_model(settings, self.backbone, self.device, self.dtype,
                                 self.fingerprint)
        self.store = (BundleStore(settings.bundle_dir, read_only=demo_tasks_dir(settings))
                      if settings.bundle_dir else None)
        self.engine: Engine | None = None
        self.registry: Registry | None = None
        self.pager: Pager | None = None
        self.decoder = Decoder(settings.decode_workers, settings.request_timeout_s)
        self.ready = False
        self._feature_configs: dict[tuple[str, str], FeatureConfig] = {}
        self.startup_error: str | None = None
        self.started_at = time.time()
        self._uploads = 0
        self._background: list[asyncio.Task] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Create the engine and registry on the running loop; load and warm up behind."""
        s = self.settings
        self.engine = Engine(self.model, self.metrics, max_batch=s.max_batch,
                             max_wait_s=s.max_wait_ms / 1000.0, max_queue=s.max_queue,
                             max_batch_frames=self.max_batch_frames,
                             features=BatchFeatures(self.model.device),
                             threads=s.inference_threads or inference_threads())
        self.engine.start()
        self.pager = Pager(self.model, self.metrics, host_bytes=s.host_cache_bytes,
                           pinned=s.pinned)
        self.registry = Registry(self.engine, self.store, self.backbone, self.fingerprint,
                                 self.metrics, self.pager, lazy=s.preload == "lazy",
                                 timeout_s=s.request_timeout_s)
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._startup(), name="aat-startup"))

    @property
    def max_batch_frames(self) -> int:
        """``AAT_MAX_BATCH_FRAMES``, or ``max_batch`` clips of the backbone's length."""
        if self.settings.max_batch_frames is not None:
            return self.settings.max_batch_frames
        return self.settings.max_batch * self.backbone.cfg.target_length

    async def _startup(self) -> None:
        """Remove orphan temporaries, load the store (each task warmed up on load; a failing
        one is marked failed and skipped), warm the backbone if no task is loaded, then ready.
        Only a failure of the whole (store unreadable, backbone broken) fails start-up."""
        try:
            if self.store is not None:
                await asyncio.to_thread(self.store.remove_orphans)
            await self.registry.refresh()
            if not self.engine.tasks:
                await self.engine.control(self._warm_up_backbone)
        except Exception as e:
            self.startup_error = f"start-up failed: {e}"
            log.exception("start-up failed")
            return
        self.ready = True
        self.metrics.ready.set(1)
        failed = sorted(t for t in self.registry.tasks.names()
                        if self.registry.tasks.state(t) == "failed")
        log.info("ready", extra={"tasks": sorted(self.engine.tasks)[:50], "failed_tasks": failed,
                                 "device": str(self.device), "dtype": self.settings.dtype,
                                 "fingerprint": self.fingerprint})
        self.pager.update_gauges()
        log.info("task cache", extra=self.cache_summary())
        if self.store is not None:
            self._background.append(asyncio.get_running_loop().create_task(
                self._refresh_forever(), name="aat-refresh"))

    def cache_summary(self) -> dict[str, Any]:
        """The tiers' budgets and contents (``GET /tasks``' ``cache``, the start-up log)."""
        return self.pager.summary(stored=len(self.registry.catalogue))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_s)
            try:
                await self.registry.refresh()
            except Exception:
                log.exception("store rescan failed")

    def _warm_up_backbone(self) -> None:
        """One batch through the backbone alone (on the worker thread), when no task is
        loaded; the tasks' own warm-up runs as the registry loads them."""
        started = time.monotonic()
        cfg = self.backbone.cfg
        self.model.forward(torch.zeros(1, cfg.target_length, cfg.num_mel_bins), [-1])
        log.info("warm-up done", extra={"tasks": 0,
                                        "seconds": round(time.monotonic() - started, 3)})

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for t in self._background:
            t.cancel()
        for t in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.engine is not None:
            await self.engine.stop()
        if self.registry is not None:
            await asyncio.to_thread(self.pager.close)
        self.decoder.shutdown()

    # -- helpers for the routes -----------------------------------------------------------
    def feature_config(self, features: dict[str, Any]) -> FeatureConfig:
        """A task's feature settings with the service's duration limit applied."""
        cfg = FeatureConfig.from_dict(features)
        limit = min(cfg.max_duration_s, self.settings.max_audio_seconds)
        return dataclasses.replace(cfg, max_duration_s=limit)

    def task_feature_config(self, info: TaskInfo) -> FeatureConfig:
        """``feature_config`` of a resident task's manifest, computed once per task version
        (the version hashes the bundle, features included) instead of once per request."""
        key = (info.manifest.task, info.version)
        cfg = self._feature_configs.get(key)
        if cfg is None:
            if len(self._feature_configs) >= 4096:
                self._feature_configs.clear()
            cfg = self._feature_configs[key] = self.feature_config(info.manifest.features)
        return cfg

    async def decode(self, audio: bytes, cfg: FeatureConfig, deadline: float = float("inf"),
                     ) -> torch.Tensor:
        """Mono PCM at ``cfg.sample_rate``, decoded off the event loop (``Decoder.decode``)."""
        return await self.decoder.decode(audio, cfg, deadline)

    @contextlib.contextmanager
    def upload_slot(self):
        """Bound concurrent bundle uploads (AAT_MAX_UPLOADS); 503 beyond."""
        if self._uploads >= self.settings.max_uploads:
            raise overloaded(f"too many bundle uploads in progress ({self.settings.max_uploads}, "
                             "AAT_MAX_UPLOADS); retry later", retry_after_s=5)
        self._uploads += 1
        try:
            yield
        finally:
            self._uploads -= 1
