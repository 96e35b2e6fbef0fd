"""Data-set loaders: each reads one data set from the directory a user extracted it to."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from aat_serve.adapters.errors import ConfigError
from aat_serve.training.data.base import (
    BadAudioError,
    BadAudioRule,
    DatasetError,
    DataSource,
    Example,
    Skipped,
    hash_split,
    keep_present_labels,
    summarize,
)
from aat_serve.training.data.esc50 import ESC50_LABELS, load_esc50
from aat_serve.training.data.generic import load_csv, load_folder
from aat_serve.training.data.gtzan import GTZAN_LABELS, load_gtzan
from aat_serve.training.data.openmic import load_openmic
from aat_serve.training.data.speechcommands import SC1_WORDS, SC2_WORDS, load_speech_commands
from aat_serve.training.data.us8k import US8K_LABELS, load_us8k

LOADERS: dict[str, Callable[..., DataSource]] = {
    "esc50": load_esc50,
    "us8k": load_us8k,
    "sc1": partial(load_speech_commands, version=1),
    "sc2": partial(load_speech_commands, version=2),
    "gtzan": load_gtzan,
    "openmic": load_openmic,
    "folder": load_folder,
    "csv": load_csv,
}
DATASETS = tuple(LOADERS)


def load_source(name: str, root: str | os.PathLike, *, on_bad_audio: BadAudioRule = "error",
                allow_pickle: bool = False, all_labels: bool = False) -> DataSource:
    """Read data set ``name`` from ``root`` (see ``DATASETS``).

    The label set is what the data holds (classes with no clip are left out, by name, in a
    warning) unless ``all_labels`` keeps every class of the official layout.
    """
    if name not in LOADERS:
        raise ConfigError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    kwargs = {"on_bad_audio": on_bad_audio}
    if name == "openmic":
        kwargs["allow_pickle"] = allow_pickle
    return keep_present_labels(LOADERS[name](root, **kwargs), all_labels)


__all__ = [
    "DATASETS", "ESC50_LABELS", "GTZAN_LABELS", "LOADERS", "SC1_WORDS", "SC2_WORDS",
    "US8K_LABELS", "BadAudioError", "DataSource", "DatasetError", "Example", "Skipped",
    "hash_split",
    "load_source", "summarize",
]
