# Two commands for a fresh machine (see README):
#   make demo   set up .venv and run the main job on a small built-in default
#   make test   set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU build (CI and the development machines have no GPU); on a GPU machine
# install your CUDA torch first and run `make test TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench
setup: $(BIN)/.installed
$(BIN)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python -m benchmarks.kernels --quick

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.kernels
