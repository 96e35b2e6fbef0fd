#!/usr/bin/env bash
# Run HERE (where PyPI is reachable), before a GPU call: puts what the GPU machine's image lacks
# into two folders that .gitignore keeps out of git and the device call carries:
#   .whl/    wheels of aat-serve's runtime dependencies missing from the image (Python 3.12,
#            manylinux x86-64), at the versions installed here;
#   .tools/  hey, the load generator of `aat bench serve` (scripts/gpu_serve_check.sh).
# Then, on the device: `bash scripts/gpu_check.sh` (carry .whl) and, with time left,
# `bash scripts/gpu_serve_check.sh` (carry .whl and .tools); scripts/gpu_env.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
# the image has torch, triton, numpy, safetensors, transformers, httpx, h11, anyio, click,
# uvloop, prometheus-client, tqdm, pyyaml, matplotlib, pytest (docs: the device's KINDS.md)
MISSING=(soundfile cffi pycparser fastapi fastapi_offline starlette pydantic pydantic_core
         pydantic-settings python-dotenv typing-inspection annotated-types typing_extensions
         uvicorn httptools orjson python-multipart opentelemetry-api)
pins=()
for name in "${MISSING[@]}"; do
  pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl
mkdir -p .whl .tools
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pins[@]}"
HEY="$(command -v hey || true)"
if [ -n "$HEY" ]; then cp "$HEY" .tools/hey; else echo "hey is not installed here (apt-get install hey)" >&2; fi
echo "prepared: $(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1)), .tools: $(ls .tools)"
