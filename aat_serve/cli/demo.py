"""``aat demo build``: make the out-of-the-box backbone and task bundles from espeak-ng and sox."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import tempfile
from pathlib import Path

from aat_serve.adapters.demo_assets import DEMO_DIR


def _command(args: argparse.Namespace, seed: int) -> str:
    """The command line that reproduces this build (settings that change the result only)."""
    parts = ["aat", "demo", "build", "--seed", str(seed)]
    if args.preset != "full":
        parts += ["--preset", args.preset]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.device != "cpu":
        parts += ["--device", args.device]
    for flag in ("tasks", "methods"):
        if getattr(args, flag):
            parts += [f"--{flag}", *getattr(args, flag)]
    return shlex.join(parts)


def run_build(args: argparse.Namespace) -> int:
    from aat_serve.training.demo.build import build
    from aat_serve.training.demo.build_config import PRESETS
    from aat_serve.training.demo.tasks import TASKS, check_targets

    cfg = PRESETS[args.preset]
    overrides = {k: v for k, v in (("seed", args.seed), ("workers", args.workers),
                                   ("threads", args.threads)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    summary = build(cfg, args.workdir, args.assets, docs=args.docs,
                    progress=not args.json, command=_command(args, cfg.seed),
                    tasks=tuple(args.tasks or TASKS),
                    methods=tuple(args.methods) if args.methods else ("head", "aat_ms", "full"),
                    device=args.device)
    complete = not args.tasks and not args.methods
    misses = check_targets(summary) if complete else []
    if args.json:
        print(json.dumps({**summary, "target_misses": misses}, indent=2, sort_keys=True))
    else:
        print(f"built in {summary['times']['total_s'] / 60:.1f} min; artifacts in {args.assets}")
        for task, res in summary["results"].items():
            accs = ", ".join(f"{m} {r['test_acc']:.1%}" for m, r in res.items())
            print(f"  {task}: held-out accuracy {accs}")
        for miss in misses:
            print(f"  target missed: {miss}")
    return 1 if misses else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the demo backbone and tasks (espeak-ng + sox)",
                       description="The demo that `aat serve` serves with no configuration.")
    dsub = p.add_subparsers(dest="demo_command", metavar="COMMAND", required=True)
    b = dsub.add_parser(
        "build", help="synthesize a corpus, pretrain a small AST, train the demo task bundles",
        description="Synthesize spoken words (espeak-ng voices and variants) and synthetic "
                    "sounds (sox), pretrain a small AST on them, train head-only, AAT^MS and "
                    "full fine-tuning for the digits, commands and instruments tasks, evaluate "
                    "on held-out voices, and write the backbone and the AAT^MS bundles to "
                    "--assets and the report to --docs. Needs espeak-ng and sox on PATH. "
                    "Rerunning with the same --workdir reuses what is already done.")
    b.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="full: the committed artifacts (default); tiny: every step in seconds")
    b.add_argument("--seed", type=int, help="seed of corpus, splits and training (default 0)")
    b.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "aat-demo",
                   help="corpus and training runs (default: %(default)s)")
    b.add_argument("--assets", type=Path, default=DEMO_DIR,
                   help="where the backbone, bundles and build.json go (default: the "
                        "package's demo assets, which `aat serve` serves)")
    b.add_argument("--docs", type=Path, default=Path("docs/demo.md"),
                   help="report file (default: %(default)s)")
    b.add_argument("--tasks", nargs="+", choices=["digits", "commands", "instruments"],
                   help="only these downstream tasks (trials)")
    b.add_argument("--methods", nargs="+", choices=["head", "aat_ms", "full"],
                   help="only these methods (trials)")
    b.add_argument("--workers", type=int, help="synthesis processes in parallel (default 2)")
    b.add_argument("--threads", type=int, help="torch threads (default 2)")
    b.add_argument("--device", default="cpu",
                   help="where to train: cpu (default; the committed artifacts), cuda, cuda:N "
                        "(fast trials; results differ from the CPU's in the last bits)")
    b.add_argument("--json", action="store_true", help="print the build summary as JSON")
    b.set_defaults(func=run_build)
