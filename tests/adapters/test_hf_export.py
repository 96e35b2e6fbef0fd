"""Export to transformers: a backbone plus a ``head`` or ``aat_m`` task is a stock
``ASTForAudioClassification`` (no custom code) whose logits equal ours; other methods are
refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.hf_export import task_as_hf, write_hf_directory
from aat_serve.adapters.model import AudioClassifier
from tests.helpers import perturb_task_weights, tiny_backbone
from tests.service.helpers import write_tiny_checkpoint

transformers = pytest.importorskip("transformers")

LABELS = ["bark", "meow", "chirp", "moo", "quack"]
FEATURES = FeatureConfig(num_mel_bins=32, target_length=64, mean=-5.0, std=3.0)


def _bundle(backbone, method: str, seed: int = 0) -> TaskBundle:
    model = perturb_task_weights(AudioClassifier(backbone, method, len(LABELS)), seed=seed,
                                 scale=0.2)
    return TaskBundle.from_model(model, "animals", LABELS, FEATURES)


def _hf_logits(directory, x: torch.Tensor) -> torch.Tensor:
    model = transformers.ASTForAudioClassification.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return model(input_values=x).logits


def _our_logits(bundle: TaskBundle, backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bundle.build_model(backbone).eval()(x)


@pytest.mark.parametrize("method", ["aat_m", "head"])
def test_transformers_loads_the_export_and_its_logits_equal_ours(tmp_path, method):
    backbone = tiny_backbone()
    bundle = _bundle(backbone, method)
    out = write_hf_directory(task_as_hf(backbone, bundle), tmp_path / "hf")
    x = torch.randn(3, FEATURES.target_length, FEATURES.num_mel_bins)
    ours, theirs = _our_logits(bundle, backbone, x), _hf_logits(out, x)
    assert theirs.shape == ours.shape == (3, len(LABELS))
    assert (theirs - ours).abs().max().item() < 1e-4

    config = json.loads((out / "config.json").read_text())
    rank = bundle.manifest.adapter_config.bottleneck if method == "aat_m" else 0
    assert config["intermediate_size"] == backbone.cfg.mlp_hidden + rank
    assert [config["id2label"][str(i)] for i in range(len(LABELS))] == LABELS
    fe = transformers.ASTFeatureExtractor.from_pretrained(str(out))
    assert (fe.num_mel_bins, fe.max_length, fe.mean, fe.std) == (32, 64, -5.0, 3.0)


def test_the_folded_adapter_is_what_makes_the_logits_equal(tmp_path):
    """The 'differs' check: the same head on the plain backbone (adapter dropped) is far off,
    so the export's equality comes from the widened MLPs."""
    backbone = tiny_backbone()
    bundle = _bundle(backbone, "aat_m", seed=3)
    head_only = TaskBundle.from_model(AudioClassifier(backbone, "head", len(LABELS)), "animals",
                                      LABELS, FEATURES)
    head_only.tensors.update({k: v for k, v in bundle.tensors.items() if k.startswith("head.")})
    plain = write_hf_directory(task_as_hf(backbone, head_only), tmp_path / "plain")
    x = torch.randn(2, FEATURES.target_length, FEATURES.num_mel_bins)
    assert (_hf_logits(plain, x) - _our_logits(bundle, backbone, x)).abs().max().item() > 1e-2


@pytest.mark.parametrize(("method", "reason"), [
    ("aat_ms", "spatial adapters act on the attention output"),
    ("prompt", "deep prompts add tokens to every block"),
    ("joint", "spatial adapters and deep prompts"),
])
def test_methods_that_cannot_be_exact_are_refused_with_the_reason(method, reason):
    backbone = tiny_backbone()
    with pytest.raises(ConfigError) as e:
        task_as_hf(backbone, _bundle(backbone, method))
    assert f"task 'animals' (method {method!r}) cannot be exported exactly" in str(e.value)
    assert reason in str(e.value) and "methods that can: head, aat_m" in str(e.value)


def test_aat_export_hf_command(tmp_path):
    ckpt_dir = write_tiny_checkpoint(tmp_path / "ckpt")
    backbone = load_checkpoint(ckpt_dir).backbone
    bundle = _bundle(backbone, "aat_m", seed=5)
    bundle_path = bundle.save(tmp_path / "animals.safetensors")
    out = tmp_path / "exported"
    run = subprocess.run([sys.executable, "-m", "aat_serve.cli.main", "export", "hf",
                          "--checkpoint", str(ckpt_dir), "--bundle", str(bundle_path),
                          "--out", str(out), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["method"] == "aat_m" and info["classes"] == len(LABELS)
    assert info["intermediate_size"] == backbone.cfg.mlp_hidden + \
        bundle.manifest.adapter_config.bottleneck
    x = torch.randn(2, FEATURES.target_length, backbone.cfg.num_mel_bins)
    assert (_hf_logits(out, x) - _our_logits(bundle, backbone, x)).abs().max().item() < 1e-4
    refused = subprocess.run([sys.executable, "-m", "aat_serve.cli.main", "export", "hf",
                              "--checkpoint", str(ckpt_dir), "--bundle",
                              str(_bundle(backbone, "aat_ms").save(tmp_path / "ms.safetensors")),
                              "--out", str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "cannot be exported exactly" in refused.stderr
    assert not (tmp_path / "no").exists()
