# Everyday commands. `make setup` once, then `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint style bench gpu-check gpu-serve-check clean

setup:  ## create .venv and install aat-serve with its dev tools (torch from local wheels)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchaudio==2.11.0
	$(BIN)/pip install -q -e '.[dev]'

test:  ## the whole test suite (what CI runs after lint)
	$(BIN)/python -m pytest -q

lint:  ## ruff, check only
	$(BIN)/ruff check .

style:  ## ruff, fix what it can
	$(BIN)/ruff check --fix .

bench:  ## list the benchmarks (`aat bench kernel|model|memory|serve|training`, docs/benchmarks.md)
	$(BIN)/aat bench --help

gpu-check:  ## GPU kernel tests at ViT-B sizes, aat bench kernel + model, PASS/MISS (CUDA; < 8 min)
	bash scripts/gpu_check.sh

gpu-serve-check:  ## issue 20's GPU serving targets: aat bench serve, ViT-B bf16, 64 clients, PASS/MISS with front ends beside one process (< 5 min)
	bash scripts/gpu_serve_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
