"""Speech Commands v0.01 (30 words) and v0.02 (35 words) in the layout of the official tarballs.

The root directly holds one folder per word (``<speaker>_nohash_<n>.wav``, 16 kHz mono, some
shorter than 1 s), ``_background_noise_/`` (never a training example), and
``validation_list.txt`` / ``testing_list.txt``; every other clip is training data.
"""

from __future__ import annotations

import logging
import os

from aat_serve.training.data.base import (
    AUDIO_EXTENSIONS,
    BadAudioRule,
    DatasetError,
    DataSource,
    Example,
    Skipped,
    check_audio,
    find_root,
    is_junk,
    read_list,
)

log = logging.getLogger(__name__)

SC1_WORDS = sorted([
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
])
"""v0.01: no canonical order exists, so alphabetical."""

SC2_WORDS = [
    "backward", "follow", "five", "bed", "zero", "on", "learn", "two", "house", "tree",
    "dog", "stop", "seven", "eight", "down", "six", "forward", "cat", "right", "visual",
    "four", "wow", "no", "nine", "off", "three", "left", "marvin", "yes", "up",
    "sheila", "happy", "bird", "go", "one",
]
"""v0.02: AST's class order (``speechcommands_class_labels_indices.csv``), which the public
Speech Commands checkpoint's head follows."""

BACKGROUND = "_background_noise_"
_EXPECTED = ("the directory that directly holds the word folders, validation_list.txt and "
             "testing_list.txt (the speech_commands_v0.0X tarball extracted)")


def load_speech_commands(root: str | os.PathLike, version: int = 2, *,
                         on_bad_audio: BadAudioRule = "error") -> DataSource:
    """Word-folder clips split by the official list files; ``version`` is 1 or 2."""
    if version not in (1, 2):
        raise DatasetError(f"Speech Commands version must be 1 or 2, got {version}")
    name = f"Speech Commands v0.0{version}"
    words = SC1_WORDS if version == 1 else SC2_WORDS
    root = find_root(root, "testing_list.txt", f"SpeechCommands/speech_commands_v0.0{version}",
                     name, _EXPECTED)
    if not (root / "validation_list.txt").is_file():
        raise DatasetError(f"{name}: {root} has testing_list.txt but no validation_list.txt; "
                           f"expected {_EXPECTED}")
    index = {w: i for i, w in enumerate(words)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        other = 2 if version == 1 else 1
        hint = f" (is this v0.0{other}? use --dataset sc{other})" if version == 1 else ""
        raise DatasetError(f"{name}: folder(s) {unknown} under {root} are not among its "
                           f"{len(words)} words{hint}")
    if not folders:
        raise DatasetError(f"{name}: {root} has no word folders; expected {_EXPECTED}")

    split_of: dict[str, str] = {}
    for split, fname in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        for rel in read_list(root / fname, name):
            word = rel.split("/")[0]
            if rel.count("/") != 1 or word not in index:
                raise DatasetError(f"{name}: {root / fname} lists {rel!r}; expected "
                                   "<word>/<file>.wav with one of the data set's words")
            if split_of.setdefault(rel, split) != split:
                raise DatasetError(f"{name}: {rel!r} is in both validation_list.txt and "
                                   "testing_list.txt")

    examples: list[Example] = []
    seen: set[str] = set()
    junk = 0
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if is_junk(path):
                junk += 1
                continue
            if path.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            rel = f"{folder.name}/{path.name}"
            seen.add(rel)
            examples.append(Example(path, (index[folder.name],), split=split_of.get(rel, "train"),
                                    key=rel))
    # Listed files that are absent still become examples, so the audio check reports them.
    for rel, split in sorted(split_of.items()):
        if rel not in seen:
            word = rel.split("/")[0]
            examples.append(Example(root / rel, (index[word],), split=split, key=rel))
    if junk:
        log.info("%s: ignored %d hidden/AppleDouble file(s)", name, junk)
    skipped: list[Skipped] = []
    examples = check_audio(examples, on_bad_audio, name, skipped)
    return DataSource(f"sc{version}", root, list(words), examples, skipped=skipped)
