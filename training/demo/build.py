"""``aat demo build``: corpus -> pretrained small AST -> task bundles -> evaluation -> artifacts.

1. Synthesize the upstream corpus (84 words, 13 sound classes) and the three downstream
   corpora (digits, commands, instruments) with speaker-disjoint splits (``corpus``).
2. Pretrain a small AST (same ``AST`` code as ViT-B, only smaller) on the upstream corpus,
   supervised, with the training package's trainer (method ``full``).
3. Export it as a Hugging Face AST directory (fp16 weights, feature settings in
   ``preprocessor_config.json``) and reload it through ``load_checkpoint``, so the bundles are
   trained on exactly the weights a server loads.
4. For every downstream task train ``head``, ``aat_ms`` and ``full``; the best epoch is chosen
   on the validation voices, accuracy is reported on the test voices (heard nowhere before).
5. Write the artifacts (backbone directory, one aat_ms bundle per task, ``build.json``),
   validated through ``TaskBundle.load`` against the exported backbone, and ``docs/demo.md``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint, to_hf_state_dict
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.device import resolve_device
from aat_serve.adapters.features import load_audio, log_mel
from aat_serve.adapters.hf_export import (
    HFModel,
    hf_config,
    hf_preprocessor_config,
    write_hf_directory,
)
from aat_serve.training.api import train
from aat_serve.training.data.base import DataSource
from aat_serve.training.data.generic import load_folder
from aat_serve.training.demo import corpus as C
from aat_serve.training.demo import render as R
from aat_serve.training.demo import sounds as S
from aat_serve.training.demo import speakers as SP
from aat_serve.training.demo.build_config import BuildConfig, recipe
from aat_serve.training.demo.report import write_report
from aat_serve.training.demo.tasks import METHODS, TASKS, UPSTREAM, check_names
from aat_serve.training.export import load_model_checkpoint
from aat_serve.training.trainer import RunOptions

log = logging.getLogger(__name__)

BACKBONE_DIR = "backbone"
TASKS_DIR = "tasks"


def xavier_init(model: AST) -> AST:
    """Xavier-uniform weights for every linear and conv layer (biases stay zero).

    A pretraining-only choice: from scratch, on a few thousand clips, it learns about twice as
    fast in the first epochs as the ViT default (truncated normal, std 0.02) we load
    checkpoints into. The architecture is unchanged.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
                torch.nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
    return model


def feature_stats(root: Path, cfg: BuildConfig, limit: int = 1000) -> tuple[float, float]:
    """Mean and standard deviation of the log-mel fbank over (up to ``limit``) training clips."""
    src = load_folder(root)
    train = [e for e in src.examples if e.split == "train"]
    step = max(1, len(train) // limit)
    fcfg = FeatureConfig(num_mel_bins=cfg.num_mel_bins, target_length=cfg.target_length)
    feats = [log_mel(load_audio(e.path), fcfg) for e in train[::step]]
    allf = torch.cat(feats)
    return float(allf.mean()), float(allf.std())


def export_backbone(path: Path, out: Path, *, fp16: bool = True) -> Path:
    """A whole-model checkpoint -> Hugging Face AST directory (its head and labels included)."""
    model, manifest = load_model_checkpoint(path)
    feats = FeatureConfig.from_dict(manifest["features"])
    canon = dict(model.backbone.frozen_state_dict())
    canon.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in to_hf_state_dict(canon).items()}
    config = hf_config(model.backbone.cfg, list(manifest["labels"]),
                       dtype="float16" if fp16 else "float32")
    return write_hf_directory(HFModel(tensors, config, hf_preprocessor_config(feats)), out)


def _sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".py"
            and "__pycache__" not in p.parts and p.name != "build.json"}


def build(cfg: BuildConfig, workdir: str | Path, assets: str | Path, *,
          docs: str | Path | None = None, progress: bool = True,
          command: str = "aat demo build", tasks: tuple[str, ...] = tuple(TASKS),
          methods: tuple[str, ...] = METHODS, device: str = "cpu") -> dict[str, Any]:
    """Run every step; return the summary written to ``<assets>/build.json``.

    ``tasks`` and ``methods`` restrict the downstream runs (for trials; the committed artifacts
    need every task with ``aat_ms``). Finished steps in ``workdir`` are reused: clips on disk
    are kept and a finished or interrupted training run resumes from its run directory.
    ``device``: where training runs; the committed artifacts are built on the CPU (a GPU is
    much faster for trials, and its results differ in the last bits).
    """
    check_names("unknown demo task or method", tasks, methods)
    dev = resolve_device(device, "demo build device")  # fails before anything is written
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(cfg, Path(workdir), Path(assets), docs, progress, command, tasks, methods,
                      dev)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Steps:
    """What the steps of one build share: its settings, work directory and run options, and
    the seconds each step took (``build.json``'s ``times``)."""

    cfg: BuildConfig
    workdir: Path
    options: RunOptions
    times: dict[str, float] = field(default_factory=dict)


def _build(cfg: BuildConfig, workdir: Path, assets: Path, docs: str | Path | None,
           progress: bool, command: str, tasks: tuple[str, ...], methods: tuple[str, ...],
           device: torch.device) -> dict[str, Any]:
    """The steps in order (see the module docstring); the summary is also ``build.json``."""
    t_start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    steps = _Steps(cfg, workdir, RunOptions(device=str(device), progress=progress,
                                            cache_waveforms=True))
    speakers, folders, synthesis = _synthesize(steps, progress)
    pretrained, (mean, std), pretrain = _pretrain(steps, folders[UPSTREAM])
    backbone_dir = export_backbone(pretrained, workdir / "backbone", fp16=cfg.fp16)
    backbone = load_checkpoint(backbone_dir).backbone  # the weights a server will load
    results, bundles = _train_tasks(steps, folders, backbone, (mean, std), tasks, methods)
    _publish(assets, backbone_dir, bundles)
    steps.times["total_s"] = time.perf_counter() - t_start
    summary = {
        "command": command, "seed": cfg.seed, "config": cfg.to_dict(),
        "features": {"num_mel_bins": cfg.num_mel_bins, "target_length": cfg.target_length,
                     "mean": mean, "std": std},
        "backbone_fingerprint": backbone.fingerprint(), "speakers": speakers.to_dict(),
        "synthesis": synthesis,
        "corpus": {c.name: json.loads((folders[c.name] / "corpus.json").read_text())["counts"]
                   for c in cfg.corpora()},
        "tools": R.tool_versions(), "torch": torch.__version__, "device": device.type,
        "threads": torch.get_num_threads(), "pretrain": pretrain, "results": results,
        "times": steps.times}
    summary["sizes"] = _sizes(assets)
    (assets / "build.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if docs is not None:
        write_report(summary, docs)
    return summary


def _synthesize(steps: _Steps, progress: bool,
                ) -> tuple[SP.Speakers, dict[str, Path], dict[str, Any]]:
    """Step 1: the corpora on disk (clips already there are kept); their speakers, folders and
    what the synthesis did (``build.json``'s ``synthesis``)."""
    cfg, out = steps.cfg, steps.workdir / "corpus"
    t = time.perf_counter()
    speakers = SP.make_speakers(cfg.seed, synthetic=cfg.synthetic_speakers)
    planned, present = C.clips_on_disk(cfg.corpora(), out, seed=cfg.seed, speakers=speakers)
    folders = C.synthesize(cfg.corpora(), out, seed=cfg.seed, speakers=speakers,
                           workers=cfg.workers, progress=progress)
    steps.times["synthesis_s"] = time.perf_counter() - t
    return speakers, folders, {"clips": planned, "reused": present,
                               "seconds": steps.times["synthesis_s"]}


def _pretrain(steps: _Steps, upstream: Path,
              ) -> tuple[Path, tuple[float, float], dict[str, Any]]:
    """Step 2: the pretrained whole-model checkpoint, the feature mean and std it was trained
    with, and what the pretraining did (``build.json``'s ``pretrain``)."""
    cfg, workdir = steps.cfg, steps.workdir
    t = time.perf_counter()
    mean, std = feature_stats(upstream, cfg)
    up = load_folder(upstream)
    steps_per_epoch = -(-sum(e.split == "train" for e in up.examples)
                        // cfg.pretrain_batch_size)
    torch.manual_seed(cfg.seed)
    fresh = xavier_init(AST(cfg.backbone_config()))
    pre_rec = recipe(cfg, "demo-pretrain", cfg.pretrain_lr, cfg.pretrain_epochs, mean, std,
                     cfg.pretrain_batch_size, warmup_steps=steps_per_epoch)
    log.info("pretraining a %d-wide, %d-block AST on %d upstream classes", cfg.embed_dim,
             cfg.depth, up.num_classes)
    pre = train("folder", upstream, fresh, "full", workdir / "pretrained.safetensors",
                task="demo-upstream", recipe=pre_rec, run_dir=workdir / "runs" / "pretrain",
                options=steps.options, source=up)
    seconds = steps.times["pretrain_s"] = time.perf_counter() - t
    pretrain = {"classes": up.num_classes, "words": len(C.UPSTREAM_WORDS),
                "sounds": len(S.UPSTREAM_SOUNDS), "train_clips": up.counts()["train"],
                "valid_clips": up.counts()["valid"], "epochs": cfg.pretrain_epochs,
                "best_epoch": pre.best_epoch, "valid_acc": pre.valid["acc"],
                "params": pre.total_params, "seconds": seconds,
                "epoch_seconds": sum(h["epoch_time_s"] for h in pre.history)}
    # A rerun in the same workdir resumes finished runs; say so rather than under-report.
    pretrain["resumed"] = pretrain["epoch_seconds"] > seconds
    return pre.out_path, (mean, std), pretrain


def _train_tasks(steps: _Steps, folders: dict[str, Path], backbone: AST,
                 stats: tuple[float, float], tasks: tuple[str, ...], methods: tuple[str, ...],
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """Step 4: every (task, method) run; their results (``build.json``'s ``results``) and the
    aat_ms bundles by task."""
    results: dict[str, dict[str, Any]] = {}
    bundles: dict[str, Path] = {}
    for task in tasks:
        src = load_folder(folders[task])
        results[task] = {}
        for method in methods:
            results[task][method], out = _train_task(steps, task, method, src, backbone, stats)
            if method == "aat_ms":
                bundles[task] = out
    return results, bundles


def _train_task(steps: _Steps, task: str, method: str, src: DataSource, backbone: AST,
                stats: tuple[float, float]) -> tuple[dict[str, Any], Path]:
    """One downstream run: its entry in ``results`` and the file it wrote."""
    cfg, workdir = steps.cfg, steps.workdir
    t = time.perf_counter()
    rec = recipe(cfg, f"demo-{task}-{method}", cfg.lr_for(task, method), cfg.epochs, *stats,
                 cfg.batch_size)
    out = workdir / "out" / f"{task}-{method}.safetensors"
    log.info("training %s with %s", task, method)
    res = train("folder", src.root, backbone, method, out, task=task, recipe=rec,
                run_dir=workdir / "runs" / f"{task}-{method}", options=steps.options,
                source=src, bottleneck=cfg.bottleneck)
    seconds = steps.times[f"{task}_{method}_s"] = time.perf_counter() - t
    return {"test_acc": res.test["acc"], "valid_acc": res.valid["acc"], "lr": rec.lr,
            "best_epoch": res.best_epoch, "trainable_params": res.trainable_params,
            "total_params": res.total_params, "seconds": seconds,
            "epoch_seconds": sum(h["epoch_time_s"] for h in res.history),
            "train_clips": len(src.splits()["train"]),
            "test_clips": len(src.splits()["test"])}, res.out_path


def _publish(assets: Path, backbone_dir: Path, bundles: dict[str, Path]) -> None:
    """Step 5: the backbone directory and the aat_ms bundles into ``assets``, each bundle
    validated against the copied backbone as any upload is."""
    assets.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(assets / BACKBONE_DIR, ignore_errors=True)
    shutil.copytree(backbone_dir, assets / BACKBONE_DIR)
    tasks_dir = assets / TASKS_DIR
    shutil.rmtree(tasks_dir, ignore_errors=True)
    tasks_dir.mkdir()
    served = load_checkpoint(assets / BACKBONE_DIR).backbone
    for task, path in bundles.items():
        bundle = TaskBundle.load(path)
        bundle.check_backbone(served)
        bundle.save(tasks_dir / f"{task}.safetensors")
        TaskBundle.load(tasks_dir / f"{task}.safetensors").check_backbone(served)
