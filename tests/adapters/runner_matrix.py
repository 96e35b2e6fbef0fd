"""The method x runner matrix: one mixed-task batch through a ``MultiTaskModel`` per runner.

``cell_results(runner)`` loads two tasks of every bundle method, ``a`` and ``b`` (same head;
different adapters and prompts, except for ``head`` whose heads differ), runs one batch mixing
all ten tasks and reports per method:

- ``equal``: the largest difference between a clip's logits and its task's ``AudioClassifier``
  alone (the torch reference), over the clips of ``a`` and ``b``;
- ``differs``: the smallest difference between ``a``'s clips and what ``b``'s weights give for
  the same clips, so a runner that ignored the task weights could not pass ``equal``.

``python -m tests.adapters.runner_matrix interpret`` prints that JSON object; the fused runner
under Triton's interpreter needs ``TRITON_INTERPRET=1`` before Python starts, so
``test_runner_matrix.py`` runs that runner in a child process. Sizes are tiny throughout.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.multitask import MultiTaskModel
from tests.helpers import TINY_FEATURES, TINY_TASKS, random_task_model, tiny_backbone

METHODS = [method for _, method, _ in TINY_TASKS]
R = 8
FRAMES = TINY_FEATURES.target_length


def _bundles(base) -> dict[str, TaskBundle]:
    """``{method}-a`` and ``{method}-b`` for every method."""
    out = {}
    for i, (_, method, classes) in enumerate(TINY_TASKS):
        a = random_task_model(base, method, classes, seed=10 + i, bottleneck=R, num_prompts=3)
        b = random_task_model(base, method, classes, seed=50 + i, bottleneck=R, num_prompts=3)
        if method != "head":  # only the adapters and prompts differ
            b.head.load_state_dict(a.head.state_dict())
        for tag, model in (("a", a), ("b", b)):
            name = f"{method}-{tag}"
            out[name] = TaskBundle.from_model(model, name, [f"{name}-{c}" for c in
                                                            range(classes)], TINY_FEATURES)
    return out


def cell_results(runner: str) -> dict[str, dict[str, float]]:
    """``{method: {"equal": max abs error, "differs": min abs distance}}`` for ``runner``."""
    base = tiny_backbone(seed=0)
    bundles = _bundles(base)
    model = MultiTaskModel(copy.deepcopy(base), max_tasks=len(bundles), bottleneck=R,
                           backend=runner)
    for b in bundles.values():
        model.load_task(b)
    # every task twice, interleaved so that each group mixes tasks
    tasks = [f"{m}-{t}" for t in "abba" for m in METHODS][:15]
    x = torch.randn(len(tasks), FRAMES, TINY_FEATURES.num_mel_bins,
                    generator=torch.Generator().manual_seed(0))
    out = model.classify(x, tasks)
    refs = {n: b.build_model(copy.deepcopy(base)).eval() for n, b in bundles.items()}
    results: dict[str, dict[str, float]] = {m: {"equal": 0.0, "differs": float("inf")}
                                            for m in METHODS}
    with torch.no_grad():
        for i, (logits, task) in enumerate(zip(out, tasks, strict=True)):
            method, tag = task.rsplit("-", 1)
            cell = results[method]
            cell["equal"] = max(cell["equal"], float((logits - refs[task](x[i:i + 1])[0])
                                                     .abs().max()))
            if tag == "a":
                other = refs[f"{method}-b"](x[i:i + 1])[0]
                cell["differs"] = min(cell["differs"], float((logits - other).abs().max()))
    return results


def main() -> int:
    json.dump(cell_results(sys.argv[1]), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
