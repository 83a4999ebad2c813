"""torchrun's environment -> torch.distributed + Megatron-Core's parallel groups.

The layout is TP × PP × CP × DP = world size, with TP, PP and CP from the config and DP derived.
Megatron orders ranks TP-fastest, then CP, then DP, then PP.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rlvr import platform
from megatron_rlvr import watchdog as stall_watchdog


_HOST_GROUP = None


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def __str__(self) -> str:
        return f"TP{self.tp}×PP{self.pp}×CP{self.cp}×DP{self.dp}"


def derive_layout(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> Layout:
    """The layout for `world_size` processes, or a clear error naming the sizes."""
    for name, val in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"parallel.{name} must be a positive integer, got {val!r}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tp×pp×cp = {tp}×{pp}×{cp} = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes or change the "
            "parallel sizes")
    return Layout(tp=tp, pp=pp, cp=cp, dp=world_size // model_parallel)


def init_distributed(tp: int = 1, pp: int = 1, cp: int = 1, *, seed: int = 0,
                     timeout_s: float = 600.0, watchdog: bool = False) -> Layout:
    """Initialise torch.distributed from torchrun's env vars (or as a single process) and
    Megatron's model-parallel groups. Idempotent for the same layout.

    A collective that waits `timeout_s` for a peer ends the run. With `watchdog`, a per-rank
    thread (megatron_rlvr/watchdog.py) does it and names the rank that stalled; the backend's own
    timeout then comes a little later, as a backstop.
    """
    from megatron.core import parallel_state, tensor_parallel

    platform.setup()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    backend_timeout = stall_watchdog.backend_timeout_s(timeout_s) if watchdog else timeout_s
    layout = derive_layout(world_size, tp, pp, cp)
    if not dist.is_initialized():
        if platform.has_cuda():
            torch.cuda.set_device(platform.device())
        timeout = datetime.timedelta(seconds=backend_timeout)
        if "MASTER_ADDR" not in os.environ:
            # A plain `python` run: a one-process group on an in-memory store. No port and no
            # environment variables, which child processes would inherit and collide on.
            dist.init_process_group(backend=platform.backend(), store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=platform.backend(), timeout=timeout)
    global _HOST_GROUP
    if _HOST_GROUP is None:
        # Object collectives (pickled Python data) go over gloo on the host: over NCCL they
        # would be copied into GPU memory on every rank first.
        _HOST_GROUP = dist.new_group(backend="gloo",
                                     timeout=datetime.timedelta(seconds=backend_timeout))
    if watchdog and world_size > 1:
        stall_watchdog.start(timeout_s)
    if parallel_state.model_parallel_is_initialized():
        current = Layout(parallel_state.get_tensor_model_parallel_world_size(),
                         parallel_state.get_pipeline_model_parallel_world_size(),
                         parallel_state.get_context_parallel_world_size(),
                         parallel_state.get_data_parallel_world_size())
        if current != layout:
            raise RuntimeError(f"parallel groups already initialised as {current}, asked {layout}")
        return layout
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, distributed_timeout_minutes=backend_timeout / 60)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


def host_group():
    """Every rank, over gloo: the group for object collectives (lists of generated groups,
    metadata). Host tensors only; the training groups carry device tensors."""
    if _HOST_GROUP is None:
        raise RuntimeError("init_distributed() has not run")
    return _HOST_GROUP


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    global _HOST_GROUP
    _HOST_GROUP = None
    stall_watchdog.stop()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_group():
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_group()


def dp_cp_group():
    """Data- and context-parallel ranks together: every rank holding other tokens of the batch."""
    from megatron.core import parallel_state
    return parallel_state.get_data_parallel_group(with_context_parallel=True)
