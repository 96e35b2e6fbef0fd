"""The serving model on a GPU at ViT-B sizes: CUDA graph replay per batch bucket equals the
eager fused path, a hot swap needs no re-capture, host and device features give the same
replay, and the bf16 residual stream tracks the fp32 stream. Skipped without CUDA and Triton
(``make gpu-check`` runs them); the same logic runs on CPU in ``test_graphs.py``."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("safetensors")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.adapters.runners.graphs import GraphConfig
from aat_serve.bench.fixtures import CLIPS, FULL, random_bundle

R = 192
BF16_REL = 2e-2  # bf16 GEMMs; a padded bucket may tile the GEMMs differently


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = AST(FULL).eval().requires_grad_(False)
    fp = base.fingerprint()
    bundles = {f"t{i}": random_bundle(base, fp, f"t{i}", "aat_ms", 50, R, seed=i)
               for i in range(4)}
    return base, fp, bundles


def model(setup, names, graphs: bool, residual=torch.bfloat16) -> MultiTaskModel:
    base, fp, bundles = setup
    m = MultiTaskModel(copy.deepcopy(base), max_tasks=8, dtype=torch.bfloat16, device="cuda",
                       fingerprint=fp, bottleneck=R, residual_dtype=residual,
                       graphs=GraphConfig(buckets=(1, 2, 4, 8), fallback=False)
                       if graphs else None)  # a failed capture must fail the test
    assert m.backend == "triton"
    for n in names:
        m.load_task(bundles[n])
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def clips(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, CLIPS["1s"], FULL.num_mel_bins,
                       generator=torch.Generator().manual_seed(seed))


def test_graph_replay_equals_the_eager_fused_path(setup):
    graphed, eager = model(setup, ["t0", "t1", "t2"], True), model(setup, ["t0", "t1", "t2"],
                                                                    False)
    tasks = ["t0", "t1", "t2", "t0", "t1"]  # bucket 8: three padding clips
    x = clips(len(tasks), 0)
    first = graphed.classify(x, tasks)
    for a, b in zip(first, eager.classify(x, tasks), strict=True):
        assert rel(a, b) < BF16_REL
    assert graphed.graphs.captures == 1
    x2 = clips(len(tasks), 1)  # a replay computes new inputs
    again = graphed.classify(x2, tasks)
    assert graphed.graphs.captures == 1
    for a, b, old in zip(again, eager.classify(x2, tasks), first, strict=True):
        assert rel(a, b) < BF16_REL and rel(a, old) > 0.05
    other = graphed.classify(x2, ["t1"] * len(tasks))  # other tasks' weights: other answers
    assert rel(other[0], again[0]) > 0.05


def test_hot_swap_replays_the_new_weights_without_recapture(setup):
    base, fp, _ = setup
    graphed = model(setup, ["t0", "t1", "t2"], True)  # pools of 4 rows: one free
    x = clips(2, 2)
    before = graphed.classify(x, ["t0", "t0"])
    captures, pools = graphed.graphs.captures, graphed.slots.pools
    new = random_bundle(base, fp, "t0", "aat_ms", 50, R, seed=42)
    graphed.load_task(new)  # copy-on-write into the free row, in place
    assert graphed.slots.pools is pools
    after = graphed.classify(x, ["t0", "t0"])
    assert graphed.graphs.captures == captures
    eager = MultiTaskModel(copy.deepcopy(base), max_tasks=8, dtype=torch.bfloat16,
                           device="cuda", fingerprint=fp, bottleneck=R,
                           residual_dtype=torch.bfloat16)
    eager.load_task(new)
    for a, b, old in zip(after, eager.classify(x, ["t0", "t0"]), before, strict=True):
        assert rel(a, b) < BF16_REL and rel(a, old) > 0.05


def test_host_and_device_features_replay_alike(setup):
    graphed = model(setup, ["t0", "t3"], True)
    x = clips(3, 3)
    on_host = graphed.classify(x, ["t0", "t3", "t0"])
    on_device = graphed.classify(x.cuda(), ["t0", "t3", "t0"])
    for a, b in zip(on_host, on_device, strict=True):
        assert torch.equal(a, b)
    shifted = graphed.classify(x.roll(1, 0).cuda(), ["t0", "t3", "t0"])
    assert not torch.equal(shifted[1], on_device[1])


def test_bf16_stream_tracks_the_fp32_stream(setup):
    bf16 = model(setup, ["t0", "t1", "t2", "t3"], False)
    fp32 = model(setup, ["t0", "t1", "t2", "t3"], False, residual=torch.float32)
    x = clips(8, 4)
    tasks = [f"t{i % 4}" for i in range(8)]
    a, b = fp32.classify(x, tasks), bf16.classify(x, tasks)
    errs = [rel(lb, la) for la, lb in zip(a, b, strict=True)]
    assert max(errs) < 3e-2 and min(errs) > 0  # close, and really a different stream


def test_one_upload_and_one_download_per_batch(setup):
    from torch.profiler import ProfilerActivity, profile

    graphed = model(setup, ["t0", "t1"], True)
    x = clips(3, 5)
    tasks = ["t0", "t1", "t0"]
    for features in (x, x.cuda()):  # host features: one packed upload; device: rows only
        graphed.classify(features, tasks)  # captured before profiling
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            graphed.classify(features, tasks)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        assert sum("HtoD" in n for n in names) == 1, names
        assert sum("DtoH" in n for n in names) == 1, names
