"""The fused kernels compiled on a CUDA GPU at real ViT-B sizes (skipped without CUDA).

Run by ``scripts/gpu_check.sh``. References: the fp64 torch reference for fp32, and for bf16
the eager bf16 path (the same rounding points a bf16 model has without the kernels). Every
candidate the dispatcher may pick (route a, route b, the spatial kernel; all configurations)
is checked on its own, as is the dispatcher's choice and its table.
"""

from __future__ import annotations

import copy

import pytest
import torch

from aat_serve.adapters.kernels import (
    AdapterPool,
    MlpWeights,
    Plans,
    mlp_adapter,
    mlp_adapter_reference,
    spatial_adapter,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

D, H, R, TOKENS = 768, 3072, 192, 1214


def operands(clip_slots: list[int], dtype: torch.dtype, slots: int = 8, seed: int = 0,
             with_mlp: bool = True, rank: int = R):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    m = len(clip_slots) * TOKENS
    mlp = MlpWeights(rnd(H, D), rnd(H), rnd(D, H), rnd(D)) if with_mlp else None
    pool = AdapterPool(rnd(slots, D, rank), rnd(slots, rank), rnd(slots, rank, D, scale=0.2),
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


def _bucket(op: str, x, h, mlp, pool, plans):
    from aat_serve.adapters.kernels.autotune import bucket_of

    return bucket_of(op, x, h, mlp.hidden if mlp is not None else 0, pool.rank, plans.segments)


def _candidates(op: str, clips: int):
    from aat_serve.adapters.kernels.autotune import Bucket
    from aat_serve.adapters.kernels.candidates import all_candidates

    rows = 1 << (clips * TOKENS - 1).bit_length()
    b = Bucket(op, D, H if op == "mlp" else 0, R, "bfloat16", "bfloat16", rows, 4)
    return {c.name: c for c in all_candidates(b) if c.name != "unfused"}


ONE_CLIP = _candidates("mlp", 1) if torch.cuda.is_available() else {}
MANY = _candidates("mlp", 8) if torch.cuda.is_available() else {}
SPATIAL = _candidates("spatial", 8) if torch.cuda.is_available() else {}


@pytest.mark.parametrize("name", sorted(ONE_CLIP.keys() | MANY.keys()))
@pytest.mark.parametrize("rank", [64, 192])
def test_every_mlp_candidate_bf16(name, rank):
    layout = [0, 0, 1, -1, 2, 2] if name in MANY else [5]
    x, h, mlp, pool, rows = operands(layout, torch.bfloat16, rank=rank)
    cand = MANY.get(name) or ONE_CLIP[name]
    out = cand.run(x, h, mlp, pool, Plans(rows))
    eager = mlp_adapter_reference(x, h, mlp, pool, rows)
    exact = mlp_adapter_reference(x, h, mlp, pool, rows, compute_dtype=torch.float64)
    assert out.dtype == torch.bfloat16 and rel(out, eager) < 1e-2
    assert rel(out, exact) <= 1.5 * rel(eager, exact) + 1e-3
    zero = AdapterPool(*(torch.zeros_like(t) for t in pool.tensors()))
    assert rel(out, mlp_adapter_reference(x, h, mlp, zero, rows)) > 1e-2


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_every_spatial_candidate_bf16(name):
    x, a, _, pool, rows = operands([0, 0, -1, 3], torch.bfloat16, with_mlp=False)
    x32 = x.float()
    for xx in (x, x32):  # bf16 and fp32 residual streams
        out = SPATIAL[name].run(xx, a, pool, Plans(rows))
        exact = mlp_adapter_reference(xx.double() + a.double(), a, None, pool, rows,
                                      compute_dtype=torch.float64)
        assert out.dtype == xx.dtype and rel(out, exact) < 1e-2
    assert rel(out, x32 + a.float()) > 1e-2  # the adapter contributes


def test_spatial_op_dispatches_and_matches():
    x, a, _, pool, rows = operands([1, 1, 2], torch.bfloat16, with_mlp=False)
    out = spatial_adapter(x, a, pool, rows, backend="triton")
    exact = mlp_adapter_reference(x.double() + a.double(), a, None, pool, rows,
                                  compute_dtype=torch.float64)
    assert rel(out, exact) < 1e-2


def test_dispatcher_choice_is_never_slower_than_unfused():
    from aat_serve.adapters.kernels.candidates import dispatcher

    for layout in ([3], [0, 0, 1, 1, 2, 2, 3, 3]):
        x, h, mlp, pool, rows = operands(layout, torch.bfloat16)
        plans = Plans(rows)
        mlp_adapter(x, h, mlp, pool, rows, backend="triton", plans=plans)
        entry = dispatcher(x.device).table.entries[_bucket("mlp", x, h, mlp, pool, plans).key]
        t = entry["timings_ms"]
        assert t[entry["choice"]] <= t["unfused"] and len(t) >= 3, entry
        assert not any("differs" in v for v in entry["rejected"].values()), entry["rejected"]


def test_kernel_table_file_round_trip(tmp_path, monkeypatch):
    from aat_serve.adapters.kernels import candidates
    from aat_serve.adapters.kernels.autotune import KernelTable

    path = tmp_path / "kernels.json"
    monkeypatch.setenv("AAT_KERNEL_TABLE", str(path))
    monkeypatch.setattr(candidates, "_DISPATCHERS", {})
    x, h, mlp, pool, rows = operands([0, 1], torch.bfloat16)
    plans = Plans(rows)
    mlp_adapter(x, h, mlp, pool, rows, backend="triton", plans=plans)
    env = candidates.environment(x.device)
    assert torch.cuda.get_device_name() in env
    key = _bucket("mlp", x, h, mlp, pool, plans).key
    again = KernelTable(env, path)
    assert again.choice(key) == candidates.dispatcher(x.device).table.choice(key) is not None
    assert KernelTable("another GPU|torch 0|triton 0", path).choice(key) is None


def test_cuda_graph_with_plans_bounded_by_clips():
    x, h, mlp, pool, rows = operands([0, 1, 1], torch.bfloat16)
    plans = Plans(rows, max_segments=3)
    mlp_adapter(x, h, mlp, pool, rows, backend="triton", plans=plans)  # measure first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = mlp_adapter(x, h, mlp, pool, rows, backend="triton",
                             plans=Plans(rows, max_segments=3))
    rows.copy_(torch.tensor([2, -1, 6], dtype=torch.int32).repeat_interleave(TOKENS).cuda())
    graph.replay()
    expected = mlp_adapter_reference(x, h, mlp, pool, rows, compute_dtype=torch.float64)
    assert rel(static, expected) < 1e-2
