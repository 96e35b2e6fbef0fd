"""Typed, validated configurations for the backbone, the adapters and the audio features."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from aat_serve.adapters.errors import ConfigError

AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


def _from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a dict, warning once about (and ignoring) unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=3)
    kwargs = {k: v for k, v in data.items() if k in names}
    for f in dataclasses.fields(cls):
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of an AST backbone (a DeiT/ViT with a 1-channel conv patch embedding)."""

    embed_dim: int = 768
    """Token width D."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads; D / 64 in the DeiT sizes."""
    mlp_hidden: int = 3072
    """Hidden width of each block's MLP."""
    patch_freq: int = 16
    """Patch (conv kernel) height, in mel bins."""
    patch_time: int = 16
    """Patch (conv kernel) width, in frames."""
    freq_stride: int = 10
    time_stride: int = 10
    num_mel_bins: int = 128
    target_length: int = 1024
    """Frames per clip the checkpoint's positional grid was made for."""
    pos_grid: tuple[int, int] | None = None
    """(freq, time) grid of the stored positional embedding; None means the grid of
    ``num_mel_bins`` x ``target_length`` at the configured strides."""
    num_prefix_tokens: int = 2
    """cls and dist tokens; their final-norm outputs are averaged before the head."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon in the blocks and the final norm (1e-6 original, 1e-12 HF)."""
    head_norm_eps: float = 1e-5
    """LayerNorm epsilon of the classification head (1e-5 original, 1e-12 HF)."""
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "mlp_hidden", "patch_freq",
                     "patch_time", "freq_stride", "time_stride", "num_mel_bins", "target_length"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(
                    f"BackboneConfig.{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"BackboneConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads "
                f"({self.num_heads})")
        if self.num_prefix_tokens not in (1, 2):
            raise ConfigError(f"BackboneConfig.num_prefix_tokens must be 1 or 2, got "
                              f"{self.num_prefix_tokens}")
        if self.patch_freq > self.num_mel_bins:
            raise ConfigError(f"BackboneConfig.patch_freq ({self.patch_freq}) exceeds num_mel_bins "
                              f"({self.num_mel_bins})")
        if self.pos_grid is not None:
            object.__setattr__(self, "pos_grid", tuple(int(v) for v in self.pos_grid))

    def grid(self, num_frames: int | None = None) -> tuple[int, int]:
        """Patch grid (freq, time) for clips of ``num_frames`` frames (default: target)."""
        frames = self.target_length if num_frames is None else num_frames
        if frames < self.patch_time:
            raise ConfigError(f"clips need at least {self.patch_time} frames, got {frames}")
        f = (self.num_mel_bins - self.patch_freq) // self.freq_stride + 1
        t = (frames - self.patch_time) // self.time_stride + 1
        return f, t

    @property
    def stored_grid(self) -> tuple[int, int]:
        """Grid of the positional embedding as stored in the checkpoint."""
        return self.pos_grid if self.pos_grid is not None else self.grid()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        return _from_dict(cls, data)


DEFAULT_BOTTLENECK = 192
"""The adapter width r of the AAT recipes (D / 4 for ViT-B), and so the default width of a
serving model's pool rows (``MultiTaskModel``, ``AAT_SLOT_WIDTH``)."""


@dataclass(frozen=True)
class AdapterConfig:
    """Which AAT modules a task adds to each block, and their sizes."""

    bottleneck: int = DEFAULT_BOTTLENECK
    """Adapter hidden width r (D / 4 for ViT-B)."""
    mlp: bool = False
    """MLP adapter in parallel with each block's MLP (AAT^M)."""
    spatial: bool = False
    """Spatial adapter after each block's attention, with shortcut (AAT^MS)."""
    num_prompts: int = 0
    """VPT-deep prompt tokens per block (12 in the paper's baseline); 0 for none."""

    def __post_init__(self) -> None:
        if self.bottleneck <= 0:
            raise ConfigError(f"AdapterConfig.bottleneck must be positive, got {self.bottleneck}")
        if self.num_prompts < 0:
            raise ConfigError(f"AdapterConfig.num_prompts must be >= 0, got {self.num_prompts}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class FeatureConfig:
    """How a waveform becomes model input: AST's Kaldi log-mel fbank, padded, normalised."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_length: int = 1024
    """Frames per clip after padding or cutting (10 ms each)."""
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    max_duration_s: float = 600.0
    """Decoded audio longer than this is refused (protects memory and latency)."""
    window: Literal["hanning"] = "hanning"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.num_mel_bins <= 0 or self.target_length <= 0:
            raise ConfigError(
                "FeatureConfig.sample_rate, num_mel_bins and target_length must be positive, got "
                f"{self.sample_rate}, {self.num_mel_bins}, {self.target_length}")
        if not self.std > 0:
            raise ConfigError(f"FeatureConfig.std must be positive, got {self.std}")
        if not self.max_duration_s > 0:
            raise ConfigError(f"FeatureConfig.max_duration_s must be positive, got "
                              f"{self.max_duration_s}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra", None)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        return _from_dict(cls, data)
