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
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.checkpoints import LoadedCheckpoint, load_checkpoint
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.device import onnx_providers, resolve_device
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.features import fbank, load_audio
from aat_serve.adapters.multitask import MultiTaskModel, ServingModel
from aat_serve.service.engine import Engine
from aat_serve.service.errors import overloaded
from aat_serve.service.metrics import Metrics
from aat_serve.service.registry import Registry
from aat_serve.service.settings import Settings
from aat_serve.service.store import BundleStore

log = logging.getLogger(__name__)

NO_CHECKPOINT = (
    "no backbone configured: set AAT_CHECKPOINT (or pass --checkpoint) to an AST/SSAST .pth "
    "file or a Hugging Face AST directory, and AAT_BUNDLE_DIR (or --bundle-dir) to the "
    "directory holding the task bundles; or build the embedded demo with `aat demo build`")


def with_embedded_defaults(settings: Settings) -> Settings:
    """Without AAT_CHECKPOINT, the embedded demo backbone (``aat demo build``) when it ships,
    and, without AAT_BUNDLE_DIR too, its task bundles as a read-only store."""
    if settings.checkpoint is not None:
        return settings
    from aat_serve.adapters import demo_assets

    if not demo_assets.available():
        return settings  # load_backbone says what to configure
    update: dict[str, Any] = {"checkpoint": demo_assets.BACKBONE_DIR}
    if settings.bundle_dir is None:
        update["bundle_dir"] = demo_assets.TASKS_DIR
    log.info("no AAT_CHECKPOINT: serving the embedded demo backbone",
             extra={k: str(v) for k, v in update.items()})
    return settings.model_copy(update=update)


def tune_process(settings: Settings) -> bool:
    """Process-wide choices of a server (not of ``adapters``): the glibc allocator keeps freed
    blocks when ``AAT_KEEP_FREED_MEMORY`` is on. Returns whether that applied."""
    if not settings.keep_freed_memory:
        return False
    from aat_serve.adapters.kernels.cpu import keep_freed_memory

    return keep_freed_memory()


def load_backbone(settings: Settings) -> LoadedCheckpoint:
    """The configured checkpoint, or ``ConfigError`` saying what to configure."""
    if settings.checkpoint is None:
        raise ConfigError(NO_CHECKPOINT)
    return load_checkpoint(settings.checkpoint)


def _featurise(audio: bytes, cfg: FeatureConfig) -> tuple[torch.Tensor, float]:
    """``features_from_audio`` in its two steps, keeping the decoded duration."""
    wave = load_audio(audio, sample_rate=cfg.sample_rate, max_duration_s=cfg.max_duration_s)
    return fbank(wave, cfg), wave.numel() / cfg.sample_rate


def build_model(settings: Settings, backbone: AST, device: torch.device, dtype: torch.dtype,
                fingerprint: str) -> MultiTaskModel:
    """The multi-task model for the configured runtime (``AAT_RUNTIME``): the ONNX Runtime
    runner (fp32, CPU tensors; ``device`` picks its execution provider) or the torch default."""
    if settings.runtime == "onnxruntime":
        model = MultiTaskModel(backbone, max_tasks=settings.max_tasks, fingerprint=fingerprint,
                               backend="onnxruntime", providers=onnx_providers(device))
        log.info("runtime onnxruntime", extra={"provider": model.backend})
        return model
    return MultiTaskModel(backbone, max_tasks=settings.max_tasks, dtype=dtype, device=device,
                          fingerprint=fingerprint)


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
        self.store = BundleStore(settings.bundle_dir) if settings.bundle_dir else None
        self.engine: Engine | None = None
        self.registry: Registry | None = None
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers,
                                              thread_name_prefix="aat-decode")
        self.ready = False
        self.startup_error: str | None = None
        self.started_at = time.time()
        self._uploads = 0
        self._background: list[asyncio.Task] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Create the engine and registry on the running loop; load and warm up behind."""
        s = self.settings
        self.engine = Engine(self.model, self.metrics, max_batch=s.max_batch,
                             max_wait_s=s.max_wait_ms / 1000.0, max_queue=s.max_queue)
        self.engine.start()
        self.registry = Registry(self.engine, self.store, self.backbone, self.fingerprint,
                                 self.metrics, lazy=s.preload == "lazy", max_tasks=s.max_tasks)
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._startup(), name="aat-startup"))

    async def _startup(self) -> None:
        try:
            await self.registry.refresh()
            await self.engine.control(self._warm_up)
        except Exception as e:
            self.startup_error = f"start-up failed: {e}"
            log.exception("start-up failed")
            return
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready", extra={"tasks": sorted(self.engine.tasks), "device": str(self.device),
                                 "dtype": self.settings.dtype, "fingerprint": self.fingerprint})
        if self.store is not None:
            self._background.append(asyncio.get_running_loop().create_task(
                self._refresh_forever(), name="aat-refresh"))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_s)
            try:
                await self.registry.refresh()
            except Exception:
                log.exception("store rescan failed")

    def _warm_up(self) -> None:
        """One batch per feature shape through every resident task (on the worker thread)."""
        started = time.monotonic()
        tasks = self.engine.tasks
        with torch.inference_mode():
            if not tasks:  # the backbone alone
                cfg = self.backbone.cfg
                p = next(self.backbone.parameters())
                self.backbone(torch.zeros(1, cfg.target_length, cfg.num_mel_bins,
                                          device=p.device, dtype=p.dtype))
            else:
                by_shape: dict[tuple[int, int], list[str]] = {}
                for name, info in sorted(tasks.items()):
                    f = info.manifest.feature_config
                    by_shape.setdefault((f.target_length, f.num_mel_bins), []).append(name)
                for shape, names in by_shape.items():
                    for i in range(0, len(names), self.settings.max_batch):
                        chunk = names[i:i + self.settings.max_batch]
                        self.model.classify(torch.zeros(len(chunk), *shape), chunk)
        log.info("warm-up done", extra={"tasks": len(tasks),
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
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # -- helpers for the routes -----------------------------------------------------------
    def feature_config(self, features: dict[str, Any]) -> FeatureConfig:
        """A task's feature settings with the service's duration limit applied."""
        cfg = FeatureConfig.from_dict(features)
        limit = min(cfg.max_duration_s, self.settings.max_audio_seconds)
        return dataclasses.replace(cfg, max_duration_s=limit)

    async def features(self, audio: bytes, cfg: FeatureConfig) -> tuple[torch.Tensor, float]:
        """Model input and duration (s), decoded in the decode pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, _featurise, audio, cfg)

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
