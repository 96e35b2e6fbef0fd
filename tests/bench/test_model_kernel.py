"""``aat bench model|kernel``: a tiny run's report is complete, consistent and checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aat_serve.bench.fixtures import QUICK
from aat_serve.cli.main import main as aat

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def report():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = aat(["bench", "model", "--quick", "--device", "cpu", "--clips", "1s",
                    "--batches", "1,4", "--memory-tasks", "1,2", "--agreement-clips", "8",
                    "--runtime", "onnxruntime", "--glibc-defaults", "--json"])
    assert code == 0
    return json.loads(buf.getvalue())


def test_baseline_is_transformers_on_the_same_weights(report):
    # fp32 logits of transformers' ASTForAudioClassification vs ours for a head-only task
    assert report["parity_max_abs_diff"]["1s"] < 1e-4


def test_throughput_rows_and_ratios(report):
    rows = {(r["batch"], r["variant"]): r for r in report["throughput"]}
    assert set(rows) == {(1, "hf-fp32"), (1, "fp32-single"), (1, "bf16-single"),
                         (4, "hf-fp32"), (4, "fp32-single"), (4, "bf16-single"),
                         (4, "fp32-mixed4"), (4, "bf16-mixed4"),
                         (1, "ort-single"), (4, "ort-single"), (4, "ort-mixed4")}
    for (b, _), r in rows.items():
        assert r["clips_per_s"] == pytest.approx(b / min(r["runs_s"]))
        assert len(r["runs_s"]) == 1 and r["best_s"] == r["median_s"] > 0
    ratios = report["ratios"]["1s-b4"]
    hf = rows[(4, "hf-fp32")]["clips_per_s"]
    assert ratios["fp32_vs_hf"] == round(rows[(4, "fp32-single")]["clips_per_s"] / hf, 3)
    assert ratios["mixed4_vs_single_bf16"] == round(
        rows[(4, "bf16-mixed4")]["clips_per_s"] / rows[(4, "bf16-single")]["clips_per_s"], 3)
    assert ratios["ort_vs_torch_fp32"] == round(
        rows[(4, "ort-single")]["clips_per_s"] / rows[(4, "fp32-single")]["clips_per_s"], 3)
    assert "mixed4_vs_single_fp32" not in report["ratios"]["1s-b1"]  # one clip cannot mix
    for t in report["targets"]:
        assert t["met"] == (t["value"] >= t["target"])


def test_agreement_and_memory(report):
    a = report["agreement"]["1s"]
    assert a["clips"] == 8 and 0.0 <= a["top1_agreement"] <= 1.0
    assert 0 < a["max_logit_rel_err"] < 0.1  # bf16 differs from fp32, but not by much
    d, depth, r = QUICK.embed_dim, QUICK.depth, QUICK.embed_dim // 4
    per_adapter = 2 * d * r + r + d
    for row in report["memory"]:
        size = 4 if row["dtype"] == "fp32" else 2
        expected = row["tasks"] * 2 * depth * per_adapter * size / 2**20  # MLP + spatial
        assert row["pools_mb"] == pytest.approx(expected)
    assert [(r["dtype"], r["tasks"]) for r in report["memory"]] == [
        ("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]


def test_bad_arguments_are_clear_errors(capsys):
    assert aat(["bench", "model", "--quick", "--clips", "2s"]) == 1
    assert "unknown clip length '2s'; expected one of 1s, 10s" in capsys.readouterr().err
    assert aat(["bench", "model", "--quick", "--batches", "0"]) == 1
    assert "--batches needs positive integers" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_kernel_bench_needs_cuda(capsys):
    assert aat(["bench", "kernel", "--json"]) == 2
    assert "aat bench kernel needs a CUDA GPU" in capsys.readouterr().err


def test_kernel_bench_baselines_compute_the_fused_op():
    """The unfused baselines of ``aat bench kernel`` compute the op the kernels compute."""
    from aat_serve.adapters.kernels import (
        AdapterPool,
        MlpWeights,
        mlp_adapter_reference,
        widened_weights,
    )
    from aat_serve.bench.kernel import _eager, _mlp_only, _widened

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mlp = MlpWeights(rnd(32, 16), rnd(32), rnd(16, 32), rnd(16))
    pool = AdapterPool(rnd(3, 16, 8), rnd(3, 8), rnd(3, 8, 16), rnd(3, 16))
    x, h = rnd(30, 16), rnd(30, 16)
    segs = [(0, 10, 0), (10, 30, 2)]
    rows = torch.tensor([0] * 10 + [2] * 20, dtype=torch.int32)
    ref = mlp_adapter_reference(x, h, mlp, pool, rows)
    wide = {s: widened_weights(mlp, pool, s) for s in range(3)}
    torch.testing.assert_close(_eager(x, h, mlp, pool, segs), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(_widened(x, h, wide, segs), ref, atol=1e-10, rtol=0)
    assert (_mlp_only(x, h, mlp) - ref).abs().max() > 1e-3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_sets_glibc_thresholds():
    code = ("from aat_serve.adapters.kernels.cpu import keep_freed_memory as k; import torch; "
            "print(k()); x = [torch.empty(4 << 20) for _ in range(3)]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "True"
