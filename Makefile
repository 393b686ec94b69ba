# Everyday targets. `make test` and `make demo` each do the whole set-up on a fresh machine first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch must be installed before anything that depends on torch, or pip pulls a
# CUDA build (several GB). On a machine that already has the torch you want, run `make TORCH= ...`.
TORCH ?= torch==2.13.0
OPEN_CLIP ?= open_clip_torch==3.3.0

.PHONY: setup test test-interpreter test-gpu demo bench bench-gpu lint format

$(BIN)/.installed: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -e ".[train,dev]"
	# open_clip's loss.py is the parity oracle of the tests; its package needs torchvision, so no deps.
	$(BIN)/pip install -q --no-deps $(OPEN_CLIP)
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest -q --durations=25

test-interpreter: setup
	$(BIN)/python -m pytest -q -m interpreter

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

demo: setup
	$(BIN)/fastclip train --output-dir runs/demo

bench: setup
	$(BIN)/fastclip bench loss --out benchmarks/results

bench-gpu: setup
	bash benchmarks/gpu_suite.sh benchmarks/results/gpu_$$(date -u +%Y%m%d_%H%M)

lint: setup
	$(BIN)/ruff format --check fastclip kernels tests benchmarks
	$(BIN)/ruff check fastclip kernels tests benchmarks

format: setup
	$(BIN)/ruff format fastclip kernels tests benchmarks
	$(BIN)/ruff check --fix fastclip kernels tests benchmarks
