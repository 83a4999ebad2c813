# syntax=docker/dockerfile:1
# GPU image for megatron-rlvr: Megatron-Core policy training + vLLM rollouts on NVIDIA GPUs.
# Not built or tested by CI (no GPU or registry access there); build it on a machine with Docker:
#   docker build -t megatron-rlvr:gpu .
#   docker run --gpus all --ipc=host --rm -it -v $PWD/data:/workspace/data megatron-rlvr:gpu
#
# Base: NGC PyTorch 25.04 = Ubuntu 24.04, Python 3.12, CUDA 12.9, NVIDIA's PyTorch 2.7.0a0 build,
# Transformer-Engine 2.2 and NVIDIA apex (both compiled against that torch; neither can be
# pip-installed sensibly elsewhere), NCCL and cuDNN.
FROM nvcr.io/nvidia/pytorch:25.04-py3

# vLLM 0.9.2's wheel is built against torch 2.7.0, the release the image's 2.7.0a0 build tracks
# (same C++ ABI). vLLM pins torch==2.7.0 exactly, so `pip install vllm` would replace the image's
# torch with PyPI's and break Transformer-Engine and apex. So: the vLLM wheel with --no-deps, then
# its requirements minus torch, torchvision, torchaudio and xformers (the image has torch and
# torchvision; vLLM's V1 engine needs neither torchaudio nor xformers), under a constraint that
# holds every torch requirement to the torch already installed.
ARG VLLM_VERSION=0.9.2
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
skip = {"torch", "torchvision", "torchaudio", "xformers"}
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
