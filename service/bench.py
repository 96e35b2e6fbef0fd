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

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import re
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint, to_hf_state_dict
from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.model import AudioClassifier

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=32, depth=2, num_heads=2, mlp_hidden=64, freq_stride=16,
                 time_stride=16, num_mel_bins=32, target_length=64),
    "small": dict(embed_dim=192, depth=6, num_heads=3, mlp_hidden=768, freq_stride=16,
                  time_stride=16, num_mel_bins=128, target_length=128),
    "vit-b": dict(embed_dim=768, depth=12, num_heads=12, mlp_hidden=3072, freq_stride=10,
                  time_stride=10, num_mel_bins=128, target_length=1024),
}


# -- building the backbone and tasks ---------------------------------------------------------

def write_random_checkpoint(directory: Path, preset: str, frames: int | None, seed: int = 0
                            ) -> Path:
    """A Hugging Face-layout AST directory with random weights (nothing is downloaded)."""
    fields = dict(PRESETS[preset])
    if frames:
        fields["target_length"] = frames
    cfg = BackboneConfig(patch_freq=16, patch_time=16, norm_eps=1e-12, head_norm_eps=1e-12,
                         **fields)
    torch.manual_seed(seed)
    canonical = AST(cfg).frozen_state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "audio-spectrogram-transformer", "hidden_size": cfg.embed_dim,
              "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
              "intermediate_size": cfg.mlp_hidden, "patch_size": 16,
              "frequency_stride": cfg.freq_stride, "time_stride": cfg.time_stride,
              "num_mel_bins": cfg.num_mel_bins, "max_length": cfg.target_length,
              "layer_norm_eps": 1e-12, "hidden_act": "gelu", "qkv_bias": True}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_hf_state_dict(canonical).items()},
              str(directory / "model.safetensors"))
    return directory


def random_bundles(backbone: AST, features: FeatureConfig, n: int, method: str = "aat_ms",
                   classes: int = 10, seed: int = 0) -> list[TaskBundle]:
    """``n`` tasks with random, non-identity weights (names ``task0``, ``task1``, ...)."""
    out = []
    for i in range(n):
        model = AudioClassifier(backbone, method, classes)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out.append(TaskBundle.from_model(model, f"task{i}", [f"class{c}" for c in range(classes)],
                                         features))
    return out


def synth_wav(seconds: float, sample_rate: int = 16000, seed: int = 0) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# -- a server in a thread --------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """The service on 127.0.0.1 in a background thread (its own event loop)."""

    def __init__(self, **settings: Any) -> None:
        import uvicorn

        from aat_serve.service.app import create_app
        from aat_serve.service.settings import Settings

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(Settings(host="127.0.0.1", port=self.port, **settings))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()),
                                       name="aat-bench-server", daemon=True)

    def __enter__(self) -> LocalServer:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise ConfigError("the benchmark server failed to start")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ConfigError("the benchmark server was not ready within 600 s")

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)


# -- the load generator ----------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    tasks: list[str]


def _metric_totals(text: str) -> dict[str, float]:
    out = {}
    for name in ("aat_batch_size_sum", "aat_batch_size_count", "aat_batch_tasks_sum"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


@dataclass
class Sample:
    """Raw figures of one closed-loop run."""

    latencies: list[float]
    errors: dict[int, int]
    seconds: float
    batch_clips: float
    batches: float
    batch_tasks: float


def run_load(url: str, tasks: list[str], clips: list[bytes], clients: int, requests: int,
             max_seconds: float, top_k: int = 1) -> Sample:
    """Closed loop: ``clients`` threads, each sending its next request when one returns."""
    import httpx

    lock = threading.Lock()
    counter = {"next": 0}
    latencies: list[float] = []
    errors: dict[int, int] = {}
    stop_at = time.monotonic() + max_seconds

    def take() -> int | None:
        with lock:
            i = counter["next"]
            if i >= requests or time.monotonic() >= stop_at:
                return None
            counter["next"] = i + 1
            return i

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while (i := take()) is not None:
                task = tasks[i % len(tasks)]
                t0 = time.perf_counter()
                r = c.post(f"/classify/{task}?top_k={top_k}", content=clips[i % len(clips)],
                           headers={"content-type": "audio/wav"})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[r.status_code] = errors.get(r.status_code, 0) + 1

    before = _metric_totals(httpx.get(url + "/metrics").text)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    elapsed = time.perf_counter() - started
    after = _metric_totals(httpx.get(url + "/metrics").text)
    return Sample(latencies, errors, elapsed,
                  after["aat_batch_size_sum"] - before["aat_batch_size_sum"],
                  after["aat_batch_size_count"] - before["aat_batch_size_count"],
                  after["aat_batch_tasks_sum"] - before["aat_batch_tasks_sum"])


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Throughput (all requests / all time), latency percentiles and batch means."""
    lat = np.array([x for s in samples for x in s.latencies]) * 1000
    n, seconds = lat.size, sum(s.seconds for s in samples)
    batches = sum(s.batches for s in samples)
    errors: dict[int, int] = {}
    for s in samples:
        for k, v in s.errors.items():
            errors[k] = errors.get(k, 0) + v
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if n else (lambda q: 0.0)
    return {
        "requests": int(n), "errors": errors, "seconds": round(seconds, 3),
        "throughput_rps": round(n / seconds, 3) if seconds > 0 else 0.0,
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "mean_batch": round(sum(s.batch_clips for s in samples) / batches, 2) if batches else 0.0,
        "mean_tasks_per_batch": round(sum(s.batch_tasks for s in samples) / batches, 2)
        if batches else 0.0,
    }


def bench_serve(*, preset: str = "small", checkpoint: str | None = None, frames: int | None,
                tasks: int = 4, clients: int = 8, requests: int = 200, max_seconds: float = 60,
                clip_s: float = 1.0, max_batch: int = 8, max_wait_ms: float = 5.0,
                device: str = "auto", dtype: str = "float32", rounds: int = 3, warmup: int = 8,
                progress: Any = None) -> dict[str, Any]:
    """Every scenario against batching on and off; the measured figures and their ratios.

    Both servers run at once (one idles while the other is measured) and the four
    (mode, scenario) runs are interleaved over ``rounds`` rounds, in a rotating order, so a
    change in the machine's background load hits every configuration alike.
    """
    if tasks < 1 or clients < 1 or requests < 1 or max_batch < 2 or rounds < 1:
        raise ConfigError("need tasks >= 1, clients >= 1, requests >= 1, rounds >= 1 and "
                          "max_batch >= 2")
    say = progress or (lambda msg: None)
    backbone_name = preset if checkpoint is None else f"checkpoint {checkpoint}"
    work = Path(tempfile.mkdtemp(prefix="aat-bench-"))
    try:
        if checkpoint is None:
            say(f"building a random {preset} backbone")
            checkpoint = str(write_random_checkpoint(work / "backbone", preset, frames))
        ckpt = load_checkpoint(checkpoint, target_length=frames)
        store = work / "store"
        store.mkdir()
        for b in random_bundles(ckpt.backbone, ckpt.features, tasks):
            b.save(store / f"{b.manifest.task}.safetensors")
        names = [f"task{i}" for i in range(tasks)]
        clips = [synth_wav(clip_s, seed=s) for s in range(8)]
        scenarios = [Scenario("single", names[:1]), Scenario(f"mix{tasks}", names)]
        modes = (("batching", max_batch), ("no_batching", 1))
        samples: dict[str, list[Sample]] = {f"{m}/{sc.name}": [] for m, _ in modes
                                            for sc in scenarios}
        with contextlib.ExitStack() as stack:
            servers = {}
            for mode, batch in modes:
                say(f"starting a server with max_batch={batch}")
                servers[mode] = stack.enter_context(LocalServer(
                    checkpoint=checkpoint, bundle_dir=store, max_batch=batch,
                    max_wait_ms=max_wait_ms, device=device, dtype=dtype,
                    max_queue=max(256, 4 * clients), request_timeout_s=600, refresh_s=3600))
                run_load(servers[mode].url, names, clips, clients, warmup, max_seconds)
            runs = list(samples)
            per_round = [requests // rounds + (1 if r < requests % rounds else 0)
                         for r in range(rounds)]
            for r in range(rounds):
                order = runs[r % len(runs):] + runs[:r % len(runs)]
                for key in order:
                    mode, name = key.split("/")
                    sc = next(x for x in scenarios if x.name == name)
                    say(f"round {r + 1}/{rounds}: {key}, {clients} clients, "
                        f"{per_round[r]} requests")
                    samples[key].append(run_load(servers[mode].url, sc.tasks, clips, clients,
                                                 per_round[r], max_seconds / rounds))
        results = {k: summarize(v) for k, v in samples.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ratio(a: str, b: str) -> float:
        x, y = results[a]["throughput_rps"], results[b]["throughput_rps"]
        return round(x / y, 3) if y else 0.0

    mix = scenarios[1].name
    cfg = ckpt.backbone.cfg
    return {
        "machine": machine(),
        "config": {"backbone": backbone_name,
                   "embed_dim": cfg.embed_dim, "depth": cfg.depth,
                   "frames": ckpt.features.target_length, "tasks": tasks, "clients": clients,
                   "requests": requests, "rounds": rounds, "clip_s": clip_s,
                   "max_batch": max_batch, "max_wait_ms": max_wait_ms, "device": device,
                   "dtype": dtype},
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


# -- CLI -------------------------------------------------------------------------------------

def _table(report: dict[str, Any]) -> str:
    c = report["config"]
    m = report["machine"]
    shape = (f" ({c['embed_dim']} wide, {c['depth']} blocks, {c['frames']} frames)"
             if "embed_dim" in c else "")
    where = f", {c['device']} {c['dtype']}" if "device" in c else ""
    lines = [f"aat bench serve: {c['backbone']}{shape}, {c['tasks']} tasks, {c['clients']} "
             f"clients, {c['clip_s']} s clips{where}; "
             f"{m['gpu'] or m['cpu']} ({m['cpu_count']} cores)",
             f"{'scenario':<22} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
             f"{'clips/batch':>11} {'tasks/batch':>11} {'n':>5}"]
    for name, r in report["results"].items():
        err = f"  errors {r['errors']}" if r["errors"] else ""
        lines.append(f"{name:<22} {r['throughput_rps']:>8.2f} {r['p50_ms']:>8.1f} "
                     f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_batch']:>11.2f} "
                     f"{r['mean_tasks_per_batch']:>11.2f} {r['requests']:>5}{err}")
    lines += [f"{name}: {v:.3f}x" for name, v in report["ratios"].items()]
    return "\n".join(lines)


def run_serve_bench(args: argparse.Namespace) -> int:
    import sys

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    if args.url:
        report = bench_running_server(args.url, tasks=args.tasks, clients=args.clients,
                                      requests=args.requests, max_seconds=args.max_seconds,
                                      clip_s=args.clip_s)
        print(json.dumps(report, indent=2) if args.json else _table(report))
        return 0
    preset = args.backbone or ("vit-b" if torch.cuda.is_available() else "small")
    report = bench_serve(preset=preset, checkpoint=args.checkpoint, frames=args.frames,
                         tasks=args.tasks, clients=args.clients, requests=args.requests,
                         max_seconds=args.max_seconds, clip_s=args.clip_s,
                         max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         device=args.device, dtype=args.dtype, rounds=args.rounds,
                         progress=say)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def register_serve_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to ``aat bench``'s subcommands."""
    p = bench_subparsers.add_parser(
        "serve", help="throughput and latency of the HTTP service, batching on vs off",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=sorted(PRESETS),
                   help="random backbone size (default: vit-b with CUDA, else small)")
    p.add_argument("--checkpoint", help="use this checkpoint instead of a random backbone")
    p.add_argument("--url", help="measure a server already running on this machine instead "
                                 "(its first --tasks tasks; no batching on/off comparison)")
    p.add_argument("--frames", type=int, help="clip length in frames (default: the preset's)")
    p.add_argument("--tasks", type=int, default=4, help="tasks in the mix (default 4)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=200,
                   help="requests per scenario (default 200)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="time limit per scenario (default 60)")
    p.add_argument("--clip-s", type=float, default=1.0, help="audio seconds per request")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds the requests are split over (default 3)")
    p.add_argument("--max-batch", type=int, default=8, help="batch size with batching on")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching wait (default 5)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_serve_bench)
