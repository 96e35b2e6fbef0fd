"""The demo build's settings: ``BuildConfig`` (every setting that decides the artifacts, recorded
in ``build.json``), its presets, and the training recipe each run gets from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from aat_serve.adapters.config import BackboneConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.training.demo import corpus as C
from aat_serve.training.demo import plan as P
from aat_serve.training.demo import sounds as S
from aat_serve.training.demo.tasks import METHODS, TASKS, UPSTREAM, check_names
from aat_serve.training.recipes import Recipe


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
    """Made-up voice variants added to the training split (``speakers.synthetic_variant``): more
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
        check_names("demo task_lr names unknown tasks or methods", self.task_lr,
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

    def corpora(self) -> list[P.CorpusDef]:
        up = P.CorpusDef(UPSTREAM, words=C.UPSTREAM_WORDS, sounds=tuple(S.UPSTREAM_SOUNDS),
                         per_class={"train": self.upstream_train, "valid": self.upstream_valid})
        per = {"train": self.train, "valid": self.valid, "test": self.test}
        return [up] + [P.CorpusDef(name, words=w, sounds=s, per_class=per)
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


def recipe(cfg: BuildConfig, name: str, lr: float, epochs: int, mean: float, std: float,
           batch_size: int, warmup_steps: int = 0) -> Recipe:
    """The recipe of one demo training run (pretraining or downstream): cross-entropy, accuracy,
    SpecAugment from ``cfg``, AAT's warm-up when ``warmup_steps`` > 0, step decay from mid-run."""
    return Recipe(name=name, target_length=cfg.target_length, mean=mean, std=std, lr=lr,
                  epochs=epochs, batch_size=batch_size, freqm=cfg.freqm, timem=cfg.timem,
                  freq_warp=cfg.freq_warp, loss="ce", metric="acc", warmup=warmup_steps > 0,
                  warmup_steps=max(1, warmup_steps), warmup_every=1,
                  lr_scheduler_start=max(1, epochs // 2), lr_scheduler_step=1,
                  lr_scheduler_decay=0.85, seed=cfg.seed).validate()
