"""``aat train``, ``aat eval`` and ``aat compare``: fine-tune on a data set, score a bundle,
compare methods. Every recipe field is a flag (``--lr``, ``--target-length``, ``--no-noise``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from typing import Any

from aat_serve.adapters.methods import METHODS
from aat_serve.training.data import DATASETS, BadAudioError
from aat_serve.training.recipes import FIELDS, RECIPES

_LITERALS = {"loss": ("ce", "bce"), "metric": ("acc", "mAP")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_recipe_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    g = p.add_argument_group("recipe overrides (default: the recipe's value)")
    for name, f in FIELDS.items():
        if name == "name" or name in skip:
            continue
        kind = type(f.default)
        kw: dict[str, Any] = {"dest": f"r_{name}", "default": None, "help": f.metadata["help"]}
        if kind is bool:
            g.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif name in _LITERALS:
            g.add_argument(_flag(name), choices=_LITERALS[name], **kw)
        else:
            g.add_argument(_flag(name), type=kind, metavar=name.upper(), **kw)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {n: getattr(args, f"r_{n}") for n in FIELDS if n != "name"
            and getattr(args, f"r_{n}", None) is not None}


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="data set layout: esc50, us8k, sc1/sc2 (Speech Commands v0.01/v0.02), "
                        "gtzan, openmic, folder (one sub-folder per label) or csv "
                        "(path,label[,split])")
    p.add_argument("--root", required=True,
                   help="where the data set was extracted (the CSV file for --dataset csv)")
    p.add_argument("--skip-bad-audio", action="store_true",
                   help="leave out (and log) files that cannot be decoded instead of stopping")
    p.add_argument("--all-labels", action="store_true",
                   help="keep every class of the official layout even when the data holds no "
                        "clip of it (default: the labels the data holds; empty classes are "
                        "named in a warning)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="OpenMIC: allow a pickled sample_key array in openmic-2018.npz")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary; no progress bars")


@contextlib.contextmanager
def cli_hints():
    """Errors name this CLI's flags, not the Python arguments behind them."""
    try:
        yield
    except BadAudioError as e:
        e.hint = "--skip-bad-audio"
        raise


def _quiet(args: argparse.Namespace) -> None:
    if args.json:
        logging.getLogger("aat_serve.training").setLevel(logging.WARNING)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.4f}"
    return str(x)


# -- train ----------------------------------------------------------------------------------

def run_train(args: argparse.Namespace) -> int:
    from aat_serve.training.api import train
    from aat_serve.training.trainer import RunOptions

    _quiet(args)
    options = RunOptions(device=args.device, num_workers=args.workers,
                         progress=args.progress or (sys.stderr.isatty() and not args.json),
                         checkpoint_every=args.checkpoint_every, cache_waveforms=args.cache_audio,
                         fresh=args.fresh)
    with cli_hints():
        result = train(args.dataset, args.root, args.checkpoint, args.method, args.out,
                       task=args.task, recipe=args.recipe, overrides=_overrides(args),
                       fold=args.fold, cv=args.cv, run_dir=args.run_dir, options=options,
                       on_bad_audio="skip" if args.skip_bad_audio else "error",
                       allow_pickle=args.allow_pickle, bottleneck=args.bottleneck,
                       num_prompts=args.num_prompts, all_labels=args.all_labels)
    summary = result.to_dict()
    if args.json:
        print(json.dumps(_clean(summary), indent=2, sort_keys=True))
        return 0
    if "cv" in summary:
        cv = summary["cv"]
        print(f"cross-validation {cv['metric']}: {_fmt(cv['mean'])} at epoch "
              f"{cv['best_epoch']} (folds: "
              + ", ".join(f"{k}={_fmt(v)}" for k, v in cv["per_fold"].items()) + ")")
    else:
        print(f"best epoch {summary['best_epoch']}: valid {summary['metric']} "
              f"{_fmt(summary['best_metric'])}"
              + (f", test {summary['metric']} {_fmt(summary['test'][summary['metric']])}"
                 if summary.get("test") else ""))
        print(f"trainable parameters {summary['trainable_params']:,} of "
              f"{summary['total_params']:,}; {summary['epoch_time_s']:.2f} s per epoch")
        print(f"run directory: {summary['run_dir']}")
    if summary.get("out"):
        print(f"wrote {summary['out']}")
    return 0


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a method on a data set and write a task bundle",
        description="Fine-tune one of the seven methods on a data set read from its official "
                    "layout, starting from a backbone checkpoint, with the data set's AAT recipe "
                    "(any field overridable). Writes a task bundle (head, prompt, aat_m, aat_ms, "
                    "joint) or a whole-model checkpoint (full, partial). An interrupted run "
                    "resumes from its run directory.",
        epilog="recipes: " + ", ".join(RECIPES))
    _add_data_flags(p)
    p.add_argument("--checkpoint", required=True,
                   help="backbone: Hugging Face AST directory, original AST or SSAST .pth, or "
                        "'demo' (the demo backbone shipped with aat-serve)")
    p.add_argument("--method", required=True, choices=list(METHODS), help="fine-tuning method")
    p.add_argument("--out", help="output bundle / model file (.safetensors)")
    p.add_argument("--task", help="task name in the bundle (default: the data set's name)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="named recipe (default: the data set's)")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--fold", type=int, help="held-out fold (esc50, us8k)")
    folds.add_argument("--cv", action="store_true",
                       help="cross-validate over every fold (esc50, us8k)")
    p.add_argument("--run-dir", help="run directory (default: OUT without suffix + .run)")
    p.add_argument("--fresh", action="store_true",
                   help="start over instead of resuming the run directory's run")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also save the training state every STEPS optimiser steps")
    p.add_argument("--cache-audio", action="store_true",
                   help="keep decoded training audio and its log-mel in memory (the fbank "
                        "is then computed once per clip, not once per epoch)")
    p.add_argument("--bottleneck", type=int, help="adapter width (default: width / 4)")
    p.add_argument("--num-prompts", type=int, help="deep prompts per block (default 12)")
    p.add_argument("--progress", action="store_true",
                   help="progress bars even when stderr is not a terminal")
    _add_recipe_flags(p)
    p.set_defaults(func=run_train)


# -- eval -----------------------------------------------------------------------------------

def run_eval(args: argparse.Namespace) -> int:
    from aat_serve.training.api import evaluate

    _quiet(args)
    with cli_hints():
        res = evaluate(args.dataset, args.root, args.bundle, checkpoint=args.checkpoint,
                       fold=args.fold, split=args.split, device=args.device,
                       batch_size=args.batch_size, num_workers=args.workers,
                       on_bad_audio="skip" if args.skip_bad_audio else "error",
                       allow_pickle=args.allow_pickle, all_labels=args.all_labels)
    if args.json:
        print(json.dumps(_clean(res), indent=2, sort_keys=True))
        return 0
    m = res["metrics"]
    where = f"{res['dataset']} {res['split']}" + (f" (fold {res['fold']})" if res["fold"] else "")
    print(f"{res['task']} [{res['method']}] on {where}, {res['clips']} clips: "
          f"{res['metric']} {_fmt(m[res['metric']])}  (acc {_fmt(m['acc'])}, mAP "
          f"{_fmt(m['mAP'])}, mAUC {_fmt(m['mAUC'])})")
    rows = res["per_class"]
    if rows and "precision" in rows[0]:
        print(f"{'label':<24} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
        for r in rows:
            print(f"{r['label'][:24]:<24} {_fmt(r['precision']):>9} {_fmt(r['recall']):>7} "
                  f"{_fmt(r['f1']):>7} {r['support']:>8}")
    else:
        print(f"{'label':<24} {'AP':>7} {'AUC':>7} {'positives':>9} {'observed':>8}")
        for r in rows:
            print(f"{r['label'][:24]:<24} {_fmt(r['ap']):>7} {_fmt(r['auc']):>7} "
                  f"{r['positives']:>9} {r['observed']:>8}")
    return 0


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a bundle on a data set's test split",
                       description="Evaluate a task bundle (or a full/partial whole-model "
                                   "checkpoint) on a data set: the recipe's metric, accuracy, "
                                   "mAP, mAUC and a per-class report.")
    _add_data_flags(p)
    p.add_argument("--checkpoint", help="the backbone the bundle was trained on, or 'demo' "
                                        "(not needed for a whole-model checkpoint)")
    p.add_argument("--bundle", required=True, help="task bundle or whole-model checkpoint")
    p.add_argument("--fold", type=int,
                   help="held-out fold (esc50, us8k; default: the fold it was trained for)")
    p.add_argument("--split", default="test", choices=("test", "valid", "train"),
                   help="which split to score (default test)")
    p.add_argument("--batch-size", type=int, default=32, help="clips per batch (default 32)")
    p.set_defaults(func=run_eval)


# -- compare --------------------------------------------------------------------------------

def run_compare(args: argparse.Namespace) -> int:
    from aat_serve.training.compare import compare_methods, markdown_table, parse_rates

    train_args = ["--dataset", args.dataset, "--root", args.root, "--checkpoint",
                  args.checkpoint, "--device", args.device, "--workers", str(args.workers)]
    if args.fold is not None:
        train_args += ["--fold", str(args.fold)]
    if args.cv:
        train_args.append("--cv")
    if args.recipe:
        train_args += ["--recipe", args.recipe]
    if args.skip_bad_audio:
        train_args.append("--skip-bad-audio")
    if args.all_labels:
        train_args.append("--all-labels")
    if args.allow_pickle:
        train_args.append("--allow-pickle")
    if args.cache_audio:
        train_args.append("--cache-audio")
    if args.fresh:
        train_args.append("--fresh")
    for name, value in _overrides(args).items():
        flag = _flag(name)
        if isinstance(value, bool):
            train_args.append(flag if value else f"--no-{flag[2:]}")
        else:
            train_args += [flag, str(value)]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    title = f"{args.dataset}: methods compared"
    rows = compare_methods(methods, train_args, args.out_dir, title, progress=not args.json,
                           rates=parse_rates(args.lr, methods))
    if args.json:
        print(json.dumps(_clean({"rows": rows}), indent=2, sort_keys=True))
    else:
        print(markdown_table(rows, title))
    return 0


def _register_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train several methods on one data set; compare them",
                       description="Train each method (in its own process) on one data set and "
                                   "write a Table-2-style comparison (trainable parameters, "
                                   "metric, epoch time, peak memory) to OUT_DIR/comparison.md "
                                   "and comparison.json.")
    _add_data_flags(p)
    p.add_argument("--checkpoint", required=True,
                   help="backbone checkpoint, or 'demo' (the shipped demo backbone)")
    p.add_argument("--methods", default="head,prompt,aat_m,aat_ms,full",
                   help="comma-separated methods (default head,prompt,aat_m,aat_ms,full)")
    p.add_argument("--out-dir", required=True, help="where runs, bundles and the table go")
    p.add_argument("--recipe", choices=list(RECIPES), help="named recipe")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--fold", type=int, help="held-out fold (esc50, us8k)")
    folds.add_argument("--cv", action="store_true", help="cross-validate every method")
    p.add_argument("--cache-audio", action="store_true", help="keep decoded audio in memory")
    p.add_argument("--fresh", action="store_true", help="start every run over")
    p.add_argument("--lr", action="append", default=[], metavar="[METHOD=]RATE",
                   help="learning rate of one method (full=1e-5), or of every method not named "
                        "(1e-4); repeatable (default: each method's recipe rate)")
    _add_recipe_flags(p, skip=("lr",))
    p.set_defaults(func=run_compare)


def register(sub: argparse._SubParsersAction) -> None:
    _register_train(sub)
    _register_eval(sub)
    _register_compare(sub)


__all__ = ["register", "run_compare", "run_eval", "run_train"]
