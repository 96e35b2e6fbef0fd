"""The fused MLP + adapter op: reference semantics, layouts, dispatch, and the Triton kernels.

The kernels run under Triton's interpreter in a child process (``kernel_cases.py``):
``TRITON_INTERPRET=1`` must be set before the kernels are first imported, and setting it in
this process would leak into every other test. Real-size bf16 runs are GPU-only
(``test_kernels_gpu.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aat_serve.adapters.backbone import Block
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels import (
    AdapterPool,
    MlpWeights,
    mlp_adapter,
    mlp_adapter_reference,
    mlp_adapter_widened,
    resolve_backend,
    row_slots,
    segments,
    sort_by_slot,
)
from aat_serve.adapters.kernels.reference import mlp_adapter_eager
from aat_serve.adapters.modules import Adapter
from tests.adapters import kernel_cases
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Relative Frobenius error against the fp64 reference: fp32 is exact up to summation order;
# fp16/bf16 round the inputs' products' sums and act once (bf16 has an 8-bit mantissa).
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}


def random_operands(m=40, d=16, h=32, r=8, slots=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype) * 0.5

    mlp = MlpWeights(rnd(h, d), rnd(h), rnd(d, h), rnd(d))
    pool = AdapterPool(rnd(slots, d, r), rnd(slots, r), rnd(slots, r, d), rnd(slots, d))
    rows = torch.tensor([-1] * 3 + [0] * 10 + [2] * 20 + [-1] * (m - 33), dtype=torch.int32)
    return rnd(m, d), rnd(m, d), mlp, pool, rows


def test_widened_mlp_equals_two_branch_form():
    x, h, mlp, pool, rows = random_operands()
    two = mlp_adapter_reference(x, h, mlp, pool, rows)
    wide = mlp_adapter_widened(x, h, mlp, pool, rows)
    torch.testing.assert_close(wide, two, atol=1e-12, rtol=0)
    zero = AdapterPool(*(torch.zeros_like(t) for t in pool.tensors()))
    plain = mlp_adapter_reference(x, h, mlp, zero, rows)
    assert (two - plain)[3:33].abs().min(dim=1).values.gt(0).all()  # adapter rows moved
    torch.testing.assert_close(two[:3], plain[:3], atol=0, rtol=0)  # -1 rows did not


def test_eager_path_equals_reference_on_unsorted_rows():
    x, h, mlp, pool, rows = random_operands()
    rows = torch.tensor([2, 2, -1, 0, 0, 2, -1, 1] * 5, dtype=torch.int32)  # runs recur
    ref = mlp_adapter_reference(x, h, mlp, pool, rows)
    torch.testing.assert_close(mlp_adapter_eager(x, h, mlp, pool, rows), ref, atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(mlp_adapter_eager(x, h, None, pool, rows),
                               mlp_adapter_reference(x, h, None, pool, rows), atol=1e-12, rtol=0)
    plain = mlp_adapter_eager(x, h, mlp, pool, torch.full_like(rows, -1))
    assert (plain - ref).abs().max() > 1e-3


def test_reference_matches_the_models_block_formula():
    """``x + MLP(h) + A(h)`` with the block's own modules, for one slot."""
    torch.manual_seed(0)
    block = Block(tiny_config()).double()
    block.mlp_adapter = Adapter(32, 8).double()
    torch.nn.init.normal_(block.mlp_adapter.fc2.weight)
    x = torch.randn(5, 32, dtype=torch.float64)
    h = block.norm2(x)
    expected = x + block.mlp(h) + block.mlp_adapter(h)
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    mlp = MlpWeights(fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    pool = AdapterPool.zeros(3, 32, 12, dtype=torch.float64)  # rank 12 > 8: zero padding
    a = block.mlp_adapter
    pool.write(2, a.fc1.weight, a.fc1.bias, a.fc2.weight, a.fc2.bias)
    with torch.no_grad():
        got = mlp_adapter_reference(x, h, mlp, pool, torch.full((5,), 2, dtype=torch.int32))
        plain = mlp_adapter_reference(x, h, mlp, pool, torch.full((5,), 0, dtype=torch.int32))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert (plain - expected).abs().max() > 1e-3


def test_pool_write_clear_and_grow():
    pool = AdapterPool.zeros(2, 4, 3)
    w1, b1, w2, b2 = torch.randn(2, 4), torch.randn(2), torch.randn(4, 2), torch.randn(4)
    pool.write(1, w1, b1, w2, b2)
    torch.testing.assert_close(pool.w_down[1, :, :2], w1.t())
    assert pool.w_down[1, :, 2].abs().sum() == 0 and pool.w_down[0].abs().sum() == 0
    torch.testing.assert_close(pool.w_up[1, :2], w2.t())
    bigger = pool.grown(5)
    assert bigger.slots == 5 and torch.equal(bigger.w_up[1], pool.w_up[1])
    assert bigger.b_up[2:].abs().sum() == 0
    pool.clear(1)
    assert all(t.abs().sum() == 0 for t in pool.tensors())
    with pytest.raises(ConfigError, match=r"adapter of shape \(4, 4\) does not fit .* rank 3"):
        pool.write(0, torch.randn(4, 4), torch.randn(4), torch.randn(4, 4), torch.randn(4))


def test_batch_metadata():
    order, inverse = sort_by_slot(torch.tensor([3, 1, 3, -1, 1, 0]))
    assert order.tolist() == [3, 5, 1, 4, 0, 2]  # stable: equal slots keep their order
    assert torch.equal(order[inverse], torch.arange(6))
    assert segments([-1, 0, 1, 1, 3, 3]) == [(0, 1, -1), (1, 2, 0), (2, 4, 1), (4, 6, 3)]
    assert segments([]) == []
    rows = row_slots(torch.tensor([2, -1]), 3)
    assert rows.dtype == torch.int32 and rows.tolist() == [2, 2, 2, -1, -1, -1]


def test_dispatch_on_cpu():
    x, h, mlp, pool, rows = random_operands(dtype=torch.float32)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    torch.testing.assert_close(mlp_adapter(x, h, mlp, pool, rows),
                               mlp_adapter_reference(x, h, mlp, pool, rows), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="unknown kernel backend 'cuda'"):
        resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(ConfigError, match="the triton backend needs CUDA tensors, got cpu"):
        mlp_adapter(x, h, mlp, pool, rows, backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter already on")
def test_interpreter_must_be_chosen_before_import():
    x, h, mlp, pool, rows = random_operands(dtype=torch.float32)
    with pytest.raises(ConfigError, match="needs TRITON_INTERPRET=1 in the environment"):
        mlp_adapter(x, h, mlp, pool, rows, backend="interpret")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_kernel_launcher_validates_operands():
    from aat_serve.adapters.kernels.triton_mlp import fused_mlp_adapter

    x, h, mlp, pool, rows = random_operands(dtype=torch.float32)
    with pytest.raises(ConfigError, match="row_slot must be int32 of shape"):
        fused_mlp_adapter(x, h, mlp, pool, rows.long())
    with pytest.raises(ConfigError, match=r"all kernel operands must be torch\.float16"):
        fused_mlp_adapter(x, h.half(), mlp, pool, rows)
    with pytest.raises(ConfigError, match=r"the residual x must be torch\.float16 or float32"):
        half = MlpWeights(*(t.half() for t in (mlp.w1, mlp.b1, mlp.w2, mlp.b2)))
        fused_mlp_adapter(x.bfloat16(), h.half(), half,
                          AdapterPool(*(t.half() for t in pool.tensors())), rows)
    with pytest.raises(ConfigError, match=r"x and h must both be \(M, D\)"):
        fused_mlp_adapter(x, h[:3], mlp, pool, rows)


@pytest.fixture(scope="module")
def interpreted():
    """Every case of ``kernel_cases`` run once in a child process with the interpreter on."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.adapters.kernel_cases"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", kernel_cases.CASES)
def test_interpreted_kernels_match_fp64_reference(interpreted, case):
    res = interpreted[case]
    assert "error" not in res, res.get("error")
    layout, dt = case.split("/")[1].rsplit("-", 1)
    assert res["err"] < TOL[dt], res
    assert res["dtype_ok"] == 1.0
    if layout in ("multitask-model", "mlp", "spatial"):
        return  # vs single-task models / every dispatcher candidate run (see kernel_cases)
    if layout in ("zero-adapters-equal-plain-mlp", "all-rows-without-adapter"):
        assert res["vs_plain"] < TOL[dt]  # no adapter contributes: the plain MLP
    else:
        assert res["vs_plain"] > 0.1  # the adapters really changed the output
