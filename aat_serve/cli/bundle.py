"""``aat bundle``: inspect a task bundle, verify it against a backbone checkpoint, or export a
checkpoint's own classifier as a ``head`` bundle."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from aat_serve.adapters.bundle import TaskBundle, head_bundle
from aat_serve.adapters.checkpoints.aat_model import MODEL_FORMAT, read_model_manifest
from aat_serve.adapters.errors import AATError

_SHOWN_LABELS = 10


def bundle_summary(path: str | Path, bundle: TaskBundle) -> dict[str, Any]:
    """The manifest, every tensor (name, shape, dtype, parameters) and the sizes of a bundle."""
    tensors = [{"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                "parameters": int(t.numel()), "bytes": int(t.numel() * t.element_size())}
               for name, t in sorted(bundle.tensors.items())]
    return {"file": str(path), "file_bytes": Path(path).stat().st_size,
            "parameters": sum(t["parameters"] for t in tensors),
            "tensor_bytes": sum(t["bytes"] for t in tensors),
            "manifest": bundle.manifest.to_dict(), "tensors": tensors}


def _print_summary(info: dict[str, Any]) -> None:
    m = info["manifest"]
    labels = m["labels"]
    # "; " because AudioSet names contain commas ("Male speech, man speaking").
    shown = "; ".join(labels[:_SHOWN_LABELS]) + ("; ..." if len(labels) > _SHOWN_LABELS else "")
    b, f = m["backbone"], m["features"]
    print(f"bundle     {info['file']} ({info['file_bytes']:,} bytes)")
    print(f"task       {m['task']}  version {m['version']}  method {m['method']}")
    print(f"labels     {len(labels)} ({'multi-label' if m['multi_label'] else 'single-label'}): "
          f"{shown}")
    print(f"backbone   {m['backbone_fingerprint']}  {b['embed_dim']} wide, {b['depth']} blocks, "
          f"stride {b['freq_stride']}/{b['time_stride']}")
    print(f"features   {f['sample_rate']} Hz, {f['num_mel_bins']} mel x {f['target_length']} "
          f"frames, mean {f['mean']}, std {f['std']}")
    if m["method"] != "head":
        print(f"adapter    {json.dumps(m['adapter'], sort_keys=True)}")
    for key in ("recipe", "metrics"):
        if m[key]:
            print(f"{key:<10} {json.dumps(m[key], sort_keys=True)}")
    print(f"created    {m['created_at'] or '-'}")
    print(f"tensors    {len(info['tensors'])}, {info['parameters']:,} parameters, "
          f"{info['tensor_bytes']:,} bytes")
    width = max(len(t["name"]) for t in info["tensors"])
    for t in info["tensors"]:
        print(f"  {t['name']:<{width}}  {t['dtype']:<8} {tuple(t['shape'])!s:<16} "
              f"{t['parameters']:>12,}")


def model_summary(path: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Like ``bundle_summary``, for a whole-model (``full``/``partial``) checkpoint."""
    from safetensors import safe_open

    tensors = []
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_slice(name)
            shape = list(t.get_shape())
            n = 1
            for d in shape:
                n *= d
            dtype = t.get_dtype()
            size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype, 4)
            tensors.append({"name": name, "shape": shape, "dtype": dtype.lower(),
                            "parameters": n, "bytes": n * size})
    return {"file": str(path), "file_bytes": Path(path).stat().st_size, "format": MODEL_FORMAT,
            "parameters": sum(t["parameters"] for t in tensors),
            "tensor_bytes": sum(t["bytes"] for t in tensors), "manifest": manifest,
            "tensors": tensors}


def _print_model_summary(info: dict[str, Any]) -> None:
    m = info["manifest"]
    labels = m["labels"]
    shown = "; ".join(labels[:_SHOWN_LABELS]) + ("; ..." if len(labels) > _SHOWN_LABELS else "")
    b, f = m["backbone"], m["features"]
    print(f"model      {info['file']} ({info['file_bytes']:,} bytes, {MODEL_FORMAT}: a "
          "backbone with its own head; use it as --checkpoint)")
    print(f"task       {m['task']}  method {m['method']}")
    print(f"labels     {len(labels)} ({'multi-label' if m['multi_label'] else 'single-label'}): "
          f"{shown}")
    print(f"backbone   {b['embed_dim']} wide, {b['depth']} blocks, "
          f"stride {b['freq_stride']}/{b['time_stride']}")
    print(f"features   {f['sample_rate']} Hz, {f['num_mel_bins']} mel x {f['target_length']} "
          f"frames, mean {f['mean']}, std {f['std']}")
    for key in ("recipe", "metrics"):
        if m.get(key):
            print(f"{key:<10} {json.dumps(m[key], sort_keys=True)}")
    print(f"created    {m.get('created_at') or '-'}")
    print(f"tensors    {len(info['tensors'])}, {info['parameters']:,} parameters, "
          f"{info['tensor_bytes']:,} bytes")


def run_inspect(args: argparse.Namespace) -> int:
    model = read_model_manifest(Path(args.file)) if Path(args.file).is_file() else None
    if model is not None:
        info = model_summary(args.file, model.raw)
        printer = _print_model_summary
    else:
        info = bundle_summary(args.file, TaskBundle.load(args.file))
        printer = _print_summary
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        printer(info)
    return 0


def _verify_failed(args: argparse.Namespace, result: dict[str, Any], why: str,
                   loaded: bool) -> int:
    result.update(ok=False, error=why)
    if args.json:
        print(json.dumps(result, indent=2))
    what = (f"does not fit checkpoint {str(args.checkpoint)!r}" if loaded else "is refused")
    print(f"error: bundle {str(args.file)!r} {what}: {why}", file=sys.stderr)
    return 1


def run_verify(args: argparse.Namespace) -> int:
    """Exit 0 only if the bundle passes every check an upload gets, on this checkpoint."""
    from aat_serve.adapters.checkpoints import load_checkpoint

    result: dict[str, Any] = {"file": str(args.file), "checkpoint": str(args.checkpoint)}
    try:
        bundle = TaskBundle.load(args.file)  # format, manifest fields, tensors
        bundle.check_version()
    except AATError as e:
        return _verify_failed(args, result, str(e), loaded=False)
    ckpt = load_checkpoint(args.checkpoint)
    fp = ckpt.backbone.fingerprint()
    m = bundle.manifest
    result.update(task=m.task, bundle_fingerprint=m.backbone_fingerprint,
                  checkpoint_fingerprint=fp)
    try:  # fingerprint, shapes, geometry, mel bins, clip length
        bundle.check_backbone(ckpt.backbone, fp)
    except AATError as e:
        return _verify_failed(args, result, str(e), loaded=True)
    result["ok"] = True
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"ok: bundle {m.task!r} ({m.method}, version {m.version}) fits "
              f"{args.checkpoint} (backbone {fp})")
    return 0


def run_from_checkpoint(args: argparse.Namespace) -> int:
    from aat_serve.adapters.checkpoints import load_checkpoint, read_label_csv

    ckpt = load_checkpoint(args.checkpoint)
    changes = {k: v for k, v in (("target_length", args.target_length), ("mean", args.mean),
                                 ("std", args.std)) if v is not None}
    if changes:
        ckpt.features = dataclasses.replace(ckpt.features, **changes)
    labels = read_label_csv(args.labels) if args.labels else None
    bundle = head_bundle(ckpt, args.task, labels, multi_label=args.multi_label)
    out = bundle.save(args.out)
    m = bundle.manifest
    info = {"out": str(out), "task": m.task, "method": m.method, "version": m.version,
            "classes": len(m.labels), "multi_label": m.multi_label,
            "backbone_fingerprint": m.backbone_fingerprint,
            "source_format": ckpt.source_format, "bytes": out.stat().st_size}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {out} ({info['bytes']:,} bytes): task {m.task!r}, head of "
              f"{ckpt.source_format} checkpoint, {len(m.labels)} classes "
              f"({'multi-label' if m.multi_label else 'single-label'}), version {m.version}, "
              f"backbone {m.backbone_fingerprint}")
    return 0


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _help(parser: argparse.ArgumentParser):
    def run(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2
    return run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="inspect, verify or create task bundles",
                       description="Inspect a task bundle, verify it against a backbone "
                                   "checkpoint, or export a checkpoint's own head as a bundle.")
    p.set_defaults(func=_help(p))
    ssub = p.add_subparsers(dest="bundle_command", metavar="ACTION")

    i = ssub.add_parser("inspect", help="show a bundle's manifest and tensors",
                        description="Validate a bundle and print its manifest, tensors "
                                    "(name, dtype, shape, parameters) and sizes; a full/partial "
                                    "model written by aat train is shown the same way.")
    i.add_argument("file", metavar="FILE",
                   help="bundle or full/partial model (.safetensors)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run_inspect)

    v = ssub.add_parser("verify", help="check that a bundle fits a backbone checkpoint",
                        description="Exit 0 only if the bundle passes every check an upload "
                                    "gets: its manifest fields within their bounds, its tensors "
                                    "finite and bounded, trained on this checkpoint's backbone "
                                    "(same weight fingerprint, tensor shapes, mel bins, a clip "
                                    "length the positional grid supports); otherwise print why "
                                    "and exit 1.")
    v.add_argument("file", metavar="FILE", help="bundle (.safetensors)")
    v.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="Hugging Face directory, original AST or SSAST .pth, or 'demo'")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=run_verify)

    f = ssub.add_parser("from-checkpoint", help="export a checkpoint's own head as a bundle",
                        description="Write the checkpoint's classifier (e.g. 527 AudioSet "
                                    "classes, 35 Speech Commands words) as a 'head' bundle, so "
                                    "the public checkpoint is servable as a task unchanged.")
    f.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="Hugging Face directory or original AST .pth with a head")
    f.add_argument("--task", required=True, metavar="NAME", help="task name ([a-z0-9_-])")
    f.add_argument("--out", required=True, metavar="FILE", help="bundle to write")
    f.add_argument("--labels", metavar="CSV",
                   help="AST class_labels_indices.csv (default: the checkpoint's id2label, "
                        "else 0..C-1)")
    ml = f.add_mutually_exclusive_group()
    ml.add_argument("--multi-label", dest="multi_label", action="store_const", const=True,
                    help="sigmoid scores (default for 527 AudioSet classes)")
    ml.add_argument("--single-label", dest="multi_label", action="store_const", const=False,
                    help="softmax scores")
    f.add_argument("--target-length", type=_positive_int, metavar="FRAMES",
                   help="frames per clip (default: the checkpoint's)")
    f.add_argument("--mean", type=float, help="feature normalisation mean (default: the "
                                              "checkpoint's, else AudioSet)")
    f.add_argument("--std", type=float, help="feature normalisation std")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=run_from_checkpoint, multi_label=None)
