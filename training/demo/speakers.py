"""The demo's speakers: espeak-ng voices x voice variants (and, for sounds, musical notes),
cut under a seed into speaker-disjoint train, valid and test sets, plus made-up variants that
join the training set only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from aat_serve.adapters.errors import ConfigError

VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
          "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
"""espeak-ng's English voices (accents); every speaker is one of these plus a variant."""

VARIANTS = (
    "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "antonio", "aunty",
    "belinda", "benjamin", "boris", "croak", "david", "Demonic", "Denis", "Diogo", "ed",
    "edward", "edward2", "f1", "f2", "f3", "f4", "f5", "Gene", "Gene2", "grandma", "grandpa",
    "gustave", "Henrique", "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john",
    "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "Lee", "linda", "m1", "m2",
    "m3", "m4", "m5", "m6", "m7", "m8", "marcelo", "Marco", "Mario", "max", "Michael", "michel",
    "miguel", "Mike", "norbert", "Nguyen", "pablo", "paul", "pedro", "quincy", "RicishayMax",
    "RicishayMax2", "RicishayMax3", "rob", "robert", "robosoft", "robosoft2", "robosoft3",
    "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby",
    "steph", "steph2", "steph3", "Storm", "travis", "Tweaky", "UniRobot", "victor", "whisper",
    "whisperf", "zac", "anika", "anikaRobot", "announcer",
)
"""espeak-ng 1.51's voice variants, less those that sound exactly like another one
(``Mr`` and ``fast`` are the default voice, ``caleb`` and ``klatt6`` are ``klatt``)."""

NOTES = tuple(range(45, 85))
"""MIDI notes the sounds are played at (A2 to C6); split like voice variants."""


SYNTHETIC_PREFIX = "aat-vtl"
"""Name prefix of the made-up training variants (no espeak-ng variant starts with it)."""


def synthetic_variant(seed: int, index: int) -> tuple[str, str]:
    """A made-up espeak-ng voice variant: its name and the text of its variant file.

    One speaker of a larger population than espeak-ng's own variants: a vocal tract length
    factor, log-uniform in [0.8, 1.5] (adult male 1.0; women about 1.15; children up to 1.5),
    scales every formant, each with its own jitter of +-7 %; sometimes a high formant (F3 or F4)
    is far off (as in several espeak-ng variants); pitch follows the vocal tract length.
    """
    rng = random.Random(f"aat-demo-vtl/{seed}/{index}")
    scale = math.exp(rng.uniform(math.log(0.8), math.log(1.5)))
    lines = ["language variant", f"name {SYNTHETIC_PREFIX}{index:03d}"]
    base = round(min(300.0, 95.0 * scale ** 2.5 * rng.uniform(0.75, 1.33)))
    lines.append(f"pitch {base} {round(base * rng.uniform(1.15, 1.8))}")
    lines.append(f"flutter {rng.randint(0, 20)}")
    for k in range(9):
        freq = scale * rng.uniform(0.93, 1.07)
        if k in (3, 4) and rng.random() < 0.2:
            freq *= math.exp(rng.uniform(math.log(0.3), math.log(2.5)))
        height = rng.randint(60, 140) if k else 100
        lines.append(f"formant {k} {round(100 * freq)} {height} {rng.randint(80, 130)}")
    return f"{SYNTHETIC_PREFIX}{index:03d}", "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Speakers:
    """The speaker-disjoint partition: voice variants and notes per split.

    ``synthetic`` maps the made-up training variants (also listed under ``variants["train"]``)
    to their variant files.
    """

    variants: dict[str, tuple[str, ...]]
    notes: dict[str, tuple[int, ...]]
    synthetic: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"variants": {k: list(v) for k, v in self.variants.items()},
                "notes": {k: list(v) for k, v in self.notes.items()},
                "synthetic": dict(self.synthetic)}


def make_speakers(seed: int, valid_variants: int = 10, test_variants: int = 14,
                  valid_notes: int = 6, test_notes: int = 8, synthetic: int = 0) -> Speakers:
    """Shuffle the variants and notes under ``seed`` and cut them into test, valid, train.

    ``synthetic`` made-up variants join the training split only (held-out speakers stay
    espeak-ng's own voices).
    """
    if valid_variants + test_variants >= len(VARIANTS) or valid_notes + test_notes >= len(NOTES):
        raise ConfigError("held-out variants or notes leave nothing to train on")
    if synthetic < 0:
        raise ConfigError(f"synthetic speakers must be >= 0, got {synthetic}")
    rng = random.Random(f"aat-demo-speakers/{seed}")
    variants = list(VARIANTS)
    rng.shuffle(variants)
    notes = list(NOTES)
    rng.shuffle(notes)

    def cut(items, n_test, n_valid):
        return {"test": tuple(sorted(items[:n_test])),
                "valid": tuple(sorted(items[n_test:n_test + n_valid])),
                "train": tuple(sorted(items[n_test + n_valid:]))}
    split = cut(variants, test_variants, valid_variants)
    made = dict(synthetic_variant(seed, i) for i in range(synthetic))
    split["train"] = split["train"] + tuple(made)
    return Speakers(split, cut(notes, test_notes, valid_notes), made)
