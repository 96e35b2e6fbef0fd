"""Users' own data: a folder per label, or a CSV of ``path,label[,split]``.

Folder source: ``root/<label>/*.{wav,flac,ogg,mp3,...}``; optional ``validation_list.txt`` /
``testing_list.txt`` (relative paths, as Speech Commands). CSV source: one row per clip,
paths relative to the CSV's folder, several labels joined with ``;`` (multi-label), split one of
``train``/``valid``/``test``. Without list files or a split column, files are split 80/10/10
by a stable hash of their name (``base.hash_split``). Labels are sorted by name.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from aat_serve.training.data.base import (
    AUDIO_EXTENSIONS,
    BadAudioRule,
    DatasetError,
    DataSource,
    Example,
    Skipped,
    check_audio,
    hash_split,
    is_junk,
    norm_rel,
    read_list,
)

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid",
               "val": "valid", "dev": "valid", "test": "test", "testing": "test", "eval": "test"}


def load_folder(root: str | os.PathLike, *, on_bad_audio: BadAudioRule = "error") -> DataSource:
    """One class per sub-folder of ``root``; folders starting with ``_`` or ``.`` are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"folder data set root {str(root)!r} is not a directory; expected "
                           "a directory with one sub-folder of audio files per label")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    labels = [p.name for p in folders]
    if len(labels) < 2:
        raise DatasetError(f"folder data set {root} has {len(labels)} label folder(s) "
                           f"{labels}; expected at least 2 (one sub-folder of audio per label)")
    lists = {s: root / f for s, f in (("valid", "validation_list.txt"),
                                      ("test", "testing_list.txt"))}
    has_lists = any(p.is_file() for p in lists.values())
    split_of: dict[str, str] = {}
    for split, path in lists.items():
        if path.is_file():
            for rel in read_list(path, "folder data set"):
                if split_of.setdefault(rel, split) != split:
                    raise DatasetError(f"folder data set: {rel!r} is in both list files")
    examples: list[Example] = []
    for i, folder in enumerate(folders):
        for path in sorted(folder.rglob("*")):
            if is_junk(path) or not path.is_file() or path.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            rel = path.relative_to(root).as_posix()
            split = split_of.pop(rel, "train") if has_lists else hash_split(rel)
            examples.append(Example(path, (i,), split=split, key=rel))
    if split_of:
        raise DatasetError(f"folder data set: the list files name {len(split_of)} file(s) not "
                           f"found under a label folder of {root}, e.g. {next(iter(split_of))!r}")
    if not examples:
        raise DatasetError(f"folder data set {root}: no audio files ({', '.join(AUDIO_EXTENSIONS)})"
                           " in its label folders")
    skipped: list[Skipped] = []
    examples = check_audio(examples, on_bad_audio, "folder data set", skipped)
    return DataSource("folder", root, labels, examples, skipped=skipped)


def load_csv(path: str | os.PathLike, *, on_bad_audio: BadAudioRule = "error") -> DataSource:
    """Rows ``path,label[,split]`` (an optional header row with those names is skipped)."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"CSV data set: {path} is a directory; pass the CSV file itself "
                           "(rows path,label[,split])")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except OSError as e:
        raise DatasetError(f"CSV data set: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"CSV data set: {path} is not UTF-8 text") from None
    start = 1 if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"] else 0
    if len(rows) <= start:
        raise DatasetError(f"CSV data set: {path} has no rows; expected path,label[,split]")
    parsed: list[tuple[int, str, list[str], str | None]] = []
    for n, row in enumerate(rows[start:], start=start + 1):
        if len(row) not in (2, 3):
            raise DatasetError(f"CSV data set: {path} line {n} has {len(row)} fields; expected "
                               "path,label[,split]")
        labels = [x.strip() for x in row[1].split(";") if x.strip()]
        if not row[0].strip() or not labels:
            raise DatasetError(f"CSV data set: {path} line {n}: empty path or label")
        split = None
        if len(row) == 3:
            split = SPLIT_NAMES.get(row[2].strip().lower())
            if split is None:
                raise DatasetError(f"CSV data set: {path} line {n}: split {row[2]!r} is not one "
                                   "of train, valid, test")
        parsed.append((n, row[0].strip(), labels, split))
    names = sorted({lab for _, _, labs, _ in parsed for lab in labs})
    index = {lab: i for i, lab in enumerate(names)}
    multi = any(len(labs) > 1 for _, _, labs, _ in parsed)
    examples = []
    for _, rel, labs, split in parsed:
        audio = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        key = norm_rel(rel)
        examples.append(Example(audio, tuple(sorted(index[lab] for lab in set(labs))),
                                split=split or hash_split(key), key=key))
    if multi:
        log.info("CSV data set: rows with several ';'-joined labels -> multi-label task")
    skipped: list[Skipped] = []
    examples = check_audio(examples, on_bad_audio, "CSV data set", skipped)
    return DataSource("csv", path.parent, names, examples, multi_label=multi, skipped=skipped)
