"""``aat bench kernel|model|serve``: one subcommand per benchmark.

Each benchmark lives beside what it measures (``aat_serve.adapters.benchmarks.kernel``,
``aat_serve.adapters.benchmarks.model``, ``aat_serve.service.bench``); this module only parses
arguments. To add
one, write a ``register_*(bench_subparsers)`` function and list it in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aat_serve.adapters.errors import ConfigError


def register_kernel_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kernel", help="fused MLP + adapter kernels against the unfused baselines (CUDA)",
        description="Time one block's MLP with per-task adapters for 1, 8 and 32 clips of 1214 "
                    "tokens and 1, 4 and 8 tasks: the frozen MLP alone, eager MLP + adapters, "
                    "widened single-task GEMMs, torch.compile of the eager path, and the fused "
                    "Triton kernels. Needs a CUDA GPU.")
    p.add_argument("--clips", default="1,8,32", help="clips per batch (default 1,8,32)")
    p.add_argument("--tasks", default="1,4,8", help="tasks per batch (default 1,4,8)")
    p.add_argument("--tokens", type=int, default=1214, help="tokens per clip (default 1214)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_kernel_bench)


def run_kernel_bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("aat bench kernel needs a CUDA GPU (the fused kernels are Triton GPU kernels); "
              "none is available here", file=sys.stderr)
        return 2
    from aat_serve.adapters.benchmarks import kernel

    report = kernel.run_kernel_bench(kernel.KernelBenchConfig(
        clips=_ints(args.clips, "--clips"), tasks=_ints(args.tasks, "--tasks"),
        tokens=args.tokens, dtype=args.dtype, compile=not args.no_compile))
    print(kernel.to_json(report) if args.json else kernel.format_report(report))
    return 0


def register_model_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model", help="whole-model clips/s vs transformers, bf16 agreement, memory per task",
        description="Clips/s of the multi-task model (single task vs a 4-task mix, fp32 and "
                    "bf16) and of transformers' ASTForAudioClassification on the same random "
                    "ViT-B weights and inputs, for 1-s and 10-s clips at batch 1 and 8, in one "
                    "run; top-1 agreement of bf16 with fp32; memory of 1, 10 and 100 resident "
                    "aat_ms tasks. Runs on CPU or CUDA; nothing is downloaded.")
    p.add_argument("--quick", action="store_true",
                   help="a tiny backbone and few repetitions (seconds; for tests)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--clips", default="1s,10s", help="clip lengths (default 1s,10s)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--rounds", type=int, help="timed calls per variant (default 3; quick 1)")
    p.add_argument("--agreement-clips", type=int,
                   help="random clips per length for bf16 agreement (default 256 1-s and 32 "
                        "10-s clips; quick 8)")
    p.add_argument("--memory-tasks", help="resident task counts (default 1,10,100; quick 1,3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: also time the ONNX Runtime backbone (fp32) beside torch, "
                        "variants 'ort-*' and the ratio ort_vs_torch_fp32")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="keep glibc's malloc defaults (by default freed memory is kept for "
                        "reuse, for the baseline and our model alike)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_model_bench)


def run_model_bench(args: argparse.Namespace) -> int:
    import torch

    from aat_serve.adapters.benchmarks import model

    if args.threads:
        torch.set_num_threads(args.threads)
    clips = tuple(c.strip() for c in args.clips.split(",") if c.strip())
    agreement = ({c: args.agreement_clips for c in clips} if args.agreement_clips is not None
                 else {"1s": 8, "10s": 0} if args.quick else {"1s": 256, "10s": 32})
    memory = args.memory_tasks or ("1,3" if args.quick else "1,10,100")
    cfg = model.ModelBenchConfig(
        quick=args.quick, device=args.device, clips=clips,
        batches=_ints(args.batches, "--batches"),
        rounds=args.rounds or (1 if args.quick else 3), agreement_clips=agreement,
        memory_tasks=_ints(memory, "--memory-tasks"),
        runtimes=("torch", "onnxruntime") if args.runtime == "onnxruntime" else ("torch",),
        keep_freed_memory=not args.glibc_defaults)
    report = model.run_model_bench(cfg)
    print(model.to_json(report) if args.json else model.format_report(report))
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be a comma-separated list of integers, got "
                          f"{text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} needs positive integers, got {text!r}")
    return values


# (module, function): registered in this order; a module that cannot be imported (say, the
# service's dependencies are missing) leaves its benchmark out with a note in --help.
BENCHMARKS = (
    ("aat_serve.cli.bench", "register_kernel_bench"),
    ("aat_serve.cli.bench", "register_model_bench"),
    ("aat_serve.service.bench", "register_serve_bench"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: kernel, model, serve",
                              description="Benchmarks; each prints its figures against a "
                                          "baseline measured in the same run (--json for "
                                          "scripts).")
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    missing = []
    for module, fn in BENCHMARKS:
        try:
            getattr(importlib.import_module(module), fn)(sub)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        p.epilog = "unavailable here: " + "; ".join(missing)

    def show_help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=show_help)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m aat_serve.cli.bench ...``: the benchmarks without the CLI's other imports."""
    parser = argparse.ArgumentParser(prog="aat")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
