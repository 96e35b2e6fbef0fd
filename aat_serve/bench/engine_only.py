"""Engine-only throughput: the server's own engine, fed decoded clips in-process, no HTTP.

``aat bench serve`` compares the service with this figure, so it is measured the
way the server computes: in a child process with the server's environment (``AAT_*``), set up
as ``aat serve`` sets itself up (``tune_process``: switch interval, allocator; ``Service``:
model, inference thread and its torch threads, batched features, batcher), and loaded through
``Engine.submit`` by ``clients`` coroutines in a closed loop, each with the clip already decoded
to PCM at the task's rate. What it leaves out is exactly the HTTP server, the request bodies and
the audio decode, so service clips/s over this is the cost of those.

Run as ``python -m aat_serve.bench.engine_only CONFIG_JSON``; prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aat_serve.adapters.errors import ConfigError


async def _closed_loop(svc: Any, names: list[str], waves: dict[str, Any], clients: int,
                       seconds: float) -> list[float]:
    """The completion times of the clips ``clients`` submitters (round-robin over ``names``)
    computed while submitting for ``seconds``, each sending its next clip when one returns."""
    from aat_serve.service.engine import Job

    engine, done, stop = svc.engine, [], time.monotonic() + seconds

    async def client(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            task = names[i % len(names)]
            info = engine.tasks[task]
            wave, cfg = waves[task]
            job = Job(task=task, wave=wave, config=cfg, version=info.version,
                      feature_settings=info.manifest.features, deadline=time.monotonic() + 600,
                      timeout_s=600.0, future=engine.new_future())
            await engine.submit(job, engine.admit())
            done.append(time.monotonic())
            i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    return done


def window_rates(done: list[float], start: float, per: float, windows: int) -> list[float]:
    """Clips per second in each of ``windows`` consecutive windows of ``per`` seconds from
    ``start``, counting the clips that completed inside each: a window starts in the steady
    state of one running loop and ends before its drain, so neither the ramp-up nor the
    clips still in flight at the end are counted (each would bias a window by about one
    batch, ~5 % at 16 clips a batch and ~340 clips/s)."""
    return [sum(1 for t in done if start + i * per <= t < start + (i + 1) * per) / per
            for i in range(windows)]


async def _measure(cfg: dict[str, Any]) -> dict[str, Any]:
    from aat_serve.adapters.fbank import window_samples
    from aat_serve.adapters.features import load_audio
    from aat_serve.service.runtime import (
        Service,
        freeze_heap,
        load_backbone,
        tune_process,
        with_embedded_defaults,
    )
    from aat_serve.service.settings import load_settings

    settings = with_embedded_defaults(load_settings())
    tune_process(settings)
    svc = Service(settings, load_backbone(settings))
    freeze_heap()  # as `aat serve` does before serving
    svc.start()
    try:
        deadline = time.monotonic() + 600
        while not svc.ready:
            if svc.startup_error or time.monotonic() > deadline:
                raise ConfigError(svc.startup_error or "the engine was not ready within 600 s")
            await asyncio.sleep(0.05)
        audio = Path(cfg["clip"]).read_bytes()
        waves = {}
        for task in cfg["tasks"]:
            fc = svc.task_feature_config(svc.engine.tasks[task])
            wave = load_audio(audio, sample_rate=fc.sample_rate, max_duration_s=fc.max_duration_s)
            waves[task] = (wave[: window_samples(fc)], fc)  # a clip up to one window: one job
        out: dict[str, Any] = {"windows": {}}
        per = cfg["seconds"] / cfg["windows"]
        for name, names in (("single", cfg["tasks"][:1]), ("mix", cfg["tasks"])):
            warm = min(1.0, per)  # one loop: warm up, then the timed windows back to back
            start = time.monotonic() + warm
            done = await _closed_loop(svc, names, waves, cfg["clients"],
                                      warm + cfg["windows"] * per)
            rates = window_rates(done, start, per, cfg["windows"])
            out["windows"][name] = [round(r, 2) for r in rates]
            out[name] = round(sum(rates) / len(rates), 2)  # all the timed clips / time
        worker = getattr(svc.engine, "worker", None)  # None: an engine before service.worker
        out["inference_threads"] = worker.threads if worker is not None else None
        return out
    finally:
        await svc.stop()


def engine_only(env: dict[str, str], *, tasks: list[str], clip: Path, clients: int,
                seconds: float, windows: int = 3, timeout_s: float = 900) -> dict[str, Any]:
    """Run the measurement in a child process with ``env`` (added to this one's) and return
    ``{"single": clips/s, "mix": clips/s, "windows": {...}, "inference_threads": n}`` (the
    clips completed in ``windows`` timed windows over their time; every window's rate under
    ``windows``: a window's count moves in steps of a batch)."""
    cfg = {"tasks": tasks, "clip": str(clip), "clients": clients, "seconds": seconds,
           "windows": windows}
    proc = subprocess.run([sys.executable, "-m", "aat_serve.bench.engine_only", json.dumps(cfg)],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise ConfigError(f"the engine-only run failed ({proc.returncode}): "
                          f"{proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    print(json.dumps(asyncio.run(_measure(json.loads(argv[0])))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
