"""Long audio in windows, for the service: the limits and the HTTP errors.

The windowing itself (where windows start, how their scores add up) is
``aat_serve.adapters.windows``, shared with ``aat predict``; here the number of windows is
bounded (``AAT_MAX_WINDOWS``, 413) and a request's ``hop_s`` is checked (400). Each window is a
clip of its own in the batch (it batches with other requests).
"""

from __future__ import annotations

from aat_serve.adapters.windows import (
    AGGREGATES,
    Aggregate,
    WindowPlan,
    aggregate_scores,
    default_aggregate,
    plan,
    window_count,
)
from aat_serve.service.errors import ErrorType, ServiceError, bad_request

__all__ = ["AGGREGATES", "Aggregate", "WindowPlan", "aggregate_scores", "default_aggregate",
           "hop_samples", "plan_windows", "window_count"]


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
    return plan(samples, window, hop, aggregate)


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
