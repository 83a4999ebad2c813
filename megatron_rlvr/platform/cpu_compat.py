"""Megatron-Core on a CPU: the one place where torch and Megatron are patched.

Megatron-Core assumes CUDA in a few hundred places: tensors created with `device="cuda"` or
`device=torch.cuda.current_device()`, `.cuda()` calls, CUDA RNG state for its model-parallel RNG
tracker, `torch.cuda.synchronize()` in pipeline p2p, and checks on `'torch.cuda.FloatTensor'` type
strings in its optimizers. Rather than patching each call site, we install one torch-function mode
that sends every CUDA device request to the CPU, plus a handful of function replacements for what a
mode cannot see (functions of `torch.cuda` itself and Megatron's own RNG helpers).

`apply()` runs only when CUDA is absent (see `megatron_rlvr.platform.setup`). Every patch below says
why it exists. Nothing here changes numerics: it only changes where tensors live.
"""
from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

from megatron_rlvr.platform import strict_device

_APPLIED = False
_CPU = torch.device("cpu")


def _is_cuda(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, int):  # an int device means cuda:<int> to torch
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


def _called_from_megatron_optimizer() -> bool:
    # The caller of Tensor.type(): the first frame outside this package's platform layer (the
    # mode's __torch_function__, its _redirect and strict_device's hook sit in between).
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
            "megatron_rlvr.platform."):
        frame = frame.f_back
    caller = frame.f_globals.get("__name__", "") if frame is not None else ""
    return caller.startswith("megatron.core.optimizer")


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA device arguments of torch functions and tensor methods to the CPU.

    Why: Megatron creates tensors on "cuda" or `torch.cuda.current_device()` in its DDP buffers,
    optimizers, pipeline schedules, masks and RNG code; `.cuda()` moves tensors. On a CPU machine
    those same tensors must simply live on the CPU.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # A module-level function, not a method: torch.compile (vLLM's sampler) builds guards on
        # what the mode calls and cannot for a staticmethod reached through `self`.
        if strict_device.enabled():
            return strict_device.torch_function(func, args, kwargs, _redirect)
        return _redirect(func, args, kwargs)


def _redirect(func, args, kwargs):
    """Call `func` with every CUDA device request turned into the CPU."""
    if "device" in kwargs and _is_cuda(kwargs["device"]):
        kwargs = {**kwargs, "device": _CPU}
    if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
        # .cuda(): the tensor stays on the CPU. pin_memory(): pinning needs an accelerator.
        return args[0]
    if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
        args = (args[0], _CPU, *args[2:])
    if kwargs.get("pin_memory"):
        kwargs = {**kwargs, "pin_memory": False}
    if func is torch.Tensor.type and len(args) == 1 and not kwargs:
        # Megatron's optimizers accept only 'torch.cuda.*Tensor' type strings for parameters.
        name = func(*args)
        if name.startswith("torch.") and not name.startswith("torch.cuda.") \
                and _called_from_megatron_optimizer():
            return "torch.cuda." + name[len("torch."):]
        return name
    return func(*args, **kwargs)


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def apply() -> None:
    """Install the CPU compatibility layer (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True

    # The mode stays on the torch-function mode stack for the life of the process, as
    # torch.set_default_device does with its own mode.
    CudaToCpuMode().__enter__()

    # torch.cuda functions that raise "Torch not compiled with CUDA" on a CPU build.
    # current_device(): ~175 Megatron call sites pass its result as a device; the mode maps it.
    torch.cuda.current_device = lambda: 0
    # synchronize(): pipeline p2p and checkpoint saving wait for the GPU; the CPU is synchronous.
    torch.cuda.synchronize = lambda device=None: None
    # The model-parallel RNG tracker swaps CUDA RNG states around every dropout region; on the CPU
    # the CPU generator plays that role (the tracker restores the state after each fork).
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed  # the tracker seeds, reads and restores around it
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0

    from megatron.core.tensor_parallel import random as mp_random

    # Megatron reads and writes CUDA generators directly (not through torch.cuda.*).
    mp_random._get_cuda_rng_state = _cpu_rng_get
    mp_random._set_cuda_rng_state = _cpu_rng_set
    # (The torch-Adam `step` restore fix is in megatron_fixes: every device needs it.)
