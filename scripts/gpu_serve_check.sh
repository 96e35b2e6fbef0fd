#!/usr/bin/env bash
# Issue 20's GPU serving targets in one bounded command (`make gpu-serve-check`, < 5 minutes):
# `aat bench serve` on a random ViT-B backbone with 4 random tasks of 1-s windows, bf16 on CUDA,
# 64 connections from hey, max batch 32: service / engine-only clips/s (target >= 0.7) and mean
# batch / max batch (>= 0.75), one task and the 4-task mix, with PASS/MISS lines; served with
# $AAT_GPU_FRONT_ENDS (default 4) front-end processes beside the model process, and the same
# server in one process measured in the same round (--baseline one-process: the ratio
# front_ends_vs_one_process says what the front ends buy on this host).
# On the lent GPU machine: scripts/gpu_prepare.sh here first, carry `.whl` and `.tools`.
# Writes $OUT (default ./gpu-check/): bench_serve.json, bench_serve.txt and serve_summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_env.sh  # PY, OUTDIR, this tree on PYTHONPATH, the carried wheels and hey
export PYTHONUNBUFFERED=1
if ! command -v hey >/dev/null; then
  echo "hey is not on PATH (scripts/gpu_prepare.sh copies it to .tools/)" | tee "$OUTDIR/serve_summary.txt"
  exit 1
fi
rc=0
timeout 270 "$PY" -m aat_serve.cli.main bench serve --backbone vit-b --frames 100 \
  --device cuda --dtype bfloat16 --tasks 4 --clients 64 --clip-s 1 --max-batch 32 \
  --front-ends "${AAT_GPU_FRONT_ENDS:-4}" --baseline one-process \
  --requests 3000 --rounds 1 --max-seconds 60 --json > "$OUTDIR/bench_serve.json" || rc=$?
json_report aat_serve.bench.serve_process format_process_report "$OUTDIR/bench_serve.json" \
  "$OUTDIR/bench_serve.txt"
case $rc in
  0) echo "ok    aat bench serve (GPU)" ;;
  124) echo "TIME  aat bench serve (GPU): stopped after 270 s" ;;
  *) echo "FAIL  aat bench serve (GPU): exit $rc" ;;
esac | tee "$OUTDIR/serve_summary.txt"
grep -hE '^  (PASS|MISS)' "$OUTDIR/bench_serve.txt" 2>/dev/null >> "$OUTDIR/serve_summary.txt"
exit $rc
