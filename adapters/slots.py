"""TaskSlots: the resident tasks of a multi-task model, their slots, pools and hot swaps.

This object owns everything that is per task and independent of how a batch is executed:
which tasks are loaded (name -> immutable ``TaskEntry``), the slot each occupies, the per-layer
adapter pools (``W_down[S, D, R]``, ``b_down[S, R]``, ``W_up[S, R, D]``, ``b_up[S, D]``; a free
row is zero, and a zero adapter is the identity), reference counts of running batches and the
copy-on-write publication of a new version. Runners (``aat_serve.adapters.runners``) only read a
pinned ``Snapshot``.

Hot swap: copy-on-write per task. Loading a task fills a fresh slot (and pool row) while the old
one keeps serving; then, under a lock, the name is switched to the new slot. A batch resolves
all its task names under that lock to immutable entries and pins their slots with a reference
count, so it runs on one consistent snapshot; a replaced slot is zeroed and freed only when the
last batch holding it finishes. A batch therefore sees a task's old weights or its new ones,
never a mix, and no batch waits for a load (a read-write lock would stall batches during a
load, or loads behind long batches). The price is one spare slot beyond ``max_tasks``.

Pools grow geometrically (1, 2, 4, ... rows up to ``max_tasks``, the spare row only when a swap
needs it), so a model with few tasks does not hold memory for ``max_tasks``.

Device budget (optional ``device_budget`` bytes): the pools' real allocation (every row, free
ones included) plus the heads and prompts of every entry still holding memory (published or
retiring) never exceed it. Growth stops at the rows the budget affords, and a load that would
not fit raises ``SlotsFullError``; ``room_for`` says beforehand whether a bundle fits, so a
residency policy (``aat_serve.adapters.residency``) can evict an idle task first. ``busy``
says whether a running batch holds a task's slot.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import Manifest, TaskBundle
from aat_serve.adapters.errors import BundleError, ConfigError, SlotsFullError, UnknownTaskError
from aat_serve.adapters.kernels.layout import AdapterPool
from aat_serve.adapters.methods import get_method

SLOT_WAIT_S = 60.0
"""How long a load waits for a replaced slot to be released by running batches."""


@dataclass(frozen=True)
class TaskInfo:
    """A resident task: its slot, bundle version and manifest."""

    name: str
    slot: int
    version: str
    method: str
    num_classes: int
    manifest: Manifest


@dataclass(frozen=True)
class TaskEntry:
    """Everything a batch needs about one loaded task; never mutated after publication."""

    info: TaskInfo
    row: int  # pool row, -1 for tasks without adapters
    gen: int  # unique per load; keys caches derived from the task's weights
    mlp: bool
    spatial: bool
    head: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # LN w, b; fc w, b
    head_eps: float
    prompts: torch.Tensor | None  # (depth, P, D)

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompts is None else self.prompts.shape[1]

    def nbytes(self) -> int:
        """Bytes of the head and prompts (the adapters live in the pools)."""
        tensors = [*self.head, *([self.prompts] if self.prompts is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class SlotPools:
    """The per-layer adapter pools of one moment; replaced as a whole when they grow."""

    mlp: tuple[AdapterPool, ...]
    spatial: tuple[AdapterPool, ...]

    @property
    def rows(self) -> int:
        return self.mlp[0].slots if self.mlp else 0

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in (*self.mlp, *self.spatial))

    def grown(self, rows: int) -> SlotPools:
        return SlotPools(tuple(p.grown(rows) for p in self.mlp),
                         tuple(p.grown(rows) for p in self.spatial))


@dataclass(frozen=True)
class Snapshot:
    """One batch's view: each clip's entry (``None``: no task) and the pools, pinned."""

    entries: tuple[TaskEntry | None, ...]
    pools: SlotPools


def _distinct(entries: Iterable[TaskEntry | None]) -> list[TaskEntry]:
    return list({id(e): e for e in entries if e is not None}.values())


class TaskSlots:
    """Resident tasks, slots, adapter pools, reference counts and copy-on-write hot swap.

    Args:
        backbone: the shared backbone bundles are validated against (not modified here).
        fingerprint: its fingerprint.
        max_tasks: how many tasks may be resident at once.
        dtype: dtype of the adapter pools.
        device: where the pools and heads live.
        bottleneck: width R of a pool row; bundles with a smaller adapter are zero-padded.
        device_budget: most bytes of pools plus heads and prompts; None: no byte bound.
    """

    def __init__(self, backbone: AST, fingerprint: str, max_tasks: int, dtype: torch.dtype,
                 device: torch.device, bottleneck: int, device_budget: int | None = None
                 ) -> None:
        self.backbone = backbone
        self.fingerprint = fingerprint
        self.max_tasks = max_tasks
        self.dtype = dtype
        self.device = device
        self.bottleneck = bottleneck
        self.capacity = max_tasks + 1  # one spare slot for copy-on-write replacement
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._write_lock = threading.Lock()
        self._tasks: dict[str, TaskEntry] = {}
        self._by_slot: dict[int, TaskEntry] = {}
        self._refs = [0] * self.capacity
        self._retiring: dict[int, TaskEntry] = {}
        self._free_slots = list(range(self.capacity))
        self._free_rows: list[int] = []
        self._gen = 0
        cfg = backbone.cfg
        empty = AdapterPool.zeros(0, cfg.embed_dim, bottleneck, dtype, device)
        self._pools = SlotPools((empty,) * cfg.depth, (empty,) * cfg.depth)
        self.device_budget = device_budget
        self.row_nbytes = 2 * cfg.depth * AdapterPool.zeros(1, cfg.embed_dim, bottleneck, dtype,
                                                            "meta").nbytes()
        """Bytes one pool row takes across every layer's MLP and spatial pools."""

    # -- queries ------------------------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, TaskInfo]:
        with self._lock:
            return {name: e.info for name, e in self._tasks.items()}

    def has(self, task: str) -> bool:
        with self._lock:
            return task in self._tasks

    def entry(self, task: str) -> TaskEntry:
        """The published entry of ``task`` (``UnknownTaskError``)."""
        with self._lock:
            return self._entry_locked(task)

    @property
    def pools(self) -> SlotPools:
        with self._lock:
            return self._pools

    def live_entries(self) -> list[TaskEntry]:
        """Entries that occupy a slot and are published (not the ones retiring)."""
        with self._lock:
            return list(self._by_slot.values())

    def loads_without_waiting(self) -> bool:
        """Whether a load now would take a free slot and a free pool row: it neither waits for
        a retiring slot nor grows (copies) the pools, so it is a few row copies."""
        with self._lock:
            return bool(self._free_slots) and bool(self._free_rows)

    def free_slots(self) -> list[int]:
        with self._lock:
            return sorted(self._free_slots)

    def retiring_slots(self) -> list[int]:
        """Replaced or unloaded slots still pinned by running batches."""
        with self._lock:
            return sorted(self._retiring)

    def busy(self, task: str) -> bool:
        """Whether a running batch holds ``task``'s published slot (False if not loaded)."""
        with self._lock:
            entry = self._tasks.get(task)
            return entry is not None and self._refs[entry.info.slot] > 0

    def room_for(self, bundle: TaskBundle) -> bool:
        """Whether ``load(bundle)`` would find a slot and stay within the device budget now."""
        needs_row, extra = self._cost(bundle)
        with self._lock:
            return self._no_room_locked(bundle.manifest.task, needs_row, extra) is None

    def used_nbytes(self) -> int:
        """Bytes counted against the device budget: pools (all rows) plus the heads and
        prompts of every entry still holding memory (published or retiring)."""
        with self._lock:
            return self._pools.nbytes() + self._heads_nbytes_locked()

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the adapter pools, bytes of the heads and prompts)."""
        with self._lock:
            pools, entries = self._pools, list(self._tasks.values())
        return pools.nbytes(), sum(e.nbytes() for e in entries)

    # -- loading and unloading ----------------------------------------------------------------
    def load(self, bundle: TaskBundle) -> int:
        """Validate ``bundle`` against the backbone and make it resident; returns its slot.

        A task of the same name is replaced atomically: batches already running finish with
        the old weights, later ones use the new. Raises ``BackboneMismatchError``,
        ``BundleError`` or ``SlotsFullError``.
        """
        bundle.check_backbone(self.backbone, self.fingerprint)
        m = bundle.manifest
        spec = get_method(m.method)
        if not spec.exports_bundle:
            raise BundleError(f"method {m.method!r} cannot be served from a bundle")
        has_mlp, has_spatial = spec.adapters.mlp, spec.adapters.spatial
        if (has_mlp or has_spatial) and m.adapter_config.bottleneck > self.bottleneck:
            raise BundleError(f"bundle {m.task!r} has adapters of bottleneck "
                              f"{m.adapter_config.bottleneck}, larger than this model's slot "
                              f"width {self.bottleneck}")
        t = {k: v.to(self.device) for k, v in bundle.tensors.items()}
        head = tuple(t[f"head.{n}"].float() for n in ("norm.weight", "norm.bias", "fc.weight",
                                                      "fc.bias"))
        prompts = t["prompts"].float() if "prompts" in t else None  # residual-stream tokens

        extra = sum(x.numel() * 4 for x in (*head, *([prompts] if prompts is not None else [])))
        with self._write_lock:
            with self._lock:
                old = self._tasks.get(m.task)
                reason = self._no_room_locked(m.task, has_mlp or has_spatial, extra)
                if reason is not None:
                    raise SlotsFullError(f"cannot load task {m.task!r}: {reason}; unload a "
                                         "task first")
                slot = self._take_slot_locked(m.task)
                row = self._take_row_locked(extra) if has_mlp or has_spatial else -1
                pools = self._pools
                self._gen += 1
                gen = self._gen
            info = TaskInfo(m.task, slot, m.version, m.method, m.num_classes, m)
            entry = TaskEntry(info, row, gen, has_mlp, has_spatial, head,
                              self.backbone.cfg.head_norm_eps, prompts)
            try:  # the row is reserved and unpublished: nobody reads it while it is written
                if row >= 0:
                    self._write_row(pools, row, t, has_mlp, has_spatial)
            except BaseException:
                with self._lock:
                    self._free_locked(entry)
                raise
            with self._lock:
                self._tasks[m.task] = entry
                self._by_slot[slot] = entry
                if old is not None:
                    self._retire_locked(old)
        return slot

    def _write_row(self, pools: SlotPools, row: int, t: dict[str, torch.Tensor], has_mlp: bool,
                   has_spatial: bool) -> None:
        for i in range(self.backbone.cfg.depth):
            for kind, on, pool in (("mlp_adapter", has_mlp, pools.mlp[i]),
                                   ("spatial_adapter", has_spatial, pools.spatial[i])):
                if on:
                    p = f"blocks.{i}.{kind}."
                    pool.write(row, *(t[p + n].to(self.dtype) for n in
                                      ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")))

    def unload(self, task: str) -> None:
        """Remove a task; batches already holding it finish first (``UnknownTaskError``)."""
        with self._write_lock, self._lock:
            entry = self._entry_locked(task)
            del self._tasks[task]
            self._retire_locked(entry)

    # -- pinning for a batch ------------------------------------------------------------------
    @contextmanager
    def pinned(self, tasks: Sequence[str]) -> Iterator[Snapshot]:
        """The entries of ``tasks`` (resolved at once) and the pools, pinned while in use.

        Raises ``UnknownTaskError`` for a task that is not loaded.
        """
        with self._lock:
            entries = tuple(self._entry_locked(t) for t in tasks)
            snapshot = self._pin_locked(entries)
        try:
            yield snapshot
        finally:
            self._unpin(entries)

    @contextmanager
    def pinned_slots(self, slots: Sequence[int]) -> Iterator[Snapshot]:
        """Like ``pinned`` for slot numbers; a free slot (or -1) gives ``None``."""
        for s in slots:
            if not -1 <= s < self.capacity:
                raise ConfigError(f"slot {s} is out of range; slots are -1 .. "
                                  f"{self.capacity - 1}")
        with self._lock:
            entries = tuple(self._by_slot.get(s) for s in slots)
            snapshot = self._pin_locked(entries)
        try:
            yield snapshot
        finally:
            self._unpin(entries)

    def _pin_locked(self, entries: tuple[TaskEntry | None, ...]) -> Snapshot:
        for e in _distinct(entries):
            self._refs[e.info.slot] += 1
        return Snapshot(entries, self._pools)

    def _unpin(self, entries: Sequence[TaskEntry | None]) -> None:
        with self._lock:
            for e in _distinct(entries):
                slot = e.info.slot
                self._refs[slot] -= 1
                if self._refs[slot] == 0 and self._retiring.get(slot) is e:
                    self._free_locked(e)

    # -- slot and row bookkeeping (caller holds the lock) -------------------------------------
    def _entry_locked(self, task: str) -> TaskEntry:
        entry = self._tasks.get(task)
        if entry is None:
            known = ", ".join(sorted(self._tasks)[:20]) or "none"
            raise UnknownTaskError(f"unknown task {task!r}; loaded tasks: {known}")
        return entry

    def _take_slot_locked(self, task: str) -> int:
        # All free slots can only be missing while replaced slots are still pinned by batches.
        if not self._free_slots and not self._slot_freed.wait_for(
                lambda: bool(self._free_slots), timeout=SLOT_WAIT_S):
            raise SlotsFullError(f"cannot load task {task!r}: no slot was released by running "
                                 f"batches within {SLOT_WAIT_S:.0f} s")
        return heapq.heappop(self._free_slots)

    def _cost(self, bundle: TaskBundle) -> tuple[bool, int]:
        """(whether ``bundle`` needs a pool row, bytes of its fp32 head and prompts)."""
        spec = get_method(bundle.manifest.method)
        needs_row = spec.adapters.mlp or spec.adapters.spatial
        extra = sum(t.numel() * 4 for n, t in bundle.tensors.items()
                    if n.startswith("head.") or n == "prompts")
        return needs_row, extra

    def _heads_nbytes_locked(self) -> int:
        return sum(e.nbytes() for e in (*self._tasks.values(), *self._retiring.values()))

    def _no_room_locked(self, task: str, needs_row: bool, extra: int) -> str | None:
        """Why loading ``task`` (``extra`` head/prompt bytes, a row or not) cannot happen now;
        None when it fits."""
        if task not in self._tasks and len(self._tasks) >= self.max_tasks:
            return f"all {self.max_tasks} task slots are in use"
        if self.device_budget is None:
            return None
        rows = self._pools.rows + (1 if needs_row and not self._free_rows else 0)
        need = rows * self.row_nbytes + self._heads_nbytes_locked() + extra
        if need > self.device_budget:
            return (f"it needs {need} bytes of task memory on the device, over the budget of "
                    f"{self.device_budget} bytes")
        return None

    def _take_row_locked(self, extra: int = 0) -> int:
        if self._free_rows:
            return heapq.heappop(self._free_rows)
        old = self._pools.rows
        # Grow geometrically up to max_tasks rows; the spare row only when a swap needs it;
        # never beyond the rows the device budget affords (at least one: checked by the caller).
        new = min(max(1, 2 * old), self.max_tasks if old < self.max_tasks else self.capacity)
        if self.device_budget is not None:
            spare = self.device_budget - self._heads_nbytes_locked() - extra
            new = max(old + 1, min(new, spare // self.row_nbytes))
        self._pools = self._pools.grown(new)
        for r in range(old + 1, new):
            heapq.heappush(self._free_rows, r)
        return old

    def _retire_locked(self, entry: TaskEntry) -> None:
        slot = entry.info.slot
        if self._by_slot.get(slot) is entry:
            del self._by_slot[slot]
        if self._refs[slot]:
            self._retiring[slot] = entry
        else:
            self._free_locked(entry)

    def _free_locked(self, entry: TaskEntry) -> None:
        self._retiring.pop(entry.info.slot, None)
        if entry.row >= 0:
            for pool in (*self._pools.mlp, *self._pools.spatial):
                pool.clear(entry.row)
            heapq.heappush(self._free_rows, entry.row)
        heapq.heappush(self._free_slots, entry.info.slot)
        self._slot_freed.notify_all()
