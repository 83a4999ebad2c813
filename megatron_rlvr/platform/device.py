"""Device and collective backend: CUDA + NCCL where a GPU exists, else CPU + gloo.

In strict device mode (`MEGATRON_RLVR_STRICT_DEVICE=1`, CPU only; see `strict_device`) the device is
"cuda:<local rank>" even on a CPU machine: the CPU layer runs it on the host but keeps its tensors
apart from host tensors, so code that forgets to move a tensor fails here as it would on a GPU.
"""
from __future__ import annotations

import os

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def strict_device_mode() -> bool:
    """True when this CPU process simulates a separate device (tests; see strict_device)."""
    return not has_cuda() and os.environ.get("MEGATRON_RLVR_STRICT_DEVICE", "0") not in ("", "0")


def device() -> torch.device:
    """This process's compute device (the local-rank GPU, or the CPU)."""
    if has_cuda() or strict_device_mode():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def host_device() -> bool:
    """True when the compute device is the host itself (plain CPU runs): nothing to move."""
    return device().type == "cpu"


def generator(seed: int) -> torch.Generator:
    """A random generator on this process's device, seeded (CUDA ops refuse CPU generators)."""
    if has_cuda():
        return torch.Generator(device=device()).manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if strict_device_mode():
        from megatron_rlvr.platform import strict_device
        strict_device.device_generator(gen)
    return gen


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
