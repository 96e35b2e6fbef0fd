"""GTZAN (Tzanetakis & Cook 2002): ``genres/<genre>/<genre>.NNNNN.{wav,au}``, no metadata.

Split: the fault-filtered, artist-conflict-free partition of Kereliuk, Sturm & Larsen (2015),
443 / 197 / 290 clips, taken from the lists torchaudio ships. The original archive holds Sun
``.au`` files and later copies ``.wav``; both are accepted. ``jazz.00054`` (broken in the
common copies, yet in the filtered training list) is always skipped with a logged warning.
"""

from __future__ import annotations

import logging
import os
import re

from aat_serve.training.data.base import (
    BadAudioRule,
    DatasetError,
    DataSource,
    Example,
    Skipped,
    check_audio,
    find_root,
    is_junk,
)

log = logging.getLogger(__name__)

GTZAN_LABELS = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop",
                "reggae", "rock"]
KNOWN_BROKEN = {"jazz.00054": "known broken clip (empty or truncated in the common copies)"}
_NAME = re.compile(r"^([a-z]+)\.(\d{5})\.(wav|au)$")
_EXPECTED = "the extracted genres/ directory (genres/<genre>/<genre>.NNNNN.wav or .au)"


def filtered_split() -> dict[str, str]:
    """Clip id (``blues.00029``) -> ``train``/``valid``/``test`` for the filtered split."""
    from torchaudio.datasets import gtzan  # the lists are data; importing them is cheap

    out: dict[str, str] = {}
    for split, ids in (("train", gtzan.filtered_train), ("valid", gtzan.filtered_valid),
                       ("test", gtzan.filtered_test)):
        for clip in ids:
            out[clip] = split
    return out


def load_gtzan(root: str | os.PathLike, *, on_bad_audio: BadAudioRule = "error") -> DataSource:
    """The clips of the filtered split that are present under ``root``."""
    root = find_root(root, "blues", "genres", "GTZAN", _EXPECTED)
    split = filtered_split()
    files: dict[str, os.PathLike] = {}
    ignored = 0
    for genre in GTZAN_LABELS:
        folder = root / genre
        if not folder.is_dir():
            raise DatasetError(f"GTZAN: {root} has no {genre}/ folder; expected {_EXPECTED}")
        for path in sorted(folder.iterdir()):
            m = _NAME.match(path.name)
            if is_junk(path) or m is None or m.group(1) != genre:
                ignored += 1
                continue
            clip = f"{genre}.{m.group(2)}"
            if clip in files:  # a .au and a .wav twin: the .wav wins (sorted: .au first)
                log.info("GTZAN: %s exists as .au and .wav; using the .wav", clip)
            files[clip] = path
    if ignored:
        log.info("GTZAN: ignored %d file(s) not named <genre>.NNNNN.wav/.au", ignored)

    examples: list[Example] = []
    skipped: list[Skipped] = []
    outside = 0
    for clip, path in sorted(files.items()):
        if clip in KNOWN_BROKEN:
            skipped.append(Skipped(path, KNOWN_BROKEN[clip]))
            log.warning("GTZAN: skipping %s: %s", path, KNOWN_BROKEN[clip])
            continue
        if clip not in split:
            outside += 1
            continue
        genre = clip.split(".")[0]
        examples.append(Example(path, (GTZAN_LABELS.index(genre),), split=split[clip], key=clip))
    if outside:
        log.info("GTZAN: %d clip(s) are not in the filtered split and are left out", outside)
    missing = sum(1 for clip in split if clip not in files and clip not in KNOWN_BROKEN)
    if missing:
        log.warning("GTZAN: %d of the %d filtered-split clips are missing under %s",
                    missing, len(split), root)
    if not examples:
        raise DatasetError(f"GTZAN: no clip of the filtered split found under {root}; "
                           f"expected {_EXPECTED}")
    examples = check_audio(examples, on_bad_audio, "GTZAN", skipped)
    return DataSource("gtzan", root, list(GTZAN_LABELS), examples, skipped=skipped)
