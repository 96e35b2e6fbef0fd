"""UrbanSound8K (Salamon et al. 2014): ``metadata/UrbanSound8K.csv`` and ``audio/fold1..10``.

10 classes in ``classID`` order, 10 predefined folds (never reshuffled). Files keep the rate,
bit depth and channel count of their Freesound originals (including 24-bit and
WAVE_FORMAT_EXTENSIBLE), so decoding goes through libsndfile and is resampled and downmixed.
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

US8K_LABELS = [
    "air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling",
    "engine_idling", "gun_shot", "jackhammer", "siren", "street_music",
]
US8K_FOLDS = tuple(range(1, 11))
_EXPECTED = "the extracted UrbanSound8K/ directory (metadata/UrbanSound8K.csv and audio/foldN/)"


def load_us8k(root: str | os.PathLike, *, on_bad_audio: BadAudioRule = "error") -> DataSource:
    """Every slice in the metadata CSV, at ``audio/fold{fold}/{slice_file_name}``."""
    root = find_root(root, "metadata/UrbanSound8K.csv", "UrbanSound8K", "UrbanSound8K",
                     _EXPECTED)
    meta = root / "metadata" / "UrbanSound8K.csv"
    rows = read_csv_rows(meta, ("slice_file_name", "fold", "classID", "class"), "UrbanSound8K")
    if not rows:
        raise DatasetError(f"UrbanSound8K: {meta} has a header but no rows")
    examples = []
    for i, row in enumerate(rows, start=2):
        where = f"UrbanSound8K: {meta} line {i}"
        fold = parse_int(row["fold"], "fold", where, 1, 10)
        class_id = parse_int(row["classID"], "classID", where, 0, 9)
        if row["class"] != US8K_LABELS[class_id]:
            raise DatasetError(f"{where}: class {row['class']!r} does not match classID "
                               f"{class_id} ({US8K_LABELS[class_id]!r})")
        name = row["slice_file_name"]
        if not name or Path(name).name != name:
            raise DatasetError(f"{where}: slice_file_name {name!r} must be a bare file name")
        examples.append(Example(root / "audio" / f"fold{fold}" / name, (class_id,), fold=fold,
                                key=name))
    skipped: list[Skipped] = []
    examples = check_audio(examples, on_bad_audio, "UrbanSound8K", skipped)
    return DataSource("us8k", root, list(US8K_LABELS), examples, folds=US8K_FOLDS,
                      skipped=skipped)
