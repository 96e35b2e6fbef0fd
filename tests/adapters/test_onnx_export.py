"""ONNX export: onnxruntime equals torch for every bundle method; metadata; shapes."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.errors import ConfigError
from adapters.methods import BUNDLE_METHODS
from adapters.model import AudioClassifier
from adapters.onnx_export import export_onnx
from tests.helpers import tiny_backbone

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

FRAMES = 48  # shorter than the backbone's 64: exercises the positional-grid cut


def _trained(method: str, seed: int = 0) -> AudioClassifier:
    """A model whose task weights are random and non-zero (fresh adapters are the identity)."""
    model = AudioClassifier(tiny_backbone(seed=seed), method, 5).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _run(path, x: torch.Tensor):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"features": x.numpy()})[0])


@pytest.mark.parametrize("method", BUNDLE_METHODS)
def test_onnxruntime_equals_torch(tmp_path, method):
    model = _trained(method)
    path = export_onnx(model, tmp_path / "m.onnx", num_frames=FRAMES)
    x = torch.randn(3, FRAMES, model.backbone.cfg.num_mel_bins)
    with torch.no_grad():
        ref = model(x)
    got = _run(path, x)
    assert got.shape == ref.shape == (3, 5)
    assert (got - ref).abs().max().item() < 1e-4
    # Differs check: another input gives other logits, so the graph is not a constant.
    other = _run(path, torch.randn_like(x))
    assert (other - ref).abs().max().item() > 1e-3


def test_adapter_folding_matters(tmp_path):
    """The folded adapters are really in the graph: zeroing them changes the output."""
    model = _trained("aat_ms")
    x = torch.randn(2, FRAMES, model.backbone.cfg.num_mel_bins)
    with_adapters = _run(export_onnx(model, tmp_path / "a.onnx", num_frames=FRAMES), x)
    with torch.no_grad():
        for block in model.backbone.blocks:
            block.mlp_adapter.fc2.weight.zero_()
            block.mlp_adapter.fc2.bias.zero_()
    without = _run(export_onnx(model, tmp_path / "b.onnx", num_frames=FRAMES), x)
    assert (with_adapters - without).abs().max().item() > 1e-3
    with torch.no_grad():
        assert (without - model(x)).abs().max().item() < 1e-4


def test_metadata_and_dynamic_batch(tmp_path):
    model = _trained("aat_m")
    meta = {"aat.task": "birds", "aat.labels": ["a", "b", "c", "d", "e"]}
    path = export_onnx(model, tmp_path / "m.onnx", num_frames=FRAMES, metadata=meta)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["aat.task"] == "birds"
    assert json.loads(props["aat.labels"]) == ["a", "b", "c", "d", "e"]
    for b in (1, 4):
        assert _run(path, torch.randn(b, FRAMES, 32)).shape == (b, 5)


def test_fixed_batch_and_bad_arguments(tmp_path):
    model = _trained("head")
    path = export_onnx(model, tmp_path / "m.onnx", num_frames=FRAMES, batch=2)
    assert _run(path, torch.randn(2, FRAMES, 32)).shape == (2, 5)
    with pytest.raises(Exception, match=r"(?i)dimension|shape|index"):
        _run(path, torch.randn(3, FRAMES, 32))
    with pytest.raises(ConfigError, match="dtype must be float32 or float16"):
        export_onnx(model, tmp_path / "x.onnx", num_frames=FRAMES, dtype="int8")
    with pytest.raises(ConfigError, match="batch must be 'dynamic' or a positive int"):
        export_onnx(model, tmp_path / "x.onnx", num_frames=FRAMES, batch=0)


def test_float16_export_is_close(tmp_path):
    model = _trained("aat_ms")
    path = export_onnx(model, tmp_path / "h.onnx", num_frames=FRAMES, dtype="float16")
    x = torch.randn(2, FRAMES, 32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"features": x.half().numpy()})[0]).float()
    with torch.no_grad():
        ref = model(x)
    assert (got - ref).abs().max().item() < 5e-2  # fp16 storage and math: ~3 decimal digits
