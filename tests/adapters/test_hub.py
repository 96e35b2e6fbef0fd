"""``--checkpoint`` as a Hugging Face model id, resolved offline from a cache the test builds.

The cache has huggingface_hub's layout (``models--owner--name/refs/main`` -> commit,
``snapshots/<commit>/<files>``); nothing touches the network (``offline=True`` or
``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aat_serve.adapters.checkpoints import load_checkpoint
from aat_serve.adapters.checkpoints.hub import looks_like_model_id, resolve_checkpoint
from aat_serve.adapters.errors import CheckpointError
from tests.adapters.ckpt_factory import random_canonical, write_hf_dir
from tests.helpers import tiny_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_model(cache: Path, repo: str, *, weights: str | None = "model.safetensors",
                 seed: int = 0) -> Path:
    """Write ``repo`` into ``cache`` as huggingface_hub stores a downloaded snapshot."""
    owner, name = repo.split("/")
    root = cache / f"models--{owner}--{name}"
    snap = root / "snapshots" / COMMIT
    cfg = tiny_config()
    write_hf_dir(snap, random_canonical(cfg, 3, seed=seed), cfg, labels=["a", "b", "c"],
                 preprocessor={"num_mel_bins": cfg.num_mel_bins, "max_length": 64,
                               "mean": -3.0, "std": 2.0, "sampling_rate": 16000},
                 weights=weights or "model.safetensors")
    if weights is None:
        (snap / "model.safetensors").unlink()
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def test_model_id_syntax():
    assert looks_like_model_id("MIT/ast-finetuned-audioset-10-10-0.4593")
    assert looks_like_model_id("acme/tiny_ast.v2")
    for bad in ("ast.pth", "/abs/path", "a/b/c", "../x", "a/..", "owner/", " a/b", "a b/c",
                "models/ast.pth", "runs/best.safetensors"):
        assert not looks_like_model_id(bad), bad


def test_local_paths_are_returned_unchanged(tmp_path):
    f = tmp_path / "model.pth"
    f.write_bytes(b"x")
    assert resolve_checkpoint(f, offline=True) == f
    assert resolve_checkpoint(tmp_path, offline=True) == tmp_path
    with pytest.raises(CheckpointError, match=r"'missing\.pth' does not exist: expected a local "
                                              r"file or directory, or a Hugging Face model id"):
        resolve_checkpoint("missing.pth", offline=True)


def test_cached_model_resolves_offline_and_loads(tmp_path):
    snap = cached_model(tmp_path, "acme/tiny-ast")
    got = resolve_checkpoint("acme/tiny-ast", cache_dir=tmp_path, offline=True)
    assert got == snap
    ckpt = load_checkpoint(got)
    direct = load_checkpoint(snap)
    assert ckpt.labels == ["a", "b", "c"]
    assert ckpt.features.mean == -3.0 and ckpt.features.target_length == 64
    assert ckpt.backbone.fingerprint() == direct.backbone.fingerprint()
    # A different cached model resolves to different weights.
    other = cached_model(tmp_path, "acme/other-ast", seed=1)
    got2 = resolve_checkpoint("acme/other-ast", cache_dir=tmp_path, offline=True)
    assert got2 == other != got
    assert load_checkpoint(got2).backbone.fingerprint() != ckpt.backbone.fingerprint()


def test_not_cached_offline_is_a_clear_error(tmp_path):
    cached_model(tmp_path, "acme/tiny-ast")
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("acme/not-there", cache_dir=tmp_path, offline=True)
    msg = str(e.value)
    assert "'acme/not-there' is not a local path and is not in the Hugging Face cache" in msg
    assert str(tmp_path) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "huggingface-cli download acme/not-there" in msg


def test_environment_offline_flag_is_read_at_call_time(tmp_path, monkeypatch):
    snap = cached_model(tmp_path, "acme/tiny-ast")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint("acme/tiny-ast", cache_dir=tmp_path) == snap
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1"):
        resolve_checkpoint("acme/absent", cache_dir=tmp_path)


def test_bin_weights_are_found_when_there_is_no_safetensors(tmp_path):
    snap = cached_model(tmp_path, "acme/bin-ast", weights="pytorch_model.bin")
    got = resolve_checkpoint("acme/bin-ast", cache_dir=tmp_path, offline=True)
    assert got == snap and (got / "pytorch_model.bin").is_file()
    assert not (got / "model.safetensors").exists()
    assert load_checkpoint(got).num_classes == 3


def test_cached_config_without_weights_is_an_error(tmp_path):
    cached_model(tmp_path, "acme/no-weights", weights=None)
    with pytest.raises(CheckpointError, match=r"'acme/no-weights' has no weights in the Hugging "
                                              r"Face cache .* while offline: expected "
                                              r"model\.safetensors or pytorch_model\.bin"):
        resolve_checkpoint("acme/no-weights", cache_dir=tmp_path, offline=True)


def test_load_checkpoint_accepts_a_model_id(tmp_path, monkeypatch):
    """The hook in ``load_checkpoint``: an id is resolved through the default cache."""
    import huggingface_hub.constants as hf_constants

    snap = cached_model(tmp_path, "acme/tiny-ast")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = load_checkpoint("acme/tiny-ast")
    assert ckpt.backbone.fingerprint() == load_checkpoint(snap).backbone.fingerprint()
    x = torch.randn(1, 64, 32)
    assert torch.equal(ckpt.logits(x), load_checkpoint(snap).logits(x))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load_checkpoint("acme/absent")
