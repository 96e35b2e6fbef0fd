"""The demo's downstream tasks and methods, and the targets the committed build must meet.

Shared by the build (which runs them) and the report (which states whether the targets hold),
so neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aat_serve.adapters.errors import ConfigError
from aat_serve.training.demo import corpus as C
from aat_serve.training.demo import sounds as S

UPSTREAM = "upstream"
"""Name of the pretraining corpus."""
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "digits": (C.DIGITS, ()),
    "commands": (C.COMMANDS, ()),
    "instruments": ((), tuple(S.INSTRUMENTS)),
}
"""Downstream tasks: (words, sound classes). None of their labels is an upstream label."""
METHODS = ("head", "aat_ms", "full")


def check_names(what: str, tasks: Iterable[str], methods: Iterable[str]) -> None:
    """Raise if ``tasks`` or ``methods`` name a demo task or method that does not exist."""
    unknown = sorted(set(tasks) - set(TASKS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"{what} {unknown}; tasks: {', '.join(TASKS)}; "
                          f"methods: {', '.join(METHODS)}")


def check_targets(summary: dict[str, Any], spoken_min: float = 0.9) -> list[str]:
    """The issue's targets the build missed (empty when all hold)."""
    misses = []
    for task, res in summary["results"].items():
        acc = res["aat_ms"]["test_acc"]
        if TASKS[task][0] and acc < spoken_min:
            misses.append(f"{task}: aat_ms {acc:.1%} < {spoken_min:.0%}")
        if not acc > res["head"]["test_acc"]:
            misses.append(f"{task}: aat_ms {acc:.1%} does not beat head "
                          f"{res['head']['test_acc']:.1%}")
    return misses
