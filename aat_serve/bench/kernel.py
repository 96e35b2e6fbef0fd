"""``aat bench kernel``: one block's MLP with per-task adapters, fused vs unfused (CUDA only).

For ranks (64, 192), clips of ``tokens`` rows (1, 8, 32) and tasks (1, 4, 8), the op
``x + MLP(h) + A_task(h)`` at ViT-B sizes (D 768, H 3072) is timed with
``triton.testing.do_bench`` (median ms) as the frozen MLP alone, eager unfused, cuBLAS on the
widened GEMMs, optionally ``torch.compile`` of the eager path, and ``fused``: what the model
runs, i.e. the kernel dispatcher's choice for the bucket (its first call measures every
candidate, route (a) and route (b) configurations and the unfused path; their best times are
reported). The spatial adapter kernel is timed against its eager form at one task.
Every implementation's output is compared with eager's first. Figures, targets and the table:
``kernel_report``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights, segments
from aat_serve.adapters.kernels.reference import widened_weights
from aat_serve.bench.common import machine
from aat_serve.bench.kernel_report import D, H, derive, format_report, targets

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

__all__ = ["KernelBenchConfig", "format_report", "run_kernel_bench"]


@dataclass
class KernelBenchConfig:
    clips: tuple[int, ...] = (1, 8, 32)
    tasks: tuple[int, ...] = (1, 4, 8)
    ranks: tuple[int, ...] = (64, 192)
    tokens: int = 1214
    dtype: str = "bfloat16"
    compile: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; expected one of "
                              f"{', '.join(DTYPES)}")


def _eager(x, h, mlp: MlpWeights, pool: AdapterPool, segs: list[tuple[int, int, int]]):
    y = x + F.linear(F.gelu(F.linear(h, mlp.w1, mlp.b1)), mlp.w2, mlp.b2)
    for r0, r1, s in segs:
        hs = h[r0:r1]
        y[r0:r1] += F.gelu(hs @ pool.w_down[s] + pool.b_down[s]) @ pool.w_up[s] + pool.b_up[s]
    return y


def _eager_spatial(x, a, pool: AdapterPool, segs: list[tuple[int, int, int]]):
    y = x + a
    for r0, r1, s in segs:
        y[r0:r1] += (F.gelu(a[r0:r1] @ pool.w_down[s] + pool.b_down[s]) @ pool.w_up[s]
                     + pool.b_up[s])
    return y


def _widened(x, h, wide: dict[int, tuple[torch.Tensor, ...]], segs):
    y = torch.empty_like(x)
    for r0, r1, s in segs:
        w1, b1, w2, b2 = wide[s]
        y[r0:r1] = x[r0:r1] + F.linear(F.gelu(F.linear(h[r0:r1], w1, b1)), w2, b2)
    return y


def _mlp_only(x, h, mlp: MlpWeights):
    return x + F.linear(F.gelu(F.linear(h, mlp.w1, mlp.b1)), mlp.w2, mlp.b2)


def _gemms(h, act, w1t, w2t):
    """Only the two widened GEMMs (the cuBLAS yardstick): h (M, D) x (D, H+R), act x (H+R, D)."""
    torch.mm(h, w1t)
    return torch.mm(act, w2t)


def _time_all(fns: dict[str, Callable[[], torch.Tensor]], ref: torch.Tensor | None,
              result: dict[str, Any], errors: dict[str, str], key: str) -> None:
    from triton.testing import do_bench

    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            result[f"{name}_first_call_s"] = time.perf_counter() - t0
            if ref is not None and name not in ("mlp", "cublas"):
                result[f"{name}_rel_diff"] = float(
                    (out.float() - ref.float()).norm() / ref.float().norm())
            result[f"{name}_ms"] = do_bench(fn, warmup=10, rep=50, return_mode="median")
        except Exception as e:  # a path that fails is reported, not fatal
            errors[f"{key}/{name}"] = f"{type(e).__name__}: {e}"[:300]


def _routes(result: dict[str, Any], entry: dict | None) -> None:
    """The dispatcher's choice and the best measured configuration of each route."""
    if not entry:
        return
    timings = entry.get("timings_ms", {})
    result["choice"] = entry.get("choice")
    result["candidates_ms"] = timings
    result["rejected"] = entry.get("rejected", {})
    for route, prefix in (("route_a", "fused-"), ("route_b", "sgmv-")):
        best = min(((v, k) for k, v in timings.items() if k.startswith(prefix)), default=None)
        if best is not None:
            result[f"{route}_ms"], result[f"{route}_best"] = best


@dataclass
class _Weights:
    mlp: MlpWeights
    pool: AdapterPool
    wide: dict[int, tuple[torch.Tensor, ...]]
    w1t: torch.Tensor  # one task's widened fc1, (D, H + R)
    w2t: torch.Tensor  # (H + R, D)
    compiled: Callable | None


def _case(w: _Weights, x: torch.Tensor, h: torch.Tensor, act: torch.Tensor, clips: int,
          tasks: int, tokens: int, errors: dict[str, str]) -> dict[str, Any]:
    """Time every path of one (rank, clips, tasks) case; the dispatcher measures on first use."""
    from aat_serve.adapters.kernels.autotune import bucket_of
    from aat_serve.adapters.kernels.candidates import dispatcher
    from aat_serve.adapters.kernels.plan import Plans
    from aat_serve.adapters.kernels.triton_mlp import fused_mlp_adapter, spatial

    mlp, pool = w.mlp, w.pool
    clip_slots = [c * tasks // clips for c in range(clips)]  # sorted, contiguous tasks
    row_slot = torch.tensor(clip_slots, dtype=torch.int32).repeat_interleave(tokens).to(x.device)
    segs = [(c0 * tokens, c1 * tokens, s) for c0, c1, s in segments(clip_slots)]
    plans = Plans(row_slot, len(segs))
    key = f"r{pool.rank}-{clips}clips-{tasks}tasks"
    result: dict[str, Any] = {"rank": pool.rank, "clips": clips, "tasks": tasks,
                              "rows": x.shape[0]}
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "mlp": lambda: _mlp_only(x, h, mlp),
        "eager": lambda: _eager(x, h, mlp, pool, segs),
        "fused": lambda: fused_mlp_adapter(x, h, mlp, pool, row_slot, plans=plans),
    }
    if tasks == 1:
        fns["cublas"] = lambda: _gemms(h, act, w.w1t, w.w2t)
        fns["widened"] = lambda: _widened(x, h, w.wide, segs)
    if w.compiled is not None:
        fns["compiled"] = lambda: w.compiled(x, h, mlp, pool, segs)
    _time_all(fns, _eager(x, h, mlp, pool, segs), result, errors, key)
    bucket = bucket_of("mlp", x, h, mlp.hidden, pool.rank, plans.segments)
    _routes(result, dispatcher(x.device).table.entries.get(bucket.key))
    if tasks == 1:  # the spatial adapter x + a + A(a), with a in h's place
        _time_all({"spatial": lambda: spatial(x, h, pool, row_slot, plans=plans),
                   "spatial_eager": lambda: _eager_spatial(x, h, pool, segs)},
                  _eager_spatial(x, h, pool, segs), result, errors, key)
    return derive(result)


def run_kernel_bench(cfg: KernelBenchConfig) -> dict[str, Any]:
    import triton

    dev = torch.device("cuda")
    dt = DTYPES[cfg.dtype]
    g = torch.Generator(device=dev).manual_seed(cfg.seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    mlp = MlpWeights(rnd(H, D), rnd(H), rnd(D, H), rnd(D))
    compiled = torch.compile(_eager, dynamic=True) if cfg.compile else None
    n_slots = max(cfg.tasks)
    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for rank in cfg.ranks:
        pool = AdapterPool(rnd(n_slots, D, rank), rnd(n_slots, rank), rnd(n_slots, rank, D),
                           rnd(n_slots, D))
        wide = {s: widened_weights(mlp, pool, s) for s in range(n_slots)}
        w = _Weights(mlp, pool, wide, wide[0][0].t().contiguous(), wide[0][2].t().contiguous(),
                     compiled)
        for clips in cfg.clips:
            m = clips * cfg.tokens
            x, h = rnd(m, D, scale=1.0), rnd(m, D, scale=1.0)
            act = rnd(m, H + rank, scale=1.0)
            for tasks in (t for t in cfg.tasks if t <= clips):  # a task owns whole clips
                results.append(_case(w, x, h, act, clips, tasks, cfg.tokens, errors))
    return {"machine": machine(dev), "triton": triton.__version__, "config": asdict(cfg),
            "results": results, "targets": targets(results), "errors": errors}
