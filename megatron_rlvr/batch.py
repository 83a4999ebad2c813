"""From scored groups to the token tensors the policy trains on, cut into micro-batches.

Two layouts (see models/pipeline.py): padded, every sequence right-padded to the batch's longest
(`build_batch` + `micro_batches`, the baseline), and packed, the sequences of a micro-batch one
after another in a single row, each padded only to the sequence-length multiple (`sequences_of` +
`pack`; partition.py decides which sequences share a micro-batch). Both give the loss the same
per-token tensors and `num_sequences`; a packed micro-batch also has `seq_index` (each token's
sequence within it), `position_ids` and `cu_seqlens`.

Layout of one sequence (right-padded to the batch length S, or to its own padded length):

    position:  0 .. P-1 | P .. P+R-1 | P+R .. S-1
    token:     prompt   | response   | pad

Position t predicts token t+1, so `labels` is the sequence shifted left and `response_mask` marks
positions P-1 .. P+R-2 (those predicting a response token). Every per-token tensor is aligned to
positions: `rollout_logprobs[t]` is vLLM's log-prob of token t+1, `advantages[t]` the sequence's
GRPO advantage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_rlvr import platform
from megatron_rlvr.algos.advantages import grpo_advantages
from megatron_rlvr.partition import fixed_plan

if TYPE_CHECKING:  # a type only: batch.py sits below generation.py (no distributed, no rollout)
    from megatron_rlvr.generation import Group


def build_batch(groups: list[Group], *, pad_id: int, length_multiple: int) -> dict[str, torch.Tensor]:
    """All sequences of `groups`, group after group, as [N, S] tensors (S: the longest sequence,
    rounded up to `length_multiple`)."""
    seqs = sequences_of(groups)
    longest = max(len(q) for q in seqs)
    return padded_rows(seqs, int(math.ceil(longest / length_multiple) * length_multiple),
                       pad_id=pad_id)


@dataclass
class Sequence:
    """One response with its prompt (host data)."""
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    advantage: float

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def sequences_of(groups: list[Group]) -> list[Sequence]:
    """All sequences of `groups`, group after group, with their GRPO advantages."""
    rewards = torch.tensor([g.reward for g in groups], dtype=torch.float64)
    adv = grpo_advantages(rewards).float().tolist()
    return [Sequence(g.prompt_ids, r, lp, a)
            for g, advs in zip(groups, adv)
            for r, lp, a in zip(g.responses, g.rollout_logprobs, advs)]


def padded_rows(seqs: list[Sequence], length: int, *, pad_id: int) -> dict[str, torch.Tensor]:
    """`seqs` as [N, length] right-padded rows (the padded layout), on the host."""
    n = len(seqs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, length), dtype=torch.bool)
    rollout_logprobs = torch.zeros((n, length), dtype=torch.float32)
    for i, q in enumerate(seqs):
        p, r = len(q.prompt_ids), len(q.response_ids)
        input_ids[i, :p] = torch.tensor(q.prompt_ids)
        if r:
            input_ids[i, p:p + r] = torch.tensor(q.response_ids)
            response_mask[i, p - 1:p + r - 1] = True
            rollout_logprobs[i, p - 1:p + r - 1] = torch.tensor(q.rollout_logprobs,
                                                                dtype=torch.float32)
    adv = torch.tensor([q.advantage for q in seqs], dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "labels": torch.roll(input_ids, -1, dims=1),
        "response_mask": response_mask,
        "rollout_logprobs": rollout_logprobs,
        "advantages": adv[:, None].expand(n, length).contiguous(),
    }


def pack(seqs: list[Sequence], *, length_multiple: int,
         device: torch.device | None = None) -> dict:
    """One packed micro-batch: the sequences concatenated into [1, T] per-token tensors, each
    padded at its end to a multiple of `length_multiple` (context/sequence parallelism; the
    padding of a sequence is invisible to its tokens under causal attention). Built on the host,
    moved to `device` (default `platform.device()`) in one go. An empty `seqs` gives one padding
    sequence that trains nothing (a rank with fewer sequences than micro-batches)."""
    lengths = [int(math.ceil(max(len(q), 1) / length_multiple) * length_multiple) for q in seqs] \
        or [length_multiple]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    t = cu[-1]
    input_ids = torch.zeros((1, t), dtype=torch.long)
    labels = torch.zeros((1, t), dtype=torch.long)
    response_mask = torch.zeros((1, t), dtype=torch.bool)
    rollout_logprobs = torch.zeros((1, t), dtype=torch.float32)
    advantages = torch.zeros((1, t), dtype=torch.float32)
    position_ids = torch.zeros((1, t), dtype=torch.long)
    seq_index = torch.zeros((1, t), dtype=torch.long)
    for i, (q, lo, hi) in enumerate(zip(seqs, cu[:-1], cu[1:])):
        p, r = len(q.prompt_ids), len(q.response_ids)
        tokens = torch.tensor(q.prompt_ids + q.response_ids, dtype=torch.long)
        input_ids[0, lo:lo + p + r] = tokens
        labels[0, lo:lo + p + r - 1] = tokens[1:]
        if r:
            response_mask[0, lo + p - 1:lo + p + r - 1] = True
            rollout_logprobs[0, lo + p - 1:lo + p + r - 1] = torch.tensor(q.rollout_logprobs)
        advantages[0, lo:hi] = q.advantage
        position_ids[0, lo:hi] = torch.arange(hi - lo)
        seq_index[0, lo:hi] = i
    device = device if device is not None else platform.device()
    host = {"input_ids": input_ids, "labels": labels, "response_mask": response_mask,
            "rollout_logprobs": rollout_logprobs, "advantages": advantages,
            "position_ids": position_ids, "seq_index": seq_index,
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    mb = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    mb["cu_seqlens_dev"] = mb.pop("cu_seqlens")
    mb["cu_seqlens"] = cu  # host copy: Python ints for slicing without a device sync
    mb["num_sequences"] = len(seqs)
    return mb


def micro_batches(batch: dict[str, torch.Tensor], start: int, stop: int, *, dp_rank: int, dp: int,
                  micro_batch_size: int, device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of sequences [start, stop) (one mini-batch), on
    `device` (default: this process's, `platform.device()`).

    The mini-batch is split into `dp` contiguous shares; each share into micro-batches. The batch
    is built on the host (from Python lists); only this rank's share moves to the device.
    """
    plan = fixed_plan(stop - start, dp=dp, micro_batch_size=micro_batch_size)[dp_rank]
    device = device if device is not None else platform.device()
    out = []
    for indices in plan:
        lo = start + indices[0]
        mb = {k: v[lo:lo + micro_batch_size].to(device, non_blocking=True)
              for k, v in batch.items()}
        mb["num_sequences"] = micro_batch_size
        out.append(mb)
    return out
