"""The trainer on tiny models and synthetic data: what each method trains, exports, resuming,
gradient accumulation, the learning-rate schedule, masked multi-label data, cross-validation."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import BundleError, BundleFieldError, ConfigError
from aat_serve.adapters.methods import METHODS
from aat_serve.adapters.model import count_trainable
from aat_serve.training.api import model_factory
from aat_serve.training.cv import run_cv, select_cv_epoch
from aat_serve.training.data import load_source
from aat_serve.training.export import load_model_checkpoint
from aat_serve.training.recipes import Recipe, get_recipe
from aat_serve.training.trainer import RunOptions, Trainer
from tests.helpers import tiny_backbone
from tests.training import synth

BASE = get_recipe("generic").replace(target_length=64, epochs=1, batch_size=2, lr=1e-3,
                                     freqm=4, timem=8)
TIME_KEYS = ("epoch_time_s", "clips_per_s")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """2 labels x 5 clips at 16 kHz: 6 train, 2 valid, 2 test (list files)."""
    root = synth.make_folder(tmp_path_factory.mktemp("pets"), per_label=5, lists="all")
    return load_source("folder", root)


def feats(r: Recipe) -> FeatureConfig:
    return FeatureConfig(num_mel_bins=32, target_length=r.target_length, mean=r.mean, std=r.std)


def make_trainer(src, method, run_dir, recipe=BASE, splits=None, **opts):
    model = model_factory(tiny_backbone(0), method, src.num_classes, seed=recipe.seed)()
    options = RunOptions(progress=False, cache_waveforms=True, **opts)
    return Trainer(model, splits or src.splits(), src.labels, recipe=recipe,
                   features=feats(recipe), run_dir=run_dir, task="pets",
                   multi_label=src.multi_label, options=options,
                   config={"dataset": src.name})


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_exactly_its_parameters_and_exports(method, pets, tmp_path):
    tr = make_trainer(pets, method, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    frozen = [n for n, p in tr.model.named_parameters() if not p.requires_grad]
    result = tr.train(tmp_path / "out.safetensors")
    after = dict(tr.model.named_parameters())
    for n in frozen:  # bit-identical, not merely close
        assert torch.equal(after[n], before[n]), n
    changed = [n for n, p in after.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed == [n for n, p in after.items() if p.requires_grad]
    assert (len(frozen) == 0) == (method == "full")
    assert result.trainable_params == count_trainable(tr.model)

    x = torch.randn(3, 64, 32)
    with torch.no_grad():
        want = tr.model.eval()(x)
    if METHODS[method].exports_bundle:
        bundle = TaskBundle.load(tmp_path / "out.safetensors")
        assert bundle.manifest.method == method and bundle.manifest.labels == ["cat", "dog"]
        assert sum(t.numel() for t in bundle.tensors.values()) == result.trainable_params
        served = bundle.build_model(tiny_backbone(0)).eval()
        untrained = model_factory(tiny_backbone(0), method, 2)().eval()
    else:
        with pytest.raises(BundleError, match="not an aat bundle"):
            TaskBundle.load(tmp_path / "out.safetensors")
        served, manifest = load_model_checkpoint(tmp_path / "out.safetensors")
        assert manifest["method"] == method and manifest["labels"] == ["cat", "dog"]
        untrained = model_factory(tiny_backbone(0), method, 2)().eval()
    with torch.no_grad():
        torch.testing.assert_close(served(x), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(untrained(x), want, atol=1e-4)


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def _strip(history):
    return [{k: v for k, v in h.items() if k not in TIME_KEYS} for h in history]


def test_interrupted_runs_resume_to_identical_weights_and_metrics(pets, tmp_path):
    r = BASE.replace(epochs=2, loss="bce", mixup=0.5, noise=True, warmup=True, warmup_steps=4,
                     warmup_every=1, lr_scheduler_start=1, lr_scheduler_decay=0.5)
    # The straight run loads data in 2 worker processes, the interrupted ones in-process:
    # augmentation is a function of (seed, epoch, index), so the results still match.
    straight = make_trainer(pets, "joint", tmp_path / "a", r, num_workers=2)
    ref = straight.train(tmp_path / "a.safetensors")
    ref_w = trainable_state(straight.model)

    # Run directory of the straight run.
    run = tmp_path / "a"
    rows = _rows(run / "metrics.csv")
    assert [int(x["epoch"]) for x in rows] == [1, 2]
    assert json.loads((run / "metrics.json").read_text())[1]["global_step"] == 6
    assert float(rows[1]["valid_loss"]) == pytest.approx(ref.history[1]["valid_loss"])
    for png in ("curves.png", "confusion.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["recipe"]["mixup"] == 0.5 and cfg["method"] == "joint"
    assert cfg["examples"]["train"]["count"] == 6
    assert json.loads((run / "summary.json").read_text())["best_epoch"] == ref.best_epoch
    manifest = TaskBundle.load(tmp_path / "a.safetensors").manifest
    assert manifest.metrics["best_epoch"] == ref.best_epoch and "test" in manifest.metrics
    assert manifest.recipe["dataset"] == "folder" and manifest.recipe["warmup"] is True

    # Interrupted mid-epoch 2, once with the state saved every step and once with epoch
    # checkpoints only (so epoch 2 restarts), then resumed by a new trainer.
    for name, stop, every, first_step in (("b", 4, 1, 5), ("c", 5, 0, 4)):
        t1 = make_trainer(pets, "joint", tmp_path / name, r, checkpoint_every=every)

        def crash(tr, info, stop=stop):
            if info["global_step"] == stop:
                raise Interrupt

        t1.callbacks.append(crash)
        with pytest.raises(Interrupt):
            t1.train(tmp_path / f"{name}.safetensors")
        t2 = make_trainer(pets, "joint", tmp_path / name, r, checkpoint_every=every)
        seen = []
        t2.callbacks.append(lambda tr, info, seen=seen: seen.append(info["global_step"]))
        res = t2.train(tmp_path / f"{name}.safetensors")
        assert seen[0] == first_step and seen[-1] == 6  # it resumed; it did not start over
        got = trainable_state(t2.model)
        assert got.keys() == ref_w.keys()
        for n in ref_w:
            assert torch.equal(got[n], ref_w[n]), (name, n)
        assert _strip(res.history) == _strip(ref.history)
        assert res.test == ref.test and res.best_epoch == ref.best_epoch
    # ... and a run with another seed does differ (so the equality above means something)
    other = make_trainer(pets, "joint", tmp_path / "d", r.replace(seed=1, epochs=1))
    other.train()
    assert not all(torch.equal(trainable_state(other.model)[n], ref_w[n]) for n in ref_w)


def test_gradient_accumulation_equals_the_larger_batch(pets, tmp_path):
    def first_step_grads(batch, accum, run):
        r = BASE.replace(batch_size=batch, grad_accum=accum, freqm=0, timem=0)
        splits = pets.splits()
        splits = {**splits, "train": splits["train"][:4]}
        tr = make_trainer(pets, "aat_ms", tmp_path / run, r, splits=splits)
        grads = []
        tr.optimizer.register_step_pre_hook(lambda *_: grads.append(
            {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}))
        tr.train()
        return grads

    one = first_step_grads(4, 1, "a")
    accumulated = first_step_grads(2, 2, "b")
    small = first_step_grads(2, 1, "c")
    assert len(one) == len(accumulated) == 1 and len(small) == 2
    for n in one[0]:
        torch.testing.assert_close(accumulated[0][n], one[0][n], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(small[0][n], one[0][n], rtol=1e-3, atol=1e-6)
               for n in one[0])


def test_warmup_and_multistep_schedule_follow_the_aat_code(pets, tmp_path):
    r = BASE.replace(epochs=3, warmup=True, warmup_steps=4, warmup_every=2,
                     lr_scheduler_start=1, lr_scheduler_step=1, lr_scheduler_decay=0.5)
    tr = make_trainer(pets, "head", tmp_path / "run", r)
    lrs = []
    tr.callbacks.append(lambda t, info: lrs.append(t.optimizer.param_groups[0]["lr"]))
    res = tr.train()
    # steps 0..2: warm-up sets 0, keeps 0, sets 2/4; the epoch end halves; step 4 (a warm-up
    # step) resets to 4/4 of the base; epoch ends halve again.
    assert lrs == pytest.approx([0, 0, 5e-4, 2.5e-4, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4])
    assert [h["lr"] for h in res.history] == pytest.approx([5e-4, 1e-3, 5e-4])


def test_a_changed_configuration_is_not_resumed_silently(pets, tmp_path):
    make_trainer(pets, "head", tmp_path / "run").train()
    with pytest.raises(ConfigError, match=r"different configuration \(recipe.lr: 0.001 -> 0.002\)"
                                          r".*--fresh"):
        make_trainer(pets, "head", tmp_path / "run", BASE.replace(lr=2e-3)).train()
    res = make_trainer(pets, "head", tmp_path / "run", BASE.replace(lr=2e-3), fresh=True).train()
    assert res.history[0]["lr"] == 2e-3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"]["lr"] == 2e-3


def test_trainer_refuses_unusable_setups(pets, tmp_path):
    with pytest.raises(ConfigError, match="validation split is empty"):
        make_trainer(pets, "head", tmp_path / "x", splits={**pets.splits(), "valid": []})
    multi = load_source("csv", synth.make_csv(tmp_path, multi=True))
    with pytest.raises(ConfigError, match="multi-label: use --loss bce"):
        make_trainer(multi, "head", tmp_path / "y")
    with pytest.raises(ConfigError, match=r"features\.target_length 64 differs"):
        model = model_factory(tiny_backbone(0), "head", 2)()
        Trainer(model, pets.splits(), pets.labels, recipe=BASE.replace(target_length=80),
                features=feats(BASE), run_dir=tmp_path / "z", task="pets")


def test_trainer_refuses_features_an_upload_would_refuse(pets, tmp_path):
    model = model_factory(tiny_backbone(0), "aat_m", 2)()
    absurd = FeatureConfig(num_mel_bins=32, target_length=64, std=1e-38)
    with pytest.raises(BundleFieldError, match=r"^bundle field features\.std is 1e-38; allowed: "
                                               r"0\.01\.\.100 \(log-mel units\)$"):
        Trainer(model, pets.splits(), pets.labels, recipe=BASE, features=absurd,
                run_dir=tmp_path / "a", task="pets")
    assert not (tmp_path / "a").exists()  # refused before anything was written
    Trainer(model, pets.splits(), pets.labels, recipe=BASE, features=feats(BASE),
            run_dir=tmp_path / "b", task="pets")  # the recipe's own features are fine


def test_openmic_masked_multi_label_training(tmp_path):
    src = load_source("openmic", synth.make_openmic(tmp_path, n=8))
    r = get_recipe("openmic").replace(target_length=64, batch_size=2, epochs=1, warmup=False)
    tr = make_trainer(src, "aat_m", tmp_path / "run", r)
    assert tr.masked
    res = tr.train(tmp_path / "om.safetensors")
    assert res.metric == "mAP" and res.test["ap_classes"] == 20
    assert not (tmp_path / "run" / "confusion.png").exists()
    assert {"ap", "auc", "observed"} <= set(res.test_report[0])
    m = TaskBundle.load(tmp_path / "om.safetensors").manifest
    assert m.multi_label and m.labels == synth.OPENMIC_CLASSES
    # the reported mAP is the masked one
    out = tr.evaluate("test")
    assert res.test["mAP"] == pytest.approx(out.metrics(masked=True)["mAP"])
    assert res.test["mAP"] != pytest.approx(out.metrics(masked=False)["mAP"])


def test_select_cv_epoch_uses_the_fold_average():
    hist = {1: [{"acc": 0.9}, {"acc": 0.5}, {"acc": 0.7}],
            2: [{"acc": 0.1}, {"acc": 0.8}, {"acc": 0.7}]}
    s = select_cv_epoch(hist, "acc")
    # fold bests are epochs 1 and 2; the averaged best is epoch 3 (0.7)
    assert s["best_epoch"] == 3 and s["mean"] == pytest.approx(0.7)
    assert s["per_epoch_mean"] == pytest.approx([0.5, 0.65, 0.7])
    assert s["per_fold"] == {"1": 0.7, "2": 0.7}
    assert s["per_fold_best_mean"] == pytest.approx(0.85)


def test_cross_validation_over_esc50_folds(tmp_path):
    root = synth.make_esc50(tmp_path, folds=(1, 2, 3), classes=(0, 1))
    src = load_source("esc50", root)
    r = get_recipe("esc50").replace(target_length=64, epochs=2, batch_size=4, freqm=4, timem=8,
                                    metric="mAP")
    make = model_factory(tiny_backbone(0), "head", src.num_classes, seed=0)
    res = run_cv(make, src, recipe=r, features=feats(r), run_dir=tmp_path / "cv", task="esc50",
                 options=RunOptions(progress=False, cache_waveforms=True),
                 config={"dataset": "esc50"}, out_path=tmp_path / "esc.safetensors")
    # folds 4 and 5 have no clips in this copy: left out
    assert sorted(res.folds) == [1, 2, 3] and not (tmp_path / "cv" / "fold4").exists()
    per_fold = {k: json.loads((tmp_path / "cv" / f"fold{k}" / "metrics.json").read_text())
                for k in (1, 2, 3)}
    means = [sum(per_fold[k][e]["mAP"] for k in per_fold) / 3 for e in range(2)]
    best = max(range(2), key=lambda e: means[e])  # the first best on a tie, as np.argmax
    assert res.summary["best_epoch"] == best + 1
    assert res.summary["mean"] == pytest.approx(means[best])
    assert res.summary["per_fold"] == {str(k): per_fold[k][best]["mAP"] for k in per_fold}
    assert json.loads((tmp_path / "cv" / "cv.json").read_text()) == res.summary
    for k in per_fold:  # each fold validated on exactly its own 2 clips
        cfg = json.loads((tmp_path / "cv" / f"fold{k}" / "config.json").read_text())
        assert cfg["fold"] == k and cfg["examples"]["valid"]["count"] == 2
        assert cfg["examples"]["train"]["count"] == 4
    m = TaskBundle.load(tmp_path / "esc.safetensors").manifest
    assert m.metrics["cv"]["best_epoch"] == res.summary["best_epoch"]
    assert m.metrics["held_out_fold"] == 1 and m.recipe["fold"] == 1


def test_the_best_epoch_breaks_a_tie_in_the_metric_by_the_validation_loss():
    from aat_serve.training.trainer import is_better

    best = {"epoch": 1, "metric": 1.0, "valid": {"acc": 1.0, "loss": 0.9}}
    assert is_better({"acc": 1.0, "loss": 0.1}, best, "acc")       # same accuracy, lower loss
    assert not is_better({"acc": 1.0, "loss": 0.95}, best, "acc")  # same accuracy, higher loss
    assert not is_better({"acc": 0.97, "loss": 0.01}, best, "acc")  # lower accuracy loses
    assert is_better({"acc": 0.5, "loss": 3.0}, {**best, "metric": 0.4}, "acc")
