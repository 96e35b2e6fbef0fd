"""AST's training augmentations, driven by an explicit random generator so they replay exactly.

- SpecAugment: one frequency and one time mask (``torchaudio``'s ``mask_along_axis`` rule:
  width ``floor(u1 * param)``, start ``floor(u2 * (size - u1 * param))``), applied to the
  log-mel fbank *before* normalisation with mask value 0, as AST does.
- Mixup on waveforms: partner padded or cut to the clip's length, ``lam * w1 + (1 - lam) * w2``
  with ``lam ~ Beta(10, 10)``, mean removed; labels mixed with the same ``lam``.
- Frequency warp (vocal tract length perturbation, off unless asked): the log-mel is resampled
  along frequency so content at ``f`` Hz moves to ``alpha * f`` (``alpha`` log-uniform in
  ``[1 / (1 + w), 1 + w]``), as a speaker with a shorter or longer vocal tract would say it.
- Noise and roll (after normalisation): ``+ U(0,1) * u / 10`` noise per bin, then a roll along
  time by an integer in ``[-10, 10)`` frames.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi

MIXUP_ALPHA = 10.0
KALDI_LOW_FREQ = 20.0
"""Lowest edge of Kaldi's (and so AST's) mel filterbank in Hz; the highest is Nyquist."""


def warp_positions(num_mel_bins: int, sample_rate: int, alpha: float) -> np.ndarray:
    """For each mel bin, the fractional input bin whose centre frequency is ``centre / alpha``
    (Kaldi's bank: ``num_mel_bins + 2`` points equally spaced in mel from 20 Hz to Nyquist)."""
    lo, hi = kaldi.mel_scale_scalar(KALDI_LOW_FREQ), kaldi.mel_scale_scalar(sample_rate / 2.0)
    step = (hi - lo) / (num_mel_bins + 1)
    centres = kaldi.inverse_mel_scale(lo + step * torch.arange(1, num_mel_bins + 1,
                                                               dtype=torch.float64))
    pos = (kaldi.mel_scale(centres / alpha) - lo) / step - 1.0
    return pos.clamp(0.0, num_mel_bins - 1.0).numpy()


def frequency_warp(fbank: torch.Tensor, alpha: float, sample_rate: int) -> torch.Tensor:
    """``(frames, mel)`` log-mel as spoken with every frequency scaled by ``alpha`` (linear
    interpolation between mel bins; bins past the edges repeat the edge bin)."""
    if alpha == 1.0:
        return fbank
    pos = torch.from_numpy(warp_positions(fbank.shape[1], sample_rate, alpha)).to(fbank.dtype)
    left = pos.floor().long()
    right = (left + 1).clamp(max=fbank.shape[1] - 1)
    w = pos - left.to(fbank.dtype)
    return fbank[:, left] * (1.0 - w) + fbank[:, right] * w


def sample_warp(rng: np.random.Generator, max_warp: float) -> float:
    """``alpha`` log-uniform in ``[1 / (1 + max_warp), 1 + max_warp]`` (1.0 when off; no draw)."""
    if max_warp <= 0:
        return 1.0
    return float((1.0 + max_warp) ** rng.uniform(-1.0, 1.0))


def mask_band(x: torch.Tensor, dim: int, param: int, u1: float, u2: float,
              value: float = 0.0) -> torch.Tensor:
    """Fill one band of ``x`` along ``dim`` with ``value``; ``u1``, ``u2`` are uniform draws."""
    if param < 1:
        return x
    size = x.shape[dim]
    width = u1 * param
    start = int(u2 * (size - width))
    end = start + int(width)
    idx = torch.arange(size, device=x.device)
    band = (idx >= start) & (idx < end)
    shape = [1] * x.dim()
    shape[dim] = size
    return x.masked_fill(band.view(shape), value)


def spec_augment(fbank: torch.Tensor, freqm: int, timem: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """One frequency mask (width < ``freqm``) then one time mask (width < ``timem``) on a
    ``(frames, mel)`` log-mel fbank, mask value 0."""
    if freqm > 0:
        u1, u2 = rng.random(2)
        fbank = mask_band(fbank, 1, freqm, u1, u2)
    if timem > 0:
        u1, u2 = rng.random(2)
        fbank = mask_band(fbank, 0, timem, u1, u2)
    return fbank


def mix_waveforms(w1: torch.Tensor, w2: torch.Tensor, lam: float) -> torch.Tensor:
    """AST's waveform mixup: both centred, ``w2`` zero-padded or cut to ``w1``'s length."""
    w1 = w1 - w1.mean()
    w2 = w2 - w2.mean()
    n = w1.shape[-1]
    if w2.shape[-1] < n:
        w2 = torch.nn.functional.pad(w2, (0, n - w2.shape[-1]))
    else:
        w2 = w2[..., :n]
    mixed = lam * w1 + (1.0 - lam) * w2
    return mixed - mixed.mean()


def sample_mixup(rng: np.random.Generator, prob: float, n: int) -> tuple[int, float] | None:
    """With probability ``prob``: a partner index uniform over the data set and ``lam``."""
    if prob <= 0 or rng.random() >= prob:
        return None
    return int(rng.integers(n)), float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))


def noise_and_roll(feats: torch.Tensor, rng: np.random.Generator,
                   max_shift: int = 10) -> torch.Tensor:
    """AST's ``--noise``: uniform noise scaled by a random factor / 10, then a time roll."""
    scale = rng.random() / 10.0
    noise = torch.from_numpy(rng.random(tuple(feats.shape), dtype=np.float32))
    shift = int(rng.integers(-max_shift, max_shift))
    return torch.roll(feats + noise * scale, shift, dims=0)
