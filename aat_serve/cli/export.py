"""``aat export onnx|hf``: one task as a standalone ONNX model (features in, logits out), or
as a stock Hugging Face ``ASTForAudioClassification`` directory (``head`` and ``aat_m`` tasks)."""

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


def _backbone_and_task(args: argparse.Namespace):
    """The ``--checkpoint``'s backbone and the ``--bundle`` (default: the checkpoint's head)."""
    from aat_serve.adapters.checkpoints import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    bundle = TaskBundle.load(args.bundle) if args.bundle else head_bundle(ckpt, task=args.task)
    return ckpt.backbone, bundle


def _task_arguments(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--checkpoint", required=True, help="backbone checkpoint (file or directory)")
    p.add_argument("--bundle", help="task bundle (.safetensors); default: the checkpoint's head")
    p.add_argument("--task", default="checkpoint-head",
                   help="task name when exporting the checkpoint's own head")
    p.add_argument("--out", required=True, help=out_help)


def run(args: argparse.Namespace) -> int:
    from aat_serve.adapters.onnx_export import OPSET, export_onnx

    backbone, bundle = _backbone_and_task(args)
    model = bundle.build_model(backbone).eval()
    m = bundle.manifest
    features = m.feature_config
    metadata = {"aat.input": args.input, "aat.task": m.task, "aat.method": m.method,
                "aat.labels": m.labels,
                "aat.multi_label": m.multi_label, "aat.features": features.to_dict(),
                "aat.backbone_fingerprint": m.backbone_fingerprint, "aat.version": m.version}
    out = export_onnx(model, args.out, num_frames=features.target_length, metadata=metadata,
                      dtype=args.dtype, batch=args.batch,
                      waveform=features if args.input == "waveform" else None)
    batch = "batch" if args.batch == "dynamic" else args.batch
    shape = ([batch, "samples"] if args.input == "waveform"
             else [batch, features.target_length, features.num_mel_bins])
    info = {"out": str(out), "task": m.task, "method": m.method, "classes": len(m.labels),
            "input_name": args.input, "input": shape,
            "opset": OPSET, "dtype": args.dtype, "bytes": out.stat().st_size}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {out} ({info['bytes'] / 1e6:.1f} MB): task {m.task!r} ({m.method}), "
              f"{args.input} {tuple(info['input'])} -> logits ({info['classes']}), "
              f"opset {OPSET}, {args.dtype}")
    return 0


def run_hf(args: argparse.Namespace) -> int:
    import torch

    from aat_serve.adapters.hf_export import task_as_hf, write_hf_directory

    backbone, bundle = _backbone_and_task(args)
    dtype = {"float32": torch.float32, "float16": torch.float16}[args.dtype]
    hf = task_as_hf(backbone, bundle, dtype=dtype)
    out = write_hf_directory(hf, args.out)
    m = bundle.manifest
    info = {"out": str(out), "task": m.task, "method": m.method, "classes": len(m.labels),
            "intermediate_size": hf.config["intermediate_size"], "dtype": args.dtype,
            "bytes": sum(f.stat().st_size for f in out.iterdir())}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {out}: task {m.task!r} ({m.method}) as ASTForAudioClassification, "
              f"{info['classes']} labels, intermediate_size {info['intermediate_size']}, "
              f"{args.dtype}; load it with transformers' from_pretrained")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a task to another runtime",
                       description="Export a task to another runtime.")
    ssub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    o = ssub.add_parser(
        "onnx", help="a standalone ONNX model: normalised log-mel features in, logits out",
        description="Export backbone + task bundle (or the checkpoint's own head) as one ONNX "
                    "model. Input 'features' (batch, frames, mel) normalised as the task's "
                    "feature settings say, or with --input waveform 'waveform' (batch, "
                    "samples) at the task's sample rate; output 'logits' (batch, classes). "
                    "The MLP adapter is folded into a widened MLP; labels and feature "
                    "settings are stored in the model metadata (keys aat.*). Opset 17.")
    _task_arguments(o, "output .onnx file")
    o.add_argument("--input", choices=("features", "waveform"), default="features",
                   help="'features' (default, fastest): normalised log-mel in; 'waveform': "
                        "mono float samples at the task's sample rate in, the Kaldi fbank and "
                        "normalisation inside the graph")
    o.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    o.add_argument("--batch", type=_batch, default="dynamic",
                   help="'dynamic' (default) or a fixed batch size")
    o.add_argument("--json", action="store_true", help="print JSON")
    o.set_defaults(func=run)
    h = ssub.add_parser(
        "hf", help="a stock Hugging Face ASTForAudioClassification directory (head, aat_m)",
        description="Export backbone + task bundle as a Hugging Face AST directory "
                    "(config.json, model.safetensors, preprocessor_config.json) that "
                    "transformers loads with no custom code. Exact for 'head' and 'aat_m' "
                    "tasks: the MLP adapter becomes r more hidden units of each block's MLP "
                    "(intermediate_size = 3072 + r for ViT-B). Other methods are refused with "
                    "the reason.")
    _task_arguments(h, "output directory (replaced if it exists)")
    h.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    h.add_argument("--json", action="store_true", help="print JSON")
    h.set_defaults(func=run_hf)
