"""AST's training augmentations, driven by an explicit random generator so they replay exactly.

- SpecAugment: one frequency and one time mask (``torchaudio``'s ``mask_along_axis`` rule:
  width ``floor(u1 * param)``, start ``floor(u2 * (size - u1 * param))``), applied to the
  log-mel fbank *before* normalisation with mask value 0, as AST does.
- Mixup on waveforms: partner padded or cut to the clip's length, ``lam * w1 + (1 - lam) * w2``
  with ``lam ~ Beta(10, 10)``, mean removed; labels mixed with the same ``lam``.
- Noise and roll (after normalisation): ``+ U(0,1) * u / 10`` noise per bin, then a roll along
  time by an integer in ``[-10, 10)`` frames.
"""

from __future__ import annotations

import numpy as np
import torch

MIXUP_ALPHA = 10.0


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
