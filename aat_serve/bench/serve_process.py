"""``aat bench serve --driver hey``: a real ``aat serve`` process under ``hey``, and its ceilings.

The server runs in its own process (started here, or ``--url``); the load comes from ``hey``
processes; this process only starts them. Each round runs, back to back: ``GET /healthz`` (the
HTTP server's own ceiling), classify on one task, classify over a task mix (one ``hey`` per
task, the connections split), all with the same connection count, and the engine alone (the
server's own engine with the server's settings, fed the decoded clip in a child process while
the server idles: ``aat_serve.bench.engine_only``; the median over the rounds). Reported per
scenario: req/s, p50/p95/p99, errors, mean clips and tasks per batch (the server's
``aat_batch_size``/``aat_batch_tasks`` histograms before and after), and the ratios classify /
healthz and service clips/s / engine-only clips/s.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.common import machine
from aat_serve.bench.engine_only import engine_only
from aat_serve.bench.fixtures import random_task_bundles, synth_wav, write_random_checkpoint
from aat_serve.bench.hey import HeyRun, ServeProcess, hey_load, hey_path


@dataclass
class ProcessBenchConfig:
    """What ``bench_serve_process`` measures (``aat bench serve --driver hey``)."""

    preset: str | None = None
    """A random backbone of this preset; None: ``checkpoint``, else the embedded demo."""
    checkpoint: str | None = None
    bundle_dir: str | None = None
    url: str | None = None
    tasks: int = 4
    clients: int = 32
    requests: int = 2000
    max_seconds: float = 120.0
    clip_s: float = 1.0
    max_batch: int = 8
    max_wait_ms: float = 5.0
    device: str = "auto"
    dtype: str = "float32"
    rounds: int = 1
    engine_seconds: float = 3.0


def _model_source(cfg: ProcessBenchConfig, work: Path) -> tuple[str, str]:
    """(checkpoint, bundle directory) for the server and the engine-only run."""
    from aat_serve.adapters.checkpoints import load_checkpoint

    if cfg.preset is not None:
        ckpt_dir = write_random_checkpoint(work / "backbone", cfg.preset, None)
        ck = load_checkpoint(ckpt_dir)
        store = work / "store"
        store.mkdir()
        for b in random_task_bundles(ck.backbone, ck.features, cfg.tasks):
            b.save(store / f"{b.manifest.task}.safetensors")
        return str(ckpt_dir), str(store)
    if cfg.checkpoint is not None:
        if cfg.bundle_dir is None:
            raise ConfigError("--checkpoint with --driver hey needs --bundle-dir")
        return cfg.checkpoint, cfg.bundle_dir
    from aat_serve.adapters import demo_assets

    if not demo_assets.available():
        raise ConfigError("no --backbone, --checkpoint or --url, and no embedded demo "
                          "(build it with `aat demo build`)")
    return str(demo_assets.BACKBONE_DIR), str(demo_assets.TASKS_DIR)


def _summary(runs: list[HeyRun]) -> dict[str, Any]:
    lat = np.array([x for r in runs for x in r.latencies]) * 1000
    seconds = sum(r.seconds for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    batches = sum(r.batch["aat_batch_size_count"] for r in runs)
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if lat.size else (lambda q: 0.0)
    return {"requests": int(lat.size), "errors": errors, "seconds": round(seconds, 3),
            "throughput_rps": round(lat.size / seconds, 2) if seconds else 0.0,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_batch": round(sum(r.batch["aat_batch_size_sum"] for r in runs) / batches, 2)
            if batches else 0.0,
            "mean_tasks_per_batch": round(sum(r.batch["aat_batch_tasks_sum"] for r in runs)
                                          / batches, 2) if batches else 0.0}


def _task_names(url: str, want: int) -> list[str]:
    import httpx

    listing = httpx.get(url + "/tasks", timeout=30).json()["tasks"]
    names = [t["task"] for t in listing if t["state"] == "active"][:want]
    if not names:
        raise ConfigError(f"the server at {url} has no active task")
    return names


def _measure(cfg: ProcessBenchConfig, url: str, clip: Path, names: list[str],
             engine_env: dict[str, str] | None) -> tuple[dict, dict]:
    runs: dict[str, list[HeyRun]] = {"healthz": [], "single": [], f"mix{len(names)}": []}
    engine_runs: list[dict[str, float]] = []
    hey_load(url, [f"/classify/{n}" for n in names], 4 * cfg.clients, cfg.clients, clip,
             cfg.max_seconds)  # warm up every task and connection
    for _ in range(cfg.rounds):
        runs["healthz"].append(hey_load(url, ["/healthz"], cfg.requests, cfg.clients, None,
                                        cfg.max_seconds))
        runs["single"].append(hey_load(url, [f"/classify/{names[0]}"], cfg.requests,
                                       cfg.clients, clip, cfg.max_seconds))
        runs[f"mix{len(names)}"].append(hey_load(url, [f"/classify/{n}" for n in names],
                                                 cfg.requests, cfg.clients, clip,
                                                 cfg.max_seconds))
        if engine_env is not None:
            engine_runs.append(engine_only(engine_env, tasks=names, clip=clip,
                                           clients=cfg.clients, seconds=cfg.engine_seconds))
    results = {k: _summary(v) for k, v in runs.items()}
    eng = ({k: round(statistics.median(r[k] for r in engine_runs), 2)
            for k in ("single", "mix")} if engine_runs else {})
    if engine_runs:
        eng["inference_threads"] = engine_runs[0]["inference_threads"]
        eng["windows"] = [r["windows"] for r in engine_runs]
    return results, eng


def bench_serve_process(cfg: ProcessBenchConfig) -> dict[str, Any]:
    """The measured figures and their ratios (``--json`` prints this)."""
    hey_path()
    work = Path(tempfile.mkdtemp(prefix="aat-bench-hey-"))
    try:
        clip = work / "clip.wav"
        clip.write_bytes(synth_wav(cfg.clip_s, seed=0))
        with contextlib.ExitStack() as stack:
            env = None
            url = cfg.url.rstrip("/") if cfg.url else None
            if url is None:
                checkpoint, bundle_dir = _model_source(cfg, work)
                env = {"AAT_MAX_BATCH": str(cfg.max_batch),
                       "AAT_MAX_WAIT_MS": str(cfg.max_wait_ms), "AAT_DEVICE": cfg.device,
                       "AAT_DTYPE": cfg.dtype, "AAT_MAX_QUEUE": str(max(256, 4 * cfg.clients)),
                       "AAT_REQUEST_TIMEOUT_S": "600"}
                url = stack.enter_context(ServeProcess(checkpoint=checkpoint,
                                                       bundle_dir=bundle_dir, env=env)).url
                # the engine-only run: the same settings, the server's store, no HTTP
                env = {**env, "AAT_CHECKPOINT": checkpoint, "AAT_BUNDLE_DIR": bundle_dir,
                       "AAT_LOG_LEVEL": "warning", "AAT_REFRESH_S": "3600"}
            names = _task_names(url, cfg.tasks)
            results, eng = _measure(cfg, url, clip, names, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mix = f"mix{len(names)}"
    health = results["healthz"]["throughput_rps"]
    ratios = {f"{k}_vs_healthz": round(results[k]["throughput_rps"] / health, 3) if health
              else 0.0 for k in ("single", mix)}
    if eng:
        ratios["single_vs_engine"] = round(results["single"]["throughput_rps"] / eng["single"], 3)
        ratios[f"{mix}_vs_engine"] = round(results[mix]["throughput_rps"] / eng["mix"], 3)
    config = {k: v for k, v in asdict(cfg).items() if k != "engine_seconds"}
    config.update(driver="hey", served_tasks=names,
                  backbone=cfg.preset or cfg.checkpoint or ("server " + url if cfg.url
                                                            else "embedded demo"))
    return {"machine": machine(), "config": config, "results": results,
            "engine_only_clips_per_s": eng, "ratios": ratios}


def format_process_report(report: dict[str, Any]) -> str:
    from aat_serve.bench.common import machine_summary, table

    c, m = report["config"], report["machine"]
    rows = [[name, f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.2f}", f"{r['mean_tasks_per_batch']:.2f}",
             r["requests"], sum(r["errors"].values()) or ""]
            for name, r in report["results"].items()]
    lines = [f"aat bench serve --driver hey: {c['backbone']}, tasks {', '.join(c['served_tasks'])},"
             f" {c['clients']} connections, {c['clip_s']} s clips, max batch {c['max_batch']}; "
             f"{machine_summary(m)}; load average {m.get('load_average')}",
             table(rows, ["scenario", "req/s", "p50 ms", "p95 ms", "p99 ms", "clips/batch",
                          "tasks/batch", "n", "errors"])]
    if report["engine_only_clips_per_s"]:
        eng = report["engine_only_clips_per_s"]
        lines.append(f"engine only (the server's engine, no HTTP or decode; "
                     f"{eng['inference_threads']} inference thread(s)), clips/s: single "
                     f"{eng['single']:.1f}, mix {eng['mix']:.1f}")
    lines += [f"{name}: {v:.3f}x" for name, v in report["ratios"].items()]
    return "\n".join(lines)
