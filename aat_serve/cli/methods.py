"""``aat methods``: trainable parameter count of each fine-tuning method."""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.config import BackboneConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.methods import METHODS
from aat_serve.adapters.model import AudioClassifier, count_trainable


def method_table(classes: int, frames: int, cfg: BackboneConfig | None = None) -> list[dict]:
    """One row per method: name, trainable parameters, share of the whole model, bundle?"""
    cfg = cfg or BackboneConfig(target_length=frames, pos_grid=None)
    rows = []
    for name, spec in METHODS.items():
        # Only shapes matter: build on the meta device (no memory, no weight init; ~10x faster).
        with torch.device("meta"):
            model = AudioClassifier(AST(cfg), name, classes)
        total = sum(p.numel() for p in model.parameters())
        n = count_trainable(model)
        rows.append({"method": name, "trainable": n, "total": total,
                     "percent": round(100.0 * n / total, 3), "bundle": spec.exports_bundle,
                     "description": spec.description})
    return rows


def checkpoint_config(checkpoint: str, frames: int | None) -> BackboneConfig:
    """A checkpoint's backbone geometry at ``frames`` (default: its own clip length)."""
    from aat_serve.adapters.checkpoints import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.backbone.cfg
    if frames is None:
        frames = ckpt.features.target_length
    return dataclasses.replace(cfg, target_length=frames, pos_grid=cfg.stored_grid)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        if args.stride is not None:
            raise ConfigError("--stride is the checkpoint's own; drop it with --checkpoint")
        cfg = checkpoint_config(args.checkpoint, args.frames)
        what = f"{args.checkpoint}: {cfg.embed_dim} wide, {cfg.depth} blocks"
    else:
        cfg = BackboneConfig(target_length=args.frames or 512,
                             freq_stride=args.stride or 10, time_stride=args.stride or 10)
        what = "ViT-B/16 AST"
    stride, frames = cfg.freq_stride, cfg.target_length
    rows = method_table(args.classes, frames, cfg)
    if args.json:
        out = {"classes": args.classes, "frames": frames, "stride": stride, "methods": rows}
        if args.checkpoint:
            out["checkpoint"] = args.checkpoint
        print(json.dumps(out, indent=2))
        return 0
    print(f"{what}, stride {stride}, {frames} frames, {args.classes} classes")
    print(f"{'method':<8} {'trainable':>12} {'of model':>9}  bundle  description")
    for r in rows:
        print(f"{r['method']:<8} {r['trainable']:>12,} {r['percent']:>8.3f}%  "
              f"{'yes' if r['bundle'] else 'no':<6}  {r['description']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="trainable parameters of each fine-tuning method",
                       description="Print each method's trainable parameter count for a "
                                   "ViT-B/16 AST backbone, or for the backbone of --checkpoint.")
    p.add_argument("--classes", type=int, default=50, help="number of classes (default 50)")
    p.add_argument("--frames", type=int,
                   help="frames per clip (default 512, or the checkpoint's own length)")
    p.add_argument("--stride", type=int, help="patch stride of ViT-B/16 (default 10)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="count for this backbone (a checkpoint, or 'demo') instead of ViT-B/16")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
