"""``aat bench model``: whole-model throughput against transformers, bf16 agreement, memory.

One run, on one machine, measures (all with random weights; nothing is downloaded):

- clips/s of ``MultiTaskModel.classify`` for 1-s (100 frames) and 10-s (1024 frames) clips at
  batch 1 and 8: a single ``aat_ms`` task vs a mix of 4, in fp32 and bf16; and transformers'
  ``ASTForAudioClassification`` in fp32 on the same weights and inputs as the baseline. Calls are
  timed round-robin (one call of every variant per round), so a change in machine load hits
  every variant alike, and clips/s come from each variant's fastest call: on a machine shared
  with other jobs the fastest call is the least disturbed one (the median and every call are in
  the JSON). A parity check first confirms that transformers and our model compute the same
  logits (fp32, a head-only task).
- top-1 agreement of bf16 against fp32 on random inputs over the 4 tasks' heads;
- memory of S resident ``aat_ms`` tasks (S = 1, 10, 100): tensor bytes, and the growth of the
  process (RSS, or the CUDA allocator) now and at its peak, each S in a fresh child process
  (``aat_serve.bench.memory``);
- the serving rows (``aat_serve.bench.model_rows``): a bf16 4-task mix against transformers in
  bf16, one 1-s clip's wall time against the GPU's busy time, and the bf16 residual stream's
  agreement, with PASS / MISS lines (``serving_only`` measures only these).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.config import BackboneConfig
from aat_serve.adapters.device import onnx_providers, resolve_device
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.cpu import keep_freed_memory
from aat_serve.adapters.multitask import MultiTaskModel
from aat_serve.bench import memory
from aat_serve.bench.common import (
    interleaved,
    machine,
    machine_summary,
    median,
    table,
)
from aat_serve.bench.fixtures import CLIPS, FULL, QUICK, TASK_CLASSES, random_bundle
from aat_serve.bench.model_rows import (
    ServingRowsConfig,
    format_serving,
    run_serving_rows,
    top1_agreement,
)

TARGETS = {"mixed4_vs_single": 0.95, "fp32_vs_hf": 1.0, "bf16_vs_hf": 1.8, "top1": 0.99,
           "ort_vs_torch_fp32": 1.3}


@dataclass
class ModelBenchConfig:
    """What to measure; ``quick`` shrinks everything so a test runs it in seconds."""

    quick: bool = False
    device: str = "auto"
    clips: tuple[str, ...] = ("1s", "10s")
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 3
    agreement_clips: dict[str, int] = field(default_factory=lambda: {"1s": 256, "10s": 32})
    memory_tasks: tuple[int, ...] = (1, 10, 100)
    runtimes: tuple[str, ...] = ("torch",)
    """``onnxruntime`` adds the ONNX Runtime backbone (fp32) beside torch, in the same run."""
    serving: ServingRowsConfig | None = field(default_factory=ServingRowsConfig)
    """The serving rows (None: skip them)."""
    serving_only: bool = False
    """Measure only the serving rows (no throughput table, bf16 agreement or memory)."""
    keep_freed_memory: bool = True
    """glibc keeps freed blocks for reuse (``aat_serve.adapters.kernels.cpu.keep_freed_memory``),
    for the whole process: the baseline and our model alike."""
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.clips if c not in CLIPS]
        if unknown:
            raise ConfigError(f"unknown clip length {unknown[0]!r}; expected one of "
                              f"{', '.join(CLIPS)}")
        if self.rounds < 1 or any(b < 1 for b in self.batches):
            raise ConfigError("rounds and batch sizes must be at least 1")
        if any(s < 1 for s in self.memory_tasks):
            raise ConfigError("memory task counts must be at least 1")
        bad = [r for r in self.runtimes if r not in ("torch", "onnxruntime")]
        if bad or "torch" not in self.runtimes:
            raise ConfigError(f"runtimes must include torch and be torch or onnxruntime, got "
                              f"{', '.join(self.runtimes)}")

    @property
    def backbone(self) -> BackboneConfig:
        return QUICK if self.quick else FULL

    @property
    def bottleneck(self) -> int:
        return self.backbone.embed_dim // 4


# -- the transformers baseline -------------------------------------------------------------

def hf_baseline(backbone: AST, head: TaskBundle, frames: int) -> torch.nn.Module:
    """transformers' ``ASTForAudioClassification`` holding ``backbone`` and ``head``'s weights.

    Saved and loaded through ``from_pretrained`` (which maps the published tensor names onto
    whatever module names this transformers version uses); the positional embedding is the one
    our backbone uses for ``frames``. Refuses missing or unused tensors.
    """
    from safetensors.torch import save_file
    from transformers import ASTConfig, ASTForAudioClassification

    from aat_serve.adapters.checkpoints import to_hf_state_dict

    c = backbone.cfg
    canonical = dict(backbone.frozen_state_dict())
    canonical["pos_embed"] = backbone.pos_embed_for(c.grid(frames)).detach()
    canonical.update({k: v for k, v in head.tensors.items() if k.startswith("head.")})
    config = ASTConfig(hidden_size=c.embed_dim, num_hidden_layers=c.depth,
                       num_attention_heads=c.num_heads, intermediate_size=c.mlp_hidden,
                       patch_size=c.patch_freq, frequency_stride=c.freq_stride,
                       time_stride=c.time_stride, max_length=frames, num_mel_bins=c.num_mel_bins,
                       layer_norm_eps=c.norm_eps, qkv_bias=c.qkv_bias,
                       num_labels=head.manifest.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in to_hf_state_dict(canonical).items()},
                  str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model, info = ASTForAudioClassification.from_pretrained(
            tmp, attn_implementation="sdpa", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise ConfigError(f"the transformers baseline did not load cleanly: {bad}")
    return model.eval()


# -- measurements ------------------------------------------------------------------------------

def _throughput(cfg: ModelBenchConfig, models: dict[str, MultiTaskModel],
                hf: dict[str, torch.nn.Module], tasks: list[str], device: torch.device,
                bar: tqdm) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for clip in cfg.clips:
        x = torch.randn(max(cfg.batches), CLIPS[clip], cfg.backbone.num_mel_bins, generator=g)
        for b in cfg.batches:
            xb = x[:b].contiguous()
            mix = [tasks[i % len(tasks)] for i in range(b)]
            fns: dict[str, Callable[[], object]] = {}
            x_dev = xb.to(device)

            def run_hf(model=hf[clip], inp=x_dev):
                with torch.inference_mode():
                    return model(input_values=inp).logits

            fns["hf-fp32"] = run_hf
            for dt, m in models.items():
                fns[f"{dt}-single"] = lambda m=m, xb=xb, b=b: m.classify(xb, [tasks[0]] * b)
                if b >= len(tasks):
                    fns[f"{dt}-mixed{len(tasks)}"] = lambda m=m, xb=xb, mix=mix: m.classify(xb,
                                                                                             mix)
            bar.set_description(f"throughput {clip} batch {b}")
            times = interleaved(fns, cfg.rounds, device, progress=lambda: bar.update(1))
            for name, ts in times.items():
                best = min(ts["wall"])  # the least disturbed call: see the module docstring
                rows.append({"clip": clip, "batch": b, "variant": name, "best_s": best,
                             "clips_per_s": b / best, "median_s": median(ts["wall"]),
                             "runs_s": ts["wall"], "cpu_s": median(ts["cpu"])})
    return rows


def _ratios(rows: list[dict[str, Any]], n_tasks: int) -> dict[str, dict[str, float]]:
    by = {(r["clip"], r["batch"], r["variant"]): r["clips_per_s"] for r in rows}
    out: dict[str, dict[str, float]] = {}
    for clip, b in sorted({(r["clip"], r["batch"]) for r in rows}):
        def get(v: str, clip=clip, b=b) -> float | None:
            return by.get((clip, b, v))
        r: dict[str, float] = {}
        hf = get("hf-fp32")
        for dt in ("fp32", "bf16", "ort"):
            single, mixed = get(f"{dt}-single"), get(f"{dt}-mixed{n_tasks}")
            if single and hf:
                r[f"{dt}_vs_hf"] = round(single / hf, 3)
            if single and mixed:
                r[f"mixed{n_tasks}_vs_single_{dt}"] = round(mixed / single, 3)
        ort, fp32 = get("ort-single"), get("fp32-single")
        if ort and fp32:
            r["ort_vs_torch_fp32"] = round(ort / fp32, 3)
        out[f"{clip}-b{b}"] = r
    return out


def _agreement(cfg: ModelBenchConfig, models: dict[str, MultiTaskModel], tasks: list[str],
               bar: tqdm) -> dict[str, Any]:
    clips = {c: n for c, n in cfg.agreement_clips.items() if c in cfg.clips}
    return top1_agreement(models["fp32"], models["bf16"], tasks, clips,
                          cfg.backbone.num_mel_bins, cfg.seed + 1, lambda: bar.update(1))


def _memory(cfg: ModelBenchConfig, device: torch.device, bar: tqdm) -> list[dict[str, Any]]:
    rows = []
    for dtype in ("fp32", "bf16"):
        for s in cfg.memory_tasks:
            bar.set_description(f"memory {dtype} S={s}")
            rows.append(memory.measure_in_child(s, dtype, cfg.quick, str(device)))
            bar.update(1)
    return rows


def run_model_bench(cfg: ModelBenchConfig) -> dict[str, Any]:
    """Run every measurement and return the report (see the module docstring)."""
    device = resolve_device(cfg.device, "--device")
    malloc_tuned = keep_freed_memory() if cfg.keep_freed_memory else False
    torch.manual_seed(cfg.seed)
    backbone = AST(cfg.backbone).eval().requires_grad_(False)
    fingerprint = backbone.fingerprint()
    bundles = [random_bundle(backbone, fingerprint, f"task{i}", "aat_ms", c, cfg.bottleneck,
                             seed=i) for i, c in enumerate(TASK_CLASSES)]
    parity = random_bundle(backbone, fingerprint, "parity", "head", TASK_CLASSES[0],
                           cfg.bottleneck, seed=0)
    load_before = machine(device)["load_average"]
    measured = {} if cfg.serving_only else _comparison(cfg, backbone, fingerprint, bundles,
                                                       parity, device)
    if cfg.serving is not None:
        measured["serving"] = run_serving_rows(cfg.serving, backbone, bundles, parity, device,
                                               hf_baseline, fingerprint, cfg.bottleneck)
    tasks = [b.manifest.task for b in bundles]
    report = {"machine": {**machine(device), "load_average_before": load_before,
                          "glibc_keeps_freed_memory": malloc_tuned},
              "config": {**asdict(cfg), "backbone": cfg.backbone.to_dict(),
                         "device": str(device), "tasks": dict(zip(tasks, TASK_CLASSES,
                                                                  strict=True))},
              **measured}
    if not cfg.serving_only:
        report["targets"] = check_targets(report)
    return report


def _comparison(cfg: ModelBenchConfig, backbone: AST, fingerprint: str,
                bundles: list[TaskBundle], parity: TaskBundle,
                device: torch.device) -> dict[str, Any]:
    """Parity with transformers, the throughput table and its ratios, bf16 agreement, memory."""
    tasks = [b.manifest.task for b in bundles]
    hf = {clip: hf_baseline(backbone, parity, CLIPS[clip]).to(device) for clip in cfg.clips}
    models = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        models[name] = MultiTaskModel(copy.deepcopy(backbone), max_tasks=8, dtype=dtype,
                                      device=device, fingerprint=fingerprint,
                                      bottleneck=cfg.bottleneck)
        for b in [*bundles, parity]:
            models[name].load_task(b)
    if "onnxruntime" in cfg.runtimes:
        models["ort"] = MultiTaskModel(copy.deepcopy(backbone), max_tasks=8, device="cpu",
                                       fingerprint=fingerprint, bottleneck=cfg.bottleneck,
                                       backend="onnxruntime", providers=onnx_providers(device))
        for b in [*bundles, parity]:
            models["ort"].load_task(b)
        for clip in cfg.clips:  # build each graph before timing (export is a one-off)
            models["ort"].classify(torch.zeros(1, CLIPS[clip], cfg.backbone.num_mel_bins),
                                   ["parity"])

    parity_diff = {}
    g = torch.Generator().manual_seed(cfg.seed + 2)
    for clip in cfg.clips:
        x = torch.randn(2, CLIPS[clip], cfg.backbone.num_mel_bins, generator=g)
        ours = torch.stack(models["fp32"].classify(x, ["parity"] * 2))
        with torch.inference_mode():
            theirs = hf[clip](input_values=x.to(device)).logits.float().cpu()
        parity_diff[clip] = float((ours - theirs).abs().max())

    n_variants = sum(1 + len(models) * (2 if b >= len(tasks) else 1) for b in cfg.batches)
    steps = (len(cfg.clips) * n_variants * (cfg.rounds + 1)
             + sum(-(-n // 8) for c, n in cfg.agreement_clips.items() if c in cfg.clips)
             + 2 * len(cfg.memory_tasks))
    with tqdm(total=steps, unit="step", dynamic_ncols=True, leave=False) as bar:
        rows = _throughput(cfg, models, hf, tasks, device, bar)
        bar.set_description("bf16 agreement")
        agreement = _agreement(cfg, models, tasks, bar)
        del models, hf
        memory = _memory(cfg, device, bar)
    return {"parity_max_abs_diff": parity_diff, "throughput": rows,
            "ratios": _ratios(rows, len(tasks)), "agreement": agreement, "memory": memory}


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue, with the measured value and whether it was met."""
    out = []
    for key, r in report["ratios"].items():
        for name, value in r.items():
            target = next((t for prefix, t in TARGETS.items() if name.startswith(prefix)), None)
            if target is not None:
                out.append({"what": f"{key} {name}", "value": value, "target": target,
                            "met": value >= target})
    top1 = report["agreement"].get("overall")
    if top1 is not None:
        out.append({"what": "bf16 top-1 agreement", "value": round(top1, 4),
                    "target": TARGETS["top1"], "met": top1 >= TARGETS["top1"]})
    return out


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    head = (f"aat bench model on {machine_summary(m)}, load average "
            f"{m['load_average_before']} -> {m['load_average']}, glibc keeps freed memory: "
            f"{m.get('glibc_keeps_freed_memory')}")
    serving = ["", format_serving(report["serving"])] if report.get("serving") else []
    if "throughput" not in report:
        return "\n".join([head, *serving])
    lines = [head,
             "transformers parity (max |logit diff|, fp32): " + ", ".join(
                 f"{k} {v:.2e}" for k, v in report["parity_max_abs_diff"].items()), ""]
    rows = [[r["clip"], r["batch"], r["variant"], f"{r['clips_per_s']:.2f}",
             f"{r['best_s'] * 1e3:.1f}", f"{r['median_s'] * 1e3:.1f}",
             f"{r['cpu_s'] * 1e3:.1f}"] for r in report["throughput"]]
    lines += [table(rows, ["clip", "batch", "variant", "clips/s", "best ms", "median ms",
                           "CPU ms"]), ""]
    for key, r in report["ratios"].items():
        lines.append(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    lines.append("")
    for clip, a in report["agreement"].items():
        if clip != "overall":
            lines.append(f"bf16 vs fp32 top-1 agreement, {clip}: {a['top1_agreement']:.4f} over "
                         f"{a['clips']} clips ({a['distinct_top1']} distinct fp32 top-1 "
                         f"classes; max logit relative error {a['max_logit_rel_err']:.2e})")
    def mb(r: dict[str, Any], *keys: str) -> str:
        v = next((r[k] for k in keys if r.get(k) is not None), None)
        return "-" if v is None else f"{v:.1f}"

    mem = [[r["dtype"], r["tasks"], f"{r['backbone_mb']:.1f}", f"{r['pools_mb']:.1f}",
            f"{r['per_task_mb']:.2f}", mb(r, "growth_mb"), mb(r, "peak_growth_mb")]
           for r in report["memory"]]
    lines += ["", table(mem, ["dtype", "tasks", "backbone MB", "pools MB", "MB/task",
                              "growth MB", "peak MB"]), ""]
    for t in report["targets"]:
        lines.append(f"{'met ' if t['met'] else 'MISS'}  {t['what']}: {t['value']} "
                     f"(target >= {t['target']})")
    return "\n".join(lines + serving)
