"""Issue 20's serving targets judged on one ``aat bench serve`` report: PASS or MISS per
target, with the value measured in that run.

On the CPU (the issue's 2-core machine, the demo model, 1-s clips, 32 connections): classify /
healthz >= 0.35, service clips/s >= 0.8x the engine alone, p99 <= 150 ms, no errors. On a GPU
(64 connections, 4 tasks, 1-s clips): service >= 0.7x the engine alone at the same max batch,
mean batch >= 0.75x the max batch, no errors. Each target is judged for the one-task run and
the task mix. A run whose conditions differ from the issue's says so beside its verdicts.
"""

from __future__ import annotations

from typing import Any

CPU_TARGETS = {"vs_healthz": 0.35, "vs_engine": 0.8, "p99_ms": 150.0}
GPU_TARGETS = {"vs_engine": 0.7, "batch_fill": 0.75}
CPU_CONDITIONS = {"clients": 32, "clip_s": 1.0}
GPU_CONDITIONS = {"clients": 64, "tasks": 4, "clip_s": 1.0}


def on_gpu(report: dict[str, Any]) -> bool:
    """Whether the measured server ran on CUDA (``--device cuda``, or ``auto`` on a GPU host)."""
    device = str(report["config"].get("device", "auto"))
    return device.startswith("cuda") or (device == "auto" and bool(report["machine"].get("gpu")))


def _row(what: str, value: float | None, op: str, target: float) -> dict[str, Any]:
    if value is None:
        status = "not measured"
    else:
        status = "PASS" if (value >= target if op == ">=" else value <= target) else "MISS"
    return {"what": what, "value": value, "op": op, "target": target, "status": status}


def serve_verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, scenario): what, value, op, target and PASS / MISS."""
    results, ratios, cfg = report["results"], report["ratios"], report["config"]
    scenarios = [k for k in results if k != "healthz" and "/" not in k]
    rows = []
    gpu = on_gpu(report)
    for name in scenarios:
        engine = ratios.get(f"{name}_vs_engine")
        if gpu:
            rows.append(_row(f"{name}: service / engine-only clips/s", engine, ">=",
                             GPU_TARGETS["vs_engine"]))
            fill = results[name]["mean_batch"] / cfg["max_batch"] if cfg.get("max_batch") else None
            rows.append(_row(f"{name}: mean batch / max batch", fill and round(fill, 3), ">=",
                             GPU_TARGETS["batch_fill"]))
        else:
            rows.append(_row(f"{name}: classify / healthz req/s", ratios.get(f"{name}_vs_healthz"),
                             ">=", CPU_TARGETS["vs_healthz"]))
            rows.append(_row(f"{name}: service / engine-only clips/s", engine, ">=",
                             CPU_TARGETS["vs_engine"]))
            rows.append(_row(f"{name}: p99 ms", results[name]["p99_ms"], "<=",
                             CPU_TARGETS["p99_ms"]))
        rows.append(_row(f"{name}: errors", sum(results[name]["errors"].values()), "<=", 0))
    return rows


def conditions_note(report: dict[str, Any]) -> str | None:
    """What differs from the conditions the issue states its targets under, if anything."""
    cfg = report["config"]
    want = GPU_CONDITIONS if on_gpu(report) else CPU_CONDITIONS
    differ = [f"{k} {cfg.get(k)} (the issue's: {v})" for k, v in want.items()
              if cfg.get(k) is not None and cfg.get(k) != v]
    return ("not the issue's conditions: " + ", ".join(differ)) if differ else None


def format_verdicts(report: dict[str, Any]) -> list[str]:
    """The verdict lines of a report (``format_process_report`` appends them)."""
    where = "GPU" if on_gpu(report) else "CPU"
    lines = [f"issue 20 targets ({where}):"]
    for r in report.get("verdicts", []):
        value = "-" if r["value"] is None else f"{r['value']:g}"
        lines.append(f"  {r['status']:<4}  {r['what']}: {value} (target {r['op']} "
                     f"{r['target']:g})")
    note = conditions_note(report)
    if note:
        lines.append(f"  ({note})")
    return lines
