"""Whole-model checkpoints of full/partial runs: our loader and the public-checkpoint loader
both read them back to the same logits; files of other kinds are refused clearly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint
from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import BundleError, CheckpointError
from aat_serve.adapters.model import AudioClassifier
from aat_serve.training.export import load_model_checkpoint, load_trained, save_model_checkpoint
from tests.helpers import tiny_backbone


def test_whole_model_checkpoint_reads_back_through_both_loaders(tmp_path):
    torch.manual_seed(0)
    cfg = BackboneConfig(embed_dim=32, depth=1, num_heads=2, mlp_hidden=64, target_length=128)
    model = AudioClassifier(AST(cfg), "partial", 3).eval()
    with torch.no_grad():
        model.head.fc.bias.add_(0.3)  # a head that is not the fresh init
    path = save_model_checkpoint(model, tmp_path / "m.safetensors", task="t",
                                 labels=["a", "b", "c"], multi_label=False,
                                 features=FeatureConfig(target_length=128),
                                 recipe={"lr": 1e-5}, metrics={"acc": 0.5})
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        want = model(x)
        ours, manifest = load_model_checkpoint(path)
        torch.testing.assert_close(ours(x), want)
        public = load_checkpoint(path, num_heads=2)  # a backbone with its own labels (issue 22)
        assert public.source_format == "aat-model" and public.backbone.cfg.freq_stride == 10
        assert public.labels == ["a", "b", "c"] and public.features.target_length == 128
        torch.testing.assert_close(public.logits(x), want, rtol=1e-5, atol=1e-6)
        # The same tensors without the manifest: the original AST layout, labels unknown.
        bare = tmp_path / "bare.safetensors"
        save_file(load_file(str(path)), str(bare))
        plain = load_checkpoint(bare, num_heads=2)
        assert plain.source_format == "ast" and plain.labels is None
        torch.testing.assert_close(plain.logits(x), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(AudioClassifier(AST(cfg), "partial", 3)(x), want)
    assert manifest["labels"] == ["a", "b", "c"] and manifest["method"] == "partial"
    assert manifest["metrics"] == {"acc": 0.5} and manifest["recipe"] == {"lr": 1e-5}
    assert load_trained(path)[1]["task"] == "t"


def test_bundle_methods_and_foreign_files_are_refused(tmp_path):
    model = AudioClassifier(tiny_backbone(), "aat_ms", 2)
    with pytest.raises(BundleError, match="keeps the backbone frozen; save a task bundle"):
        save_model_checkpoint(model, tmp_path / "x", task="t", labels=["a", "b"],
                              features=FeatureConfig(num_mel_bins=32, target_length=64),
                              multi_label=False)
    bundle = TaskBundle.from_model(model, "t", ["a", "b"],
                                   FeatureConfig(num_mel_bins=32, target_length=64))
    bundle.save(tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="is a task bundle; it needs the backbone"):
        load_trained(tmp_path / "b.safetensors")
    assert load_trained(tmp_path / "b.safetensors", tiny_backbone())[1]["method"] == "aat_ms"
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"neither a task bundle .* format is None"):
        load_trained(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_trained(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained(tmp_path / "missing.safetensors")
