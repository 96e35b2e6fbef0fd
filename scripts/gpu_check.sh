#!/usr/bin/env bash
# GPU check in one command (`make gpu-check`), under 8 minutes with every step bounded:
#   1. the kernel tests at real ViT-B sizes (D 768, H 3072, 1214 tokens per clip, bf16): every
#      candidate of the dispatcher, the dispatcher's choice and table, CUDA graphs, the model
#      (tests/adapters/test_kernels_gpu.py);
#   2. `aat bench kernel` (issue 21's kernel rows with PASS/MISS lines);
#   3. the model's GPU tests (CUDA graphs, bf16 residual stream) and
#   4. `aat bench model --serving-only` (issue 21's model rows with PASS/MISS lines).
# Needs a CUDA GPU with torch + triton; uses .venv/bin/python when present, else python3
# (override with PY=...). On the lent GPU machine (no aat-serve installed, no PyPI): run
# scripts/gpu_prepare.sh here first and carry `.whl` (the runtime dependencies its image
# lacks). Everything is also written to $OUT (default ./gpu-check/): the JSON reports, their
# text tables, the dispatcher's kernel table and a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
# PY, OUTDIR, aat_serve.* from this tree without installing it, the carried wheels
. scripts/gpu_env.sh
# the dispatcher's measurements persist here: the benchmark reuses what the tests measured
export AAT_KERNEL_TABLE="$OUTDIR/kernel_table.json"
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
status=0
step() {  # step NAME SECONDS CMD...: run CMD bounded by SECONDS, note the outcome
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" || rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then echo "ok    $name (${took}s)" >> "$SUMMARY"
  elif [ $rc -eq 124 ]; then echo "TIME  $name: stopped after ${limit}s" >> "$SUMMARY"; status=1
  else echo "FAIL  $name: exit $rc (${took}s)" >> "$SUMMARY"; status=1; fi
  return 0
}
pytest_step() {  # pytest_step NAME SECONDS TESTFILE OUTFILE: a test file as a bounded step
  step "$1" "$2" bash -c "\"$PY\" -m pytest -q -p no:cacheprovider \"$3\" 2>&1 \
    | tee \"$OUTDIR/$4\"; exit \${PIPESTATUS[0]}"
}

echo "== device =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "(no nvidia-smi)"
if ! "$PY" - <<'PYEOF' | tee "$OUTDIR/device.txt"
import sys
import torch
try:
    import triton
except ImportError:
    sys.exit("triton is not installed")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PYEOF
then
  echo "no CUDA device or no triton: nothing to check" | tee "$SUMMARY"; exit 1
fi
missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("pytest", "safetensors") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "missing Python packages: $missing (install them, e.g. from wheels carried with the" \
       "tree, then rerun)" | tee -a "$SUMMARY"
fi

echo "== 1. kernel tests: real sizes, bf16 (every candidate, dispatcher, CUDA graphs) =="
pytest_step "kernel tests" 150 tests/adapters/test_kernels_gpu.py kernel_tests.txt

echo "== 2. aat bench kernel (ranks 64 and 192; without the torch.compile baseline) =="
step "aat bench kernel" 130 bash -c "\"$PY\" -m aat_serve.cli.bench kernel --no-compile \
  --json > \"$OUTDIR/bench_kernel.json\""
json_report aat_serve.bench.kernel_report format_report "$OUTDIR/bench_kernel.json" \
  "$OUTDIR/bench_kernel.txt"

# ---- BEGIN model section (issue 21, model part: bf16 residual stream, CUDA graphs) ----
# The model's GPU tests (graph replay per batch bucket equals eager, hot swap without
# re-capture, one upload and one download per batch, bf16 vs fp32 residual stream; ViT-B), then
# `aat bench model --serving-only`: the bf16 4-task mix at 10 s, batch 32 vs transformers bf16
# without adapters, one 1-s clip's wall time vs GPU busy time, and the stream agreement.
echo "== 3. model tests: CUDA graphs per bucket, hot swap, bf16 residual stream (ViT-B) =="
pytest_step "model tests" 60 tests/adapters/test_model_gpu.py model_tests.txt
echo "== 4. aat bench model --serving-only (CUDA) =="
step "aat bench model" 110 bash -c "\"$PY\" -m aat_serve.cli.bench model --serving-only \
  --device cuda --agreement-clips 32 --json > \"$OUTDIR/bench_model.json\""
json_report aat_serve.bench.model format_report "$OUTDIR/bench_model.json" \
  "$OUTDIR/bench_model.txt"
# ---- END model section ----

echo "== summary =="
cat "$SUMMARY"
grep -hE '^(PASS|MISS|met |[0-9]+ of [0-9]+ targets)' "$OUTDIR"/bench_*.txt 2>/dev/null || true
exit $status
