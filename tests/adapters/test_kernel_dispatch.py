"""Row-tile plans and the kernel dispatcher's choice logic (fake candidates and timings).

The real candidates are timed only on a GPU (``test_kernels_gpu.py``); here the dispatcher's
rules are pinned with given timings: the fastest wins, wrong or failing candidates are
rejected, the unfused path is always a candidate and wins ties, the choice is measured once per
bucket and the table round-trips through JSON keyed by the environment.
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.autotune import (
    UNFUSED,
    Bucket,
    Candidate,
    Dispatcher,
    KernelTable,
    bucket_of,
    pick,
)
from aat_serve.adapters.kernels.plan import Plans, max_tiles, tile_plan, tile_plan_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None


def used_tiles(plan) -> list[tuple[int, int, int]]:
    return [(a, b, c) for a, b, c in zip(plan.start.tolist(), plan.end.tolist(),
                                          plan.slot.tolist(), strict=True) if a < plan.rows]


def random_rows(rng: random.Random, m: int) -> list[int]:
    rows: list[int] = []
    while len(rows) < m:  # ragged runs; -1 anywhere; a slot may come back later (unsorted)
        rows += [rng.choice([-1, 0, 1, 2, 5])] * rng.randint(1, 20)
    return rows[:m]


def test_tile_plan_matches_the_python_loop():
    rng = random.Random(0)
    for _ in range(200):
        rows = random_rows(rng, rng.randint(1, 70))
        block = rng.choice([1, 4, 16, 32])
        plan = tile_plan(torch.tensor(rows, dtype=torch.int32), block)
        assert used_tiles(plan) == tile_plan_reference(rows, block)
        unused = [(a, b, c) for a, b, c in zip(plan.start.tolist(), plan.end.tolist(),
                                               plan.slot.tolist(), strict=True) if a >= len(rows)]
        assert all(t == (len(rows), len(rows), -1) for t in unused)  # empty, skipped
        assert plan.tiles <= max_tiles(len(rows), block, len(rows))


def test_tiles_hold_one_slot_and_split_at_segment_ends():
    rows = [0] * 20 + [-1] * 3 + [2] * 17 + [0] * 2
    plan = tile_plan(torch.tensor(rows, dtype=torch.int32), 16, max_segments=4)
    assert used_tiles(plan) == [(0, 16, 0), (16, 20, 0), (20, 23, -1), (23, 39, 2),
                                (39, 40, 2), (40, 42, 0)]
    assert plan.tiles == max_tiles(42, 16, 4) == 6
    wider = tile_plan(torch.tensor(rows, dtype=torch.int32), 32)
    assert used_tiles(wider) != used_tiles(plan)  # the tile height matters
    with pytest.raises(ConfigError, match="the rows need 6 tiles of 16 but max_segments=2 "
                                          "allows 4; pass a larger max_segments"):
        tile_plan(torch.tensor(rows, dtype=torch.int32), 16, max_segments=2)


def test_plans_build_each_height_once():
    plans = Plans(torch.tensor([1] * 5 + [3] * 4, dtype=torch.int32))
    assert plans.get(4) is plans.get(4)
    assert plans.get(2).tiles != plans.get(4).tiles
    assert plans.segments == 2
    empty = tile_plan(torch.zeros(0, dtype=torch.int32), 16)
    assert empty.tiles == 0


def test_bucket_rounds_rows_and_caps_segments():
    x = torch.zeros(9712, 768, dtype=torch.float32)
    h = torch.zeros(9712, 768, dtype=torch.bfloat16)
    b = bucket_of("mlp", x, h, 3072, 192, segments=5)
    assert (b.rows, b.segments, b.dtype, b.x_dtype) == (16384, 8, "bfloat16", "float32")
    assert b.key == "mlp|d768|h3072|r192|bfloat16|xfloat32|m16384|s8"
    assert bucket_of("mlp", x, h, 3072, 192, segments=1).key != b.key


def test_pick_fastest_and_never_slower_than_unfused():
    assert pick({UNFUSED: 2.0, "a": 1.0, "b": 1.5}) == "a"
    assert pick({UNFUSED: 1.0, "a": 1.2, "b": 3.0}) == UNFUSED  # nothing beats unfused
    assert pick({UNFUSED: 1.0, "a": 1.0}) == UNFUSED  # a tie keeps unfused
    assert pick({UNFUSED: 1.0, "a": float("nan"), "b": float("inf")}) == UNFUSED
    with pytest.raises(ConfigError, match="the unfused path must be timed before choosing"):
        pick({"a": 1.0})


BUCKET = Bucket("mlp", 8, 16, 4, "float32", "float32", 16, 1)


class Fakes:
    """Candidates with given timings: ``timer`` runs the call once and reports the timing of
    whichever candidate ran."""

    def __init__(self, timings: dict[str, float], wrong=(), failing=(), unsafe=()) -> None:
        self.timings = timings
        self.last = ""
        self.timed: list[str] = []
        self.wrong, self.failing, self.unsafe = set(wrong), set(failing), set(unsafe)

    def run_of(self, name: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            self.last = name
            if name in self.failing:
                raise RuntimeError("out of shared memory")
            return x * 2 + (1.0 if name in self.wrong else 0.0)
        return run

    def candidates(self, bucket: Bucket) -> list[Candidate]:
        return [Candidate(n, self.run_of(n), graph_safe=n not in self.unsafe)
                for n in self.timings]

    def timer(self, fn) -> float:
        fn()
        self.timed.append(self.last)
        return self.timings[self.last]


def test_dispatcher_measures_once_and_rejects_wrong_or_failing_candidates(tmp_path):
    fakes = Fakes({UNFUSED: 3.0, "slow": 4.0, "fast": 1.0, "wrong": 0.1, "boom": 0.2})
    fakes.wrong, fakes.failing = {"wrong"}, {"boom"}
    table = KernelTable("GPU X|torch 1|triton 2", tmp_path / "kernels.json")
    d = Dispatcher(table, fakes.candidates, fakes.timer)
    x = torch.ones(3)
    torch.testing.assert_close(d.run(BUCKET, x), x * 2)
    assert fakes.last == "fast"
    assert sorted(fakes.timed) == ["fast", "slow", UNFUSED]
    entry = table.entries[BUCKET.key]
    assert entry["choice"] == "fast" and entry["timings_ms"] == {UNFUSED: 3.0, "slow": 4.0,
                                                                 "fast": 1.0}
    assert entry["rejected"]["wrong"].startswith("differs from unfused by ")
    assert entry["rejected"]["boom"] == "RuntimeError: out of shared memory"
    d.run(BUCKET, x)
    assert len(fakes.timed) == 3  # measured once per bucket
    other = Bucket("mlp", 8, 16, 4, "float32", "float32", 32, 1)
    d.run(other, x)
    assert len(fakes.timed) == 6  # a new bucket is measured


def test_dispatcher_keeps_unfused_when_nothing_is_faster():
    fakes = Fakes({UNFUSED: 1.0, "a": 2.0, "b": 1.5})
    d = Dispatcher(KernelTable("env"), fakes.candidates, fakes.timer)
    d.run(BUCKET, torch.ones(2))
    assert fakes.last == UNFUSED and d.table.choice(BUCKET.key) == UNFUSED


def test_dispatcher_under_graph_capture_runs_graph_safe_candidates_only():
    fakes = Fakes({UNFUSED: 1.0, "a": 3.0, "b": 2.0}, unsafe={UNFUSED})
    capturing = [False]
    d = Dispatcher(KernelTable("env"), fakes.candidates, fakes.timer, lambda: capturing[0])
    capturing[0] = True
    d.run(BUCKET, torch.ones(2))
    assert fakes.last == "a" and fakes.timed == []  # nothing measured: the first safe one
    capturing[0] = False
    d.run(BUCKET, torch.ones(2))
    assert fakes.last == UNFUSED  # measured: unfused is fastest
    capturing[0] = True
    d.run(BUCKET, torch.ones(2))
    assert fakes.last == "b"  # the fastest graph-safe one by the recorded timings


def test_table_round_trip_is_keyed_by_environment(tmp_path):
    path = tmp_path / "cache" / "kernels.json"
    h100 = KernelTable("NVIDIA H100|torch 2.11|triton 3.6", path)
    h100.record("k", "fused-x", {UNFUSED: 2.0, "fused-x": 1.0}, {"y": "failed"})
    again = KernelTable("NVIDIA H100|torch 2.11|triton 3.6", path)
    assert again.choice("k") == "fused-x"
    assert again.entries["k"]["rejected"] == {"y": "failed"}
    h200 = KernelTable("NVIDIA H200|torch 2.11|triton 3.6", path)
    assert h200.choice("k") is None  # another device measures afresh
    h200.record("k", UNFUSED, {UNFUSED: 1.0}, {})
    data = json.loads(path.read_text())
    assert data["format"] == 1 and set(data["environments"]) == {
        "NVIDIA H100|torch 2.11|triton 3.6", "NVIDIA H200|torch 2.11|triton 3.6"}
    assert KernelTable("NVIDIA H100|torch 2.11|triton 3.6", path).choice("k") == "fused-x"
    assert KernelTable("env").choice("k") is None  # no file: in memory only


def test_bad_table_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"kernel table .*bad\.json is not readable JSON"):
        KernelTable("env", bad)
    bad.write_text(json.dumps({"format": 99}))
    with pytest.raises(ConfigError, match="has format 99, expected 1; delete it"):
        KernelTable("env", bad)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_candidate_lists():
    from aat_serve.adapters.kernels.candidates import all_candidates

    for op in ("mlp", "spatial"):
        for rows in (2048, 65536):
            cands = all_candidates(Bucket(op, 768, 3072 if op == "mlp" else 0, 192,
                                          "bfloat16", "bfloat16", rows, 4))
            names = [c.name for c in cands]
            assert names[0] == UNFUSED and not cands[0].graph_safe
            assert len(set(names)) == len(names) >= 4
            assert all(c.graph_safe for c in cands[1:])
    one = [c.name for c in all_candidates(Bucket("mlp", 768, 3072, 192, "bfloat16",
                                                 "bfloat16", 2048, 1))]
    many = [c.name for c in all_candidates(Bucket("mlp", 768, 3072, 192, "bfloat16",
                                                  "bfloat16", 65536, 1))]
    assert any("split" in n for n in one) and any("persist" in n for n in many)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_operands_are_checked_once_per_signature(monkeypatch):
    from aat_serve.adapters.kernels import AdapterPool
    from aat_serve.adapters.kernels import triton_common as tc

    calls = []
    real = tc._check
    monkeypatch.setattr(tc, "_check", lambda *a: (calls.append(1), real(*a)))
    monkeypatch.setattr(tc, "_VALIDATED", set())
    pool = AdapterPool.zeros(2, 8, 4)
    x = torch.zeros(5, 8)
    rows = torch.zeros(5, dtype=torch.int32)
    tc.check_operands(x, x, None, pool, rows)
    tc.check_operands(x + 1, x, None, pool, rows)  # same signature: not checked again
    assert len(calls) == 1
    with pytest.raises(ConfigError, match=r"row_slot must be int32 of shape \(5,\)"):
        tc.check_operands(x, x, None, pool, rows.long())
    assert len(calls) == 2
    with pytest.raises(ConfigError, match=r"row_slot must be int32"):  # a bad one never sticks
        tc.check_operands(x, x, None, pool, rows.long())


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_configuration_names_spell_their_tiles_and_variants():
    """The names the dispatcher's tables and reports key on (one rule for all three kernels:
    ``triton_common.TileConfig``)."""
    from aat_serve.adapters.kernels.triton_fused import FusedConfig
    from aat_serve.adapters.kernels.triton_sgmv import SgmvConfig
    from aat_serve.adapters.kernels.triton_spatial import SpatialConfig

    assert [c.name for c in (FusedConfig(), FusedConfig(split_k=2, per_sm=2, tma=True),
                             SgmvConfig(), SgmvConfig(per_sm=3), SpatialConfig(),
                             SpatialConfig(block_m=32, per_sm=1))] == [
        "fused-m128n128r64k64w8s3", "fused-m128n128r64k64w8s3-split2-persist2-tma",
        "sgmv-m64n128r64k64w4s3", "sgmv-m64n128r64k64w4s3-persist3",
        "spatial-m64n64k64w8s2", "spatial-m32n64k64w8s2-persist1"]
    # group_m is no part of a name; every field is part of the dict
    assert FusedConfig(group_m=4).name == FusedConfig().name
    assert FusedConfig(group_m=4).as_dict() != FusedConfig().as_dict()
    assert set(SpatialConfig().as_dict()) == {"block_m", "block_n", "block_k", "num_warps",
                                              "num_stages", "per_sm"}
