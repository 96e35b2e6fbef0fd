"""MultiTaskModel: mixed-task batches equal single-task models, slot management, hot swaps."""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.errors import (
    BackboneMismatchError,
    BundleError,
    ConfigError,
    SlotsFullError,
    UnknownTaskError,
)
from aat_serve.adapters.model import AudioClassifier
from aat_serve.adapters.multitask import MultiTaskModel
from tests.helpers import TINY_TASKS, random_bundle, tiny_backbone

R = 8  # adapter bottleneck of the test bundles and slot width of the models
TASKS = TINY_TASKS
ATOL = 1e-5  # fp32, same math in a different order


def make_bundle(backbone, name: str, method: str, classes: int, seed: int) -> TaskBundle:
    """A random bundle of width R with 3 prompts (fresh adapters are zero, i.e. identity)."""
    return random_bundle(backbone, name, method, classes, seed=seed, bottleneck=R,
                         num_prompts=3)


@pytest.fixture(scope="module")
def base():
    return tiny_backbone(seed=0)


@pytest.fixture(scope="module")
def bundles(base):
    return {name: make_bundle(base, name, method, c, seed=10 + i)
            for i, (name, method, c) in enumerate(TASKS)}


@pytest.fixture(scope="module")
def references(base, bundles):
    """Each task alone: its bundle applied to its own copy of the backbone."""
    return {name: b.build_model(copy.deepcopy(base)).eval() for name, b in bundles.items()}


def plain_logits(base, bundle: TaskBundle, x: torch.Tensor) -> torch.Tensor:
    """The task's head on the backbone without its adapters or prompts."""
    model = AudioClassifier(copy.deepcopy(base), "head", bundle.manifest.num_classes)
    model.load_task_state_dict({k: v for k, v in bundle.tensors.items() if k.startswith("head.")})
    with torch.no_grad():
        return model.eval()(x)


def new_model(base, bundles=(), **kw) -> MultiTaskModel:
    kw.setdefault("bottleneck", R)
    model = MultiTaskModel(copy.deepcopy(base), **kw)
    for b in bundles:
        model.load_task(b)
    return model


@pytest.mark.parametrize("backend", ["segments", "torch"])
def test_mixed_batches_equal_each_task_alone(base, bundles, references, backend):
    model = new_model(base, bundles.values(), backend=backend)
    rng = random.Random(backend)
    names = list(bundles)
    for batch in [1, 2, 3, 5, 8, 11, 16]:
        chosen = rng.sample(names, rng.randint(1, len(names)))
        tasks = [rng.choice(chosen) for _ in range(batch)]
        x = torch.randn(batch, 64, 32)
        out = model.classify(x, tasks)
        assert len(out) == batch
        for i, (logits, task) in enumerate(zip(out, tasks, strict=True)):
            with torch.no_grad():
                ref = references[task](x[i:i + 1])[0]
            assert logits.shape == (bundles[task].manifest.num_classes,)
            assert logits.dtype == torch.float32 and logits.device.type == "cpu"
            torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


def test_task_weights_change_the_output(base, bundles, references):
    """The equality above is not vacuous: every method's task weights move the logits."""
    model = new_model(base, bundles.values())
    x = torch.randn(len(bundles), 64, 32)
    out = model.classify(x, list(bundles))
    for i, (name, bundle) in enumerate(bundles.items()):
        plain = plain_logits(base, bundle, x[i:i + 1])[0]
        if bundle.manifest.method == "head":
            torch.testing.assert_close(out[i], plain, atol=ATOL, rtol=0)
        else:
            assert (out[i] - plain).abs().max() > 1e-2, name


def test_single_task_batch_uses_the_widened_mlp(base, bundles, references):
    model = new_model(base, [bundles["ms"], bundles["m"]])
    x = torch.randn(4, 64, 32)
    out = model.classify(x, ["m"] * 4)
    assert model.runner.widened.gen == model.slots.entry("m").gen  # the widened rows hold task m
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(out), references["m"](x), atol=ATOL, rtol=0)
    out = model.classify(x, ["ms"] * 4)
    assert model.runner.widened.gen == model.slots.entry("ms").gen
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(out), references["ms"](x), atol=ATOL, rtol=0)


def test_free_slot_runs_without_adapters(base, bundles, references):
    model = new_model(base, [bundles["ms"]])
    slot = model.tasks["ms"].slot
    free = next(s for s in range(model.max_tasks) if s != slot)
    x = torch.randn(3, 64, 32)
    out = model.forward(x, [slot, free, -1])
    with torch.no_grad():
        plain = copy.deepcopy(base)(x)
        adapted = references["ms"].forward_features(x)
    torch.testing.assert_close(out[0], references["ms"](x[:1])[0].detach(), atol=ATOL, rtol=0)
    for i in (1, 2):
        assert out[i].shape == (base.cfg.embed_dim,)
        torch.testing.assert_close(out[i], plain[i], atol=ATOL, rtol=0)
        assert (out[i] - adapted[i]).abs().max() > 1e-2


def test_results_follow_the_callers_order(base, bundles):
    model = new_model(base, bundles.values())
    x = torch.randn(5, 64, 32)
    tasks = ["jt", "hd", "ms", "hd", "pr"]
    out = model.classify(x, tasks)
    assert [o.shape[0] for o in out] == [6, 4, 3, 4, 2]
    reordered = model.classify(x[[4, 2, 0]], ["pr", "ms", "jt"])
    for a, b in zip(reordered, [out[4], out[2], out[0]], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_task_management(base, bundles):
    model = new_model(base, max_tasks=2)
    s0 = model.load_task(bundles["ms"])
    s1 = model.load_task(bundles["hd"])
    assert s0 != s1
    assert model.has_task("ms") and not model.has_task("m")
    info = model.tasks["ms"]
    assert (info.slot, info.method, info.num_classes) == (s0, "aat_ms", 3)
    assert info.version == bundles["ms"].manifest.version
    assert model.task_manifest("hd").labels == ["hd-0", "hd-1", "hd-2", "hd-3"]
    with pytest.raises(SlotsFullError, match=r"cannot load task 'm': all 2 task slots are in use"):
        model.load_task(bundles["m"])
    s2 = model.load_task(bundles["ms"])  # replacing a task needs no free task slot
    assert s2 != s0 and sorted(model.tasks) == ["hd", "ms"]
    model.unload_task("hd")
    with pytest.raises(UnknownTaskError, match=r"unknown task 'hd'; loaded tasks: ms"):
        model.classify(torch.randn(1, 64, 32), ["hd"])
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
        model.unload_task("nope")
    with pytest.raises(UnknownTaskError):
        model.task_manifest("hd")
    model.load_task(bundles["m"])
    assert sorted(model.tasks) == ["m", "ms"]


def test_rejects_bad_bundles_and_inputs(base, bundles):
    model = new_model(base, [bundles["ms"]])
    other = make_bundle(tiny_backbone(seed=1), "other", "aat_m", 2, seed=3)
    with pytest.raises(BackboneMismatchError, match="'other' was trained on backbone"):
        model.load_task(other)
    wide = new_model(base, bottleneck=4)
    with pytest.raises(BundleError, match=r"bottleneck 8, larger than this model's slot width 4"):
        wide.load_task(bundles["ms"])
    with pytest.raises(ConfigError, match=r"expected features of shape \(batch, frames, 32\)"):
        model.classify(torch.randn(2, 64, 16), ["ms", "ms"])
    with pytest.raises(ConfigError, match="got 2 clips but 1 task names"):
        model.classify(torch.randn(2, 64, 32), ["ms"])
    with pytest.raises(ConfigError, match="slot 99 is out of range"):
        model.forward(torch.randn(1, 64, 32), [99])
    with pytest.raises(ConfigError, match=r"dtype must be torch\.float32 or torch\.bfloat16"):
        MultiTaskModel(copy.deepcopy(base), dtype=torch.float16)
    assert model.classify(torch.randn(0, 64, 32), []) == []


def test_pools_grow_and_freed_rows_are_zeroed(base, bundles):
    model = new_model(base, max_tasks=8)
    names = []
    for i in range(5):
        b = make_bundle(base, f"t{i}", "aat_ms", 2, seed=40 + i)
        model.load_task(b)
        names.append(b)
    pools = model.slots.pools
    per_row = pools.mlp[0].nbytes() // pools.rows
    assert pools.rows == 8  # grown 1, 2, 4, 8
    assert model.memory_bytes()["pools"] == per_row * 8 * 2 * base.cfg.depth
    row = model.slots.entry("t3").row
    assert pools.mlp[0].w_down[row].abs().sum() > 0
    model.unload_task("t3")
    for pool in (*pools.mlp, *pools.spatial):
        assert all(t[row].abs().sum() == 0 for t in pool.tensors())


def test_hot_swap_waits_for_running_batches(base, bundles, monkeypatch):
    """Copy-on-write: a batch that resolved the old weights finishes with them."""
    v1 = make_bundle(base, "t", "aat_ms", 3, seed=1)
    v2 = make_bundle(base, "t", "aat_ms", 3, seed=2)
    model = new_model(base, [v1])
    x = torch.randn(2, 64, 32)
    e1, e2 = (torch.stack(new_model(base, [v]).classify(x, ["t", "t"])) for v in (v1, v2))
    assert (e1 - e2).abs().max() > 1e-2
    started, resume = threading.Event(), threading.Event()
    run = model._run

    def slow_run(*args):
        started.set()
        assert resume.wait(10)
        return run(*args)

    monkeypatch.setattr(model, "_run", slow_run)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", model.classify(x, ["t"] * 2)))
    worker.start()
    assert started.wait(10)
    old = model.tasks["t"].slot
    new = model.load_task(v2)  # does not wait for the running batch
    assert new != old and old in model.slots.retiring_slots()
    monkeypatch.setattr(model, "_run", run)
    torch.testing.assert_close(torch.stack(model.classify(x, ["t", "t"])), e2, atol=ATOL, rtol=0)
    resume.set()
    worker.join(10)
    torch.testing.assert_close(torch.stack(result["out"]), e1, atol=ATOL, rtol=0)
    assert old not in model.slots.retiring_slots() and old in model.slots.free_slots()


def test_concurrent_hot_swaps_never_mix_versions(base, bundles):
    versions = [make_bundle(base, "t", "joint", 3, seed=s) for s in (5, 6)]
    model = new_model(base, [versions[0], bundles["m"]], max_tasks=3)
    x = torch.randn(3, 64, 32)
    tasks = ["t", "m", "t"]
    expected = [torch.cat(new_model(base, [v, bundles["m"]]).classify(x, tasks))
                for v in versions]
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    seen, errors, done = [0, 0], [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                out = torch.cat(model.classify(x, tasks))
            except UnknownTaskError as e:  # "m" is briefly unloaded below
                if "unknown task 'm'" not in str(e):
                    errors.append(repr(e))
                continue
            except Exception as e:
                errors.append(repr(e))
                return
            match = [bool((out - e).abs().max() < ATOL) for e in expected]
            if not any(match):
                errors.append((out - expected[0]).abs().max().item())
            else:
                seen[match.index(True)] += 1

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(40):
        model.load_task(versions[(i + 1) % 2])
        before = sum(seen)
        for _ in range(2000):  # let the readers run a batch between swaps (bounded)
            if sum(seen) > before + 1 or errors:
                break
            done.wait(0.005)
        if i % 10 == 5:
            model.unload_task("m")
            model.load_task(bundles["m"])
    done.set()
    for t in readers:
        t.join(30)
    assert not errors, f"{len(errors)} outputs matched neither version: {errors[:3]}"
    assert min(seen) > 0  # both versions were served while swapping
    assert len(model.slots.free_slots()) == model.slots.capacity - 2  # no slot leaked


def test_bf16_mode_tracks_fp32(base, bundles):
    fp32 = new_model(base, bundles.values())
    bf16 = new_model(base, bundles.values(), dtype=torch.bfloat16)
    assert bf16.slots.pools.mlp[0].w_down.dtype == torch.bfloat16
    assert bf16.backbone.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert bf16.backbone.blocks[0].norm2.weight.dtype == torch.float32  # fp32 residual stream
    torch.manual_seed(7)
    x = torch.randn(10, 64, 32)
    tasks = [name for name in bundles for _ in range(2)]
    a, b = fp32.classify(x, tasks), bf16.classify(x, tasks)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast changes nothing
        for la, lc in zip(a, fp32.classify(x, tasks), strict=True):
            torch.testing.assert_close(lc, la, atol=ATOL, rtol=0)
    for la, lb in zip(a, b, strict=True):
        assert lb.dtype == torch.float32
        assert not torch.equal(la, lb)  # really computed in bf16
        assert (la - lb).abs().max() < 0.05 * la.abs().max() + 0.02


def test_a_failed_load_releases_its_slot(base, bundles, monkeypatch):
    model = new_model(base, [bundles["m"]], max_tasks=2)
    free = model.slots.free_slots()

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(model.slots, "_write_row", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        model.load_task(bundles["ms"])
    assert model.slots.free_slots() == free and not model.has_task("ms")
    monkeypatch.undo()
    model.load_task(bundles["ms"])
    assert sorted(model.tasks) == ["m", "ms"]
