# Sourced by the GPU scripts (scripts/gpu_check.sh, scripts/gpu_serve_check.sh), from the
# repository root. Sets PY (.venv/bin/python when present, else python3; PY=... overrides) and
# OUTDIR ($OUT, default ./gpu-check/, created); puts this source tree on PYTHONPATH (aat-serve
# is not installed on the GPU machine's image; aat_serve/__init__.py finds the mapped package
# folders at the root); installs what scripts/gpu_prepare.sh carried; puts hey on PATH; and
# defines json_report.
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUTDIR="${OUT:-gpu-check}"
mkdir -p "$OUTDIR"
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

# json_report MODULE FUNCTION JSON TXT: a benchmark's JSON report as its text (MODULE.FUNCTION
# formats it), shown and saved to TXT; nothing when JSON is missing or empty.
json_report() {
  [ -s "$3" ] || return 0
  "$PY" -c 'import importlib, json, sys
print(getattr(importlib.import_module(sys.argv[1]), sys.argv[2])(json.load(open(sys.argv[3]))))' \
    "$1" "$2" "$3" | tee "$4"
}
