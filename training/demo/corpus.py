"""Synthesize the demo corpora from nothing but espeak-ng and sox, deterministically under a seed.

Speech: English words spoken by espeak-ng's English voices, each combined with a voice variant
(``en-us+klatt3``), at random speed, pitch and amplitude; sox trims, resamples and (sometimes)
adds reverb; background noise (white, pink or brown, made by sox) is mixed in at a random SNR;
the word lands at a random offset in a 1-s window and at a random level.

Sounds: sox ``synth`` recipes (tones, chords, noise colours, sweeps, rhythmic patterns,
plucks, and eight synthetic instruments) at random notes, lengths and levels, with the same
noise and reverb treatment.

Splits are speaker-disjoint: every voice variant belongs to exactly one of train, valid and
test, so no (voice, variant) speaker of the test split is heard in training (upstream corpus
included). For sounds the musical note plays that role. The training split can also hold
made-up variants (``synthetic_variant``: random vocal tract length, formants and pitch), more
speakers for training only; validation and test use espeak-ng's own variants. The layout is
the generic folder-per-label source (``aat_serve.training.data.generic.load_folder``)::

    <out>/<corpus>/<label>/<voice>+<variant>_<n>.wav    (speech)
    <out>/<corpus>/<label>/note<midi>_<n>.wav           (sounds)
    <out>/<corpus>/validation_list.txt, testing_list.txt, corpus.json

Every clip's parameters come from a generator seeded by (seed, corpus, label, split, index), so
the result does not depend on the number of workers or the order of synthesis.

This module holds the word lists and writes the corpora; the parts live beside it:
``speakers`` (voices, variants, notes and their split), ``sounds`` (sox recipes), ``plan``
(corpus definitions and per-clip parameters) and ``render`` (espeak-ng and sox).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from aat_serve.adapters.errors import ConfigError
from aat_serve.training.demo.plan import SPLITS, ClipPlan, CorpusDef, plan_corpus
from aat_serve.training.demo.render import (
    CLIP_SECONDS,
    SAMPLE_RATE,
    espeak_data,
    installed_variants,
    noise_beds,
    render,
    require_tools,
    tool_versions,
)
from aat_serve.training.demo.speakers import VARIANTS, VOICES, Speakers, make_speakers

log = logging.getLogger(__name__)

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UPSTREAM_WORDS = (
    "apple", "backward", "bed", "bird", "bottle", "cat", "coffee", "doctor", "dog", "follow",
    "forward", "garden", "green", "happy", "house", "learn", "light", "marvin", "money",
    "music", "orange", "paper", "pencil", "rabbit", "river", "sheila", "summer", "table",
    "tree", "visual", "water", "window", "winter", "wow", "yellow",
    "answer", "baby", "basket", "butter", "camera", "candle", "chicken", "circle", "cloud",
    "dinner", "elephant", "feather", "finger", "flower", "hammer", "island", "jacket",
    "kitchen", "ladder", "lemon", "magic", "monkey", "morning", "ocean", "pillow", "pocket",
    "purple", "rocket", "shadow", "silver", "sister", "thunder", "tiger", "tomato", "village",
    "wagon", "zebra",
    "bucket", "muffin", "jumping", "lobster", "robot", "ticket", "shop", "soft", "topic",
    "hobby", "tough", "button",
)
"""Upstream (pretraining) words: none is a digit or a command, nor sounds like one (no "for",
"to", "won", "ate", "know", "write"): the backbone learns the sounds of English words in general,
never the downstream labels."""


def clips_on_disk(corpora: Iterable[CorpusDef], out: str | Path, *, seed: int,
                  speakers: Speakers) -> tuple[int, int]:
    """How many clips ``synthesize`` plans for ``corpora`` and how many are already on disk."""
    plans = _plan_all(corpora, speakers, seed)
    return len(plans), len(plans) - len(_missing(plans, Path(out)))


def _plan_all(corpora: Iterable[CorpusDef], speakers: Speakers, seed: int) -> list[ClipPlan]:
    return [p for c in corpora for p in plan_corpus(c, speakers, seed)]


def _missing(plans: list[ClipPlan], out: Path) -> list[ClipPlan]:
    """The plans whose clip is not on disk yet (clips on disk are kept, never re-rendered)."""
    return [p for p in plans if not (out / p.corpus / p.rel).is_file()]


def synthesize(corpora: Iterable[CorpusDef], out: str | Path, *, seed: int = 0,
               speakers: Speakers | None = None, workers: int = 2, progress: bool = True,
               ) -> dict[str, Path]:
    """Write every corpus under ``out`` (clips already on disk are kept); return their folders.

    Each corpus folder gets ``validation_list.txt``, ``testing_list.txt`` and ``corpus.json``
    (seed, speakers per split, counts, tool versions).
    """
    require_tools()
    corpora = list(corpora)
    speakers = speakers or make_speakers(seed)
    known = installed_variants()
    missing = sorted(set(VARIANTS) - known)
    if missing:
        raise ConfigError(f"espeak-ng lacks the voice variants {missing[:8]}; the demo needs "
                          "espeak-ng 1.51 or later with its standard variants")
    out = Path(out)
    beds = noise_beds()
    data = espeak_data(speakers, out / ".espeak")
    versions = tool_versions()
    plans = _plan_all(corpora, speakers, seed)
    todo = _missing(plans, out)

    def job(plan: ClipPlan) -> None:
        path = out / plan.corpus / plan.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        sf.write(tmp, render(plan, beds, data), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        tmp.replace(path)

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(
            total=len(todo), unit="clip", desc="synthesize", disable=not progress,
            dynamic_ncols=True) as bar:
        for _ in pool.map(job, todo):
            bar.update(1)
    folders = {}
    for c in corpora:
        root = out / c.name
        root.mkdir(parents=True, exist_ok=True)
        mine = [p for p in plans if p.corpus == c.name]
        for split, fname in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
            rels = sorted(p.rel for p in mine if p.split == split)
            (root / fname).write_text("".join(r + "\n" for r in rels))
        counts = {s: sum(p.split == s for p in mine) for s in SPLITS}
        meta = {"corpus": c.name, "seed": seed, "labels": list(c.labels),
                "definition": asdict(c), "counts": counts, "speakers": speakers.to_dict(),
                "voices": list(VOICES), "tools": versions, "sample_rate": SAMPLE_RATE,
                "clip_seconds": CLIP_SECONDS}
        (root / "corpus.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        folders[c.name] = root
    log.info("synthesized %d clips (%d new) in %s", len(plans), len(todo), out)
    return folders
