"""Every shipped recipe validates and carries the AAT scripts' values; overrides are checked."""

from __future__ import annotations

import pytest

from aat_serve.adapters.errors import ConfigError
from aat_serve.training.recipes import (
    DATASET_RECIPES,
    FIELDS,
    RECIPES,
    Recipe,
    check_fits,
    default_recipe,
    get_recipe,
)

# name: (target_length, mean, std, lr, epochs, batch, freqm, timem, mixup, noise, loss, metric,
#        warmup, (sched start, step, decay))  -- reference notes, section 1.11
AAT_TABLE = {
    "esc50": (512, -6.6268077, 5.358466, 1e-4, 25, 42, 24, 96, 0, False, "ce", "acc", False,
              (5, 1, 0.85)),
    "esc50-full": (512, -6.6268077, 5.358466, 1e-5, 25, 48, 24, 96, 0, False, "ce", "acc",
                   False, (5, 1, 0.85)),
    "sc2": (128, -6.845978, 5.5654526, 5e-4, 30, 128, 48, 48, 0.6, True, "bce", "acc", False,
            (5, 1, 0.85)),
    "sc1": (128, -6.785136, 5.496325, 5e-4, 30, 128, 48, 48, 0.6, True, "bce", "acc", False,
            (5, 1, 0.85)),
    "gtzan": (3000, -3.0708861, 3.4615202, 1e-5, 30, 2, 48, 576, 0, False, "ce", "acc", False,
              (5, 1, 0.85)),
    "openmic": (1024, -4.0147066, 4.0522056, 1e-4, 30, 12, 48, 192, 0.5, True, "bce", "mAP",
                True, (10, 5, 0.5)),
    "us8k": (400, -4.451961, 3.9357858, 1e-5, 25, 48, 24, 96, 0, False, "ce", "acc", False,
             (5, 1, 0.85)),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_shipped_recipe_is_valid(name):
    r = RECIPES[name]
    assert r.name == name
    assert r.problems() == []
    assert r.validate() is r
    assert r.weight_decay == 0.05 and r.grad_accum == 1
    assert Recipe.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("name", sorted(AAT_TABLE))
def test_recipes_carry_the_aat_values(name):
    r = get_recipe(name)
    got = (r.target_length, r.mean, r.std, r.lr, r.epochs, r.batch_size, r.freqm, r.timem,
           r.mixup, r.noise, r.loss, r.metric, r.warmup,
           (r.lr_scheduler_start, r.lr_scheduler_step, r.lr_scheduler_decay))
    assert got == AAT_TABLE[name]


def test_milestones_are_aats_range():
    assert get_recipe("openmic").milestones()[:3] == [10, 15, 20]
    assert get_recipe("esc50").milestones()[:3] == [5, 6, 7]
    assert get_recipe("esc50").milestones()[-1] == 999


def test_every_dataset_has_a_recipe_and_method_specific_defaults():
    for ds, name in DATASET_RECIPES.items():
        assert name in RECIPES, ds
    assert default_recipe("esc50", "aat_ms").name == "esc50"
    assert default_recipe("esc50", "full").name == "esc50-full"
    assert default_recipe("csv", "head", multi_label=True).name == "generic-multilabel"
    assert default_recipe("folder", "head").name == "generic"


def test_overrides_are_validated_and_all_problems_are_reported_at_once():
    r = get_recipe("sc2").replace(lr=1e-3, batch_size=8, noise=False)
    assert (r.lr, r.batch_size, r.noise, r.mixup) == (1e-3, 8, False, 0.6)
    assert get_recipe("sc2").lr == 5e-4  # the shipped recipe is unchanged
    with pytest.raises(ConfigError) as e:
        get_recipe("esc50").replace(epochs=0, mixup=1.5, loss="mse", lr=-1.0)
    msg = str(e.value)
    for part in ("epochs must be a positive integer, got 0",
                 "mixup must be a probability in [0, 1], got 1.5",
                 "loss must be one of ce, bce, got 'mse'", "lr must be in (0, 1), got -1.0"):
        assert part in msg
    with pytest.raises(ConfigError, match="use loss 'bce' with mixup > 0"):
        get_recipe("esc50").replace(mixup=0.5)
    with pytest.raises(ConfigError, match=r"unknown recipe field\(s\) \['learning_rate'\]"):
        get_recipe("esc50").replace(learning_rate=0.1)
    with pytest.raises(ConfigError, match="unknown recipe 'audioset'; expected one of esc50"):
        get_recipe("audioset")


def test_every_field_has_help_for_its_command_line_flag():
    for name, f in FIELDS.items():
        assert f.metadata.get("help"), name


def test_ce_refuses_multi_label_data():
    check_fits(get_recipe("esc50"), multi_label=False, masked=False)
    check_fits(get_recipe("openmic"), multi_label=True, masked=True)
    with pytest.raises(ConfigError, match="multi-label: use --loss bce"):
        check_fits(get_recipe("esc50"), multi_label=True, masked=False)


def test_the_generic_recipe_has_a_rate_per_method_and_the_papers_keep_theirs():
    from aat_serve.training.api import resolve_recipe
    from aat_serve.training.recipes import GENERIC_METHOD_LR

    for method in ("head", "prompt", "aat_m", "aat_ms", "joint"):
        for ds in ("folder", "csv"):
            assert default_recipe(ds, method).lr == GENERIC_METHOD_LR[method] > 1e-4
        assert default_recipe("csv", method, multi_label=True).lr == GENERIC_METHOD_LR[method]
        # an explicit --recipe generic gets the method's rate too; --lr still wins
        assert resolve_recipe("folder", method, False, "generic").lr == GENERIC_METHOD_LR[method]
        assert resolve_recipe("folder", method, False, None, {"lr": 3e-4}).lr == 3e-4
    for method in ("full", "partial"):  # whole-model methods keep the low rate
        assert default_recipe("folder", method).lr == 1e-4
    # differs: the paper's named recipes keep their published rates for every method
    assert default_recipe("esc50", "aat_ms").lr == 1e-4
    assert default_recipe("sc2", "head").lr == 5e-4
    assert resolve_recipe("folder", "aat_ms", False, "us8k").lr == 1e-5
    assert get_recipe("generic").lr == 1e-4  # the shipped recipe itself is unchanged
