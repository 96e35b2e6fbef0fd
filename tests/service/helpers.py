"""Tiny backbones, bundles, audio and app factories for the service tests."""

from __future__ import annotations

import copy
import io
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import LoadedCheckpoint, load_checkpoint
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.features import features_from_audio
from tests.adapters.ckpt_factory import random_canonical, write_hf_dir
from tests.helpers import random_bundle, tiny_config

ADMIN = "admin-token-0123456789abcdef"
API = "api-token-0123456789abcdef"


def write_tiny_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny Hugging Face AST directory (32 wide, 2 blocks, 32 mel bins x 64 frames)."""
    cfg = tiny_config(**overrides)
    return write_hf_dir(directory, random_canonical(cfg, num_classes=3, seed=seed), cfg)


def make_bundle(ckpt: LoadedCheckpoint, task: str, *, method: str = "aat_ms",
                num_classes: int = 4, seed: int = 0, multi_label: bool = False,
                labels: list[str] | None = None, features: FeatureConfig | None = None,
                ) -> TaskBundle:
    """``tests.helpers.random_bundle`` on ``ckpt``'s backbone and features."""
    return random_bundle(ckpt.backbone, task, method, num_classes, seed=seed, labels=labels,
                         features=features or ckpt.features, multi_label=multi_label)


def reference_scores(ckpt: LoadedCheckpoint, bundle: TaskBundle, audio: bytes) -> torch.Tensor:
    """What one task alone gives for one clip: a single-task model, batch of one."""
    model = bundle.build_model(copy.deepcopy(ckpt.backbone)).eval()
    feats = features_from_audio(audio, bundle.manifest.feature_config)
    with torch.no_grad():
        logits = model(feats[None])[0]
    return torch.sigmoid(logits) if bundle.manifest.multi_label else torch.softmax(logits, -1)


def wav_bytes(seconds: float = 0.5, sr: int = 16000, seed: int = 0, channels: int = 1,
              subtype: str = "PCM_16") -> bytes:
    """A WAV of noise plus a tone whose pitch depends on ``seed`` (so clips differ)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 150 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    x = np.repeat(x[:, None], channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def load_tiny(directory: Path) -> LoadedCheckpoint:
    return load_checkpoint(directory)


def wait_ready(client, timeout_s: float = 30.0) -> None:
    """Poll /readyz until 200 (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout_s} s: {r.status_code} {r.text}")


def wait_until(predicate, timeout_s: float = 10.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (bounded); return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval)


def error(status: int, type_: str, message: str) -> tuple[int, dict]:
    return status, {"error": {"type": type_, "message": message}}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def served(app):
    """A TestClient with the lifespan running and the service ready."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        wait_ready(client)
        yield client


class Gate:
    """Records (tasks, feature shape) of each classify call; holds calls while ``closed``."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], tuple[int, ...]]] = []
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.opened.set()

    def close(self) -> None:
        self.entered.clear()
        self.opened.clear()

    def wrap(self, real):
        def classify(model, features, tasks):
            self.calls.append((list(tasks), tuple(features.shape)))
            self.entered.set()
            assert self.opened.wait(20), "gate never opened"
            return real(model, features, tasks)

        return classify
