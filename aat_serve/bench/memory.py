"""Memory of S resident ``aat_ms`` tasks, measured in a fresh child process per S.

``aat bench memory --tasks S --dtype bf16 [--quick] [--device cuda]``
builds a random backbone and a ``MultiTaskModel`` with ``max_tasks=S``, loads S random
``aat_ms`` bundles one at a time, classifies one mixed batch of eight 1-s clips and prints one
JSON object: the exact tensor bytes (``MultiTaskModel.memory_bytes``) and the process's growth
over its state right after ``import torch``: resident set now and at its peak (Linux; glibc's
mmap threshold is pinned so freed large blocks go back to the OS), or the CUDA allocator's
current and peak bytes. A fresh process per S keeps one measurement's freed memory out of the
next one's figures.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.adapters.process_memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from aat_serve.bench.fixtures import CLIPS, FULL, QUICK, TASK_CLASSES, random_bundle

MB = 1 / 2**20


def measure(tasks: int, dtype: str, quick: bool, device: str, seed: int = 0) -> dict[str, Any]:
    """Run in this process (which should be fresh); see the module docstring."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    _warm_up(dev)  # one-off runtime allocations (thread pools, kernel caches) before the base
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = rss_bytes()
        has_peak = reset_peak_rss()
    cfg = QUICK if quick else FULL
    torch.manual_seed(seed)
    backbone = AST(cfg).eval().requires_grad_(False)
    fingerprint = backbone.fingerprint()
    r = cfg.embed_dim // 4
    model = MultiTaskModel(backbone, max_tasks=tasks,
                           dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                           device=dev, fingerprint=fingerprint, bottleneck=r)
    for i in range(tasks):
        model.load_task(random_bundle(backbone, fingerprint, f"t{i}", "aat_ms",
                                      TASK_CLASSES[i % len(TASK_CLASSES)], r, seed=1000 + i))
    x = torch.randn(8, CLIPS["1s"], cfg.num_mel_bins)
    model.classify(x, [f"t{i % tasks}" for i in range(8)])
    gc.collect()
    sizes = model.memory_bytes()
    row: dict[str, Any] = {
        "dtype": dtype, "tasks": tasks, "backbone_mb": sizes["backbone"] * MB,
        "pools_mb": sizes["pools"] * MB, "heads_mb": sizes["tasks"] * MB,
        "per_task_mb": (sizes["pools"] + sizes["tasks"]) / tasks * MB,
        "pool_rows": model.slots.pools.rows}
    if cuda:
        row["growth_mb"] = (torch.cuda.memory_allocated(dev) - base) * MB
        row["peak_growth_mb"] = (torch.cuda.max_memory_allocated(dev) - base) * MB
    elif base is not None:
        row["growth_mb"] = (rss_bytes() - base) * MB
        peak = peak_rss_bytes() if has_peak else None
        row["peak_growth_mb"] = (peak - base) * MB if peak else None
    return row


def _warm_up(dev: torch.device) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        model = MultiTaskModel(AST(QUICK), max_tasks=1, dtype=dtype, device=dev, bottleneck=16)
        model.forward(torch.randn(8, CLIPS["1s"], QUICK.num_mel_bins), [-1] * 8)
    del model


def measure_in_child(tasks: int, dtype: str, quick: bool, device: str) -> dict[str, Any]:
    """``measure`` in a fresh Python process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, "-m", "aat_serve.cli.bench", "memory", "--tasks", str(tasks),
           "--dtype", dtype, "--device", device] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement for {tasks} {dtype} tasks failed: "
                           f"{proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)
