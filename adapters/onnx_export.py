"""Export one task (backbone + bundle, or a checkpoint's own head) as a standalone ONNX model.

The exported graph takes normalised log-mel features ``(batch, frames, mel)`` at the task's
target length (the default: the fastest, for callers that compute features themselves), or
with ``waveform=`` raw samples ``(batch, samples)`` with the Kaldi front end in the graph
(``fbank.KaldiFbank``: no client re-implements the fbank or the normalisation), and returns
``logits (batch, classes)``. The metadata key ``aat.input`` says which. Two things are folded
at export time:

* the positional embedding is resampled once for the task's grid and stored as a constant;
* the MLP adapter reads the same LN2 output and GELU as the MLP, so ``MLP(h) + A_m(h)`` is one
  wider MLP (design.md): ``fc1 = [W1; W_down]``, ``fc2 = [W2 | W_up]``, ``b2 + b_up``.

Labels, feature settings, task and backbone fingerprint go in the model's metadata, so the
file is self-describing. Opset 17 (the TorchScript exporter; fast and supported by every
current ONNX Runtime).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from aat_serve.adapters.backbone import AST, Block, drop_prompts, insert_prompts
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.fbank import KaldiFbank
from aat_serve.adapters.kernels.layout import MlpWeights
from aat_serve.adapters.model import AudioClassifier

OPSET = 17


class _WidenedBlock(nn.Module):
    """A block whose MLP adapter is folded into a widened MLP (one GEMM pair)."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = block.norm1, block.attn, block.norm2
        self.spatial_adapter = block.spatial_adapter
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        mlp = MlpWeights(fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if block.mlp_adapter is not None:
            a = block.mlp_adapter
            mlp = mlp.widened(a.fc1.weight, a.fc1.bias, a.fc2.weight, a.fc2.bias)
        self.fc1 = nn.Linear(mlp.w1.shape[1], mlp.w1.shape[0])
        self.fc2 = nn.Linear(mlp.w2.shape[1], mlp.w2.shape[0])
        with torch.no_grad():
            self.fc1.weight.copy_(mlp.w1)
            self.fc1.bias.copy_(mlp.b1)
            self.fc2.weight.copy_(mlp.w2)
            self.fc2.bias.copy_(mlp.b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        if self.spatial_adapter is not None:
            a = a + self.spatial_adapter(a)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FixedLengthEmbed(nn.Module):
    """``AST.embed`` for one clip length, with prefix tokens and positions as constants."""

    def __init__(self, backbone: AST, num_frames: int) -> None:
        super().__init__()
        self.patch_embed = backbone.patch_embed
        self.register_buffer("prefix", backbone.prefix_tokens().detach().clone())
        grid = backbone.cfg.grid(num_frames)
        self.register_buffer("pos", backbone.pos_embed_for(grid).detach().clone())

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(features)
        return torch.cat([self.prefix.expand(features.shape[0], -1, -1), tokens], 1) + self.pos


class ExportableClassifier(nn.Module):
    """A fixed-length, graph-friendly copy of a single-task ``AudioClassifier``."""

    def __init__(self, model: AudioClassifier, num_frames: int) -> None:
        super().__init__()
        bb: AST = model.backbone
        self.embed = FixedLengthEmbed(bb, num_frames)
        prompts = model.prompts.tokens.detach().clone() if model.prompts is not None else None
        self.register_buffer("prompts", prompts)
        self.blocks = nn.ModuleList(_WidenedBlock(b) for b in bb.blocks)
        self.backbone = bb  # for ``pool`` (final norm + prefix mean)
        self.head = model.head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = self.embed.num_prefix_tokens
        h = self.embed(features)
        for i, block in enumerate(self.blocks):
            if self.prompts is None:
                h = block(h)
            else:
                p = self.prompts[i].unsqueeze(0).expand(features.shape[0], -1, -1)
                h = drop_prompts(block(insert_prompts(h, p, n)), p.shape[1], n)
        return self.head(self.backbone.pool(h))


class WaveformClassifier(nn.Module):
    """Raw samples in: the Kaldi front end (``fbank.KaldiFbank``, float32, DFT as a matrix
    product) in front of an ``ExportableClassifier`` of any dtype."""

    def __init__(self, classifier: nn.Module, features: FeatureConfig, dtype: torch.dtype
                 ) -> None:
        super().__init__()
        self.fbank = KaldiFbank(features, dft="matmul")
        self.classifier, self.dtype = classifier, dtype

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fbank(waveform.float()).to(self.dtype))


def export_onnx(model: AudioClassifier, out: str | os.PathLike, *, num_frames: int,
                metadata: dict[str, Any] | None = None,
                dtype: Literal["float32", "float16"] = "float32",
                batch: int | Literal["dynamic"] = "dynamic",
                waveform: FeatureConfig | None = None) -> Path:
    """Write ``model`` as ONNX to ``out``; returns the path. ``metadata`` values become JSON.

    By default the graph takes normalised log-mel ``features (batch, num_frames, mel)``. With
    ``waveform`` (the task's feature settings) it takes ``waveform (batch, samples)``: mono
    float samples in [-1, 1] at ``waveform.sample_rate``, any number of samples, one length
    per batch, and computes the features in the graph.
    """
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"ONNX export dtype must be float32 or float16, got {dtype!r}")
    if batch != "dynamic" and (not isinstance(batch, int) or batch <= 0):
        raise ConfigError(f"ONNX export batch must be 'dynamic' or a positive int, got {batch!r}")
    # A deep copy: the exportable module shares submodules and is cast to ``dtype``.
    module = ExportableClassifier(copy.deepcopy(model), num_frames).eval()
    tdtype = torch.float32 if dtype == "float32" else torch.float16
    module = module.to(tdtype)
    n = 1 if batch == "dynamic" else batch
    if waveform is None:
        name, example = "features", torch.zeros(n, num_frames, model.backbone.cfg.num_mel_bins,
                                                dtype=tdtype)
        axes = {0: "batch"}
    else:
        module = WaveformClassifier(module, waveform, tdtype).eval()
        name, example = "waveform", torch.zeros(n, waveform.sample_rate)
        axes = {0: "batch", 1: "samples"}
    if batch != "dynamic":
        axes = {k: v for k, v in axes.items() if k != 0}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: axes, **({"logits": {0: "batch"}} if batch == "dynamic" else {})}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(out), dynamo=False, opset_version=OPSET,
                          input_names=[name], output_names=["logits"],
                          dynamic_axes=dynamic or None, do_constant_folding=True)
    if metadata:
        import onnx

        proto = onnx.load(str(out))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key = key
            entry.value = value if isinstance(value, str) else json.dumps(value)
        onnx.save(proto, str(out))
    return out
