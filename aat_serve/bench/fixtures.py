"""The random backbones, task bundles and clips the benchmarks run on (nothing is downloaded).

Two families of backbone sizes: ``FULL``/``QUICK`` for the model and memory benchmarks (AST
ViT-B/16, and a tiny one for tests), and ``PRESETS`` for the serving benchmark, which writes a
random checkpoint in the Hugging Face layout so that the service loads it as it would a real
one. Weights are random: speed and memory do not depend on their values.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import Manifest, TaskBundle, expected_tensor_shapes
from aat_serve.adapters.checkpoints import to_hf_state_dict
from aat_serve.adapters.config import AdapterConfig, BackboneConfig, FeatureConfig
from aat_serve.adapters.hf_export import hf_config
from aat_serve.adapters.model import AudioClassifier

FULL = BackboneConfig(norm_eps=1e-6, head_norm_eps=1e-6)  # AST ViT-B/16, stride 10
QUICK = BackboneConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden=256, norm_eps=1e-6,
                       head_norm_eps=1e-6)
CLIPS = {"1s": 100, "10s": 1024}  # frames (10 ms hop); 1024 is AST's 10-s input
TASK_CLASSES = (50, 35, 10, 527)  # ESC-50, Speech Commands, GTZAN and AudioSet-sized heads


def random_bundle(backbone: AST, fingerprint: str, name: str, method: str, classes: int,
                  bottleneck: int, seed: int) -> TaskBundle:
    """A valid bundle with random task weights (std 0.02; LayerNorm at identity)."""
    spec_adapter = {"aat_ms": AdapterConfig(bottleneck, mlp=True, spatial=True),
                    "head": AdapterConfig(bottleneck)}[method]
    shapes = expected_tensor_shapes(method, spec_adapter, backbone.cfg, classes)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n, shape in shapes.items():
        if n == "head.norm.weight":
            tensors[n] = torch.ones(shape)
        elif n == "head.norm.bias":
            tensors[n] = torch.zeros(shape)
        else:
            tensors[n] = torch.randn(shape, generator=g) * 0.02
    manifest = Manifest(task=name, method=method, labels=[f"class{i}" for i in range(classes)],
                        backbone_fingerprint=fingerprint, backbone=backbone.cfg.to_dict(),
                        features=FeatureConfig().to_dict(), adapter=spec_adapter.to_dict(),
                        version=f"bench-{seed}")
    bundle = TaskBundle(manifest, tensors)
    bundle.validate()
    return bundle


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=32, depth=2, num_heads=2, mlp_hidden=64, freq_stride=16,
                 time_stride=16, num_mel_bins=32, target_length=64),
    "small": dict(embed_dim=192, depth=6, num_heads=3, mlp_hidden=768, freq_stride=16,
                  time_stride=16, num_mel_bins=128, target_length=128),
    "vit-b": dict(embed_dim=768, depth=12, num_heads=12, mlp_hidden=3072, freq_stride=10,
                  time_stride=10, num_mel_bins=128, target_length=1024),
}


def preset_config(preset: str, frames: int | None = None) -> BackboneConfig:
    """The backbone shape of ``PRESETS[preset]`` (16x16 patches, Hugging Face's epsilons),
    ``frames`` long when given."""
    fields = dict(PRESETS[preset])
    if frames:
        fields["target_length"] = frames
    return BackboneConfig(patch_freq=16, patch_time=16, norm_eps=1e-12, head_norm_eps=1e-12,
                          **fields)


def write_random_checkpoint(directory: Path, preset: str, frames: int | None, seed: int = 0
                            ) -> Path:
    """A Hugging Face-layout AST directory with random weights (nothing is downloaded)."""
    cfg = preset_config(preset, frames)
    torch.manual_seed(seed)
    canonical = AST(cfg).frozen_state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(cfg, []), indent=2))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_hf_state_dict(canonical).items()},
              str(directory / "model.safetensors"))
    return directory


def random_task_bundles(backbone: AST, features: FeatureConfig, n: int, method: str = "aat_ms",
                        classes: int = 10, seed: int = 0) -> list[TaskBundle]:
    """``n`` tasks with random, non-identity weights (names ``task0``, ``task1``, ...).

    Unlike ``random_bundle``, built through ``AudioClassifier`` with the method's own adapter
    settings and ``features`` (the serving benchmark's bundles must match its checkpoint).
    """
    out = []
    for i in range(n):
        model = AudioClassifier(backbone, method, classes)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out.append(TaskBundle.from_model(model, f"task{i}", [f"class{c}" for c in range(classes)],
                                         features))
    return out


def synth_wav(seconds: float, sample_rate: int = 16000, seed: int = 0) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


