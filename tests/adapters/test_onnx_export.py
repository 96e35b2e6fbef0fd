"""ONNX export: onnxruntime equals torch for every bundle method; metadata; shapes."""

from __future__ import annotations

import json

import pytest
import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.methods import BUNDLE_METHODS
from aat_serve.adapters.model import AudioClassifier
from aat_serve.adapters.onnx_export import export_onnx
from tests.helpers import perturb_task_weights, tiny_backbone

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

FRAMES = 48  # shorter than the backbone's 64: exercises the positional-grid cut


def _trained(method: str, seed: int = 0) -> AudioClassifier:
    """A model whose task weights are random and non-zero (fresh adapters are the identity)."""
    model = AudioClassifier(tiny_backbone(seed=seed), method, 5).eval()
    return perturb_task_weights(model, seed=seed + 100)


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


def test_cli_exports_a_plain_checkpoint_and_a_bundle(tmp_path, capsys):
    """`aat export onnx` on a checkpoint's own head, then on a bundle: ORT equals torch."""
    from aat_serve.adapters.bundle import TaskBundle
    from aat_serve.adapters.checkpoints import load_checkpoint
    from aat_serve.adapters.config import BackboneConfig, FeatureConfig
    from aat_serve.cli.main import main
    from tests.adapters.ckpt_factory import random_canonical, write_original

    cfg = BackboneConfig(embed_dim=64, depth=2, num_heads=1, mlp_hidden=128,
                         freq_stride=16, time_stride=16, target_length=128)
    ckpt_path = write_original(tmp_path / "ast.pth", random_canonical(cfg, 7))
    out = tmp_path / "plain.onnx"
    assert main(["export", "onnx", "--checkpoint", str(ckpt_path), "--out", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == 7 and info["input"] == ["batch", 128, 128]
    ckpt = load_checkpoint(ckpt_path)
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        ref = ckpt.logits(x)
    assert (_run(out, x) - ref).abs().max().item() < 1e-4

    model = perturb_task_weights(AudioClassifier(ckpt.backbone, "aat_ms", 3).eval(), seed=3)
    bundle = TaskBundle.from_model(model, "dogs", ["a", "b", "c"],
                                   FeatureConfig(target_length=96))
    bundle.save(tmp_path / "dogs.safetensors")
    out2 = tmp_path / "dogs.onnx"
    assert main(["export", "onnx", "--checkpoint", str(ckpt_path), "--bundle",
                 str(tmp_path / "dogs.safetensors"), "--out", str(out2)]) == 0
    assert "task 'dogs' (aat_ms)" in capsys.readouterr().out
    x = torch.randn(3, 96, 128)
    with torch.no_grad():
        ref = model(x)
    assert (_run(out2, x) - ref).abs().max().item() < 1e-4
    props = {p.key: p.value for p in onnx.load(str(out2)).metadata_props}
    assert json.loads(props["aat.labels"]) == ["a", "b", "c"]
    assert json.loads(props["aat.features"])["target_length"] == 96
