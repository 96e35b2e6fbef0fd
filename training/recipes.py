"""Named training recipes: each data set's settings from the AAT scripts, overridable per field.

The values are those of the committed AAT recipes (``tasks/*/run_*.sh``; see the reference
notes, section 1.11). Every field has a help text and becomes a command-line flag of
``aat train`` (``--target-length``, ``--freqm``, ``--no-noise``, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from aat_serve.adapters.config import AUDIOSET_MEAN, AUDIOSET_STD
from aat_serve.adapters.errors import ConfigError
from aat_serve.training.losses import LOSSES

METRICS = ("acc", "mAP")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run's result, besides the data and the method."""

    name: str = _f("custom", "recipe name (for the record)")
    target_length: int = _f(1024, "frames per clip (10 ms each) after padding or cutting")
    mean: float = _f(AUDIOSET_MEAN, "fbank mean of the data set, for (x - mean) / (2 std)")
    std: float = _f(AUDIOSET_STD, "fbank standard deviation of the data set")
    lr: float = _f(1e-4, "peak learning rate of AdamW")
    epochs: int = _f(25, "training epochs")
    batch_size: int = _f(32, "clips per optimiser step (per micro-batch with --grad-accum)")
    freqm: int = _f(0, "SpecAugment frequency mask width bound (0: off)")
    timem: int = _f(0, "SpecAugment time mask width bound (0: off)")
    mixup: float = _f(0.0, "probability of waveform mixup per clip, lambda ~ Beta(10, 10)")
    noise: bool = _f(False, "add AST's random noise and time roll to the features")
    freq_warp: float = _f(0.0, "vocal tract length perturbation: scale frequencies by up to "
                               "1 + this, or down by as much (0: off)")
    loss: Literal["ce", "bce"] = _f("ce", "ce (argmax target) or bce (multi-label, mixup)")
    metric: Literal["acc", "mAP"] = _f("acc", "validation metric that picks the best epoch")
    warmup: bool = _f(False, "AAT's linear warm-up of the learning rate")
    warmup_steps: int = _f(1000, "optimiser steps of the warm-up")
    warmup_every: int = _f(50, "the warm-up raises the learning rate every this many steps")
    lr_scheduler_start: int = _f(5, "first epoch at which the learning rate decays")
    lr_scheduler_step: int = _f(1, "epochs between decays")
    lr_scheduler_decay: float = _f(0.85, "decay factor at each milestone")
    weight_decay: float = _f(0.05, "AdamW weight decay (AAT: 0.05)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimiser step")
    amp: bool = _f(True, "mixed precision where the device has it (CUDA)")
    seed: int = _f(0, "seed of initialisation, order and augmentation")

    def problems(self) -> list[str]:
        """Every invalid field, described (empty when the recipe is valid)."""
        out = []
        for name in ("target_length", "epochs", "batch_size", "warmup_steps", "warmup_every",
                     "lr_scheduler_step", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                out.append(f"{name} must be a positive integer, got {v!r}")
        for name in ("freqm", "timem", "lr_scheduler_start", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                out.append(f"{name} must be an integer >= 0, got {v!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            out.append(f"lr must be in (0, 1), got {self.lr!r}")
        if not (isinstance(self.std, int | float) and self.std > 0):
            out.append(f"std must be positive, got {self.std!r}")
        if not isinstance(self.mean, int | float):
            out.append(f"mean must be a number, got {self.mean!r}")
        if not (isinstance(self.freq_warp, int | float) and 0.0 <= self.freq_warp <= 1.0):
            out.append(f"freq_warp must be in [0, 1], got {self.freq_warp!r}")
        if not (isinstance(self.mixup, int | float) and 0.0 <= self.mixup <= 1.0):
            out.append(f"mixup must be a probability in [0, 1], got {self.mixup!r}")
        if not (isinstance(self.lr_scheduler_decay, int | float)
                and 0.0 < self.lr_scheduler_decay <= 1.0):
            out.append(f"lr_scheduler_decay must be in (0, 1], got {self.lr_scheduler_decay!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            out.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name, allowed in (("loss", LOSSES), ("metric", METRICS)):
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {', '.join(allowed)}, got "
                           f"{getattr(self, name)!r}")
        if self.mixup > 0 and self.loss == "ce":
            out.append("mixup makes soft labels; use loss 'bce' with mixup > 0 (AAT's recipes do)")
        for name in ("noise", "warmup", "amp"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        return out

    def validate(self) -> Recipe:
        """Raise one ``ConfigError`` listing every problem; return self when valid."""
        problems = self.problems()
        if problems:
            raise ConfigError(f"recipe {self.name!r} is invalid:\n  " + "\n  ".join(problems))
        return self

    def replace(self, **overrides: Any) -> Recipe:
        """A validated copy with some fields changed (unknown names are an error)."""
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown recipe field(s) {unknown}; known: {', '.join(FIELDS)}")
        return dataclasses.replace(self, **overrides).validate()

    def milestones(self) -> list[int]:
        """Epochs at which MultiStepLR decays (AAT: ``range(start, 1000, step)``)."""
        return list(range(self.lr_scheduler_start, 1000, self.lr_scheduler_step))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown recipe field(s) {unknown}")
        return cls(**data).validate()


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Recipe)}

_COMMON = dict(lr_scheduler_start=5, lr_scheduler_step=1, lr_scheduler_decay=0.85)
RECIPES: dict[str, Recipe] = {r.name: r.validate() for r in (
    Recipe("esc50", target_length=512, mean=-6.6268077, std=5.358466, lr=1e-4, epochs=25,
           batch_size=42, freqm=24, timem=96, loss="ce", metric="acc", **_COMMON),
    Recipe("esc50-full", target_length=512, mean=-6.6268077, std=5.358466, lr=1e-5, epochs=25,
           batch_size=48, freqm=24, timem=96, loss="ce", metric="acc", **_COMMON),
    Recipe("us8k", target_length=400, mean=-4.451961, std=3.9357858, lr=1e-5, epochs=25,
           batch_size=48, freqm=24, timem=96, loss="ce", metric="acc", **_COMMON),
    Recipe("sc2", target_length=128, mean=-6.845978, std=5.5654526, lr=5e-4, epochs=30,
           batch_size=128, freqm=48, timem=48, mixup=0.6, noise=True, loss="bce",
           metric="acc", **_COMMON),
    Recipe("sc1", target_length=128, mean=-6.785136, std=5.496325, lr=5e-4, epochs=30,
           batch_size=128, freqm=48, timem=48, mixup=0.6, noise=True, loss="bce",
           metric="acc", **_COMMON),
    Recipe("gtzan", target_length=3000, mean=-3.0708861, std=3.4615202, lr=1e-5, epochs=30,
           batch_size=2, freqm=48, timem=576, loss="ce", metric="acc", **_COMMON),
    Recipe("openmic", target_length=1024, mean=-4.0147066, std=4.0522056, lr=1e-4, epochs=30,
           batch_size=12, freqm=48, timem=192, mixup=0.5, noise=True, loss="bce", metric="mAP",
           warmup=True, lr_scheduler_start=10, lr_scheduler_step=5, lr_scheduler_decay=0.5),
    Recipe("generic", target_length=1024, lr=1e-4, epochs=25, batch_size=32, freqm=24,
           timem=96, loss="ce", metric="acc", **_COMMON),
    Recipe("generic-multilabel", target_length=1024, lr=1e-4, epochs=25, batch_size=32,
           freqm=24, timem=96, loss="bce", metric="mAP", **_COMMON),
)}

GENERIC_METHOD_LR: dict[str, float] = {
    "head": 1e-2, "prompt": 5e-3, "aat_m": 5e-3, "aat_ms": 5e-3, "joint": 5e-3,
}
"""The generic recipes' rate per frozen-backbone method (full and partial keep 1e-4): they
train far fewer parameters and need a higher rate; at 1e-4 an AAT^MS task on a small keyword
set barely moved its loss. Chosen by validation accuracy on an espeak-ng keyword set with the
demo backbone (``scripts/lr_trials.py``; the trials are in docs/training.md)."""

DATASET_RECIPES = {"esc50": "esc50", "us8k": "us8k", "sc1": "sc1", "sc2": "sc2",
                   "gtzan": "gtzan", "openmic": "openmic", "folder": "generic", "csv": "generic"}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; expected one of "
                          f"{', '.join(RECIPES)}") from None


def default_recipe(dataset: str, method: str, multi_label: bool = False) -> Recipe:
    """The AAT recipe of a data set; ESC-50's full/partial runs use its lower-lr recipe."""
    name = DATASET_RECIPES.get(dataset, "generic")
    if name == "esc50" and method in ("full", "partial"):
        name = "esc50-full"
    if name == "generic" and multi_label:
        name = "generic-multilabel"
    return with_method_rate(get_recipe(name), method)


def with_method_rate(recipe: Recipe, method: str) -> Recipe:
    """The generic recipes at ``method``'s own rate (``GENERIC_METHOD_LR``); others as they
    are (the paper's recipes keep their published rates)."""
    lr = GENERIC_METHOD_LR.get(method)
    if recipe.name in ("generic", "generic-multilabel") and lr is not None:
        return recipe.replace(lr=lr)
    return recipe


def check_fits(recipe: Recipe, multi_label: bool, masked: bool) -> None:
    """Refuse a recipe whose loss cannot train this data (CE on multi-label or masked labels)."""
    if recipe.loss == "ce" and (multi_label or masked):
        raise ConfigError(f"recipe {recipe.name!r} uses loss 'ce', which needs one label per "
                          "clip; this data set is multi-label: use --loss bce")
