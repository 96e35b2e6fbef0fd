# Sourced by the GPU scripts (scripts/gpu_check.sh, scripts/gpu_serve_check.sh), from the
# repository root, with PY set: this source tree on PYTHONPATH (aat-serve is not installed on
# the GPU machine's image; aat_serve/__init__.py finds the mapped package folders at the root),
# what scripts/gpu_prepare.sh carried installed, and hey on PATH.
AAT_SITE=""
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # wheels of the runtime dependencies the image lacks (scripts/gpu_prepare.sh)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/aat-site .whl/*.whl; then
    AAT_SITE=/tmp/aat-site
  else
    echo "installing the carried wheels (.whl) failed; going on without them" >&2
  fi
fi
export PYTHONPATH="$PWD${AAT_SITE:+:$AAT_SITE}${PYTHONPATH:+:$PYTHONPATH}"
if [ -x .tools/hey ]; then export PATH="$PWD/.tools:$PATH"; fi
