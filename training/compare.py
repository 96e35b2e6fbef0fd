"""A Table-2-style comparison of fine-tuning methods on one data set.

Each method trains in its own process (``aat train --json``) so that its peak memory is its
own; the table lists trainable parameters, the test (or CV) metric, the mean epoch time and
the peak memory (CUDA allocator peak on a GPU, process peak RSS on the CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.methods import get_method
from aat_serve.training.run_dir import write_json


def _cell(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def comparison_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method from ``aat train --json`` summaries."""
    rows = []
    for method, res in results.items():
        runs = list(res["folds"].values()) if "folds" in res else [res]
        metric = runs[0]["metric"]
        if "cv" in res:
            value, where = res["cv"]["mean"], "cv"
        elif runs[0].get("test"):
            value, where = runs[0]["test"][metric], "test"
        else:
            value, where = runs[0]["best_metric"], "valid"
        rows.append({
            "method": method, "trainable_params": runs[0]["trainable_params"],
            "total_params": runs[0]["total_params"],
            "percent": 100.0 * runs[0]["trainable_params"] / runs[0]["total_params"],
            "metric": metric, "value": value, "split": where,
            "epoch_time_s": sum(r["epoch_time_s"] for r in runs) / len(runs),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
            "bundle": get_method(method).exports_bundle})
    return rows


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"### {title}", "",
             "| method | trainable params | % of model | metric | epoch time (s) | "
             "peak memory (MB) | output |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['percent']:.3f} | "
            f"{r['metric']} ({r['split']}) {_cell(r['value'], '.4f')} | "
            f"{_cell(r['epoch_time_s'], '.2f')} | {_cell(r['peak_memory_mb'], '.0f')} | "
            f"{'bundle' if r['bundle'] else 'whole model'} |")
    return "\n".join(lines) + "\n"


def parse_rates(values: list[str], methods: list[str]) -> dict[str, float]:
    """``["full=1e-5", "1e-3"]`` -> a learning rate per method; methods not given keep their
    recipe's rate (an empty dict: every method trains at its own recipe's rate)."""
    rates: dict[str, float] = {}
    every: float | None = None
    for v in values:
        method, sep, rate = v.rpartition("=")
        try:
            lr = float(rate)
        except ValueError:
            raise ConfigError(f"--lr {v!r}: expected METHOD=RATE or RATE, e.g. full=1e-5"
                              ) from None
        if not sep:
            every = lr
        elif method not in methods:
            raise ConfigError(f"--lr {v!r}: {method!r} is not among the compared methods "
                              f"({', '.join(methods)})")
        else:
            rates[method] = lr
    if every is not None:
        rates = {m: rates.get(m, every) for m in methods}
    return rates


def _run_one(cmd: list[str], method: str, progress: bool) -> dict[str, Any]:
    """One ``aat train --json`` in its own process; its progress bars pass through."""
    proc = subprocess.run(cmd + (["--progress"] if progress else []), stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        try:
            tail = [json.loads(proc.stdout)["error"]["message"]]
        except (ValueError, KeyError, TypeError):
            tail = tail or proc.stdout.strip().splitlines()[-5:]
        raise ConfigError(f"training {method} failed (exit {proc.returncode}): "
                          + " | ".join(tail))
    return json.loads(proc.stdout)


def compare_methods(methods: list[str], train_args: list[str], out_dir: str | os.PathLike,
                    title: str, progress: bool = True, rates: dict[str, float] | None = None,
                    ) -> list[dict[str, Any]]:
    """Run ``aat train <train_args> --method M`` per method; write comparison.{md,json}.

    Each method trains at its recipe's learning rate unless ``rates`` names one for it.
    """
    if not methods:
        raise ConfigError("no methods to compare")
    for m in methods:
        get_method(m)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(methods, 1):
        cmd = [sys.executable, "-m", "aat_serve.cli.main", "train", *train_args, "--method", m,
               "--out", str(out_dir / f"{m}.safetensors"), "--run-dir", str(out_dir / f"{m}.run"),
               "--json"]
        if m in (rates or {}):
            cmd += ["--lr", repr(float(rates[m]))]
        if progress:
            lr = f"lr {rates[m]:g}" if m in (rates or {}) else "the recipe's lr"
            print(f"training {m} ({i}/{len(methods)}, {lr}) ...", file=sys.stderr, flush=True)
        results[m] = _run_one(cmd, m, progress)
    rows = comparison_rows(results)
    write_json(out_dir / "comparison.json", {"title": title, "rows": rows, "runs": results})
    (out_dir / "comparison.md").write_text(markdown_table(rows, title))
    return rows
