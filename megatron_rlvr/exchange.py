"""Which generated sequence each rank trains on, and moving its tokens there point to point.

After a step's rollout every rank holds the same list of `GroupSummary` (generation.py: scores and
lengths, no tokens) and, for the groups its engine generated and scored, their tokens (`Group`, the
payload). From the summaries alone every rank computes the same plan (`plan_step`): the step's
sequences in order (group after group, response after response, as `batch.sequences_of` lists
them), their GRPO advantages, and for every mini-batch which sequences each data-parallel rank
trains on in which micro-batch (partition.py: `fixed_plan`, or `token_budget_plan` on the lengths;
the padded layout's row length from the longest sequence). So every rank knows, without asking,
which sequences every other rank needs and how many bytes each one is.

Exchange (`exchange_payloads`): each sequence goes from its owner to every rank of the data-parallel
replica that trains on it (tensor-, context- and pipeline-parallel peers all need it), and nowhere
else; a rank's own sequences do not move. One message per (owner, destination) pair that has
anything: the destination's sequences of that owner in ascending index, each as int32 words
[prompt ids | response ids | rollout log-probs as float32 bits] (P + 2R words: known from the
summary, so no size handshake and no pickling). Order, on the host (gloo) group: every rank first
posts all its receives (irecv, peers rank-1, rank-2, ... in ring order), then all its sends (isend,
peers rank+1, rank+2, ...), and only then waits for them. Nothing blocks before every operation of
every rank is posted, so no rank waits on a peer that waits on it: deadlock-free for any plan, and
pairs with nothing to move post nothing (both ends know it from the plan).

Memory and traffic per rank: its replica's share of the step plus what it owns, O(batch / dp)
instead of the O(world × batch) of an all-gather of every group. Log-probs travel as float32: the
precision the layouts store them in (`build_batch`, `pack`), so the micro-batches are bit-identical.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_rlvr.algos.advantages import grpo_advantages
from megatron_rlvr.batch import Sequence, pack, padded_rows
from megatron_rlvr.generation import Group, GroupSummary
from megatron_rlvr.parallel import host_group
from megatron_rlvr.partition import fixed_plan, padded_length, token_budget_plan


@dataclass
class StepPlan:
    """The step's data layout, the same on every rank."""
    groups: list[GroupSummary]
    refs: list[tuple[int, int]]           # sequence -> (group index, response index)
    lengths: list[int]                    # sequence -> prompt + response tokens
    advantages: list[float]               # sequence -> GRPO advantage (float32 values)
    mini_batches: list[list[list[list[int]]]]  # [mini-batch][dp rank][micro-batch] -> sequences
    padded_length: int | None             # padded layout: every row's length; None when packed
    tokens_through: int                   # tokens through the model, all data-parallel ranks

    def needs(self, dp_rank: int) -> list[int]:
        """Every sequence `dp_rank` trains on in this step, ascending."""
        return sorted({i for mini in self.mini_batches for mb in mini[dp_rank] for i in mb})

    def owner(self, seq: int) -> int:
        return self.groups[self.refs[seq][0]].owner

    def words(self, seq: int) -> int:
        """int32 words of a sequence's payload on the wire: prompt + response + log-probs."""
        g, k = self.refs[seq]
        return self.lengths[seq] + self.groups[g].response_lengths[k]


@dataclass
class ExchangeStats:
    local_sequences: int = 0              # needed here and owned here: no transfer
    received_sequences: int = 0
    received_bytes: int = 0
    received_messages: int = 0
    sent_sequences: int = 0
    sent_bytes: int = 0
    received: list[int] = field(default_factory=list)  # sequence indices received


def plan_step(groups: list[GroupSummary], *, dp: int, mini_batch: int, packing: bool,
              micro_batch_size: int, max_tokens: int = 0, hidden_size: int = 0,
              multiple: int = 1) -> StepPlan:
    """The plan of a step's chosen groups (`mini_batch`: sequences per mini-batch). Packed: the
    trainer's partition (`token_budget_plan` when `max_tokens` > 0, else `fixed_plan`); padded:
    `fixed_plan`'s contiguous shares of rows padded to the batch's longest sequence."""
    refs = [(gi, k) for gi, g in enumerate(groups) for k in range(len(g.response_lengths))]
    lengths = [groups[gi].prompt_length + groups[gi].response_lengths[k] for gi, k in refs]
    rewards = torch.tensor([g.reward for g in groups], dtype=torch.float64)
    advantages = grpo_advantages(rewards).float().reshape(-1).tolist()
    n = len(refs)
    minis, through = [], 0
    padded = None
    if not packing:
        padded = int(math.ceil(max(lengths) / multiple) * multiple)
        through = n * padded
    for start in range(0, n, mini_batch):
        size = min(mini_batch, n - start)
        if packing:
            chunk = [padded_length(x, multiple) for x in lengths[start:start + size]]
            if max_tokens > 0:
                plan = token_budget_plan(chunk, dp=dp, max_tokens=max_tokens,
                                         hidden_size=hidden_size)
            else:
                plan = fixed_plan(size, dp=dp, micro_batch_size=micro_batch_size)
            # An empty micro-batch still runs one padding sequence of `multiple` tokens.
            through += sum(sum(chunk[i] for i in mb) or multiple for rank in plan for mb in rank)
        else:
            plan = fixed_plan(size, dp=dp, micro_batch_size=micro_batch_size)
        minis.append([[[start + i for i in mb] for mb in rank] for rank in plan])
    return StepPlan(groups, refs, lengths, advantages, minis, padded, through)


def data_parallel_ranks() -> list[int]:
    """The data-parallel rank of every global rank (index = global rank), from Megatron's
    parallel state on each rank: a small all-gather on the host group."""
    from megatron.core import parallel_state as ps

    out: list[int] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, ps.get_data_parallel_rank(), group=host_group())
    return out


def _encode(plan: StepPlan, seq: int, local: dict) -> torch.Tensor:
    g, k = plan.refs[seq]
    group = local[plan.groups[g].key]
    ids = torch.tensor(list(group.prompt_ids) + list(group.responses[k]), dtype=torch.int32)
    lp = torch.tensor(group.rollout_logprobs[k], dtype=torch.float32)
    if lp.numel() != len(group.responses[k]):
        raise ValueError(f"group {plan.groups[g].key} response {k}: {lp.numel()} log-probs for "
                         f"{len(group.responses[k])} tokens")
    return torch.cat([ids, lp.view(torch.int32)])


def _local_sequence(plan: StepPlan, seq: int, local: dict) -> Sequence:
    g, k = plan.refs[seq]
    group = local[plan.groups[g].key]
    return Sequence(list(group.prompt_ids), list(group.responses[k]),
                    list(group.rollout_logprobs[k]), plan.advantages[seq])


def exchange_payloads(plan: StepPlan, local: dict[tuple[int, int], Group], *, rank: int,
                      dp_of_rank: list[int], group=None) -> tuple[dict[int, Sequence],
                                                                  ExchangeStats]:
    """This rank's sequences (index -> `Sequence`), each received from its owner or taken from
    `local`; sends what the other ranks need of `local`. A collective over `group` (default the
    host group; its ranks are the global ranks). See the module docstring for the order."""
    group = group if group is not None else host_group()
    world = len(dp_of_rank)
    needs = [plan.needs(d) for d in range(max(dp_of_rank) + 1)]
    owner = [plan.owner(i) for i in range(len(plan.refs))]
    mine = needs[dp_of_rank[rank]]
    from_owner: dict[int, list[int]] = {}
    for i in mine:
        from_owner.setdefault(owner[i], []).append(i)
    # What each data-parallel replica needs of this rank's groups (the same for all its ranks).
    owned_by_replica = [[i for i in need if owner[i] == rank] for need in needs]
    stats = ExchangeStats()
    out = {i: _local_sequence(plan, i, local) for i in from_owner.get(rank, [])}
    stats.local_sequences = len(out)
    recvs, sends, encoded = [], [], {}
    for off in range(1, world):
        src = (rank - off) % world
        items = from_owner.get(src)
        if items:
            buf = torch.empty(sum(plan.words(i) for i in items), dtype=torch.int32)
            recvs.append((items, buf, dist.irecv(buf, src=src, group=group)))
    for off in range(1, world):
        dst = (rank + off) % world
        items = owned_by_replica[dp_of_rank[dst]]
        if items:
            if dp_of_rank[dst] not in encoded:  # one buffer per replica, sent to each of its ranks
                encoded[dp_of_rank[dst]] = torch.cat([_encode(plan, i, local) for i in items])
            buf = encoded[dp_of_rank[dst]]
            sends.append(dist.isend(buf, dst=dst, group=group))
            stats.sent_sequences += len(items)
            stats.sent_bytes += buf.numel() * 4
    for items, buf, work in recvs:
        work.wait()
        stats.received_messages += 1
        stats.received_bytes += buf.numel() * 4
        offset = 0
        for i in items:
            g, k = plan.refs[i]
            p, r = plan.groups[g].prompt_length, plan.groups[g].response_lengths[k]
            words = buf[offset:offset + p + 2 * r]
            offset += p + 2 * r
            out[i] = Sequence(words[:p].tolist(), words[p:p + r].tolist(),
                              words[p + r:].view(torch.float32).tolist(), plan.advantages[i])
            stats.received_sequences += 1
            stats.received.append(i)
    for work in sends:
        work.wait()
    return out, stats


def build_micro_batches(plan: StepPlan, seqs: dict[int, Sequence], dp_rank: int, *,
                        multiple: int, pad_id: int, micro_batch_size: int,
                        device: torch.device | None = None) -> list[list[dict]]:
    """This data-parallel rank's micro-batches of every mini-batch, on `device`: as
    `batch.micro_batches` (padded) or `batch.pack` (packed) build them from the whole batch."""
    from megatron_rlvr import platform

    device = device if device is not None else platform.device()
    out = []
    for mini in plan.mini_batches:
        mbs = []
        for mb in mini[dp_rank]:
            rows = [seqs[i] for i in mb]
            if plan.padded_length is None:
                mbs.append(pack(rows, length_multiple=multiple, device=device))
            else:
                host = padded_rows(rows, plan.padded_length, pad_id=pad_id)
                batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
                batch["num_sequences"] = micro_batch_size
                mbs.append(batch)
        out.append(mbs)
    return out
