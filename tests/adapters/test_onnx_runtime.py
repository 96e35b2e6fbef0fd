"""The onnxruntime backbone: per-clip adapters bound as inputs equal the torch model."""

from __future__ import annotations

import copy

import pytest
import torch

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.model import AudioClassifier
from aat_serve.adapters.onnx_runtime import OrtBackbone, TaskArrays
from tests.helpers import random_bundle, random_task_model, tiny_backbone

pytest.importorskip("onnxruntime")


def _task(backbone, method: str, classes: int, seed: int) -> AudioClassifier:
    return random_task_model(backbone, method, classes, seed=seed, scale=0.05)


def _arrays(model: AudioClassifier) -> TaskArrays:
    cfg = model.backbone.cfg
    return TaskArrays.from_tensors(model.task_state_dict(), cfg.depth, cfg.embed_dim,
                                   model.adapter_cfg.bottleneck)


@pytest.fixture(scope="module")
def setup():
    bb = tiny_backbone()
    models = [_task(bb, m, 3 + i, seed=i) for i, m in enumerate(["aat_ms", "aat_m", "head"])]
    return bb, models, OrtBackbone(bb)


def test_mixed_batch_equals_each_task_alone(setup):
    _, models, ort = setup
    x = torch.randn(6, 48, 32)
    rows = [2, 0, 1, 0, 2, 1]
    pooled = ort.pooled(x, [_arrays(m) for m in models], rows)
    with torch.no_grad():
        for i, r in enumerate(rows):
            ref = models[r].forward_features(x[i:i + 1])[0]
            assert (pooled[i] - ref).abs().max().item() < 1e-5
            # Differs: the clip run with another task's adapters is not the same.
            other = models[(r + 1) % 3].forward_features(x[i:i + 1])[0]
            assert (pooled[i] - other).abs().max().item() > 1e-4


def test_swapping_weights_needs_no_rebuild(setup):
    bb, models, ort = setup
    x = torch.randn(2, 48, 32)
    before = ort.pooled(x, [_arrays(models[0])], [0, 0])
    sessions = dict(ort._sessions)
    replaced = _task(bb, "aat_ms", 3, seed=99)
    after = ort.pooled(x, [_arrays(replaced)], [0, 0])
    assert ort._sessions == sessions  # same graph, new weights
    with torch.no_grad():
        assert (after - replaced.forward_features(x)).abs().max().item() < 1e-5
    assert (after - before).abs().max().item() > 1e-4


def test_prompt_tasks_run_in_their_own_graph(setup):
    bb, _, ort = setup
    joint = _task(bb, "joint", 4, seed=5)
    prompt = _task(bb, "prompt", 2, seed=6)
    x = torch.randn(3, 48, 32)
    pooled = ort.pooled(x, [_arrays(joint), _arrays(prompt)], [1, 0, 1])
    with torch.no_grad():
        for i, m in enumerate([prompt, joint, prompt]):
            assert (pooled[i] - m.forward_features(x[i:i + 1])[0]).abs().max().item() < 1e-5


def test_prompt_and_plain_tasks_cannot_share_a_group(setup):
    bb, models, ort = setup
    joint = _task(bb, "joint", 4, seed=5)
    with pytest.raises(ConfigError, match="separate groups"):
        ort.pooled(torch.randn(2, 48, 32), [_arrays(joint), _arrays(models[0])], [0, 1])


def _bundle(backbone, task: str, method: str, classes: int, seed: int):
    return random_bundle(backbone, task, method, classes, seed=seed, scale=0.05,
                         features=FeatureConfig(num_mel_bins=32, target_length=48))


def test_ort_multitask_model_equals_torch_multitask_model():
    from aat_serve.adapters.multitask import MultiTaskModel

    bb = tiny_backbone()
    methods = ["aat_ms", "aat_m", "head", "joint", "prompt"]
    bundles = [_bundle(bb, f"t{i}", m, 2 + i, seed=10 + i) for i, m in enumerate(methods)]
    ref = MultiTaskModel(copy.deepcopy(bb), max_tasks=8, bottleneck=192)
    ort_model = MultiTaskModel(copy.deepcopy(bb), max_tasks=8, bottleneck=192,
                               backend="onnxruntime")
    for b in bundles:
        ref.load_task(b)
        ort_model.load_task(b)
    names = ["t3", "t0", "t2", "t1", "t4", "t0", "t3", "t1"]
    x = torch.randn(len(names), 48, 32)
    want = ref.classify(x, names)
    got = ort_model.classify(x, names)
    for w, o, name in zip(want, got, names, strict=True):
        assert o.shape == w.shape
        assert (o - w).abs().max().item() < 1e-4, name
    # A hot swap is picked up without rebuilding any session.
    sessions = dict(ort_model.runner.ort._sessions)
    new = _bundle(bb, "t0", "aat_ms", 2, seed=77)
    ref.load_task(new)
    ort_model.load_task(new)
    after = ort_model.classify(x[:2], ["t0", "t0"])
    assert ort_model.runner.ort._sessions == sessions
    want_after = ref.classify(x[:2], ["t0", "t0"])
    for w, o in zip(want_after, after, strict=True):
        assert (o - w).abs().max().item() < 1e-4
    assert (after[1] - want[1]).abs().max().item() > 1e-4  # t0 really changed


def test_ort_per_task_arrays_of_unloaded_tasks_are_dropped():
    """Paging evicts tasks all the time: the runner's per-load arrays (keyed by the load's
    generation) must not outlive them, so its cache stays bounded by the resident tasks."""
    from aat_serve.adapters.multitask import MultiTaskModel

    bb = tiny_backbone()
    model = MultiTaskModel(copy.deepcopy(bb), max_tasks=2, bottleneck=192, backend="onnxruntime")
    x = torch.randn(1, 48, 32)
    gens = []
    for i in range(5):  # t0 .. t4 through two places, each evicting the oldest
        if i >= 2:
            model.unload_task(f"t{i - 2}")
        model.load_task(_bundle(bb, f"t{i}", "aat_ms", 3, seed=i))
        gens.append(model.slots.entry(f"t{i}").gen)
        model.classify(x, [f"t{i}"])
        cached = set(model.runner._arrays) - {-1}
        live = {e.gen for e in model.slots.live_entries()}
        assert cached <= live and gens[-1] in cached
    assert not set(gens[:3]) & set(model.runner._arrays)
