"""Learning check on real speech: keywords spoken by ``espeak-ng`` voices, a small randomly
initialised AST, head-only vs AAT^MS with the same recipe and data (not a unit test).

    python -m aat_serve.training.learning_check --out-dir /tmp/aat-learning-check

Clips are written in the folder layout (``<word>/<voice>+<variant>_s<speed>_p<pitch>.wav``);
held-out voice variants form the validation and test lists, so test speakers are unseen.
Prints both test accuracies; exits 1 unless AAT^MS beats head-only by ``--margin``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.config import BackboneConfig
from aat_serve.adapters.errors import AATError, ConfigError
from aat_serve.training.api import train
from aat_serve.training.recipes import get_recipe
from aat_serve.training.trainer import RunOptions

WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")
VALID_VARIANTS = ("m4",)
TEST_VARIANTS = ("f4",)


def synthesize(root: Path, words=WORDS, voices=VOICES, variants=VARIANTS) -> int:
    """Write every word x voice x variant x (speed, pitch) clip; return the clip count.

    Raises ``ConfigError`` naming espeak-ng when it is not installed.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ConfigError(f"espeak-ng is not installed; the learning check speaks its keywords "
                          f"with it into {root} (apt-get install espeak-ng)")
    valid, test = [], []
    n = 0
    for word, voice, variant, (speed, pitch) in itertools.product(
            words, voices, variants, ((150, 40), (185, 60))):
        rel = f"{word}/{voice}+{variant}_s{speed}_p{pitch}.wav"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            subprocess.run([exe, "-v", f"{voice}+{variant}", "-s", str(speed), "-p", str(pitch),
                            "-w", str(path), word], check=True, capture_output=True)
        n += 1
        if variant in VALID_VARIANTS:
            valid.append(rel)
        elif variant in TEST_VARIANTS:
            test.append(rel)
    (root / "validation_list.txt").write_text("".join(f"{r}\n" for r in valid))
    (root / "testing_list.txt").write_text("".join(f"{r}\n" for r in test))
    return n


def small_backbone(seed: int) -> AST:
    """A 4-block, 64-wide AST on 64 mel bins, randomly initialised (no pretraining).

    Weight matrices are drawn N(0, 1/fan_in) rather than the pretraining init (std 0.02):
    at width 64 the latter leaves the pooled tokens almost independent of the input (their
    spread across clips is a third of their size, before the final LayerNorm blows it up),
    so the backbone would carry no usable features for either method.
    """
    torch.manual_seed(seed)
    cfg = BackboneConfig(embed_dim=64, depth=4, num_heads=4, mlp_hidden=256, patch_freq=16,
                         patch_time=16, freq_stride=16, time_stride=8, num_mel_bins=64,
                         target_length=128)
    backbone = AST(cfg)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if p.dim() >= 2 and name not in ("pos_embed", "cls_token", "dist_token"):
                p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])))
    return backbone.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    """The script: exit status 0 when AAT^MS leads by the margin, 1 otherwise or on an error.

    A library error (espeak-ng missing, a bad recipe) is printed to stderr as its message, the
    way this script always reported it, with exit status 1.
    """
    try:
        return _run(argv)
    except AATError as e:
        print(e, file=sys.stderr)
        return 1


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="aat-learning-check")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margin", type=float, default=0.15,
                   help="required lead of aat_ms over head in test accuracy")
    p.add_argument("--methods", default="head,aat_ms")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    data = out / "keywords"
    clips = synthesize(data)
    backbone = small_backbone(args.seed)
    recipe = get_recipe("generic").replace(target_length=128, mean=-6.8, std=5.5, lr=args.lr,
                                           epochs=args.epochs, batch_size=16, freqm=8, timem=16,
                                           lr_scheduler_start=15, seed=args.seed)
    results = {}
    for method in args.methods.split(","):
        res = train("folder", data, backbone, method, out / f"{method}.safetensors",
                    task="keywords", recipe=recipe, run_dir=out / f"{method}.run",
                    options=RunOptions(progress=sys.stderr.isatty(), cache_waveforms=True))
        results[method] = {"test_acc": res.test["acc"], "valid_acc": res.valid["acc"],
                           "best_epoch": res.best_epoch,
                           "trainable_params": res.trainable_params}
        print(f"{method}: test accuracy {res.test['acc']:.3f} (valid {res.valid['acc']:.3f}, "
              f"best epoch {res.best_epoch}, {res.trainable_params:,} trainable)", flush=True)
    print(json.dumps({"clips": clips, "words": len(WORDS), "epochs": args.epochs,
                      "results": results}, indent=2))
    if {"head", "aat_ms"} <= set(results):
        lead = results["aat_ms"]["test_acc"] - results["head"]["test_acc"]
        print(f"aat_ms - head = {lead:+.3f} (required {args.margin:+.3f})")
        return 0 if lead >= args.margin else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
