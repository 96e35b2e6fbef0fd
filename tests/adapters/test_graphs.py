"""Graph replay per batch bucket (``runners.graphs``) on CPU through the eager capture backend:
padding, static buffers, hot swap without re-capture, re-capture when the pools grow, the bound
on live graphs, the eager fallback, and the settings that choose graphs.

The real ``torch.cuda.CUDAGraph`` path is tested at ViT-B sizes in ``test_model_gpu.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.adapters.runners.graphs import GraphCache, GraphConfig, default_buckets, graph_config
from tests.helpers import TINY_TASKS, random_bundle, tiny_backbone

R = 8
ATOL = 1e-5  # fp32; a padded batch may only change the summation order
EAGER = GraphConfig(buckets=(1, 2, 4, 8), capture="eager")


@pytest.fixture(scope="module")
def base():
    return tiny_backbone(seed=0)


@pytest.fixture(scope="module")
def bundles(base):
    return {name: random_bundle(base, name, method, c, seed=10 + i, bottleneck=R, num_prompts=3)
            for i, (name, method, c) in enumerate(TINY_TASKS)}


def model(base, bundles=(), graphs: GraphConfig | None = EAGER, **kw) -> MultiTaskModel:
    m = MultiTaskModel(copy.deepcopy(base), bottleneck=R, backend="torch", graphs=graphs, **kw)
    for b in bundles:
        m.load_task(b)
    return m


def features(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 64, 32, generator=torch.Generator().manual_seed(seed))


def close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = ATOL) -> None:
    assert len(a) == len(b)
    for la, lb in zip(a, b, strict=True):
        torch.testing.assert_close(la, lb, atol=atol, rtol=0)


def test_padded_replay_equals_the_eager_runner(base, bundles):
    graphed, eager = model(base, bundles.values()), model(base, bundles.values(), graphs=None)
    tasks = ["ms", "hd", "m", "ms", "jt", "pr", "m"]  # 2 groups: no prompts (5), 3 prompts (2)
    x = features(len(tasks), 0)
    close(graphed.classify(x, tasks), eager.classify(x, tasks))
    # 5 clips ran in bucket 8 (3 padding clips), the two prompt tasks in bucket 2
    assert sorted(graphed.graphs.keys()) == [(2, 64, 3, True), (8, 64, 0, True)]
    # another "ms" (same head, other adapters) answers differently: the graph used the pools
    swapped = {**bundles, "ms": random_bundle(base, "ms", "aat_ms", 3, seed=77, bottleneck=R)}
    swapped["ms"].tensors.update({k: v for k, v in bundles["ms"].tensors.items()
                                  if k.startswith("head.")})
    other = model(base, swapped.values(), graphs=None).classify(x, tasks)
    assert (graphed.classify(x, tasks)[0] - other[0]).abs().max() > 1e-3


def test_a_smaller_batch_in_the_same_bucket_resets_the_padding(base, bundles):
    graphed, eager = model(base, bundles.values()), model(base, bundles.values(), graphs=None)
    graphed.classify(features(4, 1), ["ms", "m", "ms", "m"])  # fills all 4 rows of bucket 4
    x = features(3, 2)
    for tasks in (["m", "m", "m"], ["ms", "ms", "hd"]):
        close(graphed.classify(x, tasks), eager.classify(x, tasks))
    assert graphed.graphs.captures == 2  # bucket 4 without, then with spatial adapters


def test_hot_swap_needs_no_recapture_and_serves_the_new_weights(base, bundles):
    graphed = model(base, [bundles["ms"], bundles["m"]])
    x = features(2, 3)
    before = graphed.classify(x, ["ms", "ms"])
    captures = graphed.graphs.captures
    graphed.unload_task("m")  # frees a pool row; the replacement below reuses it in place
    new = random_bundle(base, "ms", "aat_ms", 3, seed=99, bottleneck=R)
    pools = graphed.slots.pools
    graphed.load_task(new)
    assert graphed.slots.pools is pools  # the row was written in place
    after = graphed.classify(x, ["ms", "ms"])
    assert graphed.graphs.captures == captures  # the same graph, reading the pools in place
    close(after, model(base, [new], graphs=None).classify(x, ["ms", "ms"]))
    assert (after[0] - before[0]).abs().max() > 1e-3  # really the new weights


def test_grown_pools_are_captured_again(base, bundles):
    graphed = model(base, [bundles["ms"]])
    x = features(2, 4)
    graphed.classify(x, ["ms", "ms"])
    pools = graphed.slots.pools
    graphed.load_task(bundles["m"])  # a second adapter row: the pools grow (new tensors)
    assert graphed.slots.pools is not pools
    tasks = ["ms", "m"]
    close(graphed.classify(x, tasks), model(base, [bundles["ms"], bundles["m"]],
                                            graphs=None).classify(x, tasks))
    assert graphed.graphs.captures == 2 and len(graphed.graphs.keys()) == 1


def test_live_graphs_are_bounded_least_recently_used_first(base, bundles):
    graphed = model(base, [bundles["m"]], graphs=GraphConfig(buckets=(1, 2, 4), max_graphs=2,
                                                             capture="eager"))
    for n in (1, 2, 1, 4):
        graphed.classify(features(n, n), ["m"] * n)
    assert graphed.graphs.keys() == [(1, 64, 0, False), (4, 64, 0, False)]  # 2 was dropped
    assert graphed.graphs.captures == 3


def test_a_batch_beyond_the_largest_bucket_runs_eagerly(base, bundles):
    graphed = model(base, [bundles["m"]], graphs=GraphConfig(buckets=(1, 2), capture="eager"))
    x = features(3, 5)
    close(graphed.classify(x, ["m"] * 3), model(base, [bundles["m"]], graphs=None)
          .classify(x, ["m"] * 3))
    assert graphed.graphs.captures == 0


def test_free_slots_replay_the_plain_backbone(base, bundles):
    graphed, eager = model(base, [bundles["ms"]]), model(base, [bundles["ms"]], graphs=None)
    x = features(3, 6)
    pooled = graphed.forward(x, [-1, -1, -1])  # no task: pooled embeddings without adapters
    close(pooled, eager.forward(x, [-1, -1, -1]))
    adapted = graphed.forward(x, [graphed.tasks["ms"].slot, -1, -1])
    assert adapted[0].shape == (3,) and pooled[0].shape == (32,)
    close(adapted[1:], pooled[1:])
    assert sorted(graphed.graphs.keys()) == [(4, 64, 0, False), (4, 64, 0, True)]


@pytest.mark.parametrize("fallback", [True, False])
def test_a_failed_capture_runs_eagerly_or_raises(base, bundles, monkeypatch, fallback):
    def broken(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr("aat_serve.adapters.runners.graphs.EagerCapture.capture", broken)
    graphed = model(base, [bundles["m"]], graphs=GraphConfig(buckets=(1, 2, 4), capture="eager",
                                                             fallback=fallback))
    x = features(3, 7)
    if not fallback:
        with pytest.raises(RuntimeError, match="stream is capturing"):
            graphed.classify(x, ["m"] * 3)
        return
    close(graphed.classify(x, ["m"] * 3), model(base, [bundles["m"]], graphs=None)
          .classify(x, ["m"] * 3))
    assert graphed.graphs.failed == {(4, 64, 0, False): "RuntimeError: operation not permitted "
                                                        "when stream is capturing"}
    assert graphed.graphs.captures == 0 and graphed.graphs.keys() == []


def test_graph_settings():
    assert default_buckets(1) == (1,)
    assert default_buckets(8) == (1, 2, 4, 8)
    assert default_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert GraphConfig(buckets=(1, 4)).bucket(3) == 4 and GraphConfig(buckets=(1, 4)).bucket(5) \
        is None
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert graph_config("auto", cpu, "segments", 8) is None
    assert graph_config("off", cuda, "triton", 8) is None
    cfg = graph_config("auto", cuda, "triton", 32)
    assert cfg is not None and cfg.capture == "cuda" and cfg.buckets[-1] == 32 and cfg.fallback
    strict = graph_config("on", cuda, "triton", 32)
    assert strict is not None and not strict.fallback  # on: a failed capture is an error
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device and the triton "
                                          "backend, got cpu and segments; use auto or off"):
        graph_config("on", cpu, "segments", 8)
    with pytest.raises(ConfigError, match="unknown CUDA graphs mode 'yes'; expected one of "
                                          "auto, on, off"):
        graph_config("yes", cuda, "triton", 8)
    for bad in ((), (0, 1), (4, 2), (2, 2)):
        with pytest.raises(ConfigError, match="increasing positive batch sizes"):
            GraphConfig(buckets=bad)
    with pytest.raises(ConfigError, match="max_graphs must be at least 1"):
        GraphConfig(max_graphs=0)


def test_graphs_refuse_runners_they_cannot_capture(base):
    with pytest.raises(ConfigError, match=r"graphs capture the fused runner \(backend triton, "
                                          r"torch or interpret\), not segments"):
        MultiTaskModel(copy.deepcopy(base), bottleneck=R, backend="segments", graphs=EAGER)
    m = MultiTaskModel(copy.deepcopy(base), bottleneck=R, backend="torch")
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device and the triton "
                                          "backend, got cpu and torch"):
        GraphCache(m.runner, GraphConfig(), torch.device("cpu"))  # type: ignore[arg-type]
