"""``aat bench lengths``: a batch of two clip lengths, grouped by length or padded to the longer.

The engine batches clips by feature shape: a batch whose clips have two lengths runs as two
forward passes, one per length (service/engine.py). The alternative is one forward pass over
the clips padded to the longer length with an attention mask. This measures both on the same
clips, in one run, for a few length pairs:

- ``grouped``: the backbone on the shorter clips, then on the longer ones (what the engine does);
- ``padded``: the backbone once on all clips, the shorter ones zero-padded to the longer length.
  Without the mask, so its time is a lower bound of the masked pass's (a mask adds work).

It also reports how far each way moves the shorter clips' embeddings from the clips computed
alone at their own length: grouping keeps them (up to float summation order); padding does not,
since a clip's tokens take the positions of the longer grid (the positional embedding is cut
around the centre of the stored grid for each length, backbone.resample_pos_grid) and attend to
the padding, which a mask would only partly repair.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.common import interleaved, machine, machine_summary, median, table
from aat_serve.bench.fixtures import PRESETS, preset_config


@dataclass
class LengthsBenchConfig:
    """What ``run_lengths_bench`` measures (``aat bench lengths``)."""

    preset: str = "small"
    pairs: tuple[tuple[int, int], ...] = ((100, 300), (100, 1024), (512, 1024))
    """(shorter, longer) frame counts; half the batch at each."""
    batch: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    rounds: int = 5
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"--backbone must be one of {', '.join(PRESETS)}, got "
                              f"{self.preset!r}")
        if self.batch < 2 or self.batch % 2 or self.rounds < 1:
            raise ConfigError(f"--batch must be an even number >= 2 and --rounds >= 1, got "
                              f"{self.batch} and {self.rounds}")
        for short, long in self.pairs:
            if not 16 <= short < long:
                raise ConfigError(f"--pairs needs SHORT:LONG with 16 <= SHORT < LONG frames, "
                                  f"got {short}:{long}")


def _backbone(cfg: LengthsBenchConfig) -> AST:
    torch.manual_seed(0)
    return AST(preset_config(cfg.preset)).eval().to(device=cfg.device,
                                                     dtype=getattr(torch, cfg.dtype))


def _pair(model: AST, cfg: LengthsBenchConfig, short: int, long: int) -> dict[str, Any]:
    half, mel = cfg.batch // 2, model.cfg.num_mel_bins
    g = torch.Generator().manual_seed(short * 10_000 + long)
    dev, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    xs = torch.randn(half, short, mel, generator=g).to(dev, dtype)
    xl = torch.randn(half, long, mel, generator=g).to(dev, dtype)
    padded_in = torch.cat([torch.nn.functional.pad(xs, (0, 0, 0, long - short)), xl])

    def grouped() -> tuple[torch.Tensor, torch.Tensor]:
        return model(xs), model(xl)

    def padded() -> torch.Tensor:
        return model(padded_in)

    with torch.inference_mode():
        times = interleaved({"grouped": grouped, "padded": padded}, cfg.rounds, dev,
                            warmup=cfg.warmup)
        alone = torch.cat([model(xs[i:i + 1]) for i in range(half)]).float()
        kept = (grouped()[0].float() - alone).abs().max().item()
        moved = (padded()[:half].float() - alone).abs().max().item()
    ms = {k: round(median(v["wall"]) * 1000, 3) for k, v in times.items()}
    patches = {n: math.prod(model.cfg.grid(n)) for n in (short, long)}
    tokens = {"grouped": half * (patches[short] + patches[long]),
              "padded": cfg.batch * patches[long]}
    return {"short": short, "long": long, "grouped_ms": ms["grouped"],
            "padded_ms": ms["padded"],
            "padded_over_grouped": round(ms["padded"] / ms["grouped"], 3),
            "tokens": tokens, "shorter_clips_max_abs_diff": {"grouped": kept, "padded": moved}}


def run_lengths_bench(cfg: LengthsBenchConfig) -> dict[str, Any]:
    """One row per length pair, and the machine."""
    model = _backbone(cfg)
    rows = [_pair(model, cfg, short, long) for short, long in cfg.pairs]
    return {"machine": machine(torch.device(cfg.device)), "config": asdict(cfg), "rows": rows}


def format_report(report: dict[str, Any]) -> str:
    c = report["config"]
    rows = [[f"{r['short']} + {r['long']}", f"{r['grouped_ms']:.1f}", f"{r['padded_ms']:.1f}",
             f"{r['padded_over_grouped']:.2f}x",
             f"{r['tokens']['grouped']} / {r['tokens']['padded']}",
             f"{r['shorter_clips_max_abs_diff']['grouped']:.1e}",
             f"{r['shorter_clips_max_abs_diff']['padded']:.1e}"] for r in report["rows"]]
    return "\n".join([
        f"aat bench lengths: random {c['preset']} backbone, batch {c['batch']} (half at each "
        f"length), {c['device']} {c['dtype']}, median of {c['rounds']} rounds; "
        f"{machine_summary(report['machine'])}",
        table(rows, ["frames", "grouped ms", "padded ms", "padded / grouped",
                     "tokens grouped / padded", "shorter clips moved: grouped",
                     "padded (no mask)"]),
        "padded / grouped > 1: grouping by length (what the engine does) is faster. The padded "
        "pass has no mask, a lower bound of the masked pass's time."])
