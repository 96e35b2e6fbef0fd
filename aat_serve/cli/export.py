"""``aat export onnx``: one task as a standalone ONNX model (features in, logits out)."""

from __future__ import annotations

import argparse
import json

from aat_serve.adapters.bundle import TaskBundle, head_bundle


def _batch(value: str) -> int | str:
    if value == "dynamic":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'dynamic' or a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"batch must be positive, got {n}")
    return n


def run(args: argparse.Namespace) -> int:
    from aat_serve.adapters.checkpoints import load_checkpoint
    from aat_serve.adapters.onnx_export import OPSET, export_onnx

    ckpt = load_checkpoint(args.checkpoint)
    if args.bundle:
        bundle = TaskBundle.load(args.bundle)
    else:
        bundle = head_bundle(ckpt, task=args.task)
    model = bundle.build_model(ckpt.backbone).eval()
    m = bundle.manifest
    features = m.feature_config
    metadata = {"aat.task": m.task, "aat.method": m.method, "aat.labels": m.labels,
                "aat.multi_label": m.multi_label, "aat.features": features.to_dict(),
                "aat.backbone_fingerprint": m.backbone_fingerprint, "aat.version": m.version}
    out = export_onnx(model, args.out, num_frames=features.target_length, metadata=metadata,
                      dtype=args.dtype, batch=args.batch)
    info = {"out": str(out), "task": m.task, "method": m.method, "classes": len(m.labels),
            "input": ["batch" if args.batch == "dynamic" else args.batch,
                      features.target_length, features.num_mel_bins],
            "opset": OPSET, "dtype": args.dtype, "bytes": out.stat().st_size}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {out} ({info['bytes'] / 1e6:.1f} MB): task {m.task!r} ({m.method}), "
              f"features {tuple(info['input'])} -> logits ({info['classes']}), opset {OPSET}, "
              f"{args.dtype}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a task to another runtime",
                       description="Export a task to another runtime.")
    ssub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    o = ssub.add_parser(
        "onnx", help="a standalone ONNX model: normalised log-mel features in, logits out",
        description="Export backbone + task bundle (or the checkpoint's own head) as one ONNX "
                    "model. Input 'features' (batch, frames, mel) normalised as the task's "
                    "feature settings say; output 'logits' (batch, classes). The MLP adapter is "
                    "folded into a widened MLP; labels and feature settings are stored in the "
                    "model metadata (keys aat.*). Opset 17.")
    o.add_argument("--checkpoint", required=True, help="backbone checkpoint (file or directory)")
    o.add_argument("--bundle", help="task bundle (.safetensors); default: the checkpoint's head")
    o.add_argument("--task", default="checkpoint-head",
                   help="task name when exporting the checkpoint's own head")
    o.add_argument("--out", required=True, help="output .onnx file")
    o.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    o.add_argument("--batch", type=_batch, default="dynamic",
                   help="'dynamic' (default) or a fixed batch size")
    o.add_argument("--json", action="store_true", help="print JSON")
    o.set_defaults(func=run)
