"""OpenMIC-2018 (Humphrey et al. 2018): 20 instruments, multi-label, partially observed.

Layout: ``openmic-2018.npz`` (``Y_true``, ``Y_mask``, ``sample_key``), ``class-map.json``,
``partitions/split01_{train,test}.csv`` (headerless keys) and ``audio/<key[:3]>/<key>.ogg``.
A label is positive when observed and ``Y_true > 0.5`` (PaSST's rule); unobserved labels carry
mask 0 and count neither in the loss nor in the AP. There is no validation split: like PaSST,
training validates on split01's test set.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from aat_serve.training.data.base import (
    BadAudioRule,
    DatasetError,
    DataSource,
    Example,
    Skipped,
    check_audio,
    find_root,
    read_list,
)

_EXPECTED = ("the extracted openmic-2018/ directory (openmic-2018.npz, class-map.json, "
             "partitions/split01_train.csv, partitions/split01_test.csv, audio/)")


def _load_npz(path, allow_pickle: bool) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=allow_pickle) as z:
            missing = [k for k in ("Y_true", "Y_mask", "sample_key") if k not in z.files]
            if missing:
                raise DatasetError(f"OpenMIC: {path} lacks array(s) {missing}; it has "
                                   f"{sorted(z.files)}")
            return {k: z[k] for k in ("Y_true", "Y_mask", "sample_key")}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DatasetError(
                f"OpenMIC: {path} stores sample_key as pickled objects; pass allow_pickle=True "
                "(--allow-pickle) only if you trust this file") from None
        raise DatasetError(f"OpenMIC: cannot read {path}: {e}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DatasetError(f"OpenMIC: cannot read {path}: {e}") from None


def _class_map(path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"OpenMIC: cannot read {path}: {e}") from None
    if (not isinstance(data, dict) or not data
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values())
            or sorted(data.values()) != list(range(len(data)))):
        raise DatasetError(f"OpenMIC: {path} must map each instrument name to a distinct "
                           "column index 0..N-1")
    return [name for name, _ in sorted(data.items(), key=lambda kv: kv[1])]


def load_openmic(root: str | os.PathLike, *, split: str = "split01",
                 on_bad_audio: BadAudioRule = "error", allow_pickle: bool = False) -> DataSource:
    """The clips of ``partitions/{split}_{train,test}.csv`` with masked labels from the npz."""
    root = find_root(root, "openmic-2018.npz", "openmic-2018", "OpenMIC-2018", _EXPECTED)
    labels = _class_map(root / "class-map.json")
    arrays = _load_npz(root / "openmic-2018.npz", allow_pickle)
    y_true = np.asarray(arrays["Y_true"], dtype=np.float64)
    y_mask = np.asarray(arrays["Y_mask"]).astype(bool)
    keys = [str(k) for k in np.asarray(arrays["sample_key"]).reshape(-1)]
    n, c = len(keys), len(labels)
    if y_true.shape != (n, c) or y_mask.shape != (n, c):
        raise DatasetError(f"OpenMIC: Y_true {y_true.shape} and Y_mask {y_mask.shape} must both "
                           f"be (len(sample_key), classes) = ({n}, {c})")
    row_of = {k: i for i, k in enumerate(keys)}
    examples: list[Example] = []
    for part in ("train", "test"):
        path = root / "partitions" / f"{split}_{part}.csv"
        if not path.is_file():
            raise DatasetError(f"OpenMIC: missing {path}; expected {_EXPECTED}")
        for key in read_list(path, "OpenMIC"):
            if key not in row_of:
                raise DatasetError(f"OpenMIC: {path} lists sample key {key!r}, which is not in "
                                   "openmic-2018.npz's sample_key")
            i = row_of[key]
            positive = tuple(int(j) for j in np.flatnonzero(y_mask[i] & (y_true[i] > 0.5)))
            examples.append(Example(root / "audio" / key[:3] / f"{key}.ogg", positive,
                                    split=part, key=key,
                                    mask=tuple(bool(m) for m in y_mask[i])))
    if not examples:
        raise DatasetError(f"OpenMIC: the partitions under {root / 'partitions'} are empty")
    skipped: list[Skipped] = []
    examples = check_audio(examples, on_bad_audio, "OpenMIC", skipped)
    return DataSource("openmic", root, labels, examples, multi_label=True, skipped=skipped,
                      valid_is_test=True)
