"""``aat bench kernel``'s figures: derived ratios, the issue's targets (PASS/MISS) and the table.

Pure functions of the measured milliseconds, so the targets and the formatting are tested
without a GPU. One result row is one (rank, clips, tasks) case; its times (median ms) are

- ``mlp_ms``: the frozen MLP alone (cuBLAS fc1, GELU, fc2, residual add), no adapter;
- ``eager_ms``: unfused: the MLP plus each task's adapter on its rows, eager PyTorch;
- ``cublas_ms``: only the two widened GEMMs ``h [W1 | W_down]``, ``act [W2 ; W_up]`` (one
  task, torch.mm), the cuBLAS yardstick for TFLOP/s on the same shapes;
- ``fused_ms``: what the model runs, the dispatcher's choice (``choice``) for the bucket;
- ``route_a_ms`` / ``route_b_ms``: the best timed configuration of each kernel route.
"""

from __future__ import annotations

import math
from typing import Any

from aat_serve.bench.common import table

D, H = 768, 3072


def flops(rows: int, rank: int) -> int:
    """FLOPs of the widened MLP: two GEMMs of ``rows x D x (H + rank)`` (2 per MAC)."""
    return 2 * rows * D * (H + rank) * 2


def derive(r: dict[str, Any]) -> dict[str, Any]:
    """Add the ratios and TFLOP/s a result row supports (missing times give no ratio)."""
    f = flops(r["rows"], r["rank"])
    if "fused_ms" in r:
        r["fused_tflops"] = f / r["fused_ms"] / 1e9
    if "cublas_ms" in r:
        r["cublas_tflops"] = f / r["cublas_ms"] / 1e9
    if "fused_ms" in r and "mlp_ms" in r:
        r["fused_vs_mlp"] = r["fused_ms"] / r["mlp_ms"]
    if "fused_ms" in r and "eager_ms" in r:
        r["unfused_vs_fused"] = r["eager_ms"] / r["fused_ms"]
    if "fused_tflops" in r and "cublas_tflops" in r:
        r["tflops_vs_cublas"] = r["fused_tflops"] / r["cublas_tflops"]
    return r


def target_of(kind: str, r: dict[str, Any]) -> tuple[str, float] | None:
    """The issue's target for ``kind`` in row ``r`` as (comparison, bound), or None.

    fused / MLP (one task): <= 1.25 at 1 clip; at 8+ clips <= 1.05 for r <= 64, <= 1.10 else.
    unfused / fused: >= 1.0 at one task, >= 1.3 at 4+ tasks. fused TFLOP/s >= 80 % of cuBLAS
    on the same GEMMs (one task).
    """
    if kind == "fused_vs_mlp" and r["tasks"] == 1:
        if r["clips"] == 1:
            return "<=", 1.25
        if r["clips"] >= 8:
            return "<=", 1.05 if r["rank"] <= 64 else 1.10
    if kind == "unfused_vs_fused":
        if r["tasks"] == 1:
            return ">=", 1.0
        if r["tasks"] >= 4:
            return ">=", 1.3
    if kind == "tflops_vs_cublas" and r["tasks"] == 1:
        return ">=", 0.80
    return None


TARGET_KINDS = ("fused_vs_mlp", "unfused_vs_fused", "tflops_vs_cublas")


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One PASS/MISS line per (row, kind) that has a target and a measured value."""
    lines = []
    for r in results:
        for kind in TARGET_KINDS:
            t = target_of(kind, r)
            value = r.get(kind)
            if t is None or value is None or not math.isfinite(value):
                continue
            op, bound = t
            met = value <= bound if op == "<=" else value >= bound
            lines.append({"what": f"r={r['rank']} {r['clips']} clips {r['tasks']} tasks {kind}",
                          "kind": kind, "rank": r["rank"], "clips": r["clips"],
                          "tasks": r["tasks"], "value": round(value, 3), "op": op,
                          "target": bound, "met": met})
    return lines


def _ms(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:.3f}" if key in r else "-"


def _num(r: dict[str, Any], key: str, fmt: str) -> str:
    v = r.get(key)
    return format(v, fmt) if isinstance(v, int | float) and math.isfinite(v) else "-"


def format_report(report: dict[str, Any]) -> str:
    """The table, the design choice per case and one PASS/MISS line per target."""
    m = report["machine"]
    rows = []
    for r in report["results"]:
        rows.append([r["rank"], r["clips"], r["tasks"], _ms(r, "mlp_ms"), _ms(r, "eager_ms"),
                     _ms(r, "cublas_ms"), _ms(r, "route_a_ms"), _ms(r, "route_b_ms"),
                     _ms(r, "fused_ms"), _num(r, "fused_vs_mlp", ".3f"),
                     _num(r, "unfused_vs_fused", ".3f"), _num(r, "fused_tflops", ".0f"),
                     _num(r, "cublas_tflops", ".0f"), _ms(r, "spatial_ms"),
                     _ms(r, "spatial_eager_ms"), r.get("choice", "-")])
    header = ["r", "clips", "tasks", "mlp", "unfused", "cuBLAS", "route a", "route b", "fused",
              "fused/mlp", "unfused/fused", "TFLOP/s", "cuBLAS TFLOP/s", "spatial",
              "spatial unfused", "choice"]
    lines = [f"aat bench kernel on {m.get('gpu')} (torch {m['torch']}, triton "
             f"{report.get('triton')}), {report['config']['dtype']}, "
             f"{report['config']['tokens']} tokens per clip, median ms per call", "",
             table(rows, header, right=[True] * (len(header) - 1) + [False]), ""]
    for t in report["targets"]:
        lines.append(f"{'PASS' if t['met'] else 'MISS'}  {t['what']}: {t['value']} "
                     f"(target {t['op']} {t['target']})")
    met = sum(t["met"] for t in report["targets"])
    lines.append(f"{met} of {len(report['targets'])} targets met")
    for k, v in report.get("errors", {}).items():
        lines.append(f"error {k}: {v}")
    return "\n".join(lines)
