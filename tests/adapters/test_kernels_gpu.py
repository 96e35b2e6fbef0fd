"""The fused kernels compiled on a CUDA GPU at real ViT-B sizes (skipped without CUDA).

Run by ``scripts/gpu_check.sh``. References: the fp64 torch reference for fp32, and for bf16
the eager bf16 path (the same rounding points a bf16 model has without the kernels).
"""

from __future__ import annotations

import copy

import pytest
import torch

from aat_serve.adapters.kernels import AdapterPool, MlpWeights, mlp_adapter, mlp_adapter_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

D, H, R, TOKENS = 768, 3072, 192, 1214


def operands(clip_slots: list[int], dtype: torch.dtype, slots: int = 8, seed: int = 0,
             with_mlp: bool = True):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    m = len(clip_slots) * TOKENS
    mlp = MlpWeights(rnd(H, D), rnd(H), rnd(D, H), rnd(D)) if with_mlp else None
    pool = AdapterPool(rnd(slots, D, R), rnd(slots, R), rnd(slots, R, D, scale=0.2),
                       rnd(slots, D))
    rows = torch.tensor(clip_slots, dtype=torch.int32).repeat_interleave(TOKENS).cuda()
    return rnd(m, D, scale=1.0), rnd(m, D, scale=1.0), mlp, pool, rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


LAYOUTS = {
    "one-clip": [3],
    "two-tasks": [0, 5],
    "four-tasks-sorted": [0, 0, 1, 2, 2, 2, 6, 7],
    "no-adapter-clip": [-1, 1, 1, 4],
    "unsorted": [2, 0, 2, -1, 1],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_matches_eager_bf16(layout):
    x, h, mlp, pool, rows = operands(LAYOUTS[layout], torch.bfloat16)
    out = mlp_adapter(x, h, mlp, pool, rows, backend="triton")
    eager = mlp_adapter_reference(x, h, mlp, pool, rows)  # bf16 torch ops on the GPU
    exact = mlp_adapter_reference(x, h, mlp, pool, rows, compute_dtype=torch.float64)
    assert out.dtype == torch.bfloat16
    assert rel(out, eager) < 1e-2
    assert rel(out, exact) <= 1.5 * rel(eager, exact) + 1e-3  # no worse than eager bf16
    zero = AdapterPool(*(torch.zeros_like(t) for t in pool.tensors()))
    plain = mlp_adapter_reference(x, h, mlp, zero, rows, compute_dtype=torch.float64)
    if any(s >= 0 for s in LAYOUTS[layout]):
        assert rel(out, plain) > 1e-2  # the adapters contribute


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp32_and_fp16_match_fp64(dtype):
    x, h, mlp, pool, rows = operands([0, 0, 3, -1], dtype)
    out = mlp_adapter(x, h, mlp, pool, rows, backend="triton")
    exact = mlp_adapter_reference(x, h, mlp, pool, rows, compute_dtype=torch.float64)
    assert rel(out, exact) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_bf16_operands_with_fp32_residual():
    x, h, mlp, pool, rows = operands([0, 2, 2], torch.bfloat16)
    x32 = x.float() + 0.001  # not representable in bf16
    out = mlp_adapter(x32, h, mlp, pool, rows, backend="triton")
    exact = mlp_adapter_reference(x32, h, mlp, pool, rows, compute_dtype=torch.float64)
    assert out.dtype == torch.float32 and rel(out, exact) < 1e-2


def test_adapter_only_form_bf16():
    x, h, _, pool, rows = operands([1, 2], torch.bfloat16, with_mlp=False)
    out = mlp_adapter(x, h, None, pool, rows, backend="triton")
    exact = mlp_adapter_reference(x, h, None, pool, rows, compute_dtype=torch.float64)
    assert rel(out, exact) < 1e-2


def test_cuda_graph_replay_with_another_task_mix():
    x, h, mlp, pool, rows = operands([0, 1], torch.bfloat16)
    out = mlp_adapter(x, h, mlp, pool, rows, backend="triton")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = mlp_adapter(x, h, mlp, pool, rows, backend="triton")
    rows.copy_(torch.tensor([4, -1], dtype=torch.int32).repeat_interleave(TOKENS).cuda())
    graph.replay()
    expected = mlp_adapter_reference(x, h, mlp, pool, rows, compute_dtype=torch.float64)
    assert rel(static, expected) < 1e-2
    assert rel(static, out) > 1e-2  # the replay really used the new slots


def test_multitask_model_on_cuda_matches_cpu(monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 patch conv
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    from aat_serve.adapters.multitask import MultiTaskModel
    from tests.helpers import TINY_TASKS, random_bundle, tiny_backbone

    base = tiny_backbone(seed=0)
    bundles = [random_bundle(base, n, m, c, seed=i, bottleneck=8, num_prompts=3)
               for i, (n, m, c) in enumerate(TINY_TASKS)]
    cpu = MultiTaskModel(copy.deepcopy(base), bottleneck=8)
    gpu = MultiTaskModel(copy.deepcopy(base), bottleneck=8, device="cuda")
    assert gpu.backend == "triton"
    for b in bundles:
        cpu.load_task(b)
        gpu.load_task(b)
    tasks = ["ms", "hd", "m", "ms", "jt", "pr", "m", "ms"]
    x = torch.randn(len(tasks), 64, 32)
    for a, b in zip(cpu.classify(x, tasks), gpu.classify(x, tasks), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
