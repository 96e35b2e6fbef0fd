"""Reading checkpoint files: tensor files, a Hugging Face directory's weights, JSON, label CSVs.

Tensor files are safetensors (recognised by suffix or header) or ``torch.save`` files read with
``torch.load(weights_only=True)``, which refuses pickled Python objects. Every failure is a
``CheckpointError`` (``ConfigError`` for label files) naming the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from aat_serve.adapters.checkpoints.messages import few_names
from aat_serve.adapters.errors import CheckpointError, ConfigError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""A Hugging Face directory's single-file weights, in order of preference."""
HF_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
"""The index files of sharded Hugging Face weights."""


def _looks_like_safetensors(path: Path) -> bool:
    """True when the file starts with a plausible safetensors header (length, then ``{``)."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100 * 1024 * 1024 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors checkpoint {str(path)!r}: {e}") from None


def _read_torch_file(path: Path) -> object:
    """``torch.load(weights_only=True)`` of a file, with its failures said in words."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is an empty file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = ("it holds Python objects other than tensors, which weights_only=True refuses"
               if "weights only" in str(e).lower() else f"bad pickle data ({str(e)[:200]})")
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {why}") from None
    except Exception as e:  # zip, EOF and torch errors all mean "not a readable checkpoint"
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: not a PyTorch or safetensors file "
            f"({type(e).__name__}: {str(e)[:200]})") from None


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a safetensors file or a ``torch.save`` file (weights only)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _read_safetensors(path)
    obj = _read_torch_file(path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected "
                              "a non-empty state dict of tensors")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a flat state dict of tensors: "
                              f"entries {few_names(bad)} are not tensors")
    return obj


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file (``config.json``, ``preprocessor_config.json``, an index)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    return data


def shard_names(index: Path) -> list[str]:
    """The distinct shard files an index's ``weight_map`` names, sorted; each must be a plain
    file name beside the index (no folder, no leading dot), so an index cannot point outside
    its directory (a local folder and a hub download check the same way)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{str(index)!r} is not a valid shard index: expected a non-empty "
                              "'weight_map' object of tensor name -> shard file")
    values = list(weight_map.values())
    bad = sorted({repr(v) for v in values if not isinstance(v, str) or not v or "/" in v
                  or "\\" in v or v.startswith(".")})
    if bad:
        raise CheckpointError(f"{str(index)!r} names a shard outside its directory: "
                              f"{', '.join(bad[:3])}; expected file names beside the index")
    return sorted(set(values))


def _read_shards(directory: Path, index: Path) -> dict[str, torch.Tensor]:
    """Every shard an index names (``shard_names``), merged."""
    out: dict[str, torch.Tensor] = {}
    for shard in shard_names(index):
        out.update(read_tensor_file(directory / shard))
    return out


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` or ``pytorch_model.bin`` (or their sharded index) of a directory."""
    for name in HF_WEIGHT_FILES:
        if (directory / name).is_file():
            return read_tensor_file(directory / name)
    for name in HF_SHARD_INDEXES:
        if (directory / name).is_file():
            return _read_shards(directory, directory / name)
    raise CheckpointError(f"Hugging Face directory {str(directory)!r} has no model.safetensors or "
                          "pytorch_model.bin")


def read_label_csv(path: str | os.PathLike) -> list[str]:
    """Display names, in index order, from AST's ``class_labels_indices.csv``.

    Columns ``index,mid,display_name``; names are quoted and may contain commas.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read label file {str(path)!r}: {e}") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows or [c.strip() for c in rows[0]] != ["index", "mid", "display_name"]:
        raise ConfigError(f"label file {str(path)!r} must start with the header "
                          "'index,mid,display_name'")
    labels: dict[int, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 3:
            raise ConfigError(f"label file {str(path)!r} line {line}: expected 3 columns "
                              f"(index,mid,display_name), got {len(row)}")
        try:
            idx = int(row[0])
        except ValueError:
            raise ConfigError(f"label file {str(path)!r} line {line}: index {row[0]!r} is not "
                              "an integer") from None
        if idx in labels:
            raise ConfigError(f"label file {str(path)!r} line {line}: index {idx} repeated")
        labels[idx] = row[2].strip()
    if sorted(labels) != list(range(len(labels))) or not labels:
        raise ConfigError(f"label file {str(path)!r}: indices must be 0..N-1 without gaps")
    return [labels[i] for i in range(len(labels))]
