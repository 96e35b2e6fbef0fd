"""``aat bench serve --tasks N --zipf S [--resident M]``: paging thousands of tasks (issue 24).

Writes N random ``aat_ms`` bundles of the embedded demo backbone into a temporary store, starts
two real ``aat serve`` processes on it (``serve_process``-style children): one with
``AAT_MAX_TASKS=M`` (paged: the resident tasks are a cache) and one with ``AAT_MAX_TASKS=N``
(every task resident: the baseline), and drives each from C client processes
(``zipf_client``) sending Zipf-drawn tasks, closed loop. Both servers run for the whole
benchmark and the measured runs alternate over ``rounds`` rounds, so background load on the
machine hits both alike. Each server first gets ``warmup`` unmeasured requests.

Reported per server: throughput, hit rate (requests whose task was resident), p50/p99 latency
of hits and of requests that waited for a load (by source: host memory or disk), the loads' own
time (``X-AAT-Task-Load-Ms``), errors (any status but 200, or an answer naming another version
than the store's), the server's resident set (now and peak) against its budgets and the cache
summary of ``GET /tasks``; and the paged/all-resident throughput ratio.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aat_serve.adapters.bundle import TaskBundle, content_version
from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.common import machine, machine_summary, table
from aat_serve.bench.fixtures import synth_wav
from aat_serve.bench.hey import ServeProcess, metric_totals
from aat_serve.bench.zipf_client import ClientJob, Record, run_client, warm


@dataclass
class PagingBenchConfig:
    """What ``bench_paging`` measures; the defaults are the issue's target run."""

    tasks: int = 1000
    zipf: float = 1.1
    resident: int = 64
    clients: int = 8
    requests: int = 2000
    """Measured requests per server per round (all clients together)."""
    warmup: int = 1000
    rounds: int = 2
    max_seconds: float = 300.0
    clip_s: float = 1.0
    max_batch: int = 8
    max_wait_ms: float = 5.0
    host_cache_mb: float = 512.0
    device_task_mb: float | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (1 <= self.resident <= self.tasks) or self.zipf <= 0 or self.clients < 1 \
                or self.requests < 1 or self.rounds < 1:
            raise ConfigError("need 1 <= --resident <= --tasks, --zipf > 0, clients, requests "
                              "and rounds >= 1")


def write_store(store: Path, n: int, seed: int = 0) -> tuple[str, dict[str, str]]:
    """N random aat_ms bundles of the demo backbone (``task0000``...); (checkpoint, versions).

    Real size: each takes the manifest and tensor shapes of the demo's own ``digits`` task
    (aat_ms, bottleneck 32, about 400 kB) with its own name and random tensors, versioned by
    content hash as uploads are.
    """
    from aat_serve.adapters import demo_assets

    if not demo_assets.available():
        raise ConfigError("the paging benchmark runs on the embedded demo backbone; build it "
                          "with `aat demo build`")
    template = TaskBundle.load(demo_assets.TASKS_DIR / "digits.safetensors")
    g = torch.Generator().manual_seed(seed)
    versions = {}
    for i in range(n):
        tensors = {k: (v if k.startswith("head.norm") else torch.randn(v.shape, generator=g)
                       * 0.05) for k, v in template.tensors.items()}
        m = dataclasses.replace(template.manifest, task=f"task{i:04d}")
        m = dataclasses.replace(m, version=content_version(tensors, m))
        TaskBundle(m, tensors).save(store / f"{m.task}.safetensors")
        versions[m.task] = m.version
    return str(demo_assets.BACKBONE_DIR), versions


def _proc_memory(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5].lower()] = int(line.split()[1]) * 1024
    return {"rss_bytes": out.get("vmrss", 0), "peak_rss_bytes": out.get("vmhwm", 0)}


def _batches(url: str) -> tuple[float, float]:
    """(clips, batches) the server has computed so far (its ``aat_batch_size`` histogram)."""
    import httpx

    totals = metric_totals(httpx.get(url + "/metrics", timeout=60).text)
    return totals["aat_batch_size_sum"], totals["aat_batch_size_count"]


def _run(pool, url: str, names: list[str], versions: dict[str, str], cfg: PagingBenchConfig,
         clip: bytes, requests: int, seed: int) -> tuple[list[Record], float]:
    per = [requests // cfg.clients + (1 if i < requests % cfg.clients else 0)
           for i in range(cfg.clients)]
    start = time.time() + 0.2
    jobs = [ClientJob(url, names, versions, cfg.zipf, clip, n, start, start + cfg.max_seconds,
                      seed * 1000 + i) for i, n in enumerate(per) if n > 0]
    results = pool.map(run_client, jobs)
    elapsed = time.time() - start
    return [r for rs in results for r in rs], elapsed


def summarize(records: list[Record], seconds: float) -> dict[str, Any]:
    """Throughput, hit rate, latency of hits and of loads by source, errors."""
    ok = [r for r in records if r.status == 200 and r.version_ok]
    errors: dict[str, int] = {}
    for r in records:
        if r.status != 200:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
        elif not r.version_ok:
            errors["wrong_version"] = errors.get("wrong_version", 0) + 1

    def pct(xs: list[float]) -> dict[str, float]:
        a = np.array(xs)
        return ({"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 2),
                 "p99_ms": round(float(np.percentile(a, 99)), 2)} if a.size else {"n": 0})

    hits = [r for r in ok if not r.load]
    out = {"requests": len(records), "ok": len(ok), "errors": errors,
           "seconds": round(seconds, 3),
           "throughput_rps": round(len(ok) / seconds, 2) if seconds > 0 else 0.0,
           "hit_rate": round(len(hits) / len(ok), 4) if ok else 0.0,
           "hits": pct([r.seconds * 1000 for r in hits])}
    for src in ("host", "disk"):
        cold = [r for r in ok if r.load == src]
        out[f"cold_{src}"] = pct([r.seconds * 1000 for r in cold])
        out[f"load_{src}"] = pct([r.load_ms for r in cold])
    return out


def _env(cfg: PagingBenchConfig, resident: int) -> dict[str, str]:
    env = {"AAT_MAX_TASKS": str(resident), "AAT_HOST_CACHE_MB": str(cfg.host_cache_mb),
           "AAT_MAX_BATCH": str(cfg.max_batch), "AAT_MAX_WAIT_MS": str(cfg.max_wait_ms),
           "AAT_DEVICE": cfg.device, "AAT_DTYPE": cfg.dtype, "AAT_PRELOAD": "eager",
           "AAT_MAX_QUEUE": str(max(256, 4 * cfg.clients)), "AAT_REQUEST_TIMEOUT_S": "600",
           "AAT_REFRESH_S": "3600", "AAT_DEMO": "false"}
    if cfg.device_task_mb is not None and resident < cfg.tasks:
        env["AAT_DEVICE_TASK_MB"] = str(cfg.device_task_mb)
    return env


def bench_paging(cfg: PagingBenchConfig, progress=None) -> dict[str, Any]:
    """The measured figures of both servers and their throughput ratio (``--json``)."""
    import httpx

    say = progress or (lambda msg: None)
    work = Path(tempfile.mkdtemp(prefix="aat-bench-paging-"))
    modes = {"paged": cfg.resident, "all_resident": cfg.tasks}
    try:
        store = work / "store"
        store.mkdir()
        say(f"writing {cfg.tasks} random aat_ms bundles of the demo backbone")
        checkpoint, versions = write_store(store, cfg.tasks, cfg.seed)
        names = list(versions)
        np.random.default_rng(cfg.seed).shuffle(names)  # Zipf ranks not in preload order
        clip = synth_wav(cfg.clip_s, seed=1)
        servers: dict[str, ServeProcess] = {}
        records: dict[str, list[Record]] = {m: [] for m in modes}
        seconds = dict.fromkeys(modes, 0.0)
        batches = {m: [0.0, 0.0] for m in modes}  # clips, batches while measured
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(cfg.clients) as pool:
            pool.map(warm, range(cfg.clients))
            try:
                for mode, resident in modes.items():
                    say(f"starting the {mode} server (AAT_MAX_TASKS={resident})")
                    servers[mode] = ServeProcess(checkpoint=checkpoint, bundle_dir=str(store),
                                                 env=_env(cfg, resident)).__enter__()
                    _run(pool, servers[mode].url, names, versions, cfg, clip, cfg.warmup,
                         cfg.seed + 10_000)
                for r in range(cfg.rounds):
                    order = list(modes) if r % 2 == 0 else list(modes)[::-1]
                    for mode in order:
                        say(f"round {r + 1}/{cfg.rounds}: {mode}, {cfg.requests} requests")
                        before = _batches(servers[mode].url)
                        recs, secs = _run(pool, servers[mode].url, names, versions, cfg, clip,
                                          cfg.requests, cfg.seed + r)
                        after = _batches(servers[mode].url)
                        records[mode] += recs
                        seconds[mode] += secs
                        batches[mode] = [batches[mode][i] + after[i] - before[i]
                                         for i in range(2)]
                memory = {m: {**_proc_memory(s.proc.pid),
                              **httpx.get(s.url + "/tasks", timeout=60).json()["cache"]}
                          for m, s in servers.items()}
            finally:
                for s in servers.values():
                    s.__exit__()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {m: {**summarize(records[m], seconds[m]), "memory": memory[m],
                   "mean_batch": round(batches[m][0] / batches[m][1], 2) if batches[m][1]
                   else 0.0} for m in modes}
    base = results["all_resident"]["throughput_rps"]
    return {"machine": machine(), "config": asdict(cfg), "results": results,
            "ratios": {"paged_vs_all_resident": round(results["paged"]["throughput_rps"] / base,
                                                      3) if base else 0.0}}


def format_paging_report(report: dict[str, Any]) -> str:
    c = report["config"]
    rows = []
    for mode, r in report["results"].items():
        def cell(key: str, q: str, r=r) -> str:
            return f"{r[key][q]:.1f}" if r[key].get("n") else "-"

        rows.append([mode, f"{r['throughput_rps']:.1f}", f"{r['mean_batch']:.2f}",
                     f"{r['hit_rate']:.3f}",
                     cell("hits", "p50_ms"), cell("hits", "p99_ms"),
                     f"{cell('cold_host', 'p50_ms')}/{cell('cold_host', 'p99_ms')}",
                     f"{cell('cold_disk', 'p50_ms')}/{cell('cold_disk', 'p99_ms')}",
                     f"{cell('load_host', 'p50_ms')}/{cell('load_host', 'p99_ms')}",
                     f"{cell('load_disk', 'p50_ms')}/{cell('load_disk', 'p99_ms')}",
                     f"{r['memory']['rss_bytes'] / 2**20:.0f}/"
                     f"{r['memory']['peak_rss_bytes'] / 2**20:.0f}",
                     f"{r['memory']['host_bytes'] / 2**20:.0f}",
                     f"{r['memory']['device_bytes'] / 2**20:.0f}",
                     r["ok"], sum(r["errors"].values()) or 0])
    lines = [f"aat bench serve --tasks {c['tasks']} --zipf {c['zipf']} --resident "
             f"{c['resident']}: demo backbone, aat_ms tasks, {c['clients']} client processes, "
             f"{c['clip_s']} s clips, host tier {c['host_cache_mb']} MB; "
             f"{machine_summary(report['machine'])}; load average "
             f"{report['machine'].get('load_average')}",
             table(rows, ["server", "req/s", "clips/batch", "hit rate", "hit p50", "hit p99",
                          "host-load req p50/p99", "disk-load req p50/p99",
                          "host load ms p50/p99", "disk load ms p50/p99", "RSS/peak MB",
                          "host MB", "device MB", "ok", "errors"])]
    lines += [f"{k}: {v:.3f}x" for k, v in report["ratios"].items()]
    return "\n".join(lines)
