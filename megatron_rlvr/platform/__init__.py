"""Where the code runs: device and backend choice, and the CPU compatibility layer.

`setup()` is called once per process before Megatron-Core builds anything. On a machine without
CUDA it installs `cpu_compat` (the only place allowed to patch torch or Megatron); with CUDA it
changes nothing.
"""
from megatron_rlvr.platform.device import backend, device, has_cuda, has_transformer_engine


def setup() -> None:
    if not has_cuda():
        from megatron_rlvr.platform import cpu_compat

        cpu_compat.apply()


__all__ = ["backend", "device", "has_cuda", "has_transformer_engine", "setup"]
