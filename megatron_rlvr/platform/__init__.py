"""Where the code runs: device and backend choice, and the CPU compatibility layer.

`setup()` is called once per process before Megatron-Core builds anything. On a machine without
CUDA it installs `cpu_compat` (with `megatron_fixes`, the only places allowed to patch torch or
Megatron); on every device it installs `megatron_fixes`.
"""
from megatron_rlvr.platform.device import (backend, device, generator, has_cuda,
                                          has_transformer_engine, host_device, strict_device_mode)


def setup() -> None:
    from megatron_rlvr.platform import megatron_fixes

    if not has_cuda():
        from megatron_rlvr.platform import cpu_compat

        cpu_compat.apply()  # first: it must patch torch.cuda before Megatron is imported
        if strict_device_mode():
            from megatron_rlvr.platform import strict_device

            strict_device.apply()  # tests: "cuda" is a device apart from the host
    megatron_fixes.apply()  # fixes to Megatron-Core that every device needs


__all__ = ["backend", "device", "generator", "has_cuda", "has_transformer_engine", "host_device",
           "setup", "strict_device_mode"]
