"""Model input for a whole batch at once: the Kaldi log-mel of every clip, on the model's device.

The request path only decodes audio to PCM (``features.load_audio``); the inference thread
turns the batch's waveforms into features here, in one batched pass per feature setting
(``adapters.fbank.KaldiFbank``, equal to ``torchaudio.compliance.kaldi.fbank`` bit for bit on
the CPU), instead of one small fbank per clip on the decode threads. One ``KaldiFbank`` is
kept per distinct ``FeatureConfig`` (its window, mel filters and tables live on the device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import AudioError
from aat_serve.adapters.fbank import KaldiFbank


class BatchFeatures:
    """Cached batched filterbanks on one device; call from one thread (the inference worker)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._banks: dict[FeatureConfig, KaldiFbank] = {}

    def bank(self, cfg: FeatureConfig) -> KaldiFbank:
        """The filterbank of ``cfg`` on this device (built once per distinct setting)."""
        fb = self._banks.get(cfg)
        if fb is None:
            fb = KaldiFbank(cfg, dft="fft").to(self.device)
            self._banks[cfg] = fb
        return fb

    def __len__(self) -> int:
        return len(self._banks)

    def __call__(self, waves: Sequence[torch.Tensor], cfgs: Sequence[FeatureConfig]
                 ) -> tuple[torch.Tensor, list[AudioError | None]]:
        """``(B, target_length, mel)`` features for 1-D waveforms ``waves`` with their settings
        (all of one feature shape), in order; and per clip ``None`` or the ``AudioError`` why
        its features are not finite (samples too large), so the caller answers that clip alone.
        """
        if len(waves) != len(cfgs) or not waves:
            raise ValueError(f"got {len(waves)} waveforms and {len(cfgs)} feature settings")
        groups: dict[FeatureConfig, list[int]] = {}
        for i, cfg in enumerate(cfgs):
            groups.setdefault(cfg, []).append(i)
        parts: list[tuple[list[int], torch.Tensor]] = []
        for cfg, rows in groups.items():
            parts.append((rows, self._group(cfg, [waves[i] for i in rows])))
        if len(parts) == 1:
            feats = parts[0][1]
        else:
            first = parts[0][1]
            feats = first.new_empty((len(waves), *first.shape[1:]))
            for rows, f in parts:
                feats[torch.tensor(rows, device=feats.device)] = f
        finite = torch.isfinite(feats).flatten(1).all(dim=1).tolist()
        errors: list[AudioError | None] = [None] * len(waves)
        for i, ok in enumerate(finite):
            if not ok:
                peak = float(waves[i].abs().max())
                errors[i] = AudioError(f"sample values are too large for features (peak |x| = "
                                       f"{peak:.3g}; expected float audio in [-1, 1])")
        return feats, errors

    def host_batch(self, waves: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, longest)`` float32 waveforms, zero-padded, in one host buffer: page-locked
        (pinned) when the device is a GPU, so the batch goes over in one asynchronous copy."""
        longest = max(int(w.numel()) for w in waves)
        host = torch.zeros(len(waves), longest, dtype=torch.float32,
                           pin_memory=self.device.type == "cuda")
        for row, w in enumerate(waves):
            host[row, : w.numel()] = w
        return host

    def _group(self, cfg: FeatureConfig, waves: list[torch.Tensor]) -> torch.Tensor:
        batch = self.host_batch(waves).to(self.device, non_blocking=True)
        lens = torch.tensor([int(w.numel()) for w in waves], device=self.device)
        return self.bank(cfg)(batch, lens)
