"""``aat bench serve``: a real ``aat serve`` process under ``hey``, its ceilings and a baseline.

The server runs in its own process (started here, or ``--url``: one already running on this
machine); the load comes from ``hey`` processes; this process only starts them and reads the
results. Each round runs, back to back: ``GET /healthz`` (the HTTP server's own ceiling),
classify on one task, classify over a task mix (one ``hey`` per task, the connections split),
all with the same connection count, and the engine alone (the server's own engine with the
server's settings, fed the decoded clip in a child process while the server idles:
``aat_serve.bench.engine_only``; the median over the rounds).

``--baseline no-batching`` starts a second server, the same store and settings but
``AAT_MAX_BATCH=1`` (one clip, one task per forward pass), and runs the same one-task and mix
loads against it in the same rounds; ``--baseline one-process`` does the same with a server in
one process (``AAT_FRONT_ENDS=0``) beside one with ``--front-ends`` front-end processes. The
runs of a round go in an order that rotates by one each round, so a change in the machine's
background load hits both servers alike (the server not being measured idles).

Reported per scenario: req/s, p50/p95/p99, errors, mean clips and tasks per batch (the server's
``aat_batch_size``/``aat_batch_tasks`` histograms before and after), the CPU time per request
of the server's event loops and other threads (``aat_serve.bench.process_cpu``; servers this
run started), and the ratios classify /
healthz, service clips/s / engine-only clips/s and, with a baseline, batching / none or
front ends / one process.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.common import machine
from aat_serve.bench.engine_only import engine_only
from aat_serve.bench.fixtures import random_task_bundles, synth_wav, write_random_checkpoint
from aat_serve.bench.hey import HeyRun, ServeProcess, hey_load, hey_path
from aat_serve.bench.process_cpu import GROUPS, cpu_seconds, per_request_us
from aat_serve.bench.serve_targets import format_verdicts, serve_verdicts

BASELINES = ("none", "no-batching", "one-process")
BASELINE_SERVERS = {
    "no-batching": ("no_batching", {"AAT_MAX_BATCH": "1"}, "batching_vs_none",
                    "the same store and settings with AAT_MAX_BATCH=1"),
    "one-process": ("one_process", {"AAT_FRONT_ENDS": "0"}, "front_ends_vs_one_process",
                    "the same store and settings in one process (AAT_FRONT_ENDS=0)"),
}
"""Each baseline: the prefix of its server's scenarios in the report (``no_batching/single``),
what its server's environment changes, the name of its ratios, and what it is."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ProcessBenchConfig:
    """What ``bench_serve_process`` measures; ``aat bench serve``'s flags, one field each."""

    preset: str | None = None
    """A random backbone of this preset; None: ``checkpoint``, else the embedded demo."""
    frames: int | None = None
    """The random backbone's clip length in frames (None: the preset's)."""
    checkpoint: str | None = None
    bundle_dir: str | None = None
    """The task store served with ``checkpoint``; None: ``tasks`` random tasks of it."""
    url: str | None = None
    tasks: int = 4
    clients: int = 32
    requests: int = 2000
    """Requests per scenario in each round (all connections together)."""
    max_seconds: float = 120.0
    clip_s: float = 1.0
    max_batch: int = 16
    max_wait_ms: float = 5.0
    device: str = "auto"
    dtype: str = "float32"
    rounds: int = 1
    engine_seconds: float = 6.0
    """Timed seconds of each engine-only run; 0: no engine-only run."""
    baseline: str = "none"
    front_ends: int = 0
    """``AAT_FRONT_ENDS`` of the measured server (0: one process)."""

    def __post_init__(self) -> None:
        if min(self.tasks, self.clients, self.requests, self.rounds, self.max_batch) < 1:
            raise ConfigError("--tasks, --clients, --requests, --rounds and --max-batch need "
                              f"positive integers, got {self.tasks}, {self.clients}, "
                              f"{self.requests}, {self.rounds} and {self.max_batch}")
        if self.engine_seconds < 0 or self.clip_s <= 0 or self.max_seconds <= 0:
            raise ConfigError("--engine-seconds must be >= 0 and --clip-s, --max-seconds > 0, "
                              f"got {self.engine_seconds}, {self.clip_s} and {self.max_seconds}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"--baseline must be one of {', '.join(BASELINES)}, got "
                              f"{self.baseline!r}")
        if self.baseline == "one-process" and self.front_ends < 1:
            raise ConfigError("--baseline one-process compares front ends with one process: "
                              f"--front-ends must be >= 1, got {self.front_ends}")
        if self.front_ends < 0:
            raise ConfigError(f"--front-ends must be >= 0, got {self.front_ends}")
        if self.baseline == "no-batching" and self.max_batch < 2:
            raise ConfigError("--baseline no-batching compares against a server with max batch "
                              f"1: --max-batch must be >= 2, got {self.max_batch}")
        if self.frames is not None and self.preset is None:
            raise ConfigError("--frames sets the length of a random --backbone; a checkpoint's "
                              "or the demo's tasks keep their own length")
        if self.bundle_dir is not None and self.checkpoint is None:
            raise ConfigError("--bundle-dir is the store of --checkpoint; give both")
        if self.url is not None and (self.preset or self.checkpoint):
            raise ConfigError("--url measures a server that is already running; --backbone and "
                              "--checkpoint choose what a started server serves: give one or "
                              "the other")
        if self.url is not None:
            host = urlsplit(self.url).hostname
            if host not in LOOPBACK:
                raise ConfigError(f"--url must point at this machine (127.0.0.1), got host "
                                  f"{host!r}")
            if self.baseline != "none" or self.front_ends:
                raise ConfigError("--baseline and --front-ends need servers this benchmark "
                                  "starts; a --url server's settings cannot be changed")


def _random_store(checkpoint: str, frames: int | None, tasks: int, store: Path) -> None:
    from aat_serve.adapters.checkpoints import load_checkpoint

    ck = load_checkpoint(checkpoint, target_length=frames)
    store.mkdir()
    for b in random_task_bundles(ck.backbone, ck.features, tasks):
        b.save(store / f"{b.manifest.task}.safetensors")


def _model_source(cfg: ProcessBenchConfig, work: Path) -> tuple[str, str]:
    """(checkpoint, bundle directory) for the servers and the engine-only run."""
    if cfg.preset is not None:
        ckpt_dir = str(write_random_checkpoint(work / "backbone", cfg.preset, cfg.frames))
        _random_store(ckpt_dir, cfg.frames, cfg.tasks, work / "store")
        return ckpt_dir, str(work / "store")
    if cfg.checkpoint is not None:
        if cfg.bundle_dir is None:
            _random_store(cfg.checkpoint, None, cfg.tasks, work / "store")
            return cfg.checkpoint, str(work / "store")
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
    clips = sum(r.batch["aat_batch_size_sum"] for r in runs)
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if lat.size else (lambda q: 0.0)
    return {"requests": int(lat.size), "errors": errors, "seconds": round(seconds, 3),
            "throughput_rps": round(lat.size / seconds, 2) if seconds else 0.0,
            # clips, not requests: audio longer than the task's window is several clips
            "clips_per_s": round(clips / seconds, 2) if seconds else 0.0,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_batch": round(clips / batches, 2) if batches else 0.0,
            "mean_tasks_per_batch": round(sum(r.batch["aat_batch_tasks_sum"] for r in runs)
                                          / batches, 2) if batches else 0.0}


def _task_names(url: str, want: int) -> list[str]:
    import httpx

    listing = httpx.get(url + "/tasks", timeout=30).json()["tasks"]
    names = [t["task"] for t in listing if t["state"] == "active"][:want]
    if not names:
        raise ConfigError(f"the server at {url} has no active task")
    return names


def _front_ends(url: str) -> int:
    """The front-end processes connected to the server's model process (its ``/readyz``)."""
    import httpx

    return int(httpx.get(url + "/readyz", timeout=30).json().get("front_ends", 0))


def _plan(urls: dict[str, str], names: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Scenario name -> (server URL, request paths): the main server's ``healthz``, ``single``
    and ``mixN``, and a baseline server's ``<prefix>/single`` and ``<prefix>/mixN``."""
    mix = [f"/classify/{n}" for n in names]
    plan = {"healthz": (urls["main"], ["/healthz"])}
    for server, url in urls.items():
        prefix = "" if server == "main" else f"{server}/"
        plan[f"{prefix}single"] = (url, mix[:1])
        plan[f"{prefix}mix{len(names)}"] = (url, mix)
    return plan


def _measure(cfg: ProcessBenchConfig, urls: dict[str, str], clip: Path, names: list[str],
             engine_env: dict[str, str] | None, say: Callable[[str], None],
             pids: dict[str, int] | None = None) -> tuple[dict, dict]:
    """Every scenario once per round (order rotating by one each round), then the engine
    alone; the summaries (with the CPU per request of the servers in ``pids``, by URL) and
    the engine-only medians."""
    plan = _plan(urls, names)
    runs: dict[str, list[HeyRun]] = {k: [] for k in plan}
    cpu: dict[str, list] = {k: [] for k in plan}
    pids = pids or {}
    engine_runs: list[dict[str, Any]] = []
    for url in urls.values():  # warm up every task and connection of every server
        hey_load(url, [f"/classify/{n}" for n in names], 4 * cfg.clients, cfg.clients, clip,
                 cfg.max_seconds)
    order = list(plan)
    for r in range(cfg.rounds):
        for key in order[r % len(order):] + order[:r % len(order)]:
            say(f"round {r + 1}/{cfg.rounds}: {key}, {cfg.requests} requests over "
                f"{cfg.clients} connections")
            url, paths = plan[key]
            body = None if key == "healthz" else clip
            pid = pids.get(url)
            before = cpu_seconds(pid) if pid else None
            runs[key].append(hey_load(url, paths, cfg.requests, cfg.clients, body,
                                      cfg.max_seconds))
            if pid:
                cpu[key].append((before, cpu_seconds(pid)))
        if engine_env is not None:
            say(f"round {r + 1}/{cfg.rounds}: the engine alone")
            engine_runs.append(engine_only(engine_env, tasks=names, clip=clip,
                                           clients=cfg.clients, seconds=cfg.engine_seconds))
    results = {k: _summary(v) for k, v in runs.items()}
    for k, spent in cpu.items():
        if spent:
            results[k]["cpu_us_per_request"] = per_request_us(spent, results[k]["requests"])
    eng = ({k: round(statistics.median(r[k] for r in engine_runs), 2)
            for k in ("single", "mix")} if engine_runs else {})
    if engine_runs:
        eng["inference_threads"] = engine_runs[0]["inference_threads"]
        eng["windows"] = [r["windows"] for r in engine_runs]
    return results, eng


def _start_servers(cfg: ProcessBenchConfig, work: Path, stack: contextlib.ExitStack,
                   say: Callable[[str], None]
                   ) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    """The servers' URLs (``main``, and the baseline's by its prefix), all started at once,
    the main server's environment (for the engine-only run) and each server's pid by URL."""
    checkpoint, bundle_dir = _model_source(cfg, work)
    env = {"AAT_MAX_BATCH": str(cfg.max_batch), "AAT_MAX_WAIT_MS": str(cfg.max_wait_ms),
           "AAT_DEVICE": cfg.device, "AAT_DTYPE": cfg.dtype, "AAT_FRONT_ENDS": str(cfg.front_ends),
           "AAT_MAX_QUEUE": str(max(256, 4 * cfg.clients)), "AAT_REQUEST_TIMEOUT_S": "600"}
    envs = {"main": env}
    if cfg.baseline in BASELINE_SERVERS:
        prefix, change, _, _ = BASELINE_SERVERS[cfg.baseline]
        envs[prefix] = {**env, **change}
    servers = {}
    for name, server_env in envs.items():
        say(f"starting aat serve ({name}: max batch {server_env['AAT_MAX_BATCH']}, front ends "
            f"{server_env['AAT_FRONT_ENDS']})")
        servers[name] = ServeProcess(checkpoint=checkpoint, bundle_dir=bundle_dir,
                                     env=server_env)
        stack.push(servers[name])
        servers[name].start()
    urls = {name: s.wait_ready().url for name, s in servers.items()}
    # the engine-only run: the main server's settings and store, no HTTP
    pids = {s.url: s.proc.pid for s in servers.values()}
    return urls, {**env, "AAT_CHECKPOINT": checkpoint, "AAT_BUNDLE_DIR": bundle_dir,
                  "AAT_LOG_LEVEL": "warning", "AAT_REFRESH_S": "3600"}, pids


def _ratios(results: dict[str, Any], eng: dict[str, Any], mix: str, baseline: str
            ) -> dict[str, float]:
    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else 0.0

    rps = {k: v["throughput_rps"] for k, v in results.items()}
    out = {f"{k}_vs_healthz": ratio(rps[k], rps["healthz"]) for k in ("single", mix)}
    if eng:  # clips/s against clips/s: a request of several windows is several clips
        out["single_vs_engine"] = ratio(results["single"]["clips_per_s"], eng["single"])
        out[f"{mix}_vs_engine"] = ratio(results[mix]["clips_per_s"], eng["mix"])
    if baseline in BASELINE_SERVERS:
        prefix, _, name, _ = BASELINE_SERVERS[baseline]
        for k in ("single", mix):
            out[f"{name}_{k}"] = ratio(rps[k], rps[f"{prefix}/{k}"])
    return out


def bench_serve_process(cfg: ProcessBenchConfig,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The measured figures and their ratios (``--json`` prints this)."""
    say = progress or (lambda msg: None)
    hey_path()
    work = Path(tempfile.mkdtemp(prefix="aat-bench-hey-"))
    try:
        clip = work / "clip.wav"
        clip.write_bytes(synth_wav(cfg.clip_s, seed=0))
        with contextlib.ExitStack() as stack:
            env, pids = None, {}
            if cfg.url:
                urls = {"main": cfg.url.rstrip("/")}
            else:
                urls, env, pids = _start_servers(cfg, work, stack, say)
            names = _task_names(urls["main"], cfg.tasks)
            connected = {name: _front_ends(url) for name, url in urls.items()}
            engine_env = env if cfg.engine_seconds > 0 else None
            results, eng = _measure(cfg, urls, clip, names, engine_env, say, pids)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = asdict(cfg)
    config.update(driver="hey", served_tasks=names,
                  backbone=cfg.preset or cfg.checkpoint or ("server " + urls["main"] if cfg.url
                                                            else "embedded demo"))
    report = {"machine": machine(), "config": config, "results": results,
              "engine_only_clips_per_s": eng, "front_ends_connected": connected,
              "ratios": _ratios(results, eng, f"mix{len(names)}", cfg.baseline)}
    report["verdicts"] = serve_verdicts(report)
    return report


def format_process_report(report: dict[str, Any]) -> str:
    from aat_serve.bench.common import machine_summary, table

    c, m = report["config"], report["machine"]
    rows = [[name, f"{r['throughput_rps']:.1f}", f"{r['clips_per_s']:.1f}", f"{r['p50_ms']:.1f}",
             f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.2f}",
             f"{r['mean_tasks_per_batch']:.2f}",
             r["requests"], sum(r["errors"].values()) or ""]
            for name, r in report["results"].items()]
    lines = [f"aat bench serve: {c['backbone']}, tasks {', '.join(c['served_tasks'])}, "
             f"{c['clients']} connections (hey), {c['clip_s']} s clips, max batch "
             f"{c['max_batch']}, {c['rounds']} round(s) of {c['requests']} requests per "
             f"scenario; {machine_summary(m)}; load average {m.get('load_average')}",
             table(rows, ["scenario", "req/s", "clips/s", "p50 ms", "p95 ms", "p99 ms",
                          "clips/batch", "tasks/batch", "n", "errors"])]
    cpu_rows = [[name, *(f"{r['cpu_us_per_request'][g]:.0f}" for g in GROUPS)]
                for name, r in report["results"].items() if "cpu_us_per_request" in r]
    if cpu_rows:
        lines += ["CPU per request, microseconds (from /proc; a loop is one core's work):",
                  table(cpu_rows, ["scenario", "model loop", "model threads",
                                   "front-end loops", "front-end threads"])]
    connected = report.get("front_ends_connected") or {}
    if any(connected.values()):
        lines.append("front-end processes connected: " + ", ".join(
            f"{name} {n}" for name, n in connected.items()))
    if c.get("baseline") in BASELINE_SERVERS:
        prefix, _, _, what = BASELINE_SERVERS[c["baseline"]]
        lines.append(f"{prefix}/*: a second aat serve, {what}")
    if report["engine_only_clips_per_s"]:
        eng = report["engine_only_clips_per_s"]
        lines.append(f"engine only (the server's engine, no HTTP or decode; "
                     f"{eng['inference_threads']} inference thread(s)), clips/s: single "
                     f"{eng['single']:.1f}, mix {eng['mix']:.1f}")
    lines += [f"{name}: {v:.3f}x" for name, v in report["ratios"].items()]
    return "\n".join(lines + format_verdicts(report))
