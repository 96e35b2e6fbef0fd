"""The bf16 residual stream (``MultiTaskModel(residual_dtype=torch.bfloat16)``): close to the fp32
stream (both with bf16 GEMMs) at a bf16 tolerance, yet really different, for the segments and
the fused (torch) runners; and refused where it makes no sense."""

from __future__ import annotations

import copy

import pytest
import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.adapters.runners.graphs import GraphConfig
from tests.helpers import TINY_TASKS, random_bundle, tiny_backbone

R = 8


@pytest.fixture(scope="module")
def base():
    return tiny_backbone(seed=0)


@pytest.fixture(scope="module")
def bundles(base):
    return [random_bundle(base, name, method, c, seed=20 + i, bottleneck=R, num_prompts=3)
            for i, (name, method, c) in enumerate(TINY_TASKS)]


def model(base, bundles, **kw) -> MultiTaskModel:
    m = MultiTaskModel(copy.deepcopy(base), bottleneck=R, dtype=torch.bfloat16, **kw)
    for b in bundles:
        m.load_task(b)
    return m


@pytest.mark.parametrize("backend", ["segments", "torch"])
def test_bf16_stream_tracks_the_fp32_stream(base, bundles, backend):
    fp32 = model(base, bundles, backend=backend)
    bf16 = model(base, bundles, backend=backend, residual_dtype=torch.bfloat16)
    streams: list[torch.dtype] = []
    hook = bf16.backbone.blocks[0].norm2.register_forward_pre_hook(
        lambda _, args: streams.append(args[0].dtype))
    tasks = [name for name, _, _ in TINY_TASKS for _ in range(2)] + ["ms"]  # mixed, one single
    x = torch.randn(len(tasks), 64, 32, generator=torch.Generator().manual_seed(3))
    a, b = fp32.classify(x, tasks), bf16.classify(x, tasks)
    b_single = bf16.classify(x[:3], ["m"] * 3)  # segments: the widened single-task path
    hook.remove()
    assert set(streams) == {torch.bfloat16}  # the stream really is bf16 into the LayerNorm
    for la, lb in zip(a, b, strict=True):
        assert lb.dtype == torch.float32
        assert (la - lb).abs().max() < 0.03 * la.abs().max() + 0.01
    assert max(float((la - lb).abs().max()) for la, lb in zip(a, b, strict=True)) > 1e-4
    for la, lb in zip(fp32.classify(x[:3], ["m"] * 3), b_single, strict=True):
        assert 0 < (la - lb).abs().max() < 0.03 * la.abs().max() + 0.01


def test_graph_replay_of_the_bf16_stream_equals_eager(base, bundles):
    eager = model(base, bundles, backend="torch", residual_dtype=torch.bfloat16)
    graphed = model(base, bundles, backend="torch", residual_dtype=torch.bfloat16,
                    graphs=GraphConfig(buckets=(4,), capture="eager"))
    x = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(4))
    for la, lb in zip(eager.classify(x, ["ms", "m", "hd"]), graphed.classify(x, ["ms", "m", "hd"]),
                      strict=True):
        torch.testing.assert_close(lb, la, atol=2e-2, rtol=0)  # bf16; bucket 4 pads one clip


def test_a_bf16_stream_needs_bf16_gemms(base):
    with pytest.raises(ConfigError, match=r"^the residual stream must be float32 or the GEMM "
                                          r"dtype torch\.float32, got torch\.bfloat16$"):
        MultiTaskModel(copy.deepcopy(base), bottleneck=R, residual_dtype=torch.bfloat16)
