"""``aat bench serve``: a short run on the tiny backbone; the report is complete and consistent."""

from __future__ import annotations

import json

import pytest

from aat_serve.cli.main import main as aat


def test_bench_serve_json_report(capsys):
    code = aat(["bench", "serve", "--backbone", "tiny", "--tasks", "3", "--clients", "4",
                "--requests", "12", "--max-seconds", "60", "--clip-s", "0.5", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["config"]["backbone"] == "tiny" and report["config"]["tasks"] == 3
    results = report["results"]
    assert set(results) == {"batching/single", "batching/mix3", "no_batching/single",
                            "no_batching/mix3"}
    for name, r in results.items():
        assert r["requests"] == 12 and r["errors"] == {}, name
        assert r["throughput_rps"] == pytest.approx(12 / r["seconds"], rel=1e-2)
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    # the baseline really ran one clip per forward; the single-task scenario one task per batch
    assert results["no_batching/single"]["mean_batch"] == 1.0
    assert results["no_batching/mix3"]["mean_tasks_per_batch"] == 1.0
    assert results["batching/single"]["mean_tasks_per_batch"] == 1.0
    assert 1.0 <= results["batching/mix3"]["mean_tasks_per_batch"] <= 3.0
    rps = {k: v["throughput_rps"] for k, v in results.items()}
    assert report["ratios"] == {
        "mix3_vs_single_batching": round(rps["batching/mix3"] / rps["batching/single"], 3),
        "batching_vs_none_single": round(rps["batching/single"] / rps["no_batching/single"], 3),
        "batching_vs_none_mix3": round(rps["batching/mix3"] / rps["no_batching/mix3"], 3),
    }


def test_bench_serve_refuses_a_batchless_batching_run():
    with pytest.raises(SystemExit):
        aat(["bench", "serve", "--clients", "0", "--max-batch", "x"])
    assert aat(["bench", "serve", "--backbone", "tiny", "--max-batch", "1"]) == 1


def test_bench_against_a_running_server(ckpt_dir, store, bundles):
    from aat_serve.adapters.errors import ConfigError
    from aat_serve.bench.load import LocalServer
    from aat_serve.bench.serve import bench_running_server

    for name in ("birds", "words"):
        bundles[name].save(store / f"{name}.safetensors")
    with LocalServer(checkpoint=ckpt_dir, bundle_dir=store, max_batch=4) as server:
        report = bench_running_server(server.url, tasks=2, clients=2, requests=6,
                                      max_seconds=60, clip_s=0.3)
    assert set(report["results"]) == {"server/single", "server/mix2"}
    assert all(r["requests"] == 6 and r["errors"] == {} for r in report["results"].values())
    assert report["results"]["server/single"]["mean_tasks_per_batch"] == 1.0
    with pytest.raises(ConfigError) as e:
        bench_running_server("http://10.0.0.1:8000", tasks=1, clients=1, requests=1,
                             max_seconds=1, clip_s=0.1)
    assert str(e.value) == ("--url must point at this machine (127.0.0.1), got host "
                            "'10.0.0.1'")
