"""``aat predict``: classify audio files with a checkpoint's own head or a task bundle.

Scores are sigmoids for multi-label tasks and softmaxes otherwise. A file that cannot be
decoded is reported and skipped; the exit status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from aat_serve.adapters.bundle import TaskBundle, head_bundle
from aat_serve.adapters.checkpoints import load_checkpoint, read_label_csv
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import AudioError, CheckpointError, ConfigError
from aat_serve.adapters.features import features_from_audio
from aat_serve.adapters.model import AudioClassifier


@dataclass
class Predictor:
    """A ready single-task model with its labels, score function and feature settings."""

    model: AudioClassifier
    labels: list[str]
    multi_label: bool
    features: FeatureConfig
    device: torch.device

    @torch.inference_mode()
    def logits(self, source) -> torch.Tensor:
        """Logits ``(C,)`` of one clip (path, bytes or binary file)."""
        x = features_from_audio(source, self.features).unsqueeze(0).to(self.device)
        return self.model(x)[0].float().cpu()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)


def build_predictor(checkpoint: str, bundle_path: str | None = None,
                    labels_csv: str | None = None, device: str = "cpu") -> Predictor:
    """Load the backbone, then the bundle (or the checkpoint's own head) on top of it."""
    ckpt = load_checkpoint(checkpoint)
    if bundle_path is not None:
        bundle = TaskBundle.load(bundle_path)
        fingerprint = None
    else:
        if ckpt.head is None:
            raise CheckpointError(f"checkpoint {checkpoint!r} has no classification head of its "
                                  "own; pass --bundle FILE with a task bundle for it")
        bundle = head_bundle(ckpt, "checkpoint")
        fingerprint = bundle.manifest.backbone_fingerprint  # computed from this backbone
    m = bundle.manifest
    features = m.feature_config
    if features.num_mel_bins != ckpt.backbone.cfg.num_mel_bins:
        raise ConfigError(f"the task's features have {features.num_mel_bins} mel bins, but the "
                          f"backbone expects {ckpt.backbone.cfg.num_mel_bins}")
    labels = list(m.labels)
    if labels_csv is not None:
        labels = read_label_csv(labels_csv)
        if len(labels) != m.num_classes:
            raise ConfigError(f"label file {labels_csv!r} has {len(labels)} classes, but the "
                              f"task has {m.num_classes}")
    model = bundle.build_model(ckpt.backbone, fingerprint).eval()
    try:
        dev = torch.device(device)
        model.to(dev)
    except (RuntimeError, AssertionError) as e:  # bad name, or CUDA not available
        raise ConfigError(f"cannot use device {device!r}: {e}") from None
    return Predictor(model, labels, m.multi_label, features, dev)


def _result(file: str, logits: torch.Tensor, predictor: Predictor, k: int) -> dict:
    scores = predictor.scores(logits)
    top = torch.topk(scores, min(k, scores.numel()))
    return {"file": file,
            "labels": [{"label": predictor.labels[i], "score": float(s)}
                       for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)],
            "logits": [float(v) for v in logits.tolist()]}


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    predictor = build_predictor(args.checkpoint, args.bundle, args.labels, args.device)
    failed = 0
    progress = tqdm(args.audio, desc="predict", unit="file", file=sys.stderr,
                    disable=len(args.audio) < 2 or not sys.stderr.isatty())
    for path in progress:
        try:
            logits = predictor.logits(path)
        except AudioError as e:
            failed += 1
            msg = str(e) if path in str(e) else f"{path}: {e}"
            progress.write(f"error: {msg}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": path, "error": msg}), flush=True)
            continue
        result = _result(path, logits, predictor, args.top_k)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            lines = [path] + [f"  {r['score']:.4f}  {r['label']}" for r in result["labels"]]
            progress.write("\n".join(lines), file=sys.stdout)
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify audio files",
        description="Classify audio files (WAV, FLAC, OGG/Vorbis, MP3) with a backbone checkpoint "
                    "and either its own head or a task bundle. Scores are sigmoids for "
                    "multi-label tasks and softmaxes otherwise. Feature settings come from the "
                    "bundle's manifest, or from the checkpoint.",
        epilog="With --json each file gives one line: {\"file\", \"labels\": [{\"label\", "
               "\"score\"}, ...] (top-k, best first), \"logits\": [...] (every class, in index "
               "order)}, or {\"file\", \"error\"} when it cannot be decoded. The exit status is 1 "
               "if any file failed.")
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files to classify")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="backbone: a Hugging Face directory, or an AST / SSAST .pth file")
    p.add_argument("--bundle", metavar="FILE",
                   help="task bundle (.safetensors); default: the checkpoint's own head")
    p.add_argument("--labels", metavar="CSV",
                   help="class names from an AST class_labels_indices.csv "
                        "(index,mid,display_name); default: the task's own labels")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="how many labels to print per file (default 5)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    p.set_defaults(func=run)

