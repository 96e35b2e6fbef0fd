"""``--checkpoint`` as a Hugging Face model id: resolved to a local directory in the hub cache.

A local file or directory is returned unchanged. Anything else that looks like ``owner/name``
(for example ``MIT/ast-finetuned-audioset-10-10-0.4593``) is fetched with ``huggingface_hub``
into its cache (``config.json``, the weights, ``preprocessor_config.json`` if present) when the
machine is online, or looked up in that cache only when it is offline (``HF_HUB_OFFLINE=1``,
or no network). A model that is neither local nor cached is a ``CheckpointError`` that says
how to get it. Weights are then read by ``load_checkpoint`` like any local directory
(safetensors preferred; ``.bin`` files only through ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from aat_serve.adapters.checkpoints.files import HF_SHARD_INDEXES, HF_WEIGHT_FILES, shard_names
from aat_serve.adapters.errors import CheckpointError

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
"""``owner/name`` as the hub spells repository ids."""
OPTIONAL = ("preprocessor_config.json",)
"""Fetched when the repository has them."""


FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json", ".onnx")
"""A missing ``dir/file.pth`` is a mistyped path, not a model id: never sent to the hub."""


def looks_like_model_id(value: str) -> bool:
    """True for ``owner/name`` (no ``..``, no leading ``/``, not a checkpoint file name)."""
    return (bool(MODEL_ID_RE.fullmatch(value)) and ".." not in value
            and not value.lower().endswith(FILE_SUFFIXES))


def env_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, read now."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_checkpoint(path_or_id: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       offline: bool | None = None) -> Path:
    """A local path for ``path_or_id``: itself if it exists, else the hub cache's snapshot.

    ``offline`` defaults to ``env_offline()``; ``cache_dir`` to huggingface_hub's cache
    (``HF_HUB_CACHE`` / ``HF_HOME``).
    """
    path = Path(path_or_id)
    if path.exists():
        return path
    text = os.fspath(path_or_id)
    if not looks_like_model_id(text):
        raise CheckpointError(f"checkpoint {text!r} does not exist: expected a local file or "
                              "directory, or a Hugging Face model id such as "
                              "'MIT/ast-finetuned-audioset-10-10-0.4593'")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"checkpoint {text!r} is not a local path, and resolving a Hugging "
                              "Face model id needs huggingface_hub (pip install "
                              "huggingface_hub)") from None
    repo = _HubRepo(text, revision, cache_dir, env_offline() if offline is None else offline)
    return repo.snapshot()


@dataclass
class _HubRepo:
    """One model id at one revision, fetched into the hub cache (or looked up there offline)."""

    model_id: str
    revision: str | None
    cache_dir: str | os.PathLike | None
    offline: bool

    @property
    def cache(self) -> str:
        """The cache folder, for messages."""
        return str(self.cache_dir) if self.cache_dir is not None else _default_cache()

    def fetch(self, filename: str) -> Path | None:
        """The cached file, or None when the repository has no such file.

        Offline, a file missing from the cache is None too: the repository may simply lack it.
        """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        try:
            return Path(hf_hub_download(self.model_id, filename, revision=self.revision,
                                        cache_dir=self.cache_dir,
                                        local_files_only=self.offline))
        except LocalEntryNotFoundError:
            if self.offline:
                return None
            raise
        except EntryNotFoundError:
            return None

    def snapshot(self) -> Path:
        """The snapshot folder holding config.json, the weights and the optional files.

        huggingface_hub's errors become ``CheckpointError`` saying what to do.
        """
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        text = self.model_id
        try:
            config, weights = self._config(), self._weights()
            for name in OPTIONAL:
                self.fetch(name)
        except LocalEntryNotFoundError:
            raise CheckpointError(
                f"checkpoint {text!r} is not a local path, and the Hugging Face hub cannot be "
                f"reached (no network?) while the model is not in the cache ({self.cache}): "
                f"connect and retry, download it elsewhere (huggingface-cli download {text}) "
                "and copy the cache, or pass a local directory") from None
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            kind = "revision" if isinstance(e, RevisionNotFoundError) else "model"
            raise CheckpointError(f"Hugging Face {kind} not found for {text!r}"
                                  + (f" at revision {self.revision!r}" if self.revision else "")
                                  + " (a private or gated model needs HF_TOKEN)") from None
        except HfHubHTTPError as e:
            raise CheckpointError(f"downloading {text!r} from the Hugging Face hub failed: "
                                  f"{str(e).splitlines()[0][:200]}") from None
        if config.parent != weights.parent:
            raise CheckpointError(f"Hugging Face model {text!r}: config.json and the weights "
                                  "resolved to different snapshots")
        return config.parent

    def _config(self) -> Path:
        config = self.fetch("config.json")
        if config is not None:
            return config
        text = self.model_id
        if self.offline:
            raise CheckpointError(
                f"checkpoint {text!r} is not a local path and is not in the Hugging Face "
                f"cache ({self.cache}), and the hub is offline (HF_HUB_OFFLINE=1): download it "
                f"once with network access (huggingface-cli download {text}) or pass a "
                "local directory")
        raise CheckpointError(f"Hugging Face model {text!r} has no config.json; expected an "
                              "ASTForAudioClassification repository")

    def _weights(self) -> Path:
        """The single weights file, else a shard index whose shards are all fetched."""
        weights = next((w for w in map(self.fetch, HF_WEIGHT_FILES) if w is not None), None)
        if weights is not None:
            return weights
        for index_name in HF_SHARD_INDEXES:
            index = self.fetch(index_name)
            if index is not None:
                for shard in shard_names(index):
                    if self.fetch(shard) is None:
                        raise CheckpointError(f"Hugging Face model {self.model_id!r}: shard "
                                              f"{shard!r} named by {index_name} is missing")
                return index
        state = (f"in the Hugging Face cache ({self.cache}) while offline" if self.offline
                 else "in the repository")
        raise CheckpointError(f"Hugging Face model {self.model_id!r} has no weights {state}: "
                              f"expected {' or '.join(HF_WEIGHT_FILES)}")


def _default_cache() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"
