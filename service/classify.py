"""One classification request after its body arrived: decode, windows, batch, aggregate.

The decode pool turns the audio into PCM at the task's rate; the waveform is cut into the
task's windows (``service.windows``), each window queued as a clip of its own (it batches with
every other request), and the windows' probabilities are aggregated into the answer, which
says how much audio was scored, in how many windows, and how they were combined.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import torch

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.fbank import window_samples
from aat_serve.adapters.slots import TaskInfo
from aat_serve.service.engine import Admission, Job, Result
from aat_serve.service.errors import ErrorType, ServiceError
from aat_serve.service.runtime import Service
from aat_serve.service.windows import (
    Aggregate,
    aggregate_scores,
    default_aggregate,
    hop_samples,
    plan_windows,
)


@dataclass(frozen=True)
class Options:
    """The request's query parameters about what to score and return."""

    top_k: int = 5
    hop_s: float | None = None
    aggregate: Aggregate | None = None
    windows: bool = False


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Softmax probabilities, or sigmoids for multi-label tasks, as ``aat predict`` gives."""
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def top_predictions(scores: torch.Tensor, labels: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` best scores with their labels, best first; ties keep label order; as the JSON
    objects of ``Prediction`` (the response is serialised once, without pydantic)."""
    values = scores.tolist()
    if any(v != v for v in values):  # NaN: torch's order (NaN first), which Python's lacks
        order = torch.sort(scores, descending=True, stable=True).indices[:k].tolist()
    else:  # a stable descending sort, as torch's, without a tensor op on the event loop
        order = heapq.nlargest(k, range(len(values)), key=values.__getitem__)
    return [{"label": labels[i], "score": values[i]} for i in order]


async def classify_audio(svc: Service, task: str, info: TaskInfo, audio: bytes,
                         deadline: float, admission: Admission, opts: Options,
                         ) -> dict[str, Any]:
    """Score ``audio`` with ``task`` in windows; ``admission`` is the request's queue place."""
    cfg = svc.task_feature_config(info)
    wave = await svc.decode(audio, cfg, deadline)
    return await classify_wave(svc, task, info, cfg, wave, deadline, admission, opts)


async def classify_wave(svc: Service, task: str, info: TaskInfo, cfg: FeatureConfig,
                        wave: torch.Tensor, deadline: float, admission: Admission, opts: Options,
                        ) -> dict[str, Any]:
    """Score ``wave`` (PCM at ``cfg.sample_rate``, decoded here or by a front-end process) in
    the task's windows, batched with every other request; the response body as a dict."""
    sr = cfg.sample_rate
    window = window_samples(cfg)
    how = opts.aggregate or default_aggregate(info.manifest.multi_label)
    hop = hop_samples(opts.hop_s, svc.settings.window_hop_s, window, sr)
    plan = plan_windows(wave.numel(), window, hop, how, svc.settings.max_windows, sr)
    jobs = []
    for i in range(len(plan.starts)):
        start, end = plan.bounds(i)
        jobs.append(Job(task=task, wave=wave[start:end], config=cfg, version=info.version,
                        feature_settings=info.manifest.features, deadline=deadline,
                        timeout_s=svc.settings.request_timeout_s,
                        future=svc.engine.new_future()))
    results = await svc.engine.submit_many(jobs, admission)
    if len({r.task.version for r in results}) > 1:  # a hot swap between its windows
        raise ServiceError(ErrorType.TASK_CHANGED, f"task {task!r} changed its version while "
                           "this request's windows were computed; retry", {"Retry-After": "0"})
    return _response(task, results, plan, how, opts, wave.numel() / sr, sr)


def _response(task: str, results: list[Result], plan, how: Aggregate, opts: Options,
              duration_s: float, sr: int) -> dict[str, Any]:
    """The ``ClassifyResponse`` body as a plain dict, in the model's field order."""
    m = results[0].task.manifest
    scores = [probabilities(r.logits, m.multi_label) for r in results]
    per_window = None
    if opts.windows:
        per_window = [dict(start_s=round(a / sr, 6), end_s=round(b / sr, 6),
                           predictions=top_predictions(s, m.labels, opts.top_k))
                      for (a, b), s in zip(map(plan.bounds, range(len(results))), scores,
                                           strict=True)]
    first = results[0]
    return dict(
        task=task, version=m.version, multi_label=m.multi_label,
        predictions=top_predictions(aggregate_scores(scores, how), m.labels, opts.top_k),
        duration_s=round(duration_s, 6), scored_s=round(plan.scored_samples / sr, 6),
        windows=len(results), window_s=round(plan.window / sr, 6),
        hop_s=round(plan.hop / sr, 6), aggregate=how, window_results=per_window,
        queue_ms=round(max(r.queue_s for r in results) * 1000, 3),
        inference_ms=round(max(r.inference_s for r in results) * 1000, 3),
        batch_size=first.batch_size, batch_tasks=first.batch_tasks)
