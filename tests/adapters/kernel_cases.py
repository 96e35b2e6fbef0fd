"""The fused-kernel case matrix, run under Triton's interpreter in a child process.

``python -m tests.adapters.kernel_cases`` (with ``TRITON_INTERPRET=1`` in the environment, set
before Python starts, so the kernels are built interpreted) runs every case and prints one JSON
object: ``{case_id: {"err": ..., "max_abs": ..., "vs_plain": ...}}``. A case id is
``route/layout-dtype``; the routes are route (a) with plain, split-K and persistent launches,
route (b) (SGMV) plain and persistent, and the one-launch spatial kernel. ``test_kernels.py`` starts
it and checks each case against its dtype's tolerance. Importing this module does not import
Triton.
"""

from __future__ import annotations

import json
import sys

import torch

D, H, R = 32, 64, 24  # R is not a multiple of the 32-wide N tile: masked adapter columns
TILES = dict(block_m=16, block_n=32, block_k=32, group_m=2)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# name -> (row slots, pool slots, zero adapters, with shared MLP). BLOCK_M is 16, so a boundary
# at a multiple of 16 lies on a tile edge and any other inside a tile.
LAYOUTS: dict[str, tuple[list[int], int, bool, bool]] = {
    "one-task-37-rows": ([3] * 37, 4, False, True),
    "one-row": ([1], 2, False, True),
    "two-tasks-boundary-in-tile": ([0] * 20 + [1] * 17, 2, False, True),
    "two-tasks-boundary-on-edge": ([0] * 16 + [1] * 32, 2, False, True),
    "four-tasks-mixed-boundaries": ([0] * 5 + [1] * 11 + [2] * 16 + [3] * 9, 4, False, True),
    "no-adapter-rows-first-middle-last": ([-1] * 7 + [0] * 10 + [-1] * 5 + [2] * 12 + [-1] * 3,
                                          3, False, True),
    "all-rows-without-adapter": ([-1] * 21, 2, False, True),
    "non-contiguous-slot-ids": ([2] * 13 + [5] * 20, 7, False, True),
    "unsorted-rows": ([0, 3, -1, 1, 3, 0, 0, 1, -1, 3, 1, 1, 0, 3, 3, -1, 0, 1, 3, 0, 1, 1, 3,
                       0, 0, 3, -1, 1, 0, 3], 4, False, True),
    "zero-adapters-equal-plain-mlp": ([0] * 10 + [1] * 20, 2, True, True),
    "adapter-only-spatial-form": ([0] * 20 + [1] * 19, 2, False, False),
}
# route -> (dtypes it runs in, its configuration as keyword arguments). BLOCK_R 16 and R 24:
# the adapter's last column tile is ragged; SPLIT_K 3 does not divide H / BLOCK_K = 2 evenly
# (one split has no shared K blocks); persistent grids have 3 programs (a loop over items);
# tensor-descriptor (TMA) loads read past a tile's rows and past R into the next slot's rows,
# which must add nothing.
ROUTES: dict[str, tuple[tuple[str, ...], dict]] = {
    "fused": (tuple(DTYPES), dict(TILES, block_r=16)),
    "fused-split3": (("fp32", "bf16"), dict(TILES, block_r=16, block_k=16, split_k=3)),
    "fused-persistent": (("fp32",), dict(TILES, block_r=32, per_sm=1, split_k=2)),
    "fused-tma": (tuple(DTYPES), dict(TILES, block_r=16, per_sm=1, split_k=2, tma=True)),
    "sgmv": (tuple(DTYPES), dict(TILES, block_r=16)),
    "sgmv-persistent": (("fp32",), dict(TILES, block_r=16, per_sm=1)),
    "spatial": (tuple(DTYPES), dict(block_m=16, block_n=16, block_k=16)),
}
CASES = ([f"{route}/{layout}-{dt}" for route, (dts, _) in ROUTES.items() for layout in LAYOUTS
          for dt in dts]
         + ["fused/fp32-residual-four-tasks-mixed-boundaries-bf16",
            "spatial/fp32-residual-four-tasks-mixed-boundaries-bf16",
            "model/multitask-model-fp32", "dispatch/mlp-bf16", "dispatch/spatial-bf16"])


def _operands(layout: str, dtype: torch.dtype, seed: int):
    from aat_serve.adapters.kernels import AdapterPool, MlpWeights

    rows, slots, zero, with_mlp = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(dtype)

    m = len(rows)
    mlp = MlpWeights(rnd(H, D), rnd(H), rnd(D, H), rnd(D)) if with_mlp else None
    pool = AdapterPool(rnd(slots, D, R), rnd(slots, R), rnd(slots, R, D), rnd(slots, D))
    if zero:
        pool = AdapterPool(*(torch.zeros_like(t) for t in pool.tensors()))
    return rnd(m, D), rnd(m, D), mlp, pool, torch.tensor(rows, dtype=torch.int32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _config(route: str):
    from aat_serve.adapters.kernels.triton_mlp import FusedConfig, SgmvConfig, SpatialConfig

    kind = {"fused": FusedConfig, "sgmv": SgmvConfig, "spatial": SpatialConfig}
    return kind[route.split("-")[0]](**ROUTES[route][1])


def run_kernel_case(case: str) -> dict[str, float]:
    """Relative error against the fp64 reference, and distance from the adapter-free output."""
    from aat_serve.adapters.kernels import (
        AdapterPool,
        mlp_adapter,
        mlp_adapter_reference,
        spatial_adapter,
    )

    route, name = case.split("/")
    layout, dt = name.rsplit("-", 1)
    residual32 = layout.startswith("fp32-residual-")  # bf16 operands, fp32 residual stream
    layout = layout.removeprefix("fp32-residual-")
    x, h, mlp, pool, rows = _operands(layout, DTYPES[dt], seed=len(name))
    if residual32:
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 0.3
    x_dtype = x.dtype
    if route == "spatial":  # x + a + A_s(a): the attention output a in h's place, no MLP
        mlp = None
        out = spatial_adapter(x, h, pool, rows, backend="interpret", config=_config(route))
        x = x.double() + h.double()
    else:
        out = mlp_adapter(x, h, mlp, pool, rows, backend="interpret", config=_config(route))
    ref = mlp_adapter_reference(x, h, mlp, pool, rows, compute_dtype=torch.float64)
    no_adapter = AdapterPool(*(torch.zeros_like(t) for t in pool.tensors()))
    plain = mlp_adapter_reference(x, h, mlp, no_adapter, rows, compute_dtype=torch.float64)
    return {"err": _rel(out, ref), "max_abs": float((out.double() - ref).abs().max()),
            "vs_plain": _rel(out, plain), "dtype_ok": float(out.dtype == x_dtype)}


def run_model_case() -> dict[str, float]:
    """A MultiTaskModel on the interpreted kernels against each task alone (tiny backbone)."""
    import copy

    from aat_serve.adapters.multitask import MultiTaskModel
    from tests.helpers import TINY_TASKS, random_bundle, tiny_backbone

    base = tiny_backbone(seed=0)
    bundles = {n: random_bundle(base, n, m, c, seed=i, bottleneck=8, num_prompts=3)
               for i, (n, m, c) in enumerate(TINY_TASKS)}
    model = MultiTaskModel(copy.deepcopy(base), bottleneck=8, backend="interpret")
    for b in bundles.values():
        model.load_task(b)
    tasks = ["ms", "hd", "m", "ms", "jt", "pr", "m"]
    x = torch.randn(len(tasks), 64, 32, generator=torch.Generator().manual_seed(0))
    out = model.classify(x, tasks)
    err = 0.0
    for i, (logits, task) in enumerate(zip(out, tasks, strict=True)):
        with torch.no_grad():
            ref = bundles[task].build_model(copy.deepcopy(base)).eval()(x[i:i + 1])[0]
        err = max(err, float((logits - ref).abs().max()))
    return {"err": err, "max_abs": err, "vs_plain": 1.0, "dtype_ok": 1.0}


def run_dispatch_case(case: str) -> dict[str, float]:
    """Every candidate the dispatcher lists (TMA ones included) for a one-clip and a many-clip
    bucket, run by ``Dispatcher.measure`` on real operands: none may be rejected (fail or
    differ from the unfused path). Timings are fake (all equal), so unfused is chosen."""
    from aat_serve.adapters.kernels import Plans, mlp_adapter_reference
    from aat_serve.adapters.kernels import candidates as cands
    from aat_serve.adapters.kernels.autotune import Bucket, Dispatcher, KernelTable

    op = case.split("/")[1].rsplit("-", 1)[0]
    x, h, mlp, pool, rows = _operands("four-tasks-mixed-boundaries", torch.bfloat16, seed=3)
    cands.tma_available = lambda: True
    d = Dispatcher(KernelTable("interpreter"), cands.all_candidates, lambda fn: (fn(), 1.0)[1])
    operands = (x, h, mlp, pool, Plans(rows)) if op == "mlp" else (x, h, pool, Plans(rows))
    rejected, timed = 0, 0
    for bucket_rows in (2048, 65536):
        b = Bucket(op, D, H if op == "mlp" else 0, R, "bfloat16", "bfloat16", bucket_rows, 4)
        d.measure(b, {c.name: c for c in cands.all_candidates(b)}, operands)
        entry = d.table.entries[b.key]
        rejected += len(entry["rejected"])
        timed += len(entry["timings_ms"])
        if entry["rejected"]:
            raise RuntimeError(f"rejected: {entry['rejected']}")
    ref_x = x if op == "mlp" else x.double() + h.double()
    ref = mlp_adapter_reference(ref_x, h, mlp if op == "mlp" else None, pool, rows,
                                compute_dtype=torch.float64)
    out = d.run(b, *operands)
    err = _rel(out, ref)
    return {"err": err, "max_abs": err, "vs_plain": 1.0, "timed": float(timed),
            "dtype_ok": float(rejected == 0 and timed >= 10)}


def main() -> int:
    results = {}
    for case in CASES:
        try:
            results[case] = run_model_case() if case.startswith("model/") else \
                run_dispatch_case(case) if case.startswith("dispatch/") else \
                run_kernel_case(case)
        except Exception as e:  # reported per case by the test
            results[case] = {"error": f"{type(e).__name__}: {e}"}
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
