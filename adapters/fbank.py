"""A batched Kaldi log-mel filterbank as one torch module: many clips at once, on any device,
and exportable to ONNX.

It computes what ``torchaudio.compliance.kaldi.fbank`` computes with AST's settings
(``htk_compat=True, use_energy=False, window_type="hanning", dither=0``; ``snip_edges``), for a
batch of waveforms of different lengths:

1. frames of ``frame_length_ms`` every ``frame_shift_ms`` (only whole frames: snip edges);
2. per frame, remove the DC offset, pre-emphasise (``x[n] - 0.97 x[n-1]``, ``x[-1] = x[0]``)
   and multiply by the symmetric Hann window;
3. zero-pad to the next power of two and take the power spectrum ``|DFT|^2``;
4. triangular mel filters between 20 Hz and Nyquist (``mel(f) = 1127 ln(1 + f / 700)``),
   then ``log(max(energy, float32 eps))``.

Then, as ``features.fbank`` does per clip: frames past a clip's end are zero (AST pads in the
log-mel domain), the result is cut or padded to ``target_length`` and normalised
``(x - mean) / (2 std)``.

The DFT is ``torch.fft.rfft`` (``dft="fft"``, the same algorithm as torchaudio: equal to it
bit for bit on real audio) or a float32 matrix product with precomputed cosine and sine tables
(``dft="matmul"``), which the ONNX exporter turns into two ``MatMul`` nodes (it cannot export
``rfft``). The two differ only where float32 rounding of either DFT shows: in bins whose
energy is some 1e-7 of the frame's (up to ~2e-3 in their log, a pure tone's far bins; about
1e-4 of the normalised features); a float64 product is no closer to torchaudio's float32 FFT.

Framing is a ``gather`` with computed indices and nothing branches on the length, so the
number of samples can be dynamic in an exported graph.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import ConfigError

PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps


def _mel(hz: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log(1.0 + hz / 700.0)


def mel_filters(num_bins: int, padded: int, sample_rate: float) -> torch.Tensor:
    """``(padded // 2 + 1, num_bins)``: triangular filters over the power spectrum's bins
    (Kaldi's layout: equally spaced on the mel scale from 20 Hz to Nyquist, the Nyquist bin
    itself unused). Computed in float32 like Kaldi and torchaudio, so the filters agree to the
    last bit and the log-mel to rounding."""
    if num_bins < 4:
        raise ConfigError(f"num_mel_bins must be at least 4, got {num_bins}")
    lo = 1127.0 * math.log(1.0 + LOW_FREQ_HZ / 700.0)
    hi = 1127.0 * math.log(1.0 + sample_rate / 2 / 700.0)
    step = (hi - lo) / (num_bins + 1)
    index = torch.arange(num_bins)[:, None]
    left, centre, right = lo + index * step, lo + (index + 1.0) * step, lo + (index + 2.0) * step
    bin_mel = _mel((sample_rate / padded) * torch.arange(padded // 2))[None, :]
    up = (bin_mel - left) / (centre - left)
    down = (right - bin_mel) / (right - centre)
    tri = torch.clamp(torch.minimum(up, down), min=0.0)  # (num_bins, padded // 2)
    return torch.cat([tri, torch.zeros(num_bins, 1)], 1).T.contiguous()


def frame_length_samples(cfg: FeatureConfig) -> int:
    """Samples in one analysis window, computed exactly as Kaldi/torchaudio do."""
    return int(cfg.sample_rate * cfg.frame_length_ms * 0.001)


def frame_shift_samples(cfg: FeatureConfig) -> int:
    """Samples between the starts of two frames, as Kaldi/torchaudio compute it."""
    return int(cfg.sample_rate * cfg.frame_shift_ms * 0.001)


def window_samples(cfg: FeatureConfig) -> int:
    """Samples that make exactly ``target_length`` frames: one task's window of audio."""
    return (cfg.target_length - 1) * frame_shift_samples(cfg) + frame_length_samples(cfg)


def frame_count(num_samples: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """Whole frames in each clip (Kaldi's snip-edges rule; a clip shorter than one window is
    padded to one window by the caller, as ``features.log_mel`` does)."""
    return torch.div(torch.clamp(num_samples - window, min=0), shift, rounding_mode="floor") + 1


class KaldiFbank(nn.Module):
    """``forward(waves (B, N), lengths (B,))`` -> model input ``(B, target_length, mel)``.

    ``waves`` are mono float waveforms at ``cfg.sample_rate``, zero-padded to a common length
    ``N``; ``lengths`` are their true sample counts (default: all ``N``).
    """

    def __init__(self, cfg: FeatureConfig, dft: Literal["fft", "matmul"] = "fft") -> None:
        super().__init__()
        if dft not in ("fft", "matmul"):
            raise ConfigError(f"dft must be 'fft' or 'matmul', got {dft!r}")
        self.cfg, self.dft = cfg, dft
        self.window = frame_length_samples(cfg)
        self.shift = frame_shift_samples(cfg)
        if self.window < 2 or self.shift < 1:
            raise ConfigError(f"frames of {self.window} samples every {self.shift} are too short")
        self.padded = 1 << math.ceil(math.log2(self.window))
        self.register_buffer("hann", torch.hann_window(self.window, periodic=False),
                             persistent=False)
        self.register_buffer("filters", mel_filters(cfg.num_mel_bins, self.padded,
                                                    cfg.sample_rate), persistent=False)
        self.register_buffer("offsets", torch.arange(self.window), persistent=False)
        if dft == "matmul":  # only the window's rows: the zero padding adds nothing
            n = torch.arange(self.window, dtype=torch.float64)[:, None]
            k = torch.arange(self.padded // 2 + 1, dtype=torch.float64)[None, :]
            angle = 2 * math.pi * n * k / self.padded
            self.register_buffer("cos", torch.cos(angle).float(), persistent=False)
            self.register_buffer("sin", torch.sin(angle).float(), persistent=False)

    def _frames(self, waves: torch.Tensor) -> torch.Tensor:
        """``(B, F, window)``: every frame that starts inside the longest clip, read from the
        waves followed by one window of zeros (so a clip shorter than a window gets one frame,
        as ``features.log_mel`` pads it). Frames past a clip's own count are masked later;
        no branch depends on the length, so an exported graph takes any number of samples."""
        tail = waves.new_zeros(waves.shape[0], self.window)
        padded = torch.cat([waves, tail], dim=1)
        n_frames = torch.div(padded.shape[1] - self.window, self.shift,
                             rounding_mode="floor") + 1
        starts = torch.arange(n_frames, device=waves.device) * self.shift
        index = (starts[:, None] + self.offsets[None, :]).reshape(-1)
        return padded.index_select(1, index).reshape(waves.shape[0], -1, self.window)

    def _power(self, frames: torch.Tensor) -> torch.Tensor:
        if self.dft == "fft":
            return torch.fft.rfft(frames, n=self.padded).abs().square()
        return (frames @ self.cos).square() + (frames @ self.sin).square()

    def _log_mel(self, waves: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """``(B, F, mel)`` for every frame ``_frames`` reads; rows past a clip's own frames
        are zero."""
        waves = waves.float()
        if lengths is None:
            lengths = torch.full((waves.shape[0],), waves.shape[1], device=waves.device)
        frames = self._frames(waves)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - PREEMPHASIS * previous) * self.hann
        energies = self._power(frames) @ self.filters
        feats = torch.log(torch.clamp(energies, min=LOG_FLOOR))
        own = frame_count(torch.clamp(lengths, min=self.window), self.window, self.shift)
        keep = torch.arange(feats.shape[1], device=feats.device)[None, :] < own[:, None]
        return feats * keep[..., None].to(feats.dtype)

    def log_mel(self, waves: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``(B, F, mel)`` unnormalised log-mel, ``F`` the longest clip's frame count; rows
        past a shorter clip's own frames are zero."""
        n = waves.shape[1] if lengths is None else int(lengths.max())
        return self._log_mel(waves, lengths)[:, : int(frame_count(
            torch.tensor(max(n, self.window)), self.window, self.shift))]

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        feats = self._log_mel(waves, lengths)
        target = self.cfg.target_length
        # Pad then cut, with no branch on the length (an exported graph takes any length).
        pad = feats.new_zeros(feats.shape[0], target, feats.shape[2])
        feats = torch.cat([feats, pad], dim=1)[:, :target]
        return (feats - self.cfg.mean) / (self.cfg.std * 2)
