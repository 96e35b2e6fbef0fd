"""``aat bench serve`` (written with ``--driver hey``, the flag older commands name): a real
server process under hey, briefly, on the tiny backbone, with the engine-only run; the report is
complete and its ratios are its own figures'."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from aat_serve.cli.main import main as aat

needs_hey = pytest.mark.skipif(shutil.which("hey") is None and not os.environ.get(
    "AAT_REQUIRE_TOOLS"), reason="hey is not installed")


@needs_hey
def test_hey_driver_report(capsys):
    code = aat(["bench", "serve", "--driver", "hey", "--backbone", "tiny", "--tasks", "2",
                "--clients", "4", "--requests", "200", "--max-seconds", "120",
                "--clip-s", "1.0", "--max-batch", "4", "--rounds", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    results = report["results"]
    assert set(results) == {"healthz", "single", "mix2"}
    for name, r in results.items():
        assert r["requests"] == 200 and r["errors"] == {}, name
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert results["healthz"]["mean_batch"] == 0.0  # no clip computed while /healthz ran
    assert 1.0 <= results["single"]["mean_batch"] <= 4.0
    assert results["single"]["mean_tasks_per_batch"] == 1.0
    assert 1.0 <= results["mix2"]["mean_tasks_per_batch"] <= 2.0
    eng = report["engine_only_clips_per_s"]
    assert eng["single"] > 0 and eng["mix"] > 0
    rps = {k: v["throughput_rps"] for k, v in results.items()}
    clips = {k: v["clips_per_s"] for k, v in results.items()}
    # the tiny backbone's window is 0.655 s: each 1-s request is two clips, /healthz none
    assert clips["healthz"] == 0.0
    for k in ("single", "mix2"):
        assert clips[k] == pytest.approx(2 * rps[k], abs=0.05) and clips[k] != rps[k]
    assert report["ratios"] == {
        "single_vs_healthz": round(rps["single"] / rps["healthz"], 3),
        "mix2_vs_healthz": round(rps["mix2"] / rps["healthz"], 3),
        "single_vs_engine": round(clips["single"] / eng["single"], 3),
        "mix2_vs_engine": round(clips["mix2"] / eng["mix"], 3)}
    verdicts = {v["what"]: v for v in report["verdicts"]}  # judged on this run's own figures
    assert verdicts["single: p99 ms"]["value"] == results["single"]["p99_ms"]
    assert verdicts["mix2: service / engine-only clips/s"]["value"] == report["ratios"][
        "mix2_vs_engine"]
    assert len(verdicts) == 8 and {v["status"] for v in verdicts.values()} <= {"PASS", "MISS"}


def test_hey_driver_says_what_is_missing(monkeypatch):
    from aat_serve.adapters.errors import ConfigError
    from aat_serve.bench import hey

    monkeypatch.setattr(hey.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError) as e:
        hey.hey_path()
    assert str(e.value) == hey.HEY_MISSING
    monkeypatch.undo()
    assert hey.hey_path().endswith("hey")
