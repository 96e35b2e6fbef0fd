"""``aat bench serve``: real server processes under ``hey``, briefly, on the tiny backbone.

The no-batching baseline is a second ``aat serve`` with ``AAT_MAX_BATCH=1``: its batches hold
exactly one clip while the batching server's hold more under 8 connections (the pair that shows
the two servers really differ); ``--url`` goes through ``hey`` too; bad combinations of flags
are refused with messages that name them.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.serve_process import ProcessBenchConfig
from aat_serve.cli.main import main as aat

needs_hey = pytest.mark.skipif(shutil.which("hey") is None and not os.environ.get(
    "AAT_REQUIRE_TOOLS"), reason="hey is not installed")


def _ordered(r: dict) -> bool:
    return 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]


def _bench_tiny(capsys, rounds: int, *flags: str) -> dict:
    """``aat bench serve --json`` on the tiny backbone, 2 tasks, 8 connections, 48 requests per
    scenario and round, no engine-only run; the report."""
    code = aat(["bench", "serve", "--backbone", "tiny", "--tasks", "2", "--clients", "8",
                "--requests", "48", "--rounds", str(rounds), "--clip-s", "0.5", "--max-batch",
                "8", "--max-seconds", "120", "--engine-seconds", "0", "--json", *flags])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    return report


@needs_hey
def test_no_batching_baseline(capsys):
    report = _bench_tiny(capsys, 2, "--max-wait-ms", "20", "--baseline", "no-batching")
    c = report["config"]
    assert (c["baseline"], c["max_batch"], c["rounds"], c["backbone"]) == (
        "no-batching", 8, 2, "tiny")
    assert c["served_tasks"] == ["task0", "task1"]
    results = report["results"]
    assert set(results) == {"healthz", "single", "mix2", "no_batching/single",
                            "no_batching/mix2"}
    for name, r in results.items():
        assert r["requests"] == 2 * 48 and r["errors"] == {} and _ordered(r), name
    # the baseline server really ran one clip (so one task) per forward pass ...
    assert results["no_batching/single"]["mean_batch"] == 1.0
    assert results["no_batching/mix2"]["mean_batch"] == 1.0
    assert results["no_batching/mix2"]["mean_tasks_per_batch"] == 1.0
    # ... and the batching server, under the same load, did not
    assert 1.0 < results["single"]["mean_batch"] <= 8.0
    assert 1.0 < results["mix2"]["mean_batch"] <= 8.0
    assert results["single"]["mean_tasks_per_batch"] == 1.0
    assert 1.0 < results["mix2"]["mean_tasks_per_batch"] <= 2.0
    assert results["healthz"]["mean_batch"] == 0.0  # nothing computed while /healthz ran
    assert report["engine_only_clips_per_s"] == {}  # --engine-seconds 0
    rps = {k: v["throughput_rps"] for k, v in results.items()}
    assert report["ratios"] == {
        "single_vs_healthz": round(rps["single"] / rps["healthz"], 3),
        "mix2_vs_healthz": round(rps["mix2"] / rps["healthz"], 3),
        "batching_vs_none_single": round(rps["single"] / rps["no_batching/single"], 3),
        "batching_vs_none_mix2": round(rps["mix2"] / rps["no_batching/mix2"], 3)}


@needs_hey
def test_front_ends_against_one_process(capsys):
    """The same store and settings served with one front-end process and in one process, in
    the same rounds; each server says how many front ends it has (the pair: 1 and 0)."""
    report = _bench_tiny(capsys, 1, "--front-ends", "1", "--baseline", "one-process")
    assert (report["config"]["front_ends"], report["config"]["baseline"]) == (1, "one-process")
    assert report["front_ends_connected"] == {"main": 1, "one_process": 0}
    results = report["results"]
    assert set(results) == {"healthz", "single", "mix2", "one_process/single",
                            "one_process/mix2"}
    for name, r in results.items():
        assert r["requests"] == 48 and r["errors"] == {} and _ordered(r), name
    for name in ("single", "mix2", "one_process/single", "one_process/mix2"):
        assert results[name]["mean_batch"] >= 1.0, name  # computed: both served the tasks
    # CPU per request from /proc (10-ms ticks: summed over both scenarios of a server): the
    # front end works where there is one, and only there
    cpu = {k: v["cpu_us_per_request"] for k, v in results.items()}
    assert set(cpu["single"]) == {"model_loop", "model_threads", "front_end_loops",
                                  "front_end_threads"}
    front = sum(cpu[k]["front_end_loops"] + cpu[k]["front_end_threads"] for k in ("single",
                                                                              "mix2"))
    assert front > 0
    for k in ("one_process/single", "one_process/mix2"):
        assert cpu[k]["front_end_loops"] == cpu[k]["front_end_threads"] == 0
    assert sum(cpu[k]["model_loop"] + cpu[k]["model_threads"]
               for k in ("one_process/single", "one_process/mix2")) > 0
    rps = {k: v["throughput_rps"] for k, v in results.items()}
    assert report["ratios"] == {
        "single_vs_healthz": round(rps["single"] / rps["healthz"], 3),
        "mix2_vs_healthz": round(rps["mix2"] / rps["healthz"], 3),
        "front_ends_vs_one_process_single": round(rps["single"] / rps["one_process/single"], 3),
        "front_ends_vs_one_process_mix2": round(rps["mix2"] / rps["one_process/mix2"], 3)}


@needs_hey
def test_a_running_server_goes_through_hey(ckpt_dir, store, bundles):
    from aat_serve.bench.hey import ServeProcess
    from aat_serve.bench.serve_process import bench_serve_process, format_process_report

    for name in ("birds", "words"):
        bundles[name].save(store / f"{name}.safetensors")
    with ServeProcess(checkpoint=str(ckpt_dir), bundle_dir=str(store),
                      env={"AAT_MAX_BATCH": "4", "AAT_MAX_WAIT_MS": "20"}) as server:
        report = bench_serve_process(ProcessBenchConfig(
            url=server.url + "/", tasks=2, clients=4, requests=24, rounds=1, clip_s=0.3,
            max_seconds=120))
    results = report["results"]
    assert set(results) == {"healthz", "single", "mix2"}
    for name, r in results.items():
        assert r["requests"] == 24 and r["errors"] == {} and _ordered(r), name
    assert sorted(report["config"]["served_tasks"]) == ["birds", "words"]
    assert report["config"]["backbone"] == f"server {server.url}"
    assert results["single"]["mean_tasks_per_batch"] == 1.0
    assert 1.0 <= results["mix2"]["mean_tasks_per_batch"] <= 2.0
    assert 1.0 <= results["single"]["mean_batch"] <= 4.0
    # no engine-only run and no baseline against a server this run did not start
    assert report["engine_only_clips_per_s"] == {}
    assert set(report["ratios"]) == {"single_vs_healthz", "mix2_vs_healthz"}
    text = format_process_report(report)
    assert f"server {server.url}" in text and "single_vs_healthz" in text


@pytest.mark.parametrize(("fields", "message"), [
    ({"url": "http://10.0.0.1:8000"},
     "--url must point at this machine (127.0.0.1), got host '10.0.0.1'"),
    ({"url": "http://127.0.0.1:8000", "baseline": "no-batching"},
     "--baseline and --front-ends need servers this benchmark starts; a --url server's "
     "settings cannot be changed"),
    ({"url": "http://127.0.0.1:8000", "front_ends": 2},
     "--baseline and --front-ends need servers this benchmark starts; a --url server's "
     "settings cannot be changed"),
    ({"preset": "tiny", "baseline": "one-process"},
     "--baseline one-process compares front ends with one process: --front-ends must be >= 1, "
     "got 0"),
    ({"preset": "tiny", "front_ends": -1}, "--front-ends must be >= 0, got -1"),
    ({"preset": "tiny", "max_batch": 1, "baseline": "no-batching"},
     "--baseline no-batching compares against a server with max batch 1: --max-batch must be "
     ">= 2, got 1"),
    ({"frames": 64}, "--frames sets the length of a random --backbone; a checkpoint's or the "
                     "demo's tasks keep their own length"),
    ({"bundle_dir": "store"}, "--bundle-dir is the store of --checkpoint; give both"),
    ({"url": "http://127.0.0.1:8000", "preset": "tiny"},
     "--url measures a server that is already running; --backbone and --checkpoint choose what "
     "a started server serves: give one or the other"),
    ({"baseline": "threads"}, "--baseline must be one of none, no-batching, one-process, got "
                              "'threads'"),
    ({"clients": 0}, "--tasks, --clients, --requests, --rounds and --max-batch need positive "
                     "integers, got 4, 0, 2000, 1 and 16"),
])
def test_bad_flags_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError) as e:
        ProcessBenchConfig(**fields)
    assert str(e.value) == message


def test_the_cli_refuses_before_starting_anything(capsys):
    assert aat(["bench", "serve", "--backbone", "tiny", "--max-batch", "1",
                "--baseline", "no-batching"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: --baseline no-batching compares against a server with max batch 1: "
        "--max-batch must be >= 2, got 1")
    # one batch without a baseline is a legitimate server to measure: the config accepts it
    assert ProcessBenchConfig(preset="tiny", max_batch=1).max_batch == 1
    with pytest.raises(SystemExit):  # the in-process driver is gone
        aat(["bench", "serve", "--driver", "threads"])
