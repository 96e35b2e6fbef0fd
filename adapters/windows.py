"""Long audio in windows: which stretches of a waveform are scored, and how they add up.

A task scores ``target_length`` frames, i.e. ``fbank.window_samples(cfg)`` samples (its window).
Audio up to one window long is one window (a shorter clip is padded in the log-mel domain, as
``features.fbank`` pads it). Longer audio is cut into windows of that length every ``hop``
samples, the last one padded where it runs past the end, so every sample is scored:
``1 + ceil((n - window) / hop)`` windows. The per-window probabilities are then aggregated:
``mean`` (single-label default), ``max`` (multi-label default), or ``first``, which scores only
the first window.

The service (``service.windows``: limits and HTTP errors on top) and ``aat predict`` use these
same functions, so both score long audio alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from aat_serve.adapters.errors import ConfigError

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


def plan(samples: int, window: int, hop: int, aggregate: Aggregate) -> WindowPlan:
    """The windows to score (``first``: only the first); no limit on their number."""
    if not 1 <= hop <= window:
        raise ConfigError(f"the hop is {hop} samples; expected 1 up to the window of {window} "
                          "(a longer hop would leave audio unscored)")
    n = 1 if aggregate == "first" else window_count(samples, window, hop)
    return WindowPlan(samples, window, hop, tuple(i * hop for i in range(n)))


def default_aggregate(multi_label: bool) -> Aggregate:
    return "max" if multi_label else "mean"


def aggregate_scores(scores: list[torch.Tensor], how: Aggregate) -> torch.Tensor:
    """One score vector from the windows' probabilities."""
    if how == "first" or len(scores) == 1:
        return scores[0]
    stacked = torch.stack(scores)
    return stacked.max(dim=0).values if how == "max" else stacked.mean(dim=0)
