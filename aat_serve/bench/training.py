"""Training step time and peak memory of fine-tuning methods on one batch (ViT-B AST).

    aat bench training --methods full,aat_ms --frames 128,512 --batch 8

Each (method, clip length) runs in a fresh subprocess so that peak memory is its own: the CUDA
allocator's peak on a GPU; on the CPU the process's peak RSS, also shown minus the RSS before
the first step (weights included in both methods alike). A step is forward, backward and the
AdamW update over the method's trainable parameters, on random features of the recipe shapes
(128 frames ~ a 1-s clip as Speech Commands, 512 frames ~ a 5-s clip as ESC-50). Weights are
random: speed and memory do not depend on their values.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.config import BackboneConfig
from aat_serve.adapters.model import AudioClassifier, count_trainable
from aat_serve.adapters.process_memory import rss_bytes
from aat_serve.bench.common import machine, machine_summary, table
from aat_serve.training.api import model_factory


def measure(method: str, frames: int, batch: int, steps: int, warmup: int, device: str,
            classes: int = 50) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` ones in this process; report peak memory."""
    dev = torch.device(device)
    torch.manual_seed(0)
    backbone = AST(BackboneConfig(target_length=frames))
    model = model_factory(backbone, method, classes)().to(dev)
    assert isinstance(model, AudioClassifier)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, frames, 128, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else torch.autocast("cpu", enabled=False))

    def step() -> None:
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rss_before = rss_bytes()  # None without /proc: the difference below is then unknown
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"method": method, "frames": frames, "batch": batch, "device": device,
           "trainable_params": count_trainable(model),
           "step_s_median": statistics.median(times), "step_s_min": min(times),
           "steps": steps}
    if dev.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out["peak_mb"] = peak
        out["peak_over_start_mb"] = (peak - rss_before / 2**20 if rss_before is not None
                                     else float("nan"))
    return out


@dataclass
class TrainingBenchConfig:
    """The cases (every method at every clip length) and the steps each one times."""

    methods: tuple[str, ...] = ("full", "aat_ms")
    frames: tuple[int, ...] = (128, 512)
    batch: int = 8
    steps: int = 5
    warmup: int = 2
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def measure_in_child(cfg: TrainingBenchConfig, method: str, frames: int) -> dict[str, Any]:
    """``measure`` of one case in a fresh Python process, so that its peak memory is its own."""
    cmd = [sys.executable, "-m", "aat_serve.cli.bench", "training", "--one", f"{method}:{frames}",
           "--batch", str(cfg.batch), "--steps", str(cfg.steps), "--warmup", str(cfg.warmup),
           "--device", cfg.device]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_training_bench(cfg: TrainingBenchConfig) -> dict[str, Any]:
    """Every (clip length, method) case, each in its own child process."""
    rows = []
    for frames in cfg.frames:
        for method in cfg.methods:
            rows.append(measure_in_child(cfg, method, frames))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"machine": machine(torch.device(cfg.device)), "config": asdict(cfg),
            "results": rows}


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table of the cases and, per clip length, aat_ms against full."""
    cfg, rows = report["config"], report["results"]
    extra = cfg["device"] == "cpu"
    lines = [f"ViT-B/16 AST (stride 10), batch {cfg['batch']}, {cfg['steps']} timed steps after "
             f"{cfg['warmup']}; {machine_summary(report['machine'])}"]
    header = ["frames", "method", "trainable", "step (s, median)", "peak memory (MB)"]
    cells = [[r["frames"], r["method"], f"{r['trainable_params']:,}",
              f"{r['step_s_median']:.3f}", f"{r['peak_mb']:.0f}"]
             + ([f"{r['peak_over_start_mb']:.0f}"] if extra else []) for r in rows]
    lines.append(table(cells, header + (["peak - start (MB)"] if extra else []), markdown=True,
                       right=[True, False, True, True, True, True][:len(header) + extra]))
    base = {(r["frames"], r["method"]): r for r in rows}
    for frames in sorted({r["frames"] for r in rows}):
        full, ms = base.get((frames, "full")), base.get((frames, "aat_ms"))
        if full and ms:
            line = (f"{frames} frames: aat_ms is {full['step_s_median'] / ms['step_s_median']:.2f}"
                    f"x as fast per step as full, with {ms['peak_mb'] / full['peak_mb']:.2f}x its "
                    "peak memory")
            if extra:
                ratio = ms["peak_over_start_mb"] / full["peak_over_start_mb"]
                line += f" ({ratio:.2f}x counting only what training adds to the weights)"
            lines.append(line)
    return "\n".join(lines)
