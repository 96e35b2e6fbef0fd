"""Training step time and peak memory of fine-tuning methods on one batch (ViT-B AST).

    python -m aat_serve.training.benchmark --methods full,aat_ms --frames 128,512 --batch 8

Each (method, clip length) runs in a fresh subprocess so that peak memory is its own: the CUDA
allocator's peak on a GPU; on the CPU the process's peak RSS, also shown minus the RSS before
the first step (weights included in both methods alike). A step is forward, backward and the
AdamW update over the method's trainable parameters, on random features of the recipe shapes
(128 frames ~ a 1-s clip as Speech Commands, 512 frames ~ a 5-s clip as ESC-50). Weights are
random: speed and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from aat_serve.adapters.benchmarks.memory import rss_bytes


def measure(method: str, frames: int, batch: int, steps: int, warmup: int, device: str,
            classes: int = 50) -> dict:
    """Time ``steps`` training steps after ``warmup`` ones; report peak memory."""
    from aat_serve.adapters.backbone import AST
    from aat_serve.adapters.config import BackboneConfig
    from aat_serve.adapters.model import AudioClassifier, count_trainable
    from aat_serve.training.api import model_factory

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


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, " \
           f"{torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="full,aat_ms")
    p.add_argument("--frames", default="128,512", help="frames per clip, comma-separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: METHOD:FRAMES in this process
    args = p.parse_args(argv)
    if args.one:
        method, frames = args.one.split(":")
        print(json.dumps(measure(method, int(frames), args.batch, args.steps, args.warmup,
                                 args.device)))
        return 0
    rows = []
    for frames in [int(f) for f in args.frames.split(",")]:
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "aat_serve.training.benchmark",
                   "--one", f"{method}:{frames}",
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--device", args.device]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"ViT-B/16 AST (stride 10), batch {args.batch}, {args.steps} timed steps after "
          f"{args.warmup}; {machine()}; torch {torch.__version__}")
    extra = args.device == "cpu"
    print("| frames | method | trainable | step (s, median) | peak memory (MB) |"
          + (" peak - start (MB) |" if extra else ""))
    print("|---:|---|---:|---:|---:|" + ("---:|" if extra else ""))
    for r in rows:
        print(f"| {r['frames']} | {r['method']} | {r['trainable_params']:,} | "
              f"{r['step_s_median']:.3f} | {r['peak_mb']:.0f} |"
              + (f" {r['peak_over_start_mb']:.0f} |" if extra else ""))
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
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
