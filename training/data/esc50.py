"""ESC-50 (Piczak 2015) in its official v2 layout: ``meta/esc50.csv`` and a flat ``audio/``.

50 classes in ``target`` order, 5 folds for leave-one-fold-out cross-validation; the clips are
44.1 kHz mono 5 s WAVs (resampled to 16 kHz when decoded).
"""

from __future__ import annotations

import os
from pathlib import Path

from aat_serve.training.data.base import (
    BadAudioRule,
    DatasetError,
    DataSource,
    Example,
    Skipped,
    check_audio,
    find_root,
    parse_int,
    read_csv_rows,
)

ESC50_LABELS = [
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow",
    "rain", "sea_waves", "crackling_fire", "crickets", "chirping_birds", "water_drops", "wind",
    "pouring_water", "toilet_flush", "thunderstorm",
    "crying_baby", "sneezing", "clapping", "breathing", "coughing", "footsteps", "laughing",
    "brushing_teeth", "snoring", "drinking_sipping",
    "door_wood_knock", "mouse_click", "keyboard_typing", "door_wood_creaks", "can_opening",
    "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick", "glass_breaking",
    "helicopter", "chainsaw", "siren", "car_horn", "engine", "train", "church_bells", "airplane",
    "fireworks", "hand_saw",
]
ESC50_FOLDS = (1, 2, 3, 4, 5)
_EXPECTED = "the extracted ESC-50-master/ directory (meta/esc50.csv and audio/*.wav)"


def load_esc50(root: str | os.PathLike, *, on_bad_audio: BadAudioRule = "error") -> DataSource:
    """Every clip listed in ``meta/esc50.csv``, with its fold and ``target`` label."""
    root = find_root(root, "meta/esc50.csv", "ESC-50-master", "ESC-50", _EXPECTED)
    meta = root / "meta" / "esc50.csv"
    rows = read_csv_rows(meta, ("filename", "fold", "target", "category"), "ESC-50")
    if not rows:
        raise DatasetError(f"ESC-50: {meta} has a header but no rows")
    examples = []
    for i, row in enumerate(rows, start=2):
        where = f"ESC-50: {meta} line {i}"
        fold = parse_int(row["fold"], "fold", where, 1, 5)
        target = parse_int(row["target"], "target", where, 0, 49)
        if row["category"] != ESC50_LABELS[target]:
            raise DatasetError(f"{where}: category {row['category']!r} does not match target "
                               f"{target} ({ESC50_LABELS[target]!r})")
        name = row["filename"]
        if not name or Path(name).name != name:
            raise DatasetError(f"{where}: filename {name!r} must be a bare file name in audio/")
        examples.append(Example(root / "audio" / name, (target,), fold=fold, key=name))
    skipped: list[Skipped] = []
    examples = check_audio(examples, on_bad_audio, "ESC-50", skipped)
    return DataSource("esc50", root, list(ESC50_LABELS), examples, folds=ESC50_FOLDS,
                      skipped=skipped)
