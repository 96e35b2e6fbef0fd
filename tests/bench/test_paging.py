"""``aat bench serve --zipf``: the Zipf draw, the summary's arithmetic, the store it writes and a
short end-to-end run against two real servers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aat_serve.adapters import demo_assets
from aat_serve.adapters.bundle import TaskBundle, content_version
from aat_serve.bench.paging import summarize, write_store
from aat_serve.bench.zipf_client import Record, draw_tasks, zipf_probabilities
from aat_serve.cli.main import main as aat

needs_demo = pytest.mark.skipif(not demo_assets.available(), reason="no embedded demo")


def test_zipf_draw_is_skewed_reproducible_and_seeded():
    p = zipf_probabilities(1000, 1.1)
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) < 0)
    assert p[0] / p[9] == pytest.approx(10 ** 1.1)
    names = [f"t{i}" for i in range(1000)]
    a, b = draw_tasks(names, 1.1, 5000, seed=3), draw_tasks(names, 1.1, 5000, seed=3)
    assert a == b and a != draw_tasks(names, 1.1, 5000, seed=4)
    top64 = sum(x in set(names[:64]) for x in a) / len(a)
    assert abs(top64 - p[:64].sum()) < 0.03  # the drawn share matches the law
    assert p[:64].sum() > 0.6


def test_summary_counts_hits_loads_and_errors_exactly():
    recs = ([Record(0.010, 200, "", -1.0, True)] * 6 + [Record(0.030, 200, "host", 2.0, True)] * 2
            + [Record(0.050, 200, "disk", 9.0, True)] + [Record(0.01, 200, "", -1.0, False)]
            + [Record(0.5, 503, "", -1.0, False)])
    s = summarize(recs, 2.0)
    assert (s["requests"], s["ok"], s["throughput_rps"]) == (11, 9, 4.5)
    assert s["errors"] == {"503": 1, "wrong_version": 1}
    assert s["hit_rate"] == round(6 / 9, 4)
    assert (s["hits"]["n"], s["hits"]["p50_ms"]) == (6, 10.0)
    assert (s["cold_host"]["n"], s["cold_host"]["p99_ms"], s["load_host"]["p50_ms"]) == (2, 30.0,
                                                                                         2.0)
    assert (s["cold_disk"]["n"], s["load_disk"]["p99_ms"]) == (1, 9.0)


@needs_demo
def test_the_store_holds_real_size_valid_distinct_bundles(tmp_path):
    checkpoint, versions = write_store(tmp_path, 3)
    digits = TaskBundle.load(demo_assets.TASKS_DIR / "digits.safetensors")
    assert checkpoint == str(demo_assets.BACKBONE_DIR) and list(versions) == [
        "task0000", "task0001", "task0002"]
    bundles = [TaskBundle.load(tmp_path / f"{t}.safetensors") for t in versions]
    for b in bundles:
        assert b.manifest.version == versions[b.manifest.task]
        assert content_version(b.tensors, b.manifest) == b.manifest.version
        assert {k: v.shape for k, v in b.tensors.items()} == {
            k: v.shape for k, v in digits.tensors.items()}
    assert len(set(versions.values())) == 3


@needs_demo
def test_a_short_paging_run_reports_both_servers(capsys):
    code = aat(["bench", "serve", "--tasks", "8", "--zipf", "1.1", "--resident", "2",
                "--clients", "2", "--requests", "24", "--warmup", "8", "--rounds", "1",
                "--clip-s", "0.5", "--device", "cpu", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    paged, full = report["results"]["paged"], report["results"]["all_resident"]
    for r in (paged, full):
        assert (r["requests"], r["ok"], r["errors"]) == (24, 24, {})
    assert full["hit_rate"] == 1.0 and full["memory"]["resident"] == 8
    assert paged["hit_rate"] < 1.0 and paged["memory"]["resident"] <= 2
    assert paged["cold_host"]["n"] + paged["cold_disk"]["n"] == round(24 * (1 - paged[
        "hit_rate"]))
    assert paged["memory"]["host_bytes"] <= paged["memory"]["host_budget_bytes"]
    assert report["ratios"]["paged_vs_all_resident"] == round(
        paged["throughput_rps"] / full["throughput_rps"], 3)
