"""GRPO advantages: each response's reward normalised within its prompt's group."""
from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sequence advantages (r - mean_group) / (std_group + eps) for rewards [num_prompts, G].

    The std is the unbiased sample std (torch.std, divisor G - 1), as in the paper's verl code,
    so G >= 2. A group whose rewards are all equal gets advantage 0. Broadcasting to the
    response tokens is the caller's job. Computed in float64, returned in the rewards' dtype
    (float32 for integer rewards).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, G] with G >= 2, "
                         f"got {tuple(rewards.shape)}")
    r = rewards.double()
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)
