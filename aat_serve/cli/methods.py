"""``aat methods``: trainable parameter count of each fine-tuning method."""

from __future__ import annotations

import argparse
import json

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.config import BackboneConfig
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


def run(args: argparse.Namespace) -> int:
    cfg = BackboneConfig(target_length=args.frames, freq_stride=args.stride,
                         time_stride=args.stride)
    rows = method_table(args.classes, args.frames, cfg)
    if args.json:
        print(json.dumps({"classes": args.classes, "frames": args.frames,
                          "stride": args.stride, "methods": rows}, indent=2))
        return 0
    print(f"ViT-B/16 AST, stride {args.stride}, {args.frames} frames, {args.classes} classes")
    print(f"{'method':<8} {'trainable':>12} {'of model':>9}  bundle  description")
    for r in rows:
        print(f"{r['method']:<8} {r['trainable']:>12,} {r['percent']:>8.3f}%  "
              f"{'yes' if r['bundle'] else 'no':<6}  {r['description']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="trainable parameters of each fine-tuning method",
                       description="Print each method's trainable parameter count for a "
                                   "ViT-B/16 AST backbone.")
    p.add_argument("--classes", type=int, default=50, help="number of classes (default 50)")
    p.add_argument("--frames", type=int, default=512, help="frames per clip (default 512)")
    p.add_argument("--stride", type=int, default=10, help="patch stride (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
