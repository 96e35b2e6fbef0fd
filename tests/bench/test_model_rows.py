"""The serving rows of ``aat bench model``: PASS / MISS logic, and a tiny CPU run's report."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from aat_serve.bench.model_rows import SERVING_TARGETS, busy_ms, verdicts, wall_ms
from aat_serve.cli.main import main as aat


def report(device: str, mix: float | None, wall_over_busy: float | None,
           top1: float | None) -> dict:
    return {"device": device, "tasks": 4, "clip": "10s", "batch": 32, "mix": {},
            "mix_vs_hf_bf16": mix,
            "batch1": None if wall_over_busy is None else {"wall_over_busy": wall_over_busy},
            "agreement": {"overall": top1}}


def statuses(r: dict) -> list[str]:
    return [v["status"] for v in verdicts(r)]


def test_targets_are_the_issues():
    assert SERVING_TARGETS == {"mix_vs_hf_bf16": 0.90, "batch1_wall_over_busy": 1.2,
                               "residual_top1": 0.99}


@pytest.mark.parametrize(("mix", "wall", "top1", "expected"), [
    (0.95, 1.1, 0.995, ["PASS", "PASS", "PASS"]),
    (0.90, 1.2, 0.99, ["PASS", "PASS", "PASS"]),  # the bounds themselves pass
    (0.89, 1.21, 0.989, ["MISS", "MISS", "MISS"]),
    (0.95, 6.5, 0.999, ["PASS", "MISS", "PASS"]),  # launch-bound: wall far above busy
    (None, None, None, ["not measured", "not measured", "not measured"]),
])
def test_pass_and_miss_on_cuda(mix, wall, top1, expected):
    assert statuses(report("cuda:0", mix, wall, top1)) == expected


def test_gpu_targets_need_cuda_on_a_cpu():
    v = verdicts(report("cpu", 1.5, None, 0.98))
    assert [x["status"] for x in v] == ["needs CUDA", "needs CUDA", "MISS"]
    assert v[0]["value"] == 1.5  # what was measured is still shown
    assert v[0]["what"] == ("4-task mix, bf16, 10s clips, batch 32 vs transformers bf16 "
                            "(no adapters)")
    assert (v[1]["op"], v[1]["target"]) == ("<=", 1.2)


def test_timers_off_cuda():
    calls = []
    assert wall_ms(lambda: calls.append(1), torch.device("cpu"), 4) >= 0
    assert len(calls) == 5  # one warm-up call, then the timed ones
    assert busy_ms(lambda: None, torch.device("cpu")) is None  # GPU busy time needs CUDA


def test_quick_serving_only_run_on_cpu():
    pytest.importorskip("transformers")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = aat(["bench", "model", "--quick", "--device", "cpu", "--clips", "1s",
                    "--serving-only", "--serving-batch", "4", "--glibc-defaults", "--json"])
    assert code == 0
    r = json.loads(buf.getvalue())
    assert "throughput" not in r and "targets" not in r  # only the serving rows
    s = r["serving"]
    assert (s["device"], s["batch"], s["clip"], s["graphs"], s["batch1"]) == (
        "cpu", 4, "1s", False, None)
    assert set(s["mix"]) == {"hf-bf16", "bf16-stream", "fp32-stream"}
    assert s["graph_failures"] == {}
    assert s["mix_vs_hf_bf16"] == round(s["mix"]["bf16-stream"]["clips_per_s"]
                                        / s["mix"]["hf-bf16"]["clips_per_s"], 3)
    a = s["agreement"]["1s"]
    assert a["clips"] == 8 and 0 < a["max_logit_rel_err"] < 0.1  # differs, but not by much
    assert set(a["disagreements_by_task"]) == {"task0", "task1", "task2", "task3"}
    assert sum(a["disagreements_by_task"].values()) == round(8 * (1 - a["top1_agreement"]))
    assert [v["status"] for v in s["verdicts"]][:2] == ["needs CUDA", "needs CUDA"]
    assert s["verdicts"][2]["status"] == ("PASS" if a["top1_agreement"] >= 0.99 else "MISS")


def test_serving_batch_must_be_positive(capsys):
    assert aat(["bench", "model", "--quick", "--serving-only", "--serving-batch", "0"]) == 1
    assert "--serving-batch must be at least 1, got 0" in capsys.readouterr().err
