"""The engine-only figure of ``aat bench serve`` is the server's own engine: a child
process set up from the server's ``AAT_*`` environment, fed decoded clips through
``Engine.submit``."""

from __future__ import annotations

import pytest

from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.engine_only import engine_only
from tests.service.helpers import wav_bytes


def test_the_engine_only_run_takes_the_servers_settings(ckpt_dir, store, bundles, tmp_path):
    for task in ("birds", "words"):
        bundles[task].save(store / f"{task}.safetensors")
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(0.5))
    env = {"AAT_CHECKPOINT": str(ckpt_dir), "AAT_BUNDLE_DIR": str(store),
           "AAT_LOG_LEVEL": "warning", "AAT_MAX_BATCH": "4"}
    got = {}
    for threads in ("1", "2"):
        got[threads] = engine_only({**env, "AAT_INFERENCE_THREADS": threads},
                                   tasks=["birds", "words"], clip=clip, clients=4, seconds=0.6,
                                   windows=2)
    for r in got.values():
        assert r["single"] > 0 and r["mix"] > 0
        assert len(r["windows"]["single"]) == len(r["windows"]["mix"]) == 2
    # the same run, only AAT_INFERENCE_THREADS differs: the child's inference thread follows it
    assert (got["1"]["inference_threads"], got["2"]["inference_threads"]) == (1, 2)


def test_a_child_that_cannot_start_is_a_clear_error(tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(0.5))
    with pytest.raises(ConfigError) as e:
        engine_only({"AAT_CHECKPOINT": str(tmp_path / "missing"), "AAT_LOG_LEVEL": "warning"},
                    tasks=["birds"], clip=clip, clients=1, seconds=0.2)
    assert str(e.value).startswith("the engine-only run failed (1): ")
    assert "missing" in str(e.value)


def test_window_rates_count_only_clips_completed_inside_each_window():
    from aat_serve.bench.engine_only import window_rates

    # a ramp before the first window, 10 clips in window 0, 20 in window 1, a drain after
    done = ([0.05, 0.1] + [1.0 + i * 0.05 for i in range(10)] + [1.5 + i * 0.025
                                                                   for i in range(20)]
            + [2.0, 2.01, 2.02])
    assert window_rates(done, start=1.0, per=0.5, windows=2) == [20.0, 40.0]
    # counting every completion over the nominal time (the old figure) would read higher
    assert len(done) / 1.0 > sum(window_rates(done, 1.0, 0.5, 2)) / 2
    assert window_rates([], start=0.0, per=1.0, windows=3) == [0.0, 0.0, 0.0]
