"""``aat bench kernel``'s ratios, issue-21 targets and PASS/MISS table from given timings
(the timings themselves need a GPU: ``make gpu-check``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aat_serve.bench.kernel_report import derive, flops, format_report, target_of, targets
from aat_serve.cli.main import main as aat


def row(rank, clips, tasks, **ms):
    return derive({"rank": rank, "clips": clips, "tasks": tasks, "rows": clips * 1214, **ms})


def test_derived_ratios_and_tflops():
    r = row(192, 8, 1, mlp_ms=1.0, eager_ms=1.5, fused_ms=1.08, cublas_ms=1.0)
    assert r["fused_vs_mlp"] == pytest.approx(1.08)
    assert r["unfused_vs_fused"] == pytest.approx(1.5 / 1.08)
    assert r["fused_tflops"] == pytest.approx(flops(8 * 1214, 192) / 1.08e9)
    assert flops(8 * 1214, 192) == 2 * 8 * 1214 * 768 * (3072 + 192) * 2
    assert r["tflops_vs_cublas"] == pytest.approx(1 / 1.08)
    partial = row(64, 1, 1, mlp_ms=1.0)  # the fused path failed: no ratios, no targets
    assert "fused_vs_mlp" not in partial and targets([partial]) == []


def test_targets_follow_the_issue():
    assert target_of("fused_vs_mlp", {"rank": 64, "clips": 8, "tasks": 1}) == ("<=", 1.05)
    assert target_of("fused_vs_mlp", {"rank": 192, "clips": 32, "tasks": 1}) == ("<=", 1.10)
    assert target_of("fused_vs_mlp", {"rank": 192, "clips": 1, "tasks": 1}) == ("<=", 1.25)
    assert target_of("fused_vs_mlp", {"rank": 192, "clips": 8, "tasks": 4}) is None
    assert target_of("unfused_vs_fused", {"rank": 64, "clips": 8, "tasks": 1}) == (">=", 1.0)
    assert target_of("unfused_vs_fused", {"rank": 64, "clips": 8, "tasks": 4}) == (">=", 1.3)
    assert target_of("unfused_vs_fused", {"rank": 64, "clips": 8, "tasks": 2}) is None
    assert target_of("tflops_vs_cublas", {"rank": 64, "clips": 8, "tasks": 1}) == (">=", 0.8)


def test_pass_and_miss_lines():
    rows = [row(64, 8, 1, mlp_ms=1.0, eager_ms=1.2, fused_ms=1.08, cublas_ms=0.95),
            row(192, 8, 1, mlp_ms=1.0, eager_ms=1.2, fused_ms=1.08, cublas_ms=0.95),
            row(192, 8, 4, mlp_ms=1.0, eager_ms=1.2, fused_ms=1.0)]
    got = {(t["rank"], t["tasks"], t["kind"]): t["met"] for t in targets(rows)}
    assert got == {(64, 1, "fused_vs_mlp"): False, (192, 1, "fused_vs_mlp"): True,
                   (64, 1, "unfused_vs_fused"): True, (192, 1, "unfused_vs_fused"): True,
                   (64, 1, "tflops_vs_cublas"): True, (192, 1, "tflops_vs_cublas"): True,
                   (192, 4, "unfused_vs_fused"): False}
    report = {"machine": {"gpu": "NVIDIA H200", "torch": "2.11"}, "triton": "3.6",
              "config": {"dtype": "bfloat16", "tokens": 1214}, "results": rows,
              "targets": targets(rows), "errors": {"r64-1clips-1tasks/compiled": "boom"}}
    text = format_report(report)
    assert text.startswith("aat bench kernel on NVIDIA H200 (torch 2.11, triton 3.6), "
                           "bfloat16, 1214 tokens per clip")
    assert "MISS  r=64 8 clips 1 tasks fused_vs_mlp: 1.08 (target <= 1.05)" in text
    assert "PASS  r=192 8 clips 1 tasks fused_vs_mlp: 1.08 (target <= 1.1)" in text
    assert "MISS  r=192 8 clips 4 tasks unfused_vs_fused: 1.2 (target >= 1.3)" in text
    assert "5 of 7 targets met" in text
    assert "error r64-1clips-1tasks/compiled: boom" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_kernel_bench_says_the_figures_need_cuda(capsys):
    assert aat(["bench", "kernel", "--rank", "64"]) == 2
    err = capsys.readouterr().err
    assert "aat bench kernel needs a CUDA GPU" in err and "make gpu-check" in err
    assert aat(["bench", "kernel", "--rank", "0"]) == 1
    assert "--rank needs positive integers, got '0'" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parents[2]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_steps_are_bounded_under_eight_minutes():
    text = GPU_CHECK.read_text()
    limits = [int(n) for n in re.findall(r'^(?:pytest_)?step "[^"]+" (\d+) ', text, flags=re.M)]
    assert len(limits) == 4 and sum(limits) <= 8 * 60 - 15  # 15 s for start-up and printing
    assert "BEGIN model section" in text and "END model section" in text
    assert "make gpu-check" in (ROOT / "docs" / "benchmarks.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_check_without_cuda_says_so(tmp_path):
    proc = subprocess.run(["bash", str(GPU_CHECK)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path), "PY": sys.executable},
                          timeout=300)
    assert proc.returncode == 1
    assert (tmp_path / "summary.txt").read_text() == "no CUDA device or no triton: nothing " \
                                                     "to check\n"
    assert "sees no CUDA device" in proc.stderr
