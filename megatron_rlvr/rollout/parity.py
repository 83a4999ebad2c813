"""Log-prob parity between the rollout engine and the policy after a weight sync.

If the engine's weights or numerics differ from the trainer's, the PPO ratio is taken against a
policy that did not produce the samples. The trainer logs these two numbers every step.
"""
from __future__ import annotations

from typing import Sequence

import torch


def logprob_mismatch(rollout_logprobs: Sequence[Sequence[float]],
                     policy_logprobs: Sequence[torch.Tensor | Sequence[float]]) -> dict[str, float]:
    """Mean and max |rollout - policy| over every response token of every sample.

    Both arguments hold one entry per sample, aligned token by token (the policy's log-probs of
    the same sampled tokens at the same temperature).
    """
    if len(rollout_logprobs) != len(policy_logprobs):
        raise ValueError(f"{len(rollout_logprobs)} rollout samples but {len(policy_logprobs)} "
                         "policy samples")
    diffs = []
    for i, (r, p) in enumerate(zip(rollout_logprobs, policy_logprobs)):
        r = torch.as_tensor(r, dtype=torch.float64)
        p = torch.as_tensor(p, dtype=torch.float64).detach().cpu()
        if r.shape != p.shape:
            raise ValueError(f"sample {i}: {r.numel()} rollout log-probs but {p.numel()} policy "
                             "log-probs")
        diffs.append((r - p).abs())
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    if d.numel() == 0:
        return {"rollout/logprob_mismatch_mean": 0.0, "rollout/logprob_mismatch_max": 0.0}
    return {"rollout/logprob_mismatch_mean": d.mean().item(),
            "rollout/logprob_mismatch_max": d.max().item()}
