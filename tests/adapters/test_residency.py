"""Paging policy and mechanism: LRU victim choice, the host tier's byte budget, and TaskSlots'
device budget (real pool bytes), busy slots and room checks."""

from __future__ import annotations

import pytest
import torch

from aat_serve.adapters.errors import ConfigError, SlotsFullError
from aat_serve.adapters.host_tier import HostTier, bundle_nbytes
from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.adapters.residency import LruOrder
from tests.helpers import random_bundle, tiny_backbone

R = 8


@pytest.fixture(scope="module")
def base():
    return tiny_backbone(seed=0)


@pytest.fixture(scope="module")
def many(base):
    """Eight aat_ms tasks of one size (four classes), t0 .. t7."""
    return [random_bundle(base, f"t{i}", "aat_ms", 4, seed=i, bottleneck=R) for i in range(8)]


# -- LruOrder ----------------------------------------------------------------------------------

def test_victim_is_the_least_recently_used_idle_unpinned_task():
    lru = LruOrder(pinned=["p"])
    for t in ("a", "b", "c", "p"):
        lru.touch(t)
    resident = {"a", "b", "c", "p"}
    assert lru.victim(resident, idle=lambda t: True) == "a"
    lru.touch("a")  # used again: now the newest
    assert lru.order(resident) == ["b", "c", "p", "a"]
    assert lru.victim(resident, idle=lambda t: True) == "b"
    assert lru.victim(resident, idle=lambda t: t != "b") == "c"  # b busy: skipped
    assert lru.victim(resident, idle=lambda t: True, exclude={"b"}) == "c"


def test_pinned_and_busy_tasks_are_never_victims():
    lru = LruOrder(pinned=["p"])
    lru.touch("p")
    lru.touch("x")
    assert lru.victim({"p", "x"}, idle=lambda t: t != "x") is None
    assert lru.victim({"p", "x"}, idle=lambda t: True) == "x"


def test_untouched_resident_tasks_go_first_and_forgotten_ones_leave_the_order():
    lru = LruOrder()
    lru.touch("hot")
    lru.touch("gone")
    lru.forget("gone")
    assert lru.order({"hot", "zeta", "alpha"}) == ["alpha", "zeta", "hot"]
    assert lru.victim({"hot"}, idle=lambda t: True) == "hot"
    assert lru.victim(set(), idle=lambda t: True) is None


# -- HostTier ----------------------------------------------------------------------------------

def test_host_tier_keeps_within_its_budget_and_evicts_least_recently_used(many):
    size = bundle_nbytes(many[0])
    assert size == sum(t.numel() * 4 for t in many[0].tensors.values())
    tier = HostTier(3 * size + size // 2)  # room for three
    assert tier.put("t0", 1, many[0]) == []
    assert tier.put("t1", 1, many[1]) == []
    assert tier.put("t2", 1, many[2]) == []
    assert tier.get("t0", 1) is many[0]  # t0 now most recent: t1 goes first
    assert tier.put("t3", 1, many[3]) == ["t1"]
    assert tier.names() == ["t2", "t0", "t3"] and tier.nbytes == 3 * size
    tier.touch("t2")
    assert tier.put("t4", 1, many[4]) == ["t0"]
    assert tier.nbytes <= tier.budget_bytes
    assert "t1" not in tier and tier.get("t1", 1) is None


def test_host_tier_misses_on_another_file_and_drops_the_stale_entry(many):
    tier = HostTier(10 * bundle_nbytes(many[0]))
    tier.put("t0", (1, 100), many[0])
    assert tier.get("t0", (1, 100)) is many[0]
    assert tier.get("t0", (2, 100)) is None  # the file changed
    assert "t0" not in tier and tier.nbytes == 0


def test_host_tier_refuses_a_bundle_over_its_budget_and_a_negative_budget(many):
    tier = HostTier(bundle_nbytes(many[0]) - 1)
    assert tier.put("t0", 1, many[0]) == [] and len(tier) == 0
    assert len(HostTier(0)) == 0
    with pytest.raises(ConfigError, match=r"budget must be >= 0 bytes, got -1"):
        HostTier(-1)


# -- TaskSlots: device budget, busy, room ------------------------------------------------------

def _model(base, **kw) -> MultiTaskModel:
    import copy

    return MultiTaskModel(copy.deepcopy(base), bottleneck=R, **kw)


def _head_bytes(b) -> int:
    return sum(t.numel() * 4 for n, t in b.tensors.items() if n.startswith("head."))


def test_device_budget_caps_pool_rows_and_counts_real_bytes(base, many):
    probe = _model(base, max_tasks=64)
    row = probe.slots.row_nbytes
    head = _head_bytes(many[0])
    budget = 3 * row + 3 * head  # three tasks fit, a fourth does not
    model = _model(base, max_tasks=64, device_budget=budget)
    for b in many[:3]:
        assert model.slots.room_for(b)
        model.load_task(b)
        assert model.slots.used_nbytes() <= budget
    pools, heads = model.slots.nbytes()
    assert pools == 3 * row  # grew 1, 2, then 3 rows (not 4: the budget affords 3)
    assert model.slots.used_nbytes() == pools + heads == budget
    assert not model.slots.room_for(many[3])
    with pytest.raises(SlotsFullError, match=r"cannot load task 't3': it needs \d+ bytes of task "
                                             r"memory on the device, over the budget of "
                                             rf"{budget} bytes"):
        model.load_task(many[3])
    model.unload_task("t0")  # room again, in the freed row
    assert model.slots.room_for(many[3])
    model.load_task(many[3])
    assert model.slots.nbytes()[0] == 3 * row and set(model.tasks) == {"t1", "t2", "t3"}


def test_without_a_budget_pools_grow_geometrically_as_before(base, many):
    model = _model(base, max_tasks=64)
    for b in many[:3]:
        model.load_task(b)
    assert model.slots.nbytes()[0] == 4 * model.slots.row_nbytes  # 1, 2, 4 rows
    assert model.slots.room_for(many[3])


def test_busy_is_true_exactly_while_a_batch_holds_the_slot(base, many):
    model = _model(base, max_tasks=4)
    model.load_task(many[0])
    model.load_task(many[1])
    assert not model.slots.busy("t0") and not model.slots.busy("nope")
    with model.slots.pinned(["t0"]) as snap:
        assert model.slots.busy("t0") and not model.slots.busy("t1")
        assert snap.entries[0].info.name == "t0"
    assert not model.slots.busy("t0")
    x = torch.zeros(1, base.cfg.target_length, base.cfg.num_mel_bins)
    assert model.classify(x, ["t1"])[0].shape == (4,)
    assert not model.slots.busy("t1")
