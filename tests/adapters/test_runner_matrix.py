"""Every bundle method through every runner: a mixed-task batch equals each task alone, and
another task's weights give another answer (see ``runner_matrix``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adapters import runner_matrix

ROOT = Path(__file__).resolve().parents[2]
# runner -> largest allowed error against the torch reference (fp32 throughout)
RUNNERS = {"segments": 1e-5, "torch": 1e-5, "interpret": 1e-4, "onnxruntime": 1e-4}
DIFFERS = 1e-3


def _interpreted() -> dict[str, dict[str, float]]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.adapters.runner_matrix", "interpret"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def matrix():
    """Each runner's results, computed once on first use."""
    cache: dict[str, dict[str, dict[str, float]]] = {}

    def get(runner: str) -> dict[str, dict[str, float]]:
        if runner not in cache:
            if runner == "interpret":
                cache[runner] = _interpreted()
            else:
                if runner == "onnxruntime":
                    pytest.importorskip("onnxruntime")
                cache[runner] = runner_matrix.cell_results(runner)
        return cache[runner]

    return get


@pytest.mark.parametrize("method", runner_matrix.METHODS)
@pytest.mark.parametrize("runner", list(RUNNERS))
def test_mixed_batch_equals_each_task_alone(matrix, runner, method):
    assert matrix(runner)[method]["equal"] < RUNNERS[runner]


@pytest.mark.parametrize("method", runner_matrix.METHODS)
@pytest.mark.parametrize("runner", list(RUNNERS))
def test_another_tasks_weights_differ(matrix, runner, method):
    assert matrix(runner)[method]["differs"] > DIFFERS
