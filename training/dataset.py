"""Examples -> model input, as AST's data loader: decode, mixup, fbank, (frequency warp),
SpecAugment, normalise, noise. Every random choice comes from a generator seeded by
(seed, epoch, index), so an item is the same whatever the worker count, the order, or whether
the run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import AudioError
from aat_serve.adapters.features import load_audio, log_mel, normalise, pad_or_cut
from aat_serve.training.augment import (
    frequency_warp,
    mix_waveforms,
    noise_and_roll,
    sample_mixup,
    sample_warp,
    spec_augment,
)
from aat_serve.training.data.base import Example


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation settings (all off for evaluation)."""

    freqm: int = 0
    timem: int = 0
    mixup: float = 0.0
    noise: bool = False
    freq_warp: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.freqm or self.timem or self.mixup or self.noise or self.freq_warp)


class ClipDataset(Dataset):
    """Items ``{"features": (T, F), "target": (C,), "mask": (C,), "index": ()}``."""

    def __init__(self, examples: Sequence[Example], num_classes: int, features: FeatureConfig,
                 augment: Augment | None = None, seed: int = 0,
                 cache_waveforms: bool = False) -> None:
        self.examples = list(examples)
        self.num_classes = num_classes
        self.features = features
        self.augment = augment or Augment()
        self.seed = int(seed)
        self.epoch = 0
        # The log-mel of a clip alone (before any augmentation) serves every item without
        # mixup; decoded waveforms are kept too only when mixup may need them.
        self._mel_cache: dict[int, torch.Tensor] | None = {} if cache_waveforms else None
        self._cache: dict[int, torch.Tensor] | None = (
            {} if cache_waveforms and self.augment.mixup > 0 else None)

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def waveform(self, i: int) -> torch.Tensor:
        """The clip as a centred mono waveform at the feature sample rate."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        path = self.examples[i].path
        try:
            w = load_audio(path, sample_rate=self.features.sample_rate,
                           max_duration_s=self.features.max_duration_s)
        except AudioError as e:
            msg = str(e)
            # type(e): an AudioTooLongError stays one when the path is added to its message
            raise type(e)(msg if str(path) in msg else f"{path}: {msg}") from None
        w = w - w.mean()
        if self._cache is not None:
            self._cache[i] = w
        return w

    def log_mel(self, i: int) -> torch.Tensor:
        """The clip's log-mel at the target length, cached with the waveform when asked."""
        if self._mel_cache is not None and i in self._mel_cache:
            return self._mel_cache[i]
        feats = pad_or_cut(log_mel(self.waveform(i), self.features),
                           self.features.target_length)
        if self._mel_cache is not None:
            self._mel_cache[i] = feats
        return feats

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, i))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        aug = self.augment
        rng = self.rng(i)
        target = ex.target(self.num_classes)
        mask = ex.mask_vector(self.num_classes)
        mix = sample_mixup(rng, aug.mixup, len(self))
        if mix is not None:
            j, lam = mix
            wave = mix_waveforms(self.waveform(i), self.waveform(j), lam)
            other = self.examples[j]
            target = lam * target + (1.0 - lam) * other.target(self.num_classes)
            mask = mask * other.mask_vector(self.num_classes)  # observed in both clips
            feats = pad_or_cut(log_mel(wave, self.features), self.features.target_length)
        else:
            feats = self.log_mel(i)
        feats = frequency_warp(feats, sample_warp(rng, aug.freq_warp), self.features.sample_rate)
        feats = spec_augment(feats, aug.freqm, aug.timem, rng)
        feats = normalise(feats, self.features)
        if aug.noise:
            feats = noise_and_roll(feats, rng)
        return {"features": feats.to(torch.float32),
                "target": torch.from_numpy(np.asarray(target, dtype=np.float32)),
                "mask": torch.from_numpy(np.asarray(mask, dtype=np.float32)),
                "index": torch.tensor(i)}


class EpochSampler(Sampler[int]):
    """A permutation seeded by (seed, epoch), optionally starting part-way (for resuming)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n = n
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.start = int(start)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return max(0, self.n - self.start)
