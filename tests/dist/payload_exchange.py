"""Run under torchrun (4 ranks): the step's tokens reach each rank point to point, O(its share).

Synthetic rollouts of two generation rounds (groups of 4 responses of varied lengths, some with
all-equal accuracies that dynamic sampling drops) are "generated" the way generation.py does: each
group is held only by its owner (the scorer of its engine: every rank at vllm_tp = 1, even ranks at
vllm_tp = 2), and only summaries are all-gathered (`share_summaries`). Then, for every layout of 4
ranks (DP4, TP2×DP2 with vllm_tp 1 and 2, PP2×DP2, CP2×DP2, TP2×CP2) and for the padded layout,
packed micro-batches of a fixed size and packed token-budget micro-batches, with two mini-batches
a step, on every rank:
  - the micro-batches built from the exchanged payloads (`exchange.plan_step`,
    `exchange_payloads`, `build_micro_batches`, as the trainer does) equal, tensor for tensor, the
    ones the trainer built before from the whole batch all-gathered on every rank (the old
    `Trainer._micro_batches`, copied below, on `generation.gather_groups`);
  - the rank received exactly the sequences its data-parallel replica trains on that it does not
    own, nothing else, each once, and its bytes are exactly those sequences' payloads;
  - it received at most its replica's share of the step (1/dp of the sequences with a fixed
    micro-batch size; a token budget balances work, so there only: less than the whole step).
Prints, per layout, the sequences and bytes each rank received against the old all-gather's
(the pickled groups of every other rank).

    torchrun --nproc_per_node=4 tests/dist/payload_exchange.py
"""
import pickle

import torch
import torch.distributed as dist

from megatron_rlvr.algos.dynamic_sampling import GroupAccumulator
from megatron_rlvr.batch import build_batch, micro_batches, pack, sequences_of
from megatron_rlvr.exchange import (build_micro_batches, data_parallel_ranks, exchange_payloads,
                                    plan_step)
from megatron_rlvr.generation import Group, gather_groups, share_summaries
from megatron_rlvr.models.pipeline import sequence_length_multiple
from megatron_rlvr.parallel import host_group, init_distributed
from megatron_rlvr.partition import fixed_plan, padded_length, token_budget_plan
from megatron_rlvr.fast_exit import exit_now

N = 4             # responses per group
PER_ROUND = 10    # groups generated per round
TRAIN_GROUPS = 8  # groups a step trains on (two mini-batches of 4)
MINI = 4 * N
MICRO = 2
BUDGET = 160
HIDDEN = 64
PAD = 0
CPU = torch.device("cpu")


def make_round(round_index: int, rank: int, owners: list[int]) -> dict:
    """This rank's scored groups of one round: positions p whose engine's scorer is this rank."""
    local = {}
    for p in range(PER_ROUND):
        if owners[p % len(owners)] != rank:
            continue
        g = torch.Generator().manual_seed(1000 * round_index + p)
        prompt = torch.randint(1, 500, (int(torch.randint(2, 9, (1,), generator=g)),),
                               generator=g).tolist()
        lengths = torch.randint(0, 40, (N,), generator=g).tolist()
        responses = [torch.randint(1, 500, (n,), generator=g).tolist() for n in lengths]
        logprobs = [(-torch.rand(n, generator=g, dtype=torch.float64) * 3).tolist() for n in lengths]
        if p % 4 == 3:   # all correct: dropped by dynamic sampling
            acc = [1.0] * N
        else:
            acc = [float(x) for x in torch.randint(0, 2, (N,), generator=g)]
            acc[0], acc[1] = 1.0, 0.0
        reward = [a - 0.01 * n for a, n in zip(acc, lengths)]
        local[(round_index, p)] = Group(
            prompt_index=100 * round_index + p, data_source="t", ground_truth="0",
            prompt_ids=prompt, responses=responses, rollout_logprobs=logprobs,
            finish_reasons=["length" if n == 39 else "stop" for n in lengths], accuracy=acc,
            reward=reward, timed_out=0)
    return local


def old_micro_batches(groups, *, dp, dp_rank, packing, multiple, max_tokens):
    """Trainer._micro_batches before the exchange (commit 9295bc9), on the whole batch."""
    mini = MINI
    seqs = sequences_of(groups)
    if not packing:
        batch = build_batch(groups, pad_id=PAD, length_multiple=multiple)
        return [micro_batches(batch, i, i + mini, dp_rank=dp_rank, dp=dp, micro_batch_size=MICRO,
                              device=CPU) for i in range(0, len(seqs), mini)]
    out = []
    for start in range(0, len(seqs), mini):
        chunk = seqs[start:start + mini]
        lengths = [padded_length(len(q), multiple) for q in chunk]
        if max_tokens > 0:
            plan = token_budget_plan(lengths, dp=dp, max_tokens=max_tokens, hidden_size=HIDDEN)
        else:
            plan = fixed_plan(len(chunk), dp=dp, micro_batch_size=MICRO)
        out.append([pack([chunk[i] for i in mb], length_multiple=multiple, device=CPU)
                    for mb in plan[dp_rank]])
    return out


def same(a, b, where):
    assert len(a) == len(b), (where, len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert len(x) == len(y), (where, i, len(x), len(y))
        for j, (p, q) in enumerate(zip(x, y)):
            assert list(p) == list(q), (where, i, j, list(p), list(q))
            for k in p:
                if isinstance(p[k], torch.Tensor):
                    assert p[k].dtype == q[k].dtype and torch.equal(p[k], q[k]), (where, i, j, k)
                else:
                    assert p[k] == q[k], (where, i, j, k, p[k], q[k])


def check_layout(tp, pp, cp, vllm_tp):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    layout = init_distributed(tp, pp, cp)
    rank, world, dp = dist.get_rank(), dist.get_world_size(), layout.dp
    dp_rank = ps.get_data_parallel_rank()
    dp_of_rank = data_parallel_ranks()
    assert dp_of_rank[rank] == dp_rank
    owners = list(range(0, world, vllm_tp))  # one scorer per engine

    # Rollout as the trainer runs it: summaries gathered, tokens kept by their owner.
    acc = GroupAccumulator(TRAIN_GROUPS, max_rounds=4)
    local, summary_bytes, generated = {}, 0, []
    for r in range(2):
        mine = make_round(r, rank, owners)
        summaries = share_summaries(mine)
        summary_bytes += len(pickle.dumps(summaries))
        generated += summaries
        acc.add(summaries, [s.accuracy for s in summaries])
        local.update(mine)
    chosen = acc.take()
    assert acc.stats.dropped_all_correct > 0 and len(chosen) == TRAIN_GROUPS
    keys = {s.key for s in chosen}
    local = {k: g for k, g in local.items() if k in keys}

    # The old path: every round's groups, tokens included, all-gathered to every rank. What a rank
    # received then: the pickled groups of every other rank, of every round.
    everything = {k: g for r in range(2) for k, g in make_round(r, rank, owners).items()}
    all_groups = gather_groups(generated, everything)
    others = [g for s, g in zip(generated, all_groups) if s.owner != rank]
    old_bytes = len(pickle.dumps(others))
    whole = gather_groups(chosen, local)  # the step's groups in order, for the old micro-batches
    total = sum(len(g.responses) for g in whole)

    multiple = sequence_length_multiple(tp=tp, cp=cp, sequence_parallel=tp > 1)
    report = []
    for name, packing, budget in (("padded", False, 0), ("packed", True, 0),
                                  ("budget", True, BUDGET)):
        plan = plan_step(chosen, dp=dp, mini_batch=MINI, packing=packing, micro_batch_size=MICRO,
                         max_tokens=budget, hidden_size=HIDDEN, multiple=multiple)
        seqs, stats = exchange_payloads(plan, local, rank=rank, dp_of_rank=dp_of_rank)
        new = build_micro_batches(plan, seqs, dp_rank, multiple=multiple, pad_id=PAD,
                                  micro_batch_size=MICRO, device=CPU)
        old = old_micro_batches(whole, dp=dp, dp_rank=dp_rank, packing=packing,
                                multiple=multiple, max_tokens=budget)
        where = f"TP{tp}xPP{pp}xCP{cp}xDP{dp} vllm_tp{vllm_tp} {name} rank {rank}"
        same(new, old, where)
        need = plan.needs(dp_rank)
        foreign = [i for i in need if plan.owner(i) != rank]
        assert sorted(stats.received) == foreign, (where, stats.received, foreign)
        assert len(set(stats.received)) == len(stats.received), where
        assert stats.local_sequences == len(need) - len(foreign), where
        assert stats.received_bytes == 4 * sum(plan.words(i) for i in foreign), where
        if budget == 0:  # (a token budget balances work, not counts)
            assert len(need) == total // dp, (where, len(need), total, dp)
        if dp > 1:
            assert len(need) < total, where
        assert set(seqs) == set(need), where
        report.append(f"{name}: {stats.received_sequences} seqs / {stats.received_bytes} B "
                      f"in {stats.received_messages} msgs")
    line = (f"TP{tp}xPP{pp}xCP{cp}xDP{dp} vllm_tp{vllm_tp} rank {rank}: old all-gather "
            f"{sum(len(g.responses) for g in others)} seqs / {old_bytes} B (step: {total} seqs); "
            f"summaries {summary_bytes} B; " + "; ".join(report))
    lines = [None] * world
    dist.all_gather_object(lines, line, group=host_group())
    if rank == 0:
        print("\n".join(lines), flush=True)


def main():
    init_distributed()
    assert dist.get_world_size() == 4
    for tp, pp, cp, vllm_tp in ((1, 1, 1, 1), (2, 1, 1, 1), (2, 1, 1, 2), (1, 2, 1, 1),
                                (1, 1, 2, 1), (2, 1, 2, 2)):
        check_layout(tp, pp, cp, vllm_tp)
    dist.barrier()
    if dist.get_rank() == 0:
        print("PAYLOAD_EXCHANGE_OK", flush=True)


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
