"""``aat bench lengths``: grouped by length vs padded to the longer, on the tiny backbone."""

from __future__ import annotations

import json

import pytest

from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.lengths import LengthsBenchConfig, run_lengths_bench
from aat_serve.cli.main import main as aat


def test_the_report_and_what_each_way_does_to_the_shorter_clips(capsys):
    assert aat(["bench", "lengths", "--backbone", "tiny", "--pairs", "32:64,48:160",
                "--batch", "4", "--rounds", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["short"], r["long"]) for r in report["rows"]] == [(32, 64), (48, 160)]
    # tiny: 32 mel bins -> 2 frequency patches, time patches (frames - 16) // 16 + 1
    assert [r["tokens"] for r in report["rows"]] == [
        {"grouped": 2 * (2 * 2 + 2 * 4), "padded": 4 * 2 * 4},
        {"grouped": 2 * (2 * 3 + 2 * 10), "padded": 4 * 2 * 10}]
    for r in report["rows"]:
        assert r["padded_over_grouped"] == round(r["padded_ms"] / r["grouped_ms"], 3)
        moved = r["shorter_clips_max_abs_diff"]
        assert moved["grouped"] < 1e-5 < 1e-2 < moved["padded"]  # kept vs moved


@pytest.mark.parametrize(("fields", "message"), [
    ({"pairs": ((64, 32),)}, "--pairs needs SHORT:LONG with 16 <= SHORT < LONG frames, got 64:32"),
    ({"batch": 3}, "--batch must be an even number >= 2 and --rounds >= 1, got 3 and 5"),
    ({"preset": "huge"}, "--backbone must be one of tiny, small, vit-b, got 'huge'"),
])
def test_bad_settings_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError) as e:
        run_lengths_bench(LengthsBenchConfig(**fields))
    assert str(e.value) == message


def test_the_cli_refuses_a_malformed_pair(capsys):
    assert aat(["bench", "lengths", "--pairs", "100-300"]) == 1
    assert "--pairs must be SHORT:LONG[,SHORT:LONG...], got '100-300'" in capsys.readouterr().err
