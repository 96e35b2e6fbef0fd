"""Issue 20's targets judged on an ``aat bench serve`` report: the right targets for the
device, PASS and MISS on either side of each threshold, and the conditions note."""

from __future__ import annotations

import copy

from aat_serve.bench.serve_targets import conditions_note, format_verdicts, serve_verdicts


def _report(device="cpu", gpu=None, **config):
    scen = {"throughput_rps": 300.0, "clips_per_s": 300.0, "p50_ms": 100.0, "p95_ms": 120.0,
            "p99_ms": 140.0, "mean_batch": 15.0, "mean_tasks_per_batch": 1.0, "errors": {}}
    return {
        "machine": {"gpu": gpu},
        "config": {"device": device, "clients": 32, "tasks": 3, "clip_s": 1.0,
                   "max_batch": 16, **config},
        "results": {"healthz": dict(scen, mean_batch=0.0), "single": dict(scen),
                    "mix3": dict(scen, p99_ms=240.0, errors={"503": 2}),
                    "no_batching/single": dict(scen)},
        "ratios": {"single_vs_healthz": 0.04, "mix3_vs_healthz": 0.036,
                   "single_vs_engine": 0.85, "mix3_vs_engine": 0.79},
    }


def _table(rows):
    return {r["what"]: (r["value"], r["status"]) for r in rows}


def test_cpu_targets():
    rows = _table(serve_verdicts(_report()))
    assert rows == {
        "single: classify / healthz req/s": (0.04, "MISS"),
        "single: service / engine-only clips/s": (0.85, "PASS"),
        "single: p99 ms": (140.0, "PASS"),
        "single: errors": (0, "PASS"),
        "mix3: classify / healthz req/s": (0.036, "MISS"),
        "mix3: service / engine-only clips/s": (0.79, "MISS"),
        "mix3: p99 ms": (240.0, "MISS"),
        "mix3: errors": (2, "MISS"),
    }


def test_gpu_targets_on_cuda_or_auto_on_a_gpu_host():
    for report in (_report(device="cuda"), _report(device="auto", gpu="NVIDIA H200")):
        rows = _table(serve_verdicts(report))
        assert rows["single: service / engine-only clips/s"] == (0.85, "PASS")
        assert rows["single: mean batch / max batch"] == (0.938, "PASS")
        assert rows["mix3: service / engine-only clips/s"] == (0.79, "PASS")  # 0.7 on a GPU
        assert not any("healthz" in k or "p99" in k for k in rows)
    low = _report(device="cuda")
    low["results"]["single"]["mean_batch"] = 11.9
    assert _table(serve_verdicts(low))["single: mean batch / max batch"] == (0.744, "MISS")


def test_thresholds_are_inclusive_and_a_missing_figure_is_said():
    r = _report()
    r["ratios"]["single_vs_engine"] = 0.8
    r["results"]["single"]["p99_ms"] = 150.0
    rows = _table(serve_verdicts(r))
    assert rows["single: service / engine-only clips/s"] == (0.8, "PASS")
    assert rows["single: p99 ms"] == (150.0, "PASS")
    r2 = copy.deepcopy(r)
    r2["results"]["single"]["p99_ms"] = 150.1
    del r2["ratios"]["single_vs_engine"]  # --engine-seconds 0
    rows = _table(serve_verdicts(r2))
    assert rows["single: p99 ms"] == (150.1, "MISS")
    assert rows["single: service / engine-only clips/s"] == (None, "not measured")


def test_conditions_note_and_text():
    assert conditions_note(_report()) is None
    assert conditions_note(_report(clients=8, clip_s=0.5)) == (
        "not the issue's conditions: clients 8 (the issue's: 32), clip_s 0.5 (the issue's: 1.0)")
    assert conditions_note(_report(device="cuda")) == (
        "not the issue's conditions: clients 32 (the issue's: 64), tasks 3 (the issue's: 4)")
    report = _report()
    report["verdicts"] = serve_verdicts(report)
    lines = format_verdicts(report)
    assert lines[0] == "issue 20 targets (CPU):"
    assert "  PASS  single: p99 ms: 140 (target <= 150)" in lines
    assert "  MISS  mix3: p99 ms: 240 (target <= 150)" in lines
