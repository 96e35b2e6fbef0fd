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

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint, to_hf_state_dict
from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.device import resolve_device
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.features import load_audio, log_mel
from aat_serve.training.api import train
from aat_serve.training.data.generic import load_folder
from aat_serve.training.demo import corpus as C
from aat_serve.training.export import load_model_checkpoint
from aat_serve.training.recipes import Recipe
from aat_serve.training.trainer import RunOptions

log = logging.getLogger(__name__)

UPSTREAM = "upstream"
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "digits": (C.DIGITS, ()),
    "commands": (C.COMMANDS, ()),
    "instruments": ((), tuple(C.INSTRUMENTS)),
}
"""Downstream tasks: (words, sound classes). None of their labels is an upstream label."""
METHODS = ("head", "aat_ms", "full")
BACKBONE_DIR = "backbone"
TASKS_DIR = "tasks"


def _check_names(what: str, tasks: Iterable[str], methods: Iterable[str]) -> None:
    """Raise if ``tasks`` or ``methods`` name a demo task or method that does not exist."""
    unknown = sorted(set(tasks) - set(TASKS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"{what} {unknown}; tasks: {', '.join(TASKS)}; "
                          f"methods: {', '.join(METHODS)}")


@dataclass(frozen=True)
class BuildConfig:
    """Every setting that decides the demo artifacts (recorded in ``build.json``)."""

    seed: int = 0
    # corpus sizes: clips per class and split
    upstream_train: int = 120
    upstream_valid: int = 10
    train: int = 400
    valid: int = 20
    test: int = 40
    synthetic_speakers: int = 64
    """Made-up voice variants added to the training split (``corpus.synthetic_variant``): more
    speakers, a wider range of vocal tract lengths than espeak-ng's 73 training variants."""
    # model
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    num_mel_bins: int = 64
    target_length: int = 100
    patch: int = 16
    stride: int = 16
    """Patch stride along frequency."""
    time_stride: int = 8
    """Patch stride along time: overlapping patches, one token per 80 ms (words need it)."""
    bottleneck: int = 32
    # optimisation
    pretrain_batch_size: int = 64
    pretrain_epochs: int = 30
    pretrain_lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    lr: dict[str, float] = field(default_factory=lambda: {"head": 1e-2, "aat_ms": 5e-3,
                                                          "full": 1e-3})
    task_lr: dict[str, dict[str, float]] = field(
        default_factory=lambda: {"commands": {"aat_ms": 2e-3}})
    """Per-task overrides of ``lr``, each the rate with the better validation accuracy: commands'
    aat_ms fits the training voices by epoch 2 at 5e-3 (valid 93.5 %) and peaks at epoch 10 at
    2e-3 (94.0 %); digits keeps 5e-3 (98.0 % vs 97.5 %). See docs/demo-experiments.md."""
    freqm: int = 8
    timem: int = 10
    freq_warp: float = 0.0
    """Vocal tract length perturbation (training only); off: at 0.25 (pretraining and tasks)
    it slowed pretraining and moved held-out digits by less than the test set's noise."""
    # machinery (does not change the result)
    workers: int = 2
    threads: int = 2
    """Torch threads (the build's 2-core machine; log-mel features are computed once per clip,
    so the GEMMs dominate and both cores help)."""
    fp16: bool = True
    """Store the backbone in fp16 (halves the committed size; loaded back as fp32)."""

    def __post_init__(self) -> None:
        if set(self.lr) != set(METHODS):
            raise ConfigError(f"demo lr needs exactly the methods {', '.join(METHODS)}; "
                              f"got {', '.join(sorted(self.lr))}")
        _check_names("demo task_lr names unknown tasks or methods", self.task_lr,
                       {m for over in self.task_lr.values() for m in over})

    def lr_for(self, task: str, method: str) -> float:
        """The learning rate of one downstream run: ``task_lr`` if it names it, else ``lr``."""
        return self.task_lr.get(task, {}).get(method, self.lr[method])

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_hidden=4 * self.embed_dim, patch_freq=self.patch, patch_time=self.patch,
            freq_stride=self.stride, time_stride=self.time_stride, num_mel_bins=self.num_mel_bins,
            target_length=self.target_length, norm_eps=1e-6, head_norm_eps=1e-6)

    def corpora(self) -> list[C.CorpusDef]:
        up = C.CorpusDef(UPSTREAM, words=C.UPSTREAM_WORDS, sounds=tuple(C.UPSTREAM_SOUNDS),
                         per_class={"train": self.upstream_train, "valid": self.upstream_valid})
        per = {"train": self.train, "valid": self.valid, "test": self.test}
        return [up] + [C.CorpusDef(name, words=w, sounds=s, per_class=per)
                       for name, (w, s) in TASKS.items()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, BuildConfig] = {
    "full": BuildConfig(),
    "tiny": BuildConfig(upstream_train=3, upstream_valid=1, train=3, valid=2, test=2,
                        synthetic_speakers=2, embed_dim=32, depth=2, num_heads=2,
                        num_mel_bins=32, bottleneck=8,
                        pretrain_batch_size=16, batch_size=16, pretrain_epochs=1, epochs=1),
}
"""``full`` makes the committed artifacts; ``tiny`` exercises every step in seconds (tests)."""


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


def recipe(cfg: BuildConfig, name: str, lr: float, epochs: int, mean: float, std: float,
           batch_size: int, warmup_steps: int = 0) -> Recipe:
    return Recipe(name=name, target_length=cfg.target_length, mean=mean, std=std, lr=lr,
                  epochs=epochs, batch_size=batch_size, freqm=cfg.freqm, timem=cfg.timem,
                  freq_warp=cfg.freq_warp, loss="ce", metric="acc", warmup=warmup_steps > 0,
                  warmup_steps=max(1, warmup_steps), warmup_every=1,
                  lr_scheduler_start=max(1, epochs // 2), lr_scheduler_step=1,
                  lr_scheduler_decay=0.85, seed=cfg.seed).validate()


def export_backbone(path: Path, out: Path, *, fp16: bool = True) -> Path:
    """A whole-model checkpoint -> Hugging Face AST directory (its head and labels included)."""
    model, manifest = load_model_checkpoint(path)
    b = model.backbone.cfg
    feats = FeatureConfig.from_dict(manifest["features"])
    labels = list(manifest["labels"])
    canon = dict(model.backbone.frozen_state_dict())
    canon.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in to_hf_state_dict(canon).items()}
    config = {
        "architectures": ["ASTForAudioClassification"],
        "model_type": "audio-spectrogram-transformer",
        "hidden_size": b.embed_dim, "num_hidden_layers": b.depth,
        "num_attention_heads": b.num_heads, "intermediate_size": b.mlp_hidden,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": b.norm_eps, "qkv_bias": b.qkv_bias,
        "patch_size": b.patch_freq, "frequency_stride": b.freq_stride,
        "time_stride": b.time_stride, "max_length": b.target_length,
        "num_mel_bins": b.num_mel_bins, "torch_dtype": "float16" if fp16 else "float32",
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    pre = {"feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1,
           "sampling_rate": feats.sample_rate, "num_mel_bins": feats.num_mel_bins,
           "max_length": feats.target_length, "mean": feats.mean, "std": feats.std,
           "do_normalize": True, "padding_value": 0.0, "return_attention_mask": False}
    if b.patch_freq != b.patch_time:
        raise ConfigError("the Hugging Face AST format needs square patches")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True)
                                                  + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


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
    _check_names("unknown demo task or method", tasks, methods)
    dev = resolve_device(device, "demo build device")  # fails before anything is written
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(cfg, Path(workdir), Path(assets), docs, progress, command, tasks, methods,
                      dev)
    finally:
        torch.set_num_threads(threads)


def _build(cfg: BuildConfig, workdir: Path, assets: Path, docs: str | Path | None,
           progress: bool, command: str, tasks: tuple[str, ...], methods: tuple[str, ...],
           device: torch.device) -> dict[str, Any]:
    t_start = time.perf_counter()
    workdir, assets = Path(workdir), Path(assets)
    workdir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    options = RunOptions(device=str(device), progress=progress, cache_waveforms=True)

    t = time.perf_counter()
    speakers = C.make_speakers(cfg.seed, synthetic=cfg.synthetic_speakers)
    planned, present = C.clips_on_disk(cfg.corpora(), workdir / "corpus", seed=cfg.seed,
                                       speakers=speakers)
    folders = C.synthesize(cfg.corpora(), workdir / "corpus", seed=cfg.seed, speakers=speakers,
                           workers=cfg.workers, progress=progress)
    times["synthesis_s"] = time.perf_counter() - t
    synthesis = {"clips": planned, "reused": present, "seconds": times["synthesis_s"]}

    t = time.perf_counter()
    mean, std = feature_stats(folders[UPSTREAM], cfg)
    up = load_folder(folders[UPSTREAM])
    steps_per_epoch = -(-sum(e.split == "train" for e in up.examples)
                        // cfg.pretrain_batch_size)
    torch.manual_seed(cfg.seed)
    fresh = xavier_init(AST(cfg.backbone_config()))
    pre_rec = recipe(cfg, "demo-pretrain", cfg.pretrain_lr, cfg.pretrain_epochs, mean, std,
                     cfg.pretrain_batch_size, warmup_steps=steps_per_epoch)
    log.info("pretraining a %d-wide, %d-block AST on %d upstream classes", cfg.embed_dim,
             cfg.depth, up.num_classes)
    pre = train("folder", folders[UPSTREAM], fresh, "full", workdir / "pretrained.safetensors",
                task="demo-upstream", recipe=pre_rec, run_dir=workdir / "runs" / "pretrain",
                options=options, source=up)
    times["pretrain_s"] = time.perf_counter() - t
    pretrain = {"classes": up.num_classes, "words": len(C.UPSTREAM_WORDS),
                "sounds": len(C.UPSTREAM_SOUNDS), "train_clips": up.counts()["train"],
                "valid_clips": up.counts()["valid"], "epochs": cfg.pretrain_epochs,
                "best_epoch": pre.best_epoch, "valid_acc": pre.valid["acc"],
                "params": pre.total_params, "seconds": times["pretrain_s"],
                "epoch_seconds": sum(h["epoch_time_s"] for h in pre.history)}
    # A rerun in the same workdir resumes finished runs; say so rather than under-report.
    pretrain["resumed"] = pretrain["epoch_seconds"] > times["pretrain_s"]

    backbone_dir = export_backbone(pre.out_path, workdir / "backbone", fp16=cfg.fp16)
    backbone = load_checkpoint(backbone_dir).backbone  # the weights a server will load
    fingerprint = backbone.fingerprint()

    results: dict[str, dict[str, Any]] = {}
    bundles: dict[str, Path] = {}
    for task in tasks:
        src = load_folder(folders[task])
        results[task] = {}
        for method in methods:
            t = time.perf_counter()
            rec = recipe(cfg, f"demo-{task}-{method}", cfg.lr_for(task, method), cfg.epochs,
                         mean, std, cfg.batch_size)
            out = workdir / "out" / f"{task}-{method}.safetensors"
            log.info("training %s with %s", task, method)
            res = train("folder", folders[task], backbone, method, out, task=task, recipe=rec,
                        run_dir=workdir / "runs" / f"{task}-{method}", options=options,
                        source=src, bottleneck=cfg.bottleneck)
            seconds = time.perf_counter() - t
            results[task][method] = {
                "test_acc": res.test["acc"], "valid_acc": res.valid["acc"], "lr": rec.lr,
                "best_epoch": res.best_epoch, "trainable_params": res.trainable_params,
                "total_params": res.total_params, "seconds": seconds,
                "epoch_seconds": sum(h["epoch_time_s"] for h in res.history),
                "train_clips": len(src.splits()["train"]), "test_clips": len(src.splits()["test"])}
            times[f"{task}_{method}_s"] = seconds
            if method == "aat_ms":
                bundles[task] = res.out_path

    # Artifacts: the backbone directory and the aat_ms bundles, validated as any upload is.
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
    times["total_s"] = time.perf_counter() - t_start
    summary = {
        "command": command, "seed": cfg.seed, "config": cfg.to_dict(),
        "features": {"num_mel_bins": cfg.num_mel_bins, "target_length": cfg.target_length,
                     "mean": mean, "std": std},
        "backbone_fingerprint": fingerprint, "speakers": speakers.to_dict(),
        "synthesis": synthesis,
        "corpus": {c.name: json.loads((folders[c.name] / "corpus.json").read_text())["counts"]
                   for c in cfg.corpora()},
        "tools": C.tool_versions(), "torch": torch.__version__, "device": device.type,
        "threads": torch.get_num_threads(), "pretrain": pretrain, "results": results,
        "times": times}
    summary["sizes"] = _sizes(assets)
    (assets / "build.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if docs is not None:
        from aat_serve.training.demo.report import write_report
        write_report(summary, docs)
    return summary


def check_targets(summary: dict[str, Any], spoken_min: float = 0.9) -> list[str]:
    """The issue's targets the build missed (empty when all hold)."""
    misses = []
    for task, res in summary["results"].items():
        acc = res["aat_ms"]["test_acc"]
        if TASKS[task][0] and acc < spoken_min:
            misses.append(f"{task}: aat_ms {acc:.1%} < {spoken_min:.0%}")
        if not acc > res["head"]["test_acc"]:
            misses.append(f"{task}: aat_ms {acc:.1%} does not beat head "
                          f"{res['head']['test_acc']:.1%}")
    return misses

