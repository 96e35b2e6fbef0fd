"""Which resident task to evict: least recently used among the idle, unpinned ones.

``TaskSlots`` is the mechanism (slots, rows, batch pins); this module is the policy that turns
the resident slots into a cache over a bundle store. It keeps the order in which tasks were
last used and, when a cold task needs room, names the victim: the least recently used resident
task that is idle (the caller says what idle means: no request in flight and no running batch
holding its slot) and not in the pinned set (tasks an operator wants resident always).

Resident tasks never touched (loaded at start-up, before any request) count as older than every
touched one, in name order, so a preloaded task nobody asks for goes first. All operations are
O(1) except ``victim``, which walks the order from the oldest end and stops at the first
candidate (O(n) only when most resident tasks are busy). Not thread-safe: the service calls it
from its event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable


class LruOrder:
    """Least-recently-used order of task names and the victim choice over it."""

    def __init__(self, pinned: Iterable[str] = ()) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()
        self.pinned = frozenset(pinned)
        """Tasks never chosen as victims (``AAT_PINNED_TASKS``)."""

    def touch(self, task: str) -> None:
        """``task`` was just used (a request resolved it, or it was loaded): most recent."""
        self._order[task] = None
        self._order.move_to_end(task)

    def forget(self, task: str) -> None:
        """``task`` left the device (evicted, unloaded or deleted)."""
        self._order.pop(task, None)

    def order(self, resident: Collection[str]) -> list[str]:
        """``resident`` from least to most recently used (untouched ones first, by name)."""
        untouched = sorted(t for t in resident if t not in self._order)
        return untouched + [t for t in self._order if t in resident]

    def victim(self, resident: Collection[str], idle: Callable[[str], bool],
               exclude: Collection[str] = ()) -> str | None:
        """The least recently used task of ``resident`` that is ``idle``, not pinned and not
        in ``exclude`` (e.g. the task being loaded); None when every one is busy or pinned."""
        for task in self.order(resident):
            if task not in self.pinned and task not in exclude and idle(task):
                return task
        return None
