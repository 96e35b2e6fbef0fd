"""Long audio in windows: which stretches of a waveform are scored, and how they add up.

A task scores ``target_length`` frames, i.e. ``fbank.window_samples(cfg)`` samples (its window).
Audio up to one window long is one window (a shorter clip is padded in the log-mel domain, as
``features.fbank`` pads it). Longer audio is cut into windows of that length every ``hop``
samples, the last one padded where it runs past the end, so every sample is scored:
``1 + ceil((n - window) / hop)`` windows. Each window is a clip of its own in the batch (it
batches with other requests); the per-window probabilities are then aggregated: ``mean``
(single-label default), ``max`` (multi-label default), or ``first``, which scores only the first
window (the cut the service made before windows existed, now said in the response).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from aat_serve.service.errors import ErrorType, ServiceError, bad_request

Aggregate = Literal["mean", "max", "first"]
AGGREGATES: tuple[str, ...] = ("mean", "max", "first")


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one waveform start, all in samples."""

    samples: int
    """The waveform's length."""
    window: int
    hop: int
    starts: tuple[int, ...]

    def bounds(self, i: int) -> tuple[int, int]:
        """Sample range ``[start, end)`` of window ``i`` (its end clipped at the audio's)."""
        start = self.starts[i]
        return start, min(start + self.window, self.samples)

    @property
    def scored_samples(self) -> int:
        """Samples inside some window (all of them, unless only the first window is scored)."""
        return self.bounds(len(self.starts) - 1)[1]


def window_count(samples: int, window: int, hop: int) -> int:
    """Windows of ``window`` samples every ``hop`` that cover ``samples`` samples."""
    if samples <= window:
        return 1
    return 1 + math.ceil((samples - window) / hop)


def plan_windows(samples: int, window: int, hop: int, aggregate: Aggregate, max_windows: int,
                 sample_rate: int) -> WindowPlan:
    """The windows to score; 413 ``audio_too_long`` when there would be more than
    ``max_windows`` (``first`` always scores one)."""
    n = 1 if aggregate == "first" else window_count(samples, window, hop)
    if n > max_windows:
        raise ServiceError(
            ErrorType.AUDIO_TOO_LONG,
            f"audio of {samples / sample_rate:g} s makes {n} windows of "
            f"{window / sample_rate:g} s every {hop / sample_rate:g} s; the limit is "
            f"{max_windows} windows (AAT_MAX_WINDOWS): send shorter audio, a larger hop_s, "
            "or aggregate=first")
    return WindowPlan(samples, window, hop, tuple(i * hop for i in range(n)))


def hop_samples(hop_s: float | None, default_s: float | None, window: int,
                sample_rate: int) -> int:
    """The hop in samples: ``hop_s`` (the request's), else ``default_s`` (``AAT_WINDOW_HOP_S``,
    capped at the task's window, as tasks' windows differ), else one window (no overlap). 400
    when the request's is not within (0, window]: a longer hop would leave audio unscored."""
    if hop_s is None:
        return window if default_s is None else max(1, min(window, round(default_s * sample_rate)))
    hop = round(hop_s * sample_rate)
    if not (hop_s > 0 and 1 <= hop <= window):
        raise bad_request(f"hop_s is {hop_s:g}; allowed: above 0 up to the task's window of "
                          f"{window / sample_rate:g} s (a longer hop would leave audio "
                          "unscored)")
    return hop


def default_aggregate(multi_label: bool) -> Aggregate:
    return "max" if multi_label else "mean"


def aggregate_scores(scores: list[torch.Tensor], how: Aggregate) -> torch.Tensor:
    """One score vector from the windows' probabilities."""
    if how == "first" or len(scores) == 1:
        return scores[0]
    stacked = torch.stack(scores)
    return stacked.max(dim=0).values if how == "max" else stacked.mean(dim=0)
