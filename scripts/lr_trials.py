"""Learning-rate trials of the ``generic`` recipe (folder/csv data) per method, on the demo
backbone and a keyword set spoken by espeak-ng (not a unit test; docs/training.md has the
figures).

    python scripts/lr_trials.py --out-dir /tmp/aat-lr-trials --epochs 10

Clips: 4 words x 4 voices x 8 variants x 2 (speed, pitch), the layout of
``training.learning_check`` (variant m4 is the validation set, f4 the test set: unseen
speakers). Every other recipe field is the generic recipe's default with the backbone's own
feature settings. Prints one JSON line per (method, rate) with valid accuracy, the last
epoch's valid loss (ties in accuracy are broken by it) and test accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from aat_serve.training.api import train
from aat_serve.training.learning_check import synthesize
from aat_serve.training.trainer import RunOptions

WORDS = ("yes", "no", "up", "down")


def _final_valid_loss(run_dir: Path) -> float:
    """The last epoch's validation loss (``metrics.csv``): it breaks ties in accuracy."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        return round(float(list(csv.DictReader(f))[-1]["valid_loss"]), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="aat-lr-trials")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--methods", default="head,prompt,aat_m,aat_ms,joint")
    p.add_argument("--rates", default="1e-4,1e-3,5e-3,1e-2")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    data = out / "keywords"
    clips = synthesize(data, words=WORDS)
    print(json.dumps({"clips": clips, "words": len(WORDS), "epochs": args.epochs}), flush=True)
    for method in args.methods.split(","):
        for rate in (float(r) for r in args.rates.split(",")):
            name = f"{method}-{rate:g}"
            res = train("folder", data, "demo", method, out / f"{name}.safetensors",
                        task="keywords", overrides={"lr": rate, "epochs": args.epochs},
                        run_dir=out / f"{name}.run",
                        options=RunOptions(progress=False, cache_waveforms=True))
            print(json.dumps({"method": method, "lr": rate, "valid_acc": res.valid["acc"],
                              "final_valid_loss": _final_valid_loss(out / f"{name}.run"),
                              "test_acc": res.test["acc"], "best_epoch": res.best_epoch}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
