"""The shared table printer and machine description, and ``aat bench training``."""

from __future__ import annotations

import json

import pytest
import torch

from aat_serve.bench.common import machine, machine_summary, positive_ints, table
from aat_serve.bench.training import TrainingBenchConfig, format_report, run_training_bench
from aat_serve.cli.main import main as aat


def test_table_aligns_text_and_writes_markdown():
    rows = [["full", 1.5, 10], ["aat_ms", 12.25, 7]]
    text = table(rows, ["method", "s", "n"]).splitlines()
    assert text == ["method      s   n",
                    "------  -----  --",
                    "full      1.5  10",
                    "aat_ms  12.25   7"]
    md = table(rows, ["method", "s", "n"], markdown=True).splitlines()
    assert md == ["| method | s | n |", "|---|---:|---:|", "| full | 1.5 | 10 |",
                  "| aat_ms | 12.25 | 7 |"]
    left = table(rows, ["method", "s", "n"], markdown=True, right=[False, False, False])
    assert left.splitlines()[1] == "|---|---|---|"


def test_machine_names_the_measured_device():
    cpu = machine(torch.device("cpu"))
    assert cpu["gpu"] is None and cpu["cpu_count"] >= 1 and cpu["torch"] == torch.__version__
    assert machine_summary(cpu).startswith(f"{cpu['cpu']} ({cpu['cpu_count']} CPUs, ")
    with_gpu = {**cpu, "gpu": "Some GPU"}
    assert machine_summary(with_gpu).startswith("Some GPU (")


def test_positive_ints_names_the_flag():
    assert positive_ints("1, 8,32", "--clips") == (1, 8, 32)
    with pytest.raises(ValueError, match="--clips needs positive integers"):
        positive_ints("0", "--clips")
    with pytest.raises(ValueError, match="--x must be a comma-separated list"):
        positive_ints("a", "--x")


def test_training_bench_one_case_in_process(capsys):
    assert aat(["bench", "training", "--one", "head:16", "--batch", "1", "--steps", "1",
                "--warmup", "0", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["method"], row["frames"], row["batch"], row["steps"]) == ("head", 16, 1, 1)
    assert row["trainable_params"] > 0 and row["step_s_median"] > 0 and row["peak_mb"] > 0


def test_training_bench_runs_each_case_in_a_child_and_compares():
    cfg = TrainingBenchConfig(methods=("head",), frames=(16,), batch=1, steps=1, warmup=0,
                              device="cpu")
    report = run_training_bench(cfg)
    assert [(r["method"], r["frames"]) for r in report["results"]] == [("head", 16)]
    assert report["config"]["device"] == "cpu" and report["machine"]["gpu"] is None
    # the comparison line needs both full and aat_ms: synthesise them from the one row
    row = report["results"][0]
    both = {**report, "results": [{**row, "method": "full", "step_s_median": 2.0,
                                   "peak_mb": 400.0, "peak_over_start_mb": 200.0},
                                  {**row, "method": "aat_ms", "step_s_median": 1.0,
                                   "peak_mb": 300.0, "peak_over_start_mb": 100.0}]}
    text = format_report(both)
    assert "| frames | method | trainable | step (s, median) | peak memory (MB) | peak - start " \
           "(MB) |" in text
    assert ("16 frames: aat_ms is 2.00x as fast per step as full, with 0.75x its peak memory "
            "(0.50x counting only what training adds to the weights)") in text
    assert "aat_ms is" not in format_report(report)  # one method: nothing to compare
