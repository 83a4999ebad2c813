"""Device and collective backend: CUDA + NCCL where a GPU exists, else CPU + gloo."""
from __future__ import annotations

import os

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """This process's compute device (the local-rank GPU, or the CPU)."""
    if has_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def backend() -> str:
    """The torch.distributed backend for this device."""
    return "nccl" if has_cuda() else "gloo"


def has_transformer_engine() -> bool:
    """True when Transformer-Engine imports (GPU images); it never does on CPU machines."""
    if not has_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True
