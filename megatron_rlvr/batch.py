"""From scored groups to the padded token tensors the policy trains on, cut into micro-batches.

Layout of one sequence (right-padded to the batch length S):

    position:  0 .. P-1 | P .. P+R-1 | P+R .. S-1
    token:     prompt   | response   | pad

Position t predicts token t+1, so `labels` is the sequence shifted left and `response_mask` marks
positions P-1 .. P+R-2 (those predicting a response token). Every per-token tensor is aligned to
positions: `rollout_logprobs[t]` is vLLM's log-prob of token t+1, `advantages[t]` the sequence's
GRPO advantage.
"""
from __future__ import annotations

import math

import torch

from megatron_rlvr import platform
from megatron_rlvr.algos.advantages import grpo_advantages
from megatron_rlvr.generation import Group


def build_batch(groups: list[Group], *, pad_id: int, length_multiple: int) -> dict[str, torch.Tensor]:
    """All sequences of `groups`, group after group, as [N, S] tensors."""
    rewards = torch.tensor([g.reward for g in groups], dtype=torch.float64)
    seq_adv = grpo_advantages(rewards).reshape(-1).float()
    seqs = [(g.prompt_ids, r, lp) for g in groups for r, lp in zip(g.responses, g.rollout_logprobs)]
    longest = max(len(p) + len(r) for p, r, _ in seqs)
    s = int(math.ceil(longest / length_multiple) * length_multiple)
    n = len(seqs)
    input_ids = torch.full((n, s), pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, s), dtype=torch.bool)
    rollout_logprobs = torch.zeros((n, s), dtype=torch.float32)
    for i, (prompt, response, logprobs) in enumerate(seqs):
        p, r = len(prompt), len(response)
        input_ids[i, :p] = torch.tensor(prompt)
        if r:
            input_ids[i, p:p + r] = torch.tensor(response)
            response_mask[i, p - 1:p + r - 1] = True
            rollout_logprobs[i, p - 1:p + r - 1] = torch.tensor(logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "labels": torch.roll(input_ids, -1, dims=1),
        "response_mask": response_mask,
        "rollout_logprobs": rollout_logprobs,
        "advantages": seq_adv[:, None].expand(n, s).contiguous(),
    }


def micro_batches(batch: dict[str, torch.Tensor], start: int, stop: int, *, dp_rank: int, dp: int,
                  micro_batch_size: int, device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of sequences [start, stop) (one mini-batch), on
    `device` (default: this process's, `platform.device()`).

    The mini-batch is split into `dp` contiguous shares; each share into micro-batches. The batch
    is built on the host (from Python lists); only this rank's share moves to the device.
    """
    total = stop - start
    if total % dp or (total // dp) % micro_batch_size:
        raise ValueError(f"a mini-batch of {total} sequences does not split into {dp} data-parallel "
                         f"shares of whole micro-batches of {micro_batch_size}")
    share = total // dp
    lo = start + dp_rank * share
    device = device if device is not None else platform.device()
    return [{k: v[i:i + micro_batch_size].to(device, non_blocking=True) for k, v in batch.items()}
            for i in range(lo, lo + share, micro_batch_size)]
