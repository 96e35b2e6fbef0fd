"""HostTier: a byte-budgeted LRU of validated task bundles in host (CPU) memory.

The tier between the bundle store (disk) and the device: a task whose bundle was read and
validated once comes back onto the device from here without reading or validating its file
again. Each entry is keyed by the task name and carries a ``key`` naming the exact file it came
from (the store's stamp: mtime and size), so a changed file never hits an old entry.

Budget: the sum of the entries' tensor bytes (``TaskBundle.tensors``; the manifest and Python
objects are not counted, a few kB per task) never exceeds ``budget_bytes``. Putting an entry
evicts the least recently used ones until it fits; a bundle larger than the whole budget is not
kept. A budget of 0 disables the tier. Every operation is O(1) apart from the evictions it
causes. Not thread-safe: the service calls it from its event loop only.

The tier is inclusive: a bundle stays here while its task is resident too (the service puts it
here when it reads the file and touches it when the task is evicted from the device, so the
most recently evicted tasks are the last to leave).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.errors import ConfigError


def bundle_nbytes(bundle: TaskBundle) -> int:
    """Bytes of a bundle's tensors (what the tier's budget counts)."""
    return sum(t.numel() * t.element_size() for t in bundle.tensors.values())


@dataclass(frozen=True)
class Cached:
    """One bundle held in host memory."""

    key: Hashable
    """Which file it came from (the store's stamp); a lookup with another key misses."""
    bundle: TaskBundle
    nbytes: int


class HostTier:
    """Validated bundles by task name, least recently used first out, within a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"the host tier's budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, Cached] = OrderedDict()
        self._nbytes = 0

    # -- queries ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held now (always <= ``budget_bytes``)."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, task: object) -> bool:
        return task in self._items

    def names(self) -> list[str]:
        """Cached tasks, least recently used first."""
        return list(self._items)

    def get(self, task: str, key: Hashable) -> TaskBundle | None:
        """The bundle of ``task`` from the file ``key`` (now most recently used), or None; an
        entry from another file is dropped."""
        item = self._items.get(task)
        if item is None:
            return None
        if item.key != key:
            self.discard(task)
            return None
        self._items.move_to_end(task)
        return item.bundle

    # -- changes ------------------------------------------------------------------------------
    def put(self, task: str, key: Hashable, bundle: TaskBundle) -> list[str]:
        """Keep ``bundle`` as ``task``'s (most recently used); returns the tasks evicted to
        make room. A bundle larger than the budget is not kept (and evicts nothing)."""
        self.discard(task)
        size = bundle_nbytes(bundle)
        if size > self.budget_bytes:
            return []
        evicted = []
        while self._nbytes + size > self.budget_bytes:
            old, item = self._items.popitem(last=False)
            self._nbytes -= item.nbytes
            evicted.append(old)
        self._items[task] = Cached(key, bundle, size)
        self._nbytes += size
        return evicted

    def touch(self, task: str) -> None:
        """Make ``task`` most recently used, if it is here (its task left the device)."""
        if task in self._items:
            self._items.move_to_end(task)

    def discard(self, task: str) -> bool:
        """Drop ``task``'s entry (deleted, or its file changed); whether there was one."""
        item = self._items.pop(task, None)
        if item is None:
            return False
        self._nbytes -= item.nbytes
        return True
