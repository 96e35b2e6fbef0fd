"""``aat bench serve``: closed-loop load on a local server, dynamic batching on vs off.

One run builds a random backbone (or uses ``--checkpoint``) and N random ``aat_ms`` task
bundles, then serves them from two servers on 127.0.0.1 in this process (uvicorn in threads):
one with dynamic batching (``--max-batch``), one with ``max_batch=1`` (the baseline: one clip,
one task per forward). Against each, C clients send requests back to back (closed loop), all to
one task or round-robin over every task. The four runs are interleaved over ``--rounds`` rounds
so that background load affects them alike; each is bounded in count (``--requests``) and time
(``--max-seconds``). Reported: throughput, p50/p95/p99 latency, mean
clips and tasks per batch (from the server's metrics), and the ratios mix/single and on/off.

With ``--url`` the same load runs against a server already running on this machine (single task
vs mix only, since its batching cannot be switched).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aat_serve.adapters.checkpoints import LoadedCheckpoint, load_checkpoint
from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.common import machine, machine_summary, table
from aat_serve.bench.fixtures import random_task_bundles, synth_wav, write_random_checkpoint
from aat_serve.bench.load import LocalServer, Sample, run_load, summarize


@dataclass
class ServeBenchConfig:
    """What ``bench_serve`` measures; the defaults are ``aat bench serve``'s."""

    preset: str = "small"
    checkpoint: str | None = None
    frames: int | None = None
    tasks: int = 4
    clients: int = 8
    requests: int = 200
    max_seconds: float = 60.0
    clip_s: float = 1.0
    max_batch: int = 8
    max_wait_ms: float = 5.0
    device: str = "auto"
    dtype: str = "float32"
    rounds: int = 3
    warmup: int = 8

    def __post_init__(self) -> None:
        if (self.tasks < 1 or self.clients < 1 or self.requests < 1 or self.max_batch < 2
                or self.rounds < 1):
            raise ConfigError("need tasks >= 1, clients >= 1, requests >= 1, rounds >= 1 and "
                              "max_batch >= 2")


@dataclass
class Scenario:
    name: str
    tasks: list[str]


MODES = ("batching", "no_batching")


def _write_store(cfg: ServeBenchConfig, work: Path, say: Callable[[str], None]
                 ) -> tuple[str, LoadedCheckpoint, Path]:
    """The checkpoint (random unless given), loaded, and a bundle store with ``cfg.tasks``."""
    checkpoint = cfg.checkpoint
    if checkpoint is None:
        say(f"building a random {cfg.preset} backbone")
        checkpoint = str(write_random_checkpoint(work / "backbone", cfg.preset, cfg.frames))
    ckpt = load_checkpoint(checkpoint, target_length=cfg.frames)
    store = work / "store"
    store.mkdir()
    for b in random_task_bundles(ckpt.backbone, ckpt.features, cfg.tasks):
        b.save(store / f"{b.manifest.task}.safetensors")
    return checkpoint, ckpt, store


def _rounds(cfg: ServeBenchConfig, urls: dict[str, str], scenarios: list[Scenario],
            clips: list[bytes], say: Callable[[str], None]) -> dict[str, list[Sample]]:
    """Every (mode, scenario) run once per round, in an order rotating by one each round."""
    samples: dict[str, list[Sample]] = {f"{m}/{sc.name}": [] for m in MODES for sc in scenarios}
    runs = list(samples)
    per_round = [cfg.requests // cfg.rounds + (1 if r < cfg.requests % cfg.rounds else 0)
                 for r in range(cfg.rounds)]
    for r in range(cfg.rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for key in order:
            mode, name = key.split("/")
            sc = next(x for x in scenarios if x.name == name)
            say(f"round {r + 1}/{cfg.rounds}: {key}, {cfg.clients} clients, "
                f"{per_round[r]} requests")
            samples[key].append(run_load(urls[mode], sc.tasks, clips, cfg.clients,
                                         per_round[r], cfg.max_seconds / cfg.rounds))
    return samples


def bench_serve(cfg: ServeBenchConfig, progress: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Every scenario against batching on and off; the measured figures and their ratios.

    Both servers run at once (one idles while the other is measured) and the four
    (mode, scenario) runs are interleaved over ``rounds`` rounds, in a rotating order, so a
    change in the machine's background load hits every configuration alike.
    """
    say = progress or (lambda msg: None)
    work = Path(tempfile.mkdtemp(prefix="aat-bench-"))
    try:
        checkpoint, ckpt, store = _write_store(cfg, work, say)
        names = [f"task{i}" for i in range(cfg.tasks)]
        clips = [synth_wav(cfg.clip_s, seed=s) for s in range(8)]
        scenarios = [Scenario("single", names[:1]), Scenario(f"mix{cfg.tasks}", names)]
        with contextlib.ExitStack() as stack:
            urls = {}
            for mode, batch in zip(MODES, (cfg.max_batch, 1), strict=True):
                say(f"starting a server with max_batch={batch}")
                urls[mode] = stack.enter_context(LocalServer(
                    checkpoint=checkpoint, bundle_dir=store, max_batch=batch,
                    max_wait_ms=cfg.max_wait_ms, device=cfg.device, dtype=cfg.dtype,
                    max_queue=max(256, 4 * cfg.clients), request_timeout_s=600,
                    refresh_s=3600)).url
                run_load(urls[mode], names, clips, cfg.clients, cfg.warmup, cfg.max_seconds)
            samples = _rounds(cfg, urls, scenarios, clips, say)
        results = {k: summarize(v) for k, v in samples.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ratio(a: str, b: str) -> float:
        x, y = results[a]["throughput_rps"], results[b]["throughput_rps"]
        return round(x / y, 3) if y else 0.0

    mix = scenarios[1].name
    shape = ckpt.backbone.cfg
    config = {k: v for k, v in asdict(cfg).items()
              if k not in ("preset", "checkpoint", "frames", "max_seconds", "warmup")}
    return {
        "machine": machine(),
        "config": {"backbone": cfg.preset if cfg.checkpoint is None
                   else f"checkpoint {cfg.checkpoint}",
                   "embed_dim": shape.embed_dim, "depth": shape.depth,
                   "frames": ckpt.features.target_length, **config},
        "results": results,
        "ratios": {
            f"{mix}_vs_single_batching": ratio(f"batching/{mix}", "batching/single"),
            "batching_vs_none_single": ratio("batching/single", "no_batching/single"),
            f"batching_vs_none_{mix}": ratio(f"batching/{mix}", f"no_batching/{mix}"),
        },
    }


def bench_running_server(url: str, *, tasks: int, clients: int, requests: int,
                         max_seconds: float, clip_s: float) -> dict[str, Any]:
    """Single task vs mix against a server that is already running (loopback only)."""
    import httpx

    host = httpx.URL(url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"--url must point at this machine (127.0.0.1), got host {host!r}")
    listing = httpx.get(url.rstrip("/") + "/tasks", timeout=30)
    if listing.status_code != 200:
        raise ConfigError(f"GET {url}/tasks answered {listing.status_code}: {listing.text[:200]}")
    names = [t["task"] for t in listing.json()["tasks"]][:tasks]
    if not names:
        raise ConfigError(f"the server at {url} has no tasks")
    clips = [synth_wav(clip_s, seed=s) for s in range(8)]
    run_load(url, names, clips, clients, 8, max_seconds)  # warm up
    results = {"server/single": summarize([run_load(url, names[:1], clips, clients, requests,
                                                    max_seconds)]),
               f"server/mix{len(names)}": summarize([run_load(url, names, clips, clients,
                                                              requests, max_seconds)])}
    single, mix = (results[k]["throughput_rps"] for k in results)
    return {"machine": machine(),
            "config": {"backbone": f"server {url}", "tasks": len(names), "clients": clients,
                       "requests": requests, "clip_s": clip_s},
            "results": results,
            "ratios": {f"mix{len(names)}_vs_single": round(mix / single, 3) if single else 0}}


def format_report(report: dict[str, Any]) -> str:
    c = report["config"]
    shape = (f" ({c['embed_dim']} wide, {c['depth']} blocks, {c['frames']} frames)"
             if "embed_dim" in c else "")
    where = f", {c['device']} {c['dtype']}" if "device" in c else ""
    rows = []
    for name, r in report["results"].items():
        rows.append([name, f"{r['throughput_rps']:.2f}", f"{r['p50_ms']:.1f}",
                     f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.2f}",
                     f"{r['mean_tasks_per_batch']:.2f}", r["requests"],
                     r["errors"] or ""])
    lines = [f"aat bench serve: {c['backbone']}{shape}, {c['tasks']} tasks, {c['clients']} "
             f"clients, {c['clip_s']} s clips{where}; {machine_summary(report['machine'])}",
             table(rows, ["scenario", "req/s", "p50 ms", "p95 ms", "p99 ms", "clips/batch",
                          "tasks/batch", "n", "errors"])]
    lines += [f"{name}: {v:.3f}x" for name, v in report["ratios"].items()]
    return "\n".join(lines)
