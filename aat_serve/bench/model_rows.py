"""The serving rows of ``aat bench model``: bf16 end to end against transformers' bf16 model,
the launch overhead of one short clip, and the agreement of the bf16 residual stream.

- ``mix``: the four random ``aat_ms`` tasks mixed in one batch (default 10-s clips, batch 32 on
  a GPU, 8 on a CPU), our model in bf16 with a bf16 residual stream and CUDA graphs where they
  run (``AAT_CUDA_GRAPHS=auto``), against transformers' ``ASTForAudioClassification`` in bf16
  with no adapters at all, on the same inputs, already on the device (the service computes
  features there). The fp32-stream variant is timed in the same rounds. clips/s from each
  variant's fastest call (round-robin). Target: ours >= 0.90x transformers (a GPU target).
- ``batch1``: one 1-s clip: the median wall time of a call against the GPU's busy time for the
  same work, the union of the kernel and copy intervals that ``torch.profiler`` records for one
  eager call (graph replays run the same kernels; the profile of a replay is reported too where
  the profiler sees its kernels). Target: wall <= 1.2x busy. CUDA only.
- ``agreement``: top-1 agreement of the bf16 stream with the fp32 stream (both bf16 GEMMs) on
  random clips over the four tasks' heads. Target >= 99 %. Any device.

On a CPU the GPU targets are reported as ``needs CUDA`` beside what was measured.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.adapters.runners import resolve_runner
from aat_serve.adapters.runners.graphs import graph_config
from aat_serve.bench.common import interleaved, synchronize
from aat_serve.bench.fixtures import CLIPS

SERVING_TARGETS = {"mix_vs_hf_bf16": 0.90, "batch1_wall_over_busy": 1.2, "residual_top1": 0.99}
HfFactory = Callable[[AST, TaskBundle, int], torch.nn.Module]
"""Builds transformers' model holding a backbone and a head for a clip length (fp32)."""


@dataclass
class ServingRowsConfig:
    """What the serving rows measure; ``batch`` None: 32 on CUDA, 8 elsewhere."""

    batch: int | None = None
    clip: str = "10s"
    rounds: int = 3
    agreement_clips: dict[str, int] = field(default_factory=lambda: {"1s": 128, "10s": 16})
    batch1_calls: int = 30
    seed: int = 0

    def batch_for(self, device: torch.device) -> int:
        return self.batch or (32 if device.type == "cuda" else 8)


def top1_agreement(a: MultiTaskModel, b: MultiTaskModel, tasks: Sequence[str],
                   clips: dict[str, int], mel: int, seed: int,
                   progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Top-1 agreement of ``b`` with ``a`` on random clips (batches of 8 over ``tasks``), per
    clip length (and the clips that disagree, per task) and overall, with the number of
    distinct top-1 classes of ``a`` and the largest relative logit error."""
    g = torch.Generator().manual_seed(seed)
    res: dict[str, Any] = {}
    total = agree = 0
    for clip, n in clips.items():
        if n <= 0:
            continue
        top_a: list[int] = []
        same, rel = 0, 0.0
        differ = dict.fromkeys(tasks, 0)
        for start in range(0, n, 8):
            x = torch.randn(min(8, n - start), CLIPS[clip], mel, generator=g)
            names = [tasks[(start + i) % len(tasks)] for i in range(x.shape[0])]
            for la, lb, t in zip(a.classify(x, names), b.classify(x, names), names, strict=True):
                top_a.append(int(la.argmax()))
                same += int(la.argmax()) == int(lb.argmax())
                differ[t] += int(la.argmax()) != int(lb.argmax())
                rel = max(rel, float((la - lb).norm() / la.norm()))
            if progress:
                progress()
        res[clip] = {"clips": n, "top1_agreement": same / n, "distinct_top1": len(set(top_a)),
                     "max_logit_rel_err": rel, "disagreements_by_task": differ}
        total += n
        agree += same
    res["overall"] = agree / total if total else None
    return res


def busy_ms(fn: Callable[[], object], device: torch.device) -> dict[str, float] | None:
    """GPU busy time of one call of ``fn``: the union of the device intervals (kernels,
    copies) ``torch.profiler`` records, and their count; None off CUDA or when none is seen."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > hi:
            busy, lo = busy + hi - lo, s
        hi = max(hi, e)
    return {"busy_ms": (busy + hi - lo) / 1e3, "device_ops": len(spans)}


def wall_ms(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Median wall time of ``calls`` synchronised calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(calls):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _models(backbone: AST, bundles: list[TaskBundle], device: torch.device, batch: int,
            fingerprint: str, bottleneck: int) -> dict[str, MultiTaskModel]:
    graphs = graph_config("auto", device, resolve_runner("auto", device), batch)
    out = {}
    for name, residual in (("bf16-stream", torch.bfloat16), ("fp32-stream", torch.float32)):
        out[name] = MultiTaskModel(copy.deepcopy(backbone), max_tasks=8, dtype=torch.bfloat16,
                                   device=device, fingerprint=fingerprint, bottleneck=bottleneck,
                                   residual_dtype=residual, graphs=graphs)
        for b in bundles:
            out[name].load_task(b)
    return out


def _batch1(model: MultiTaskModel, task: str, mel: int, device: torch.device,
            calls: int) -> dict[str, Any]:
    x = torch.randn(1, CLIPS["1s"], mel, device=device)
    call = lambda: model.classify(x, [task])  # noqa: E731
    row: dict[str, Any] = {"wall_ms": wall_ms(call, device, calls), "graphs": bool(model.graphs)}
    row["graphed_profile"] = busy_ms(call, device) if model.graphs else None
    graphs, model.graphs = model.graphs, None  # the same work, eagerly: every kernel visible
    try:
        row["eager_wall_ms"] = wall_ms(call, device, calls)
        row.update(busy_ms(call, device) or {"busy_ms": None, "device_ops": None})
    finally:
        model.graphs = graphs
    row["wall_over_busy"] = (round(row["wall_ms"] / row["busy_ms"], 3) if row["busy_ms"]
                             else None)
    return row


def run_serving_rows(cfg: ServingRowsConfig, backbone: AST, bundles: list[TaskBundle],
                     parity: TaskBundle, device: torch.device, hf_factory: HfFactory,
                     fingerprint: str, bottleneck: int,
                     progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Measure the serving rows (see the module docstring) and judge them."""
    batch, mel = cfg.batch_for(device), backbone.cfg.num_mel_bins
    tasks = [b.manifest.task for b in bundles]
    models = _models(backbone, bundles, device, batch, fingerprint, bottleneck)
    agreement = top1_agreement(models["fp32-stream"], models["bf16-stream"], tasks,
                               cfg.agreement_clips, mel, cfg.seed + 3, progress)
    hf = hf_factory(backbone, parity, CLIPS[cfg.clip]).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(batch, CLIPS[cfg.clip], mel,
                    generator=torch.Generator().manual_seed(cfg.seed + 4)).to(device)
    mix = [tasks[i % len(tasks)] for i in range(batch)]

    def run_hf() -> object:
        with torch.inference_mode():
            return hf(input_values=x.to(torch.bfloat16)).logits

    fns: dict[str, Callable[[], object]] = {"hf-bf16": run_hf}
    for name, m in models.items():
        fns[name] = lambda m=m: m.classify(x, mix)
    times = interleaved(fns, cfg.rounds, device, progress=progress)
    mix_rows = {name: {"clips_per_s": batch / min(t["wall"]), "best_s": min(t["wall"]),
                       "median_s": statistics.median(t["wall"]), "runs_s": t["wall"]}
                for name, t in times.items()}
    hf_rate = mix_rows["hf-bf16"]["clips_per_s"]
    report: dict[str, Any] = {
        "device": str(device), "tasks": len(tasks), "batch": batch, "clip": cfg.clip,
        "graphs": bool(models["bf16-stream"].graphs), "agreement": agreement,
        "mix": mix_rows, "mix_vs_hf_bf16": round(mix_rows["bf16-stream"]["clips_per_s"]
                                                 / hf_rate, 3),
        "mix_fp32_stream_vs_hf_bf16": round(mix_rows["fp32-stream"]["clips_per_s"] / hf_rate, 3),
        "batch1": (_batch1(models["bf16-stream"], tasks[0], mel, device, cfg.batch1_calls)
                   if device.type == "cuda" else None)}
    cache = models["bf16-stream"].graphs
    report["graph_failures"] = {str(k): v for k, v in cache.failed.items()} if cache else {}
    report["verdicts"] = verdicts(report)
    return report


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS / MISS for each serving target, or ``needs CUDA`` for a GPU target measured
    elsewhere (with the value measured, if any)."""
    cuda = str(report["device"]).startswith("cuda")
    b1 = report.get("batch1") or {}
    rows = [
        (f"{report['tasks']}-task mix, bf16, {report['clip']} clips, batch "
         f"{report['batch']} vs transformers bf16 (no adapters)", report.get("mix_vs_hf_bf16"),
         ">=", SERVING_TARGETS["mix_vs_hf_bf16"], True),
        ("1-s clip, batch 1: wall time / GPU busy time", b1.get("wall_over_busy"), "<=",
         SERVING_TARGETS["batch1_wall_over_busy"], True),
        ("bf16 vs fp32 residual stream, top-1 agreement",
         (report.get("agreement") or {}).get("overall"), ">=", SERVING_TARGETS["residual_top1"],
         False),
    ]
    out = []
    for what, value, op, target, gpu in rows:
        if gpu and not cuda:
            status = "needs CUDA"
        elif value is None:
            status = "not measured"
        else:
            status = "PASS" if (value >= target if op == ">=" else value <= target) else "MISS"
        out.append({"what": what, "value": value, "op": op, "target": target, "status": status})
    return out


def format_serving(report: dict[str, Any]) -> str:
    """The serving rows as text: agreement, the mix table, the batch-1 row, verdict lines."""
    a = report["agreement"]
    lines = [f"serving rows on {report['device']} (CUDA graphs: {report['graphs']}; shapes "
             f"whose capture failed and ran eagerly: {report.get('graph_failures') or 'none'})"]
    for clip, r in a.items():
        if clip != "overall":
            lines.append(f"bf16 vs fp32 residual stream, {clip}: top-1 {r['top1_agreement']:.4f} "
                         f"over {r['clips']} clips ({r['distinct_top1']} distinct top-1 classes; "
                         f"max logit relative error {r['max_logit_rel_err']:.2e}; disagreeing "
                         f"clips by task: {r['disagreements_by_task']})")
    for name, r in report["mix"].items():
        lines.append(f"{report['clip']} batch {report['batch']} {name}: "
                     f"{r['clips_per_s']:.2f} clips/s (best {r['best_s'] * 1e3:.1f} ms, median "
                     f"{r['median_s'] * 1e3:.1f} ms)")
    lines.append(f"ratios vs hf-bf16: bf16-stream {report['mix_vs_hf_bf16']:.3f}, fp32-stream "
                 f"{report['mix_fp32_stream_vs_hf_bf16']:.3f}")
    b1 = report.get("batch1")
    if b1:
        busy = "-" if b1["busy_ms"] is None else f"{b1['busy_ms']:.3f}"
        lines.append(f"1-s batch 1: wall {b1['wall_ms']:.3f} ms (eager {b1['eager_wall_ms']:.3f}"
                     f" ms), GPU busy {busy} ms over {b1['device_ops']} device ops; graphed "
                     f"profile {b1['graphed_profile']}")
    else:
        lines.append("1-s batch 1 wall vs GPU busy time: needs CUDA")
    for v in report["verdicts"]:
        value = "-" if v["value"] is None else v["value"]
        lines.append(f"{v['status']:<10}  {v['what']}: {value} (target {v['op']} {v['target']})")
    return "\n".join(lines)
