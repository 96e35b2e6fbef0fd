"""``aat bench kernel|model|memory|serve|training``: the arguments of every benchmark.

The benchmarks themselves live in ``aat_serve.bench`` (one module each) and are imported only
when their subcommand runs, so ``aat --help`` stays fast and a benchmark's child processes
(``memory`` and ``training`` measure each case in a fresh ``python -m aat_serve.cli.bench``)
load only what they measure. To add one, write a ``register_*(bench_subparsers)`` function and
list it in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import json
import sys

from aat_serve.adapters.errors import ConfigError
from aat_serve.bench.common import positive_ints


def register_kernel_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kernel", help="fused MLP + adapter kernels against the unfused baselines (CUDA)",
        description="Time one block's MLP with per-task adapters for 1, 8 and 32 clips of 1214 "
                    "tokens, 1, 4 and 8 tasks and adapter ranks 64 and 192: the frozen MLP "
                    "alone, eager MLP + adapters, cuBLAS on the widened GEMMs, torch.compile of "
                    "the eager path, and the kernels the dispatcher picks (route a: fused "
                    "Triton GEMMs; route b: cuBLAS + SGMV adapters), with PASS/MISS lines "
                    "against issue 21's targets. Needs a CUDA GPU.")
    p.add_argument("--clips", default="1,8,32", help="clips per batch (default 1,8,32)")
    p.add_argument("--tasks", default="1,4,8", help="tasks per batch (default 1,4,8)")
    p.add_argument("--rank", default="64,192", help="adapter ranks (default 64,192)")
    p.add_argument("--tokens", type=int, default=1214, help="tokens per clip (default 1214)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_kernel_bench)


def run_kernel_bench(args: argparse.Namespace) -> int:
    import torch

    from aat_serve.bench.common import to_json

    ranks = positive_ints(args.rank, "--rank")
    clips, tasks = positive_ints(args.clips, "--clips"), positive_ints(args.tasks, "--tasks")
    if not torch.cuda.is_available():
        print("aat bench kernel needs a CUDA GPU: its figures (fused / frozen MLP, unfused / "
              "fused, TFLOP/s vs cuBLAS) are GPU timings of Triton kernels, and none is "
              "available here. Run `make gpu-check` on a CUDA machine (docs/benchmarks.md).",
              file=sys.stderr)
        return 2
    from aat_serve.bench import kernel

    report = kernel.run_kernel_bench(kernel.KernelBenchConfig(
        clips=clips, tasks=tasks, ranks=ranks, tokens=args.tokens, dtype=args.dtype,
        compile=not args.no_compile))
    print(to_json(report) if args.json else kernel.format_report(report))
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
    serving = p.add_mutually_exclusive_group()
    serving.add_argument("--serving-only", action="store_true",
                         help="only the serving rows: a bf16 4-task mix vs transformers bf16, "
                              "1-s batch-1 wall vs GPU busy time, bf16 residual agreement "
                              "(PASS/MISS)")
    serving.add_argument("--no-serving", action="store_true", help="skip the serving rows")
    p.add_argument("--serving-batch", type=int,
                   help="batch of the serving rows' mix (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_model_bench)


def run_model_bench(args: argparse.Namespace) -> int:
    import torch

    from aat_serve.bench import model
    from aat_serve.bench.common import to_json
    from aat_serve.bench.model_rows import ServingRowsConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    clips = tuple(c.strip() for c in args.clips.split(",") if c.strip())
    agreement = ({c: args.agreement_clips for c in clips} if args.agreement_clips is not None
                 else {"1s": 8, "10s": 0} if args.quick else {"1s": 256, "10s": 32})
    memory = args.memory_tasks or ("1,3" if args.quick else "1,10,100")
    if args.serving_batch is not None and args.serving_batch < 1:
        raise ConfigError(f"--serving-batch must be at least 1, got {args.serving_batch}")
    serving = None if args.no_serving else ServingRowsConfig(
        batch=args.serving_batch, clip="10s" if "10s" in clips else clips[0],
        rounds=args.rounds or (1 if args.quick else 3),
        agreement_clips=({c: args.agreement_clips for c in clips}
                         if args.agreement_clips is not None
                         else {"1s": 8} if args.quick else {"1s": 128, "10s": 16}),
        batch1_calls=3 if args.quick else 30)
    cfg = model.ModelBenchConfig(
        quick=args.quick, device=args.device, clips=clips,
        batches=positive_ints(args.batches, "--batches"),
        rounds=args.rounds or (1 if args.quick else 3), agreement_clips=agreement,
        memory_tasks=positive_ints(memory, "--memory-tasks"),
        runtimes=("torch", "onnxruntime") if args.runtime == "onnxruntime" else ("torch",),
        keep_freed_memory=not args.glibc_defaults, serving=serving,
        serving_only=args.serving_only)
    report = model.run_model_bench(cfg)
    print(to_json(report) if args.json else model.format_report(report))
    return 0


def register_memory_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory", help="memory of S resident aat_ms tasks, in this process (prints JSON)",
        description="Build a random backbone and a multi-task model holding --tasks random "
                    "aat_ms tasks, classify one mixed batch and print one JSON object: tensor "
                    "bytes and this process's memory growth now and at its peak. Meant for a "
                    "fresh process (aat bench model runs one per task count).")
    p.add_argument("--tasks", type=int, required=True, help="resident tasks S")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="the tiny backbone (for tests)")
    p.set_defaults(func=run_memory_bench)


def run_memory_bench(args: argparse.Namespace) -> int:
    from aat_serve.bench.memory import measure

    if args.tasks < 1:
        raise ConfigError(f"--tasks needs a positive integer, got {args.tasks}")
    print(json.dumps(measure(args.tasks, args.dtype, args.quick, args.device)))
    return 0


def register_serve_bench(sub: argparse._SubParsersAction) -> None:
    from aat_serve.bench.fixtures import PRESETS
    from aat_serve.bench.serve_process import BASELINES

    p = sub.add_parser(
        "serve", help="throughput and latency of a real `aat serve` process under `hey` load",
        description="Starts `aat serve` in a child process (or measures --url) and loads it "
                    "from `hey` processes (apt-get install hey), --clients connections: "
                    "GET /healthz (the HTTP ceiling), classify on one task and over a --tasks "
                    "mix, and the server's engine alone in a child process (no HTTP, no "
                    "decode), over --rounds rounds. Reported: req/s, p50/p95/p99 latency, "
                    "errors, mean clips and tasks per batch (from the server's metrics) and "
                    "the ratios classify / healthz and service / engine. --baseline "
                    "no-batching adds a second server with AAT_MAX_BATCH=1, measured in the "
                    "same rounds, and the ratios batching / none. With --zipf: the paging "
                    "benchmark (see below).")
    p.add_argument("--backbone", choices=sorted(PRESETS),
                   help="serve a random backbone of this size with --tasks random tasks "
                        "(default: the embedded demo backbone and its tasks)")
    p.add_argument("--checkpoint", help="serve this checkpoint: with --bundle-dir's tasks, or "
                                        "else --tasks random tasks of it")
    p.add_argument("--bundle-dir", help="with --checkpoint: the task store to serve")
    p.add_argument("--url", help="measure a server already running on this machine instead "
                                 "(its first --tasks active tasks; no engine-only run, no "
                                 "--baseline)")
    p.add_argument("--frames", type=int,
                   help="clip length in frames of the random --backbone (default: the "
                        "preset's)")
    p.add_argument("--tasks", type=int, default=4, help="tasks in the mix (default 4)")
    p.add_argument("--clients", type=int, default=8,
                   help="concurrent connections, split over the tasks of a mix (default 8)")
    p.add_argument("--requests", type=int, default=200,
                   help="requests per scenario in each round (default 200)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="time limit of one scenario's run; a run still going then fails "
                        "(default 60)")
    p.add_argument("--clip-s", type=float, default=1.0, help="audio seconds per request")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; each runs every scenario once, in an order rotating by one "
                        "(default 3)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="AAT_MAX_BATCH of the server (default 16, the server's own default)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching wait (default 5)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--front-ends", type=int, default=0, metavar="N",
                   help="AAT_FRONT_ENDS of the server: N HTTP front-end processes beside the "
                        "model process (default 0: one process)")
    p.add_argument("--baseline", choices=BASELINES, default="none",
                   help="also measure, in the same rounds, the same server with AAT_MAX_BATCH=1 "
                        "(no-batching) or in one process (one-process, with --front-ends) "
                        "(default none)")
    p.add_argument("--engine-seconds", type=float, default=6.0,
                   help="timed seconds of each round's engine-only run; 0 skips it "
                        "(default 6)")
    p.add_argument("--driver", choices=["hey"], default="hey",
                   help="the load generator: `hey` processes, the only one (the in-process "
                        "`threads` driver is gone; the flag stays so older commands parse)")
    g = p.add_argument_group(
        "paging (--zipf)", "N random aat_ms tasks of the demo backbone in a store, requests "
        "drawn from a Zipf law by client processes, against a real `aat serve` with --resident "
        "resident tasks and one with every task resident: hit rate, latency of hits and of cold "
        "loads (host memory or disk), throughput ratio, errors, memory vs budgets")
    g.add_argument("--zipf", type=float, help="Zipf exponent S of the task popularity (turns "
                                              "the paging benchmark on)")
    g.add_argument("--resident", type=int, default=64, help="AAT_MAX_TASKS of the paged "
                                                            "server (default 64)")
    g.add_argument("--warmup", type=int, default=1000,
                   help="unmeasured requests per server first (default 1000)")
    g.add_argument("--host-cache-mb", type=float, default=512.0,
                   help="AAT_HOST_CACHE_MB of both servers (default 512)")
    g.add_argument("--device-task-mb", type=float,
                   help="AAT_DEVICE_TASK_MB of the paged server (default unset)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_serve_bench)


def run_serve_bench(args: argparse.Namespace) -> int:
    from aat_serve.bench.common import to_json

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    if args.zipf is not None:
        from aat_serve.bench.paging import PagingBenchConfig, bench_paging, format_paging_report

        report = bench_paging(PagingBenchConfig(
            tasks=args.tasks, zipf=args.zipf, resident=args.resident, clients=args.clients,
            requests=args.requests, warmup=args.warmup, rounds=args.rounds,
            max_seconds=args.max_seconds, clip_s=args.clip_s, max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms, host_cache_mb=args.host_cache_mb,
            device_task_mb=args.device_task_mb, device=args.device, dtype=args.dtype),
            progress=say)
        print(to_json(report) if args.json else format_paging_report(report))
        return 0
    from aat_serve.bench.serve_process import (
        ProcessBenchConfig,
        bench_serve_process,
        format_process_report,
    )

    report = bench_serve_process(ProcessBenchConfig(
        preset=args.backbone, frames=args.frames, checkpoint=args.checkpoint,
        bundle_dir=args.bundle_dir, url=args.url, tasks=args.tasks, clients=args.clients,
        requests=args.requests, max_seconds=args.max_seconds, clip_s=args.clip_s,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, device=args.device,
        dtype=args.dtype, rounds=args.rounds, engine_seconds=args.engine_seconds,
        baseline=args.baseline, front_ends=args.front_ends), progress=say)
    print(to_json(report) if args.json else format_process_report(report))
    return 0


def register_training_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "training", help="training step time and peak memory per method (ViT-B AST)",
        description="Training step time and peak memory of fine-tuning methods on one batch "
                    "of random features, each (method, clip length) in a fresh child process "
                    "so that its peak memory is its own. Prints a Markdown table.")
    p.add_argument("--methods", default="full,aat_ms", help="methods (default full,aat_ms)")
    p.add_argument("--frames", default="128,512", help="frames per clip, comma-separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: METHOD:FRAMES in this process
    p.set_defaults(func=run_training_bench)


def run_training_bench(args: argparse.Namespace) -> int:
    from aat_serve.bench import training
    from aat_serve.bench.common import to_json

    device = args.device or training.TrainingBenchConfig().device
    if args.one:
        method, frames = args.one.split(":")
        print(json.dumps(training.measure(method, int(frames), args.batch, args.steps,
                                          args.warmup, device)))
        return 0
    cfg = training.TrainingBenchConfig(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        frames=positive_ints(args.frames, "--frames"), batch=args.batch, steps=args.steps,
        warmup=args.warmup, device=device)
    report = training.run_training_bench(cfg)
    print(to_json(report) if args.json else training.format_report(report))
    return 0


def register_lengths_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lengths", help="a batch of two clip lengths: grouped by length vs padded to the longer",
        description="The backbone on a batch whose clips have two lengths, computed as the "
                    "engine does (one pass per length) and padded to the longer length in one "
                    "pass (no mask: a lower bound of the masked pass), per length pair; also "
                    "how far each moves the shorter clips' embeddings from their own.")
    p.add_argument("--backbone", default="small", help="random backbone preset (default small)")
    p.add_argument("--pairs", default="100:300,100:1024,512:1024",
                   help="SHORT:LONG frame counts, comma-separated (default 100:300,100:1024,"
                        "512:1024)")
    p.add_argument("--batch", type=int, default=16, help="clips per batch, half at each length")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_lengths_bench)


def run_lengths_bench(args: argparse.Namespace) -> int:
    from aat_serve.bench import lengths
    from aat_serve.bench.common import to_json

    try:
        pairs = tuple((int(a), int(b)) for a, b in (x.split(":") for x in args.pairs.split(",")))
    except ValueError:
        raise ConfigError(f"--pairs must be SHORT:LONG[,SHORT:LONG...], got {args.pairs!r}"
                          ) from None
    report = lengths.run_lengths_bench(lengths.LengthsBenchConfig(
        preset=args.backbone, pairs=pairs, batch=args.batch, device=args.device,
        dtype=args.dtype, rounds=args.rounds))
    print(to_json(report) if args.json else lengths.format_report(report))
    return 0


# Registered in this order.
BENCHMARKS = (register_kernel_bench, register_model_bench, register_memory_bench,
              register_serve_bench, register_training_bench, register_lengths_bench)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: kernel, model, memory, serve, training, "
                                            "lengths",
                              description="Benchmarks; each prints its figures against a "
                                          "baseline measured in the same run (--json for "
                                          "scripts).")
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for add in BENCHMARKS:
        add(sub)

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
