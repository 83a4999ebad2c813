"""Fixes to Megatron-Core 0.16.1 that every device needs (CPU, or CUDA with or without
Transformer-Engine / Apex). `apply()` is called by `megatron_rlvr.platform.setup()` on every device;
the CPU-only shims stay in `cpu_compat`.

Each fix is written so that it changes nothing where Megatron's own code is right: it checks the
condition it exists for and otherwise calls the original.
"""
from __future__ import annotations

import torch

_APPLIED = False
_ORIGINAL_SET_STATES = None


def _is_torch_adam(optimizer) -> bool:
    """Megatron fell back to torch's Adam/AdamW (no Transformer-Engine or Apex fused Adam)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    """DistributedOptimizer's state restore, copying only the tensors the checkpoint supplies.

    Megatron's version copies every key of the inner optimizer's per-parameter state. When neither
    Transformer-Engine nor Apex is installed, Megatron falls back to torch's Adam, whose state also
    holds `step`; Megatron restores `step` from the param groups and passes no tensor for it, so
    loading any distributed-optimizer checkpoint failed with KeyError: 'step' (on a GPU without
    TE/Apex as on the CPU). Any other inner optimizer (TE's or Apex's FusedAdam) goes to the
    original.
    """
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 \
            or not _is_torch_adam(self.optimizer):
        return _ORIGINAL_SET_STATES(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    for key, tensor in tensors.items():
        dst[key].copy_(tensor)


def apply() -> None:
    """Install the fixes (idempotent)."""
    global _APPLIED, _ORIGINAL_SET_STATES
    if _APPLIED:
        return
    _APPLIED = True
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # Resuming a distributed-optimizer checkpoint with torch's Adam (see the function's docstring).
    _ORIGINAL_SET_STATES = DistributedOptimizer._set_main_param_and_optimizer_states
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
