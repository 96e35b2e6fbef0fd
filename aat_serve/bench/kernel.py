"""``aat bench kernel``: one block's MLP with per-task adapters, fused vs unfused (CUDA only).

For each (clips of ``tokens`` rows, tasks) the op ``x + MLP(h) + A_{task}(h)`` at ViT-B sizes
(D 768, H 3072, R 192) is timed with ``triton.testing.do_bench`` (median) as:

- ``mlp``: the frozen MLP alone, no adapter (the lower bound);
- ``eager``: the MLP plus each task's adapter on its contiguous rows, in eager PyTorch;
- ``widened``: per task, cuBLAS GEMMs on materialised ``[W1 | W_down]`` / ``[W2 ; W_up]``;
- ``compiled``: ``torch.compile`` of the eager path;
- ``fused``: the two Triton kernels (``aat_serve.adapters.kernels.triton_mlp``).

Every implementation's output is compared with the fused one first. Reported: ms, TFLOP/s
(2·M·D·(H + R)·2 FLOPs) and the ratios fused/mlp (target <= 1.10) and eager/fused
(target >= 1.3).
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
from aat_serve.bench.common import machine, table

D, H, R = 768, 3072, 192
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TARGETS = {"fused_vs_mlp": 1.10, "eager_vs_fused": 1.3}


@dataclass
class KernelBenchConfig:
    clips: tuple[int, ...] = (1, 8, 32)
    tasks: tuple[int, ...] = (1, 4, 8)
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


def _widened(x, h, wide: dict[int, tuple[torch.Tensor, ...]], segs):
    y = torch.empty_like(x)
    for r0, r1, s in segs:
        w1, b1, w2, b2 = wide[s]
        y[r0:r1] = x[r0:r1] + F.linear(F.gelu(F.linear(h[r0:r1], w1, b1)), w2, b2)
    return y


def _mlp_only(x, h, mlp: MlpWeights):
    return x + F.linear(F.gelu(F.linear(h, mlp.w1, mlp.b1)), mlp.w2, mlp.b2)


def run_kernel_bench(cfg: KernelBenchConfig) -> dict[str, Any]:
    from triton.testing import do_bench

    from aat_serve.adapters.kernels.triton_mlp import default_config, fused_mlp_adapter

    dev = torch.device("cuda")
    dt = DTYPES[cfg.dtype]
    g = torch.Generator(device=dev).manual_seed(cfg.seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    mlp = MlpWeights(rnd(H, D), rnd(H), rnd(D, H), rnd(D))
    n_slots = max(cfg.tasks)
    pool = AdapterPool(rnd(n_slots, D, R), rnd(n_slots, R), rnd(n_slots, R, D), rnd(n_slots, D))
    wide = {s: widened_weights(mlp, pool, s) for s in range(n_slots)}
    compiled = torch.compile(_eager, dynamic=True) if cfg.compile else None
    rows, errors = [], {}
    for clips in cfg.clips:
        m = clips * cfg.tokens
        x, h = rnd(m, D, scale=1.0), rnd(m, D, scale=1.0)
        for tasks in cfg.tasks:
            if tasks > clips:
                continue  # a task owns whole clips
            t = tasks
            clip_slots = [c * t // clips for c in range(clips)]  # sorted, contiguous tasks
            rows_slot = torch.tensor(clip_slots, dtype=torch.int32).repeat_interleave(cfg.tokens)
            row_slot = rows_slot.to(dev)
            segs = [(c0 * cfg.tokens, c1 * cfg.tokens, s) for c0, c1, s in segments(clip_slots)]
            fns: dict[str, Callable[[], torch.Tensor]] = {
                "mlp": lambda x=x, h=h: _mlp_only(x, h, mlp),
                "eager": lambda x=x, h=h, segs=segs: _eager(x, h, mlp, pool, segs),
                "widened": lambda x=x, h=h, segs=segs: _widened(x, h, wide, segs),
                "fused": lambda x=x, h=h, rs=row_slot: fused_mlp_adapter(x, h, mlp, pool, rs),
            }
            if compiled is not None:
                fns["compiled"] = lambda x=x, h=h, segs=segs: compiled(x, h, mlp, pool, segs)
            key = f"{clips}clips-{t}tasks"
            ref = fns["fused"]()
            result: dict[str, Any] = {"clips": clips, "tasks": t, "rows": m,
                                      "config": asdict(default_config(m))}
            flops = 2 * m * D * (H + R) * 2
            for name, fn in fns.items():
                try:
                    t0 = time.perf_counter()
                    out = fn()
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    if name != "mlp":
                        rel = float((out.float() - ref.float()).norm() / ref.float().norm())
                        result[f"{name}_rel_diff"] = rel
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    result[f"{name}_ms"] = ms
                    result[f"{name}_tflops"] = flops / ms / 1e9
                    result[f"{name}_first_call_s"] = first
                except Exception as e:  # a baseline that fails is reported, not fatal
                    errors[f"{key}/{name}"] = f"{type(e).__name__}: {e}"[:300]
            if "fused_ms" in result and "mlp_ms" in result:
                result["fused_vs_mlp"] = result["fused_ms"] / result["mlp_ms"]
            if "fused_ms" in result and "eager_ms" in result:
                result["eager_vs_fused"] = result["eager_ms"] / result["fused_ms"]
            rows.append(result)
    report = {"machine": machine(dev), "config": asdict(cfg), "results": rows, "errors": errors}
    report["targets"] = [
        {"what": f"{r['clips']} clips {r['tasks']} tasks {k}", "value": round(r[k], 3),
         "target": t, "met": r[k] <= t if k == "fused_vs_mlp" else r[k] >= t}
        for r in rows for k, t in TARGETS.items() if k in r]
    return report


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    names = ["mlp", "eager", "widened", "compiled", "fused"]
    rows = []
    for r in report["results"]:
        diff = max((v for k, v in r.items() if k.endswith("_rel_diff")), default=0.0)
        rows.append([r["clips"], r["tasks"]]
                    + [f"{r[f'{n}_ms']:.3f}" if f"{n}_ms" in r else "-" for n in names]
                    + [f"{r.get('fused_tflops', float('nan')):.0f}",
                       f"{r.get('fused_vs_mlp', float('nan')):.3f}",
                       f"{r.get('eager_vs_fused', float('nan')):.3f}",
                       f"{diff:.1e}"])
    lines = [f"aat bench kernel on {m.get('gpu')} (torch {m['torch']}, CUDA {m.get('cuda')}), "
             f"{report['config']['dtype']}, median ms per call", "",
             table(rows, ["clips", "tasks", *[f"{n} ms" for n in names], "fused TFLOP/s",
                          "fused/mlp", "eager/fused", "max rel diff"]), ""]
    for t in report["targets"]:
        lines.append(f"{'met ' if t['met'] else 'MISS'}  {t['what']}: {t['value']} "
                     f"(target {'<=' if 'fused_vs_mlp' in t['what'] else '>='} {t['target']})")
    for k, v in report["errors"].items():
        lines.append(f"error {k}: {v}")
    return "\n".join(lines)
