"""What the demo corpora hold: corpus definitions and the plan of every clip, fixed before
anything is rendered.

Every clip's parameters come from a generator seeded by (seed, corpus, label, split, index), so
the plan, and with it the corpus, does not depend on the number of workers or the order of
synthesis; a clip's file name encodes its speaker (``speaker_of``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aat_serve.training.demo.speakers import VOICES, Speakers

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class CorpusDef:
    """One corpus: a folder-per-label data set of spoken words and/or synthetic sounds."""

    name: str
    words: tuple[str, ...] = ()
    sounds: tuple[str, ...] = ()
    per_class: dict[str, int] = field(default_factory=dict)
    """Clips per class in each split (``train``, ``valid``, ``test``; missing means 0)."""

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted(self.words + self.sounds))


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip, fixed before anything runs."""

    corpus: str
    label: str
    split: str
    rel: str
    """Path relative to the corpus folder: ``<label>/<file>.wav``."""
    kind: str
    """``speech`` or ``sound``."""
    params: dict[str, Any]


def _common_params(rng: random.Random) -> dict[str, Any]:
    reverb = None
    if rng.random() < 0.3:
        reverb = [rng.randint(10, 70), rng.randint(20, 80), rng.randint(20, 80)]
    noise = None
    if rng.random() < 0.75:
        noise = {"colour": rng.choice(("white", "pink", "brown")), "snr_db": rng.uniform(5, 30),
                 "offset": rng.random()}
    return {"reverb": reverb, "noise": noise, "peak_db": rng.uniform(-20.0, -1.0),
            "onset": rng.random()}


def plan_corpus(corpus: CorpusDef, speakers: Speakers, seed: int) -> list[ClipPlan]:
    """The clips of ``corpus``, each with its own deterministic parameters."""
    plans = []
    for label in corpus.labels:
        spoken = label in corpus.words
        for split in SPLITS:
            for i in range(corpus.per_class.get(split, 0)):
                rng = random.Random(f"aat-demo/{seed}/{corpus.name}/{label}/{split}/{i}")
                p = _common_params(rng)
                if spoken:
                    voice = rng.choice(VOICES)
                    variant = rng.choice(speakers.variants[split])
                    p.update(text=label, voice=voice, variant=variant,
                             speed=rng.randint(130, 210), pitch=rng.randint(15, 85),
                             amplitude=rng.randint(70, 150))
                    rel = f"{label}/{voice}+{variant}_{split}{i:04d}.wav"
                    kind = "speech"
                else:
                    note = rng.choice(speakers.notes[split])
                    p.update(recipe=label, note=note, detune=rng.uniform(-0.3, 0.3),
                             duration=rng.uniform(0.35, 0.9), rng_seed=rng.getrandbits(32))
                    rel = f"{label}/note{note}_{split}{i:04d}.wav"
                    kind = "sound"
                plans.append(ClipPlan(corpus.name, label, split, rel, kind, p))
    return plans


def speaker_of(rel: str) -> str:
    """The speaker (``voice+variant``) or note (``note<midi>``) a clip's file name encodes."""
    name = Path(rel).name
    return name.rsplit("_", 1)[0]
