"""Error-message wording shared by the checkpoint modules."""

from __future__ import annotations

from collections.abc import Sequence


def few_names(names: Sequence[str], n: int = 8) -> str:
    """The first ``n`` names quoted and comma-separated, then "and K more" for the rest.

    Checkpoints hold hundreds of tensors; an error names a handful so it stays readable.
    """
    names = list(names)
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
