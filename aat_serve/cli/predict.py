"""``aat predict``: classify audio files with a checkpoint's own head or a task bundle.

Scores are sigmoids for multi-label tasks and softmaxes otherwise. A file that cannot be
decoded is reported and skipped; the exit status is 1 if any file failed. ``-`` (or
``/dev/stdin``) reads one clip from standard input; a folder stands for its audio files, in
sorted order. ``--json`` results use the API's key: ``predictions``.

Audio longer than the task's clip is scored in windows as ``POST /classify`` scores it
(``aat_serve.adapters.windows``, the same functions): windows of the task's length every
``--hop-s`` (default: one window, no overlap), their probabilities aggregated by ``--aggregate``
(default mean, max for multi-label tasks; ``first`` scores only the first window).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aat_serve.adapters.bundle import TaskBundle, head_bundle
from aat_serve.adapters.checkpoints import load_checkpoint, read_label_csv
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.device import resolve_device
from aat_serve.adapters.errors import AudioError, CheckpointError, ConfigError
from aat_serve.adapters.fbank import window_samples
from aat_serve.adapters.features import fbank, load_audio
from aat_serve.adapters.model import AudioClassifier
from aat_serve.adapters.windows import (
    AGGREGATES,
    Aggregate,
    aggregate_scores,
    default_aggregate,
    plan,
)

WINDOWS_PER_FORWARD = 8
"""Windows of one file computed in one forward pass (bounds memory on long files)."""


@dataclass
class Scored:
    """One file's answer: every window's logits ``(n, C)`` and the aggregated scores."""

    logits: torch.Tensor
    scores: torch.Tensor
    aggregate: Aggregate


@dataclass
class Predictor:
    """A ready single-task model with its labels, score function and feature settings."""

    model: AudioClassifier
    labels: list[str]
    multi_label: bool
    features: FeatureConfig
    device: torch.device

    @torch.inference_mode()
    def score(self, source, hop_s: float | None = None, aggregate: Aggregate | None = None
              ) -> Scored:
        """One clip (path, bytes or binary file) scored in the task's windows."""
        cfg = self.features
        wave = load_audio(source, sample_rate=cfg.sample_rate, max_duration_s=cfg.max_duration_s)
        window = window_samples(cfg)
        how = aggregate or default_aggregate(self.multi_label)
        hop = window if hop_s is None else max(1, round(hop_s * cfg.sample_rate))
        p = plan(wave.numel(), window, hop, how)
        feats = [fbank(wave[a:b], cfg) for a, b in map(p.bounds, range(len(p.starts)))]
        logits = torch.cat([self.model(torch.stack(feats[i:i + WINDOWS_PER_FORWARD])
                                       .to(self.device)).float().cpu()
                            for i in range(0, len(feats), WINDOWS_PER_FORWARD)])
        return Scored(logits, aggregate_scores([self.scores(lg) for lg in logits], how), how)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)


def build_predictor(checkpoint: str, bundle_path: str | None = None,
                    labels_csv: str | None = None, device: str = "auto") -> Predictor:
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
    dev = resolve_device(device, "--device")
    try:
        model.to(dev)
    except (RuntimeError, AssertionError) as e:  # e.g. no such CUDA device index
        raise ConfigError(f"cannot use device {device!r}: {e}") from None
    return Predictor(model, labels, m.multi_label, features, dev)


def _result(file: str, scored: Scored, predictor: Predictor, k: int) -> dict:
    scores = scored.scores
    top = torch.topk(scores, min(k, scores.numel()))
    out = {"file": file,
           "predictions": [{"label": predictor.labels[i], "score": float(s)}
                           for s, i in zip(top.values.tolist(), top.indices.tolist(),
                                           strict=True)],
           "logits": [float(v) for v in scored.logits[0].tolist()],
           "windows": len(scored.logits), "aggregate": scored.aggregate}
    if len(scored.logits) > 1:
        out["window_logits"] = scored.logits.tolist()
    return out


STDIN_NAMES = ("-", "/dev/stdin")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".au", ".aiff", ".aif")


def expand_inputs(items: list[str]) -> list[str]:
    """Each argument as given; a folder becomes its audio files (recursively, sorted)."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if item in STDIN_NAMES or not p.is_dir():
            out.append(item)
            continue
        found = sorted(str(f) for f in p.rglob("*") if f.is_file()
                       and f.suffix.lower() in AUDIO_SUFFIXES and not f.name.startswith("."))
        if not found:
            raise ConfigError(f"folder {item!r} holds no audio files; expected files ending "
                              f"in {', '.join(AUDIO_SUFFIXES)}")
        out.extend(found)
    if sum(i in STDIN_NAMES for i in out) > 1:
        raise ConfigError("standard input ('-' or /dev/stdin) can be read only once")
    return out


def _source(item: str):
    """What ``features_from_audio`` reads: the bytes of stdin, or the path."""
    return sys.stdin.buffer.read() if item in STDIN_NAMES else item


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.hop_s is not None and not args.hop_s > 0:
        raise ConfigError(f"--hop-s must be above 0 (seconds), got {args.hop_s:g}")
    inputs = expand_inputs(args.audio)
    predictor = build_predictor(args.checkpoint, args.bundle, args.labels, args.device)
    failed = 0
    progress = tqdm(inputs, desc="predict", unit="file", file=sys.stderr,
                    disable=len(inputs) < 2 or not sys.stderr.isatty())
    for path in progress:
        try:
            scored = predictor.score(_source(path), args.hop_s, args.aggregate)
        except (AudioError, ConfigError) as e:
            failed += 1
            msg = str(e) if path in str(e) else f"{path}: {e}"
            progress.write(f"error: {msg}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": path, "error": msg}), flush=True)
            continue
        result = _result(path, scored, predictor, args.top_k)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            head = path if result["windows"] == 1 else \
                f"{path} ({result['windows']} windows, {result['aggregate']})"
            lines = [head] + [f"  {r['score']:.4f}  {r['label']}"
                              for r in result["predictions"]]
            progress.write("\n".join(lines), file=sys.stdout)
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify audio files",
        description="Classify audio files (WAV, FLAC, OGG/Vorbis, MP3) with a backbone checkpoint "
                    "and either its own head or a task bundle. Scores are sigmoids for "
                    "multi-label tasks and softmaxes otherwise. Feature settings come from the "
                    "bundle's manifest, or from the checkpoint.",
        epilog="With --json each file gives one line: {\"file\", \"predictions\": [{\"label\", "
               "\"score\"}, ...] (top-k, best first), \"logits\": [...] (every class, in index "
               "order; of the first window), \"windows\", \"aggregate\", and \"window_logits\" "
               "when the audio made several windows}, or {\"file\", \"error\"} when it cannot "
               "be decoded. The exit status is 1 if any file failed; a failure before any "
               "file is read prints {\"error\": {\"type\", \"message\"}}.")
    p.add_argument("audio", nargs="+", metavar="AUDIO",
                   help="audio files to classify; a folder stands for its audio files "
                        "(sorted), '-' for one clip on standard input")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="backbone: a Hugging Face directory, an AST / SSAST .pth file, a "
                        "full/partial model from aat train, or 'demo' (the shipped demo "
                        "backbone)")
    p.add_argument("--bundle", metavar="FILE",
                   help="task bundle (.safetensors); default: the checkpoint's own head")
    p.add_argument("--labels", metavar="CSV",
                   help="class names from an AST class_labels_indices.csv "
                        "(index,mid,display_name); default: the task's own labels")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="how many labels to print per file (default 5)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present; default), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    p.add_argument("--hop-s", type=float, metavar="S",
                   help="audio longer than the task's clip is scored in windows of that length "
                        "every S seconds (default: one window, no overlap), as POST /classify "
                        "scores it")
    p.add_argument("--aggregate", choices=AGGREGATES,
                   help="how the windows' scores combine: mean (default), max (default for "
                        "multi-label tasks), or first (score only the first window)")
    p.set_defaults(func=run)

