"""What every data-set loader returns: labelled clips on disk, their splits, and what was skipped.

A loader only reads metadata and checks file headers; audio is decoded later, per item, by
``aat_serve.training.dataset.ClipDataset``. Undecodable files are an error unless the caller asks
for the
explicit ``on_bad_audio="skip"`` rule, which logs and counts every file it drops.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from aat_serve.adapters.errors import AudioError, ConfigError
from aat_serve.adapters.features import audio_info

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".au", ".aiff", ".aif")
BadAudioRule = Literal["error", "skip"]


class DatasetError(ConfigError):
    """A data set is not where it was said to be, or its metadata does not fit its layout."""


@dataclass(frozen=True)
class Example:
    """One labelled clip: where it is, which classes it has, which split/fold it belongs to."""

    path: Path
    labels: tuple[int, ...]
    """Indices of the positive classes (one for single-label data sets)."""
    split: str = "train"
    fold: int | None = None
    key: str = ""
    """The data set's own id for the clip (file name or sample key)."""
    mask: tuple[bool, ...] | None = None
    """Which classes were annotated at all (OpenMIC); None means every class is observed."""

    def target(self, num_classes: int) -> np.ndarray:
        """Multi-hot float32 target vector."""
        y = np.zeros(num_classes, dtype=np.float32)
        y[list(self.labels)] = 1.0
        return y

    def mask_vector(self, num_classes: int) -> np.ndarray:
        """Float32 vector, 1 where the class is observed."""
        if self.mask is None:
            return np.ones(num_classes, dtype=np.float32)
        return np.asarray(self.mask, dtype=np.float32)


@dataclass(frozen=True)
class Skipped:
    """A file left out by an explicit rule, and why."""

    path: Path
    reason: str


@dataclass
class DataSource:
    """A data set as read from disk: labels in their canonical order and every example."""

    name: str
    root: Path
    labels: list[str]
    examples: list[Example]
    multi_label: bool = False
    folds: tuple[int, ...] = ()
    """The cross-validation folds (ESC-50, UrbanSound8K); empty for fixed splits."""
    skipped: list[Skipped] = field(default_factory=list)
    valid_is_test: bool = False
    """True where the data set has no validation split and validates on its test split."""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def masked(self) -> bool:
        return any(e.mask is not None for e in self.examples)

    def splits(self, fold: int | None = None) -> dict[str, list[Example]]:
        """``train``/``valid``/``test`` examples; ``fold`` selects the held-out fold of CV sets."""
        if self.folds:
            if fold is None:
                raise ConfigError(
                    f"{self.name} is evaluated by cross-validation over folds "
                    f"{list(self.folds)}: choose a held-out fold (--fold K) or --cv")
            if fold not in self.folds:
                raise ConfigError(f"{self.name} has folds {list(self.folds)}; got fold {fold}")
            held = [e for e in self.examples if e.fold == fold]
            return {"train": [e for e in self.examples if e.fold != fold],
                    "valid": held, "test": held}
        if fold is not None:
            raise ConfigError(f"{self.name} has fixed splits, not folds; drop --fold/--cv")
        out = {s: [e for e in self.examples if e.split == s] for s in SPLITS}
        if self.valid_is_test:
            out["valid"] = out["test"]
        return out

    def counts(self, fold: int | None = None) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits(fold).items()}


# -- helpers shared by the loaders ----------------------------------------------------------

def find_root(root: str | os.PathLike, marker: str, archive_dir: str, dataset: str,
              expected: str) -> Path:
    """The directory holding ``marker``: ``root`` itself, or ``root/archive_dir``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{dataset} root {str(root)!r} is not a directory; expected {expected}")
    if (root / marker).exists():
        return root
    if (root / archive_dir / marker).exists():
        log.info("%s: using %s", dataset, root / archive_dir)
        return root / archive_dir
    raise DatasetError(f"{dataset} root {str(root)!r} has no {marker}; expected {expected}")


def read_csv_rows(path: Path, required: Iterable[str], dataset: str) -> list[dict[str, str]]:
    """Rows of a CSV with a header, checking that the ``required`` columns are there."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DatasetError(f"{dataset}: {path} lacks column(s) {missing}; its header is "
                                   f"{header}, expected at least {list(required)}")
            return list(reader)
    except OSError as e:
        raise DatasetError(f"{dataset}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{dataset}: {path} is not UTF-8 text") from None


def parse_int(value: str, what: str, where: str, lo: int, hi: int) -> int:
    """An int in ``[lo, hi]`` from a metadata cell, or an error naming the row."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {what} {value!r} is not an integer") from None
    if not lo <= n <= hi:
        raise DatasetError(f"{where}: {what} {n} is outside {lo}..{hi}")
    return n


def is_junk(path: Path) -> bool:
    """macOS AppleDouble (``._x.wav``) and other hidden files: never audio."""
    return path.name.startswith(".")


def audio_problem(path: Path) -> str | None:
    """Why ``path`` cannot be decoded (missing, empty, bad or truncated header), or None."""
    if not path.is_file():
        return "file does not exist"
    try:
        info = audio_info(path)
    except AudioError as e:
        return f"not decodable audio ({e})"
    if info.frames <= 0:
        return "audio has no samples"
    return None


SHOWN_BAD_FILES = 20
"""How many undecodable files one error names before it says "and N more"."""


class BadAudioError(DatasetError):
    """Files of a data set cannot be decoded; names every one (up to ``SHOWN_BAD_FILES``).

    ``hint`` is how the caller leaves such files out: the Python argument by default; the CLI
    sets its flag (``--skip-bad-audio``) before it prints the error.
    """

    def __init__(self, dataset: str, bad: list[Skipped], hint: str = "on_bad_audio='skip'"):
        self.dataset, self.bad, self.hint = dataset, list(bad), hint
        super().__init__(dataset)

    def __str__(self) -> str:
        shown = [f"  {b.path}: {b.reason}" for b in self.bad[:SHOWN_BAD_FILES]]
        more = len(self.bad) - len(shown)
        if more:
            shown.append(f"  and {more} more")
        return (f"{self.dataset}: {len(self.bad)} file(s) are not readable audio:\n"
                + "\n".join(shown) + f"\n(pass {self.hint} to leave such files out)")


def check_audio(examples: list[Example], on_bad_audio: BadAudioRule, dataset: str,
                skipped: list[Skipped]) -> list[Example]:
    """Read every file's header; bad files raise (all named at once), or are skipped under
    the explicit rule."""
    if on_bad_audio not in ("error", "skip"):
        raise ConfigError(f"on_bad_audio must be 'error' or 'skip', got {on_bad_audio!r}")
    kept: list[Example] = []
    bad: list[Skipped] = []
    for ex in examples:
        problem = audio_problem(ex.path)
        if problem is None:
            kept.append(ex)
        else:
            bad.append(Skipped(ex.path, problem))
    if bad and on_bad_audio == "error":
        raise BadAudioError(dataset, bad)
    for b in bad:
        skipped.append(b)
        log.warning("%s: skipping %s: %s", dataset, b.path, b.reason)
    if bad:
        log.warning("%s: skipped %d undecodable file(s) by the --skip-bad-audio rule", dataset,
                    len(bad))
    return kept


def keep_present_labels(source: DataSource, all_labels: bool = False) -> DataSource:
    """The label set the data holds: classes without a single clip are left out (a warning
    names them), unless ``all_labels`` keeps every class of the layout (still warned about).

    A subset of Speech Commands or ESC-50 otherwise trains a head with empty classes.
    Masked (OpenMIC) sources keep their classes: absence there is an annotation.
    """
    if source.masked:
        return source
    present = sorted({i for e in source.examples for i in e.labels})
    empty = [name for i, name in enumerate(source.labels) if i not in set(present)]
    if not empty:
        return source
    names = ", ".join(empty)
    if all_labels:
        log.warning("%s: %d of %d classes have no clips (kept by --all-labels): %s",
                    source.name, len(empty), source.num_classes, names)
        return source
    log.warning("%s: %d of %d classes have no clips and are left out (pass --all-labels to "
                "keep them): %s", source.name, len(empty), source.num_classes, names)
    index = {old: new for new, old in enumerate(present)}
    examples = [dataclasses.replace(e, labels=tuple(index[i] for i in e.labels))
                for e in source.examples]
    return dataclasses.replace(source, labels=[source.labels[i] for i in present],
                               examples=examples)


_NOHASH = re.compile(r"_nohash_.*$")


def hash_split(name: str, valid_percent: float = 10.0, test_percent: float = 10.0) -> str:
    """Stable split of a file by the SHA-1 of its name (the part before ``_nohash_``).

    The Speech Commands scheme: every file of one speaker (same prefix) lands in one split,
    and adding files never moves existing ones.
    """
    stem = _NOHASH.sub("", Path(name).name)
    h = int(hashlib.sha1(stem.encode("utf-8")).hexdigest(), 16)
    percent = (h % 100_000) / 1000.0
    if percent < valid_percent:
        return "valid"
    if percent < valid_percent + test_percent:
        return "test"
    return "train"


def read_list(path: Path, dataset: str) -> list[str]:
    """Non-empty lines of a list file, as normalised forward-slash relative paths."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DatasetError(f"{dataset}: cannot read {path}: {e.strerror}") from None
    return [norm_rel(line) for line in lines if line.strip()]


def norm_rel(p: str) -> str:
    """``./right//a.wav`` and ``right\\a.wav`` -> ``right/a.wav`` (so list matching is exact)."""
    return os.path.normpath(p.strip().replace("\\", "/")).replace(os.sep, "/")


def summarize(source: DataSource) -> str:
    """One line: name, classes, examples per split (or per fold), skipped files."""
    if source.folds:
        per = {f: sum(e.fold == f for e in source.examples) for f in source.folds}
        parts = ", ".join(f"fold{f}={n}" for f, n in per.items())
    else:
        parts = ", ".join(f"{k}={v}" for k, v in source.counts().items())
    skipped = f", skipped {len(source.skipped)}" if source.skipped else ""
    return (f"{source.name}: {source.num_classes} classes, {len(source.examples)} clips "
            f"({parts}){skipped}")
