#!/usr/bin/env bash
# The GPU image's entrypoint: before the command, prove that vLLM's, Transformer-Engine's and
# apex's compiled code runs on this GPU with the image's torch (a docker build has no GPU, so the
# build only checks imports). Skip with MEGATRON_RLVR_SKIP_IMAGE_CHECK=1; a container without a
# GPU skips it with a warning.
set -e
if [ "${MEGATRON_RLVR_SKIP_IMAGE_CHECK:-0}" != "1" ]; then
    if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        python /workspace/megatron-rlvr/tests/gpu/image_check.py
    else
        echo "image_check: no GPU visible (docker run --gpus all ...); compiled kernels not checked" >&2
    fi
fi
exec "$@"
