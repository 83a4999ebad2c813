"""One generation round: prompts -> scored groups of responses, on every rank's engine at once.

The trainer's ranks all hold the same list of prompts for the round. Each vLLM engine (one per rank,
or one per `vllm_tp` ranks) generates its share and its first rank scores the responses in the
reward pool. That rank, the group's *owner*, keeps the group's tokens (prompt ids, response ids,
rollout log-probs: the payload, `Group`); only a `GroupSummary` (scores, lengths, finish reasons,
the owner's rank: a few numbers per response) is all-gathered, so every rank ends the round with
the same list of summaries in prompt order. Dynamic sampling, the metrics, the GRPO advantages and
the data-parallel plan need nothing more; exchange.py then moves each payload from its owner to
the ranks that train on it (memory and traffic O(each rank's share), not O(world × batch)).

`generate_groups` is the old, simple path (every group's tokens on every rank); for evaluation
tools, tests and probes of small runs only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist

from megatron_rlvr.parallel import host_group
from megatron_rlvr.rewards.shaping import overlong_penalty
from megatron_rlvr.rollout.base import SamplingParams


@dataclass
class Group:
    """One prompt and its n responses (token ids), with rollout log-probs and scores."""
    prompt_index: int                  # index into the dataset
    data_source: str
    ground_truth: str
    prompt_ids: list[int]
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    finish_reasons: list[str]
    accuracy: list[float]              # 0/1 correctness (what dynamic sampling filters on)
    reward: list[float]                # correctness + overlong penalty (what advantages use)
    timed_out: int = 0                 # responses whose verification hit the timeout


@dataclass
class GroupSummary:
    """A group without its tokens: what every rank needs of every group (dynamic sampling,
    metrics, advantages, the data-parallel plan). `key` names the group within an RL step
    (generation round, position in the round's prompt list); `owner` is the global rank that
    holds its `Group` (the scorer of the engine that generated it)."""
    key: tuple[int, int]
    owner: int
    prompt_index: int
    data_source: str
    prompt_length: int
    response_lengths: list[int]
    finish_reasons: list[str]
    accuracy: list[float]
    reward: list[float]
    timed_out: int = 0

    def sequence_lengths(self) -> list[int]:
        """Tokens of each (prompt + response) sequence."""
        return [self.prompt_length + r for r in self.response_lengths]


def summary_of(group: Group, key: tuple[int, int], owner: int) -> GroupSummary:
    return GroupSummary(key=key, owner=owner, prompt_index=group.prompt_index,
                        data_source=group.data_source, prompt_length=len(group.prompt_ids),
                        response_lengths=[len(r) for r in group.responses],
                        finish_reasons=list(group.finish_reasons), accuracy=list(group.accuracy),
                        reward=list(group.reward), timed_out=group.timed_out)


@dataclass
class Round:
    """One generation round as a rank ends it: every group's summary (the same list on every
    rank, in prompt order) and the payloads this rank owns, by key."""
    summaries: list[GroupSummary]
    local: dict[tuple[int, int], Group]


@dataclass
class ShapingConfig:
    enable: bool
    max_response_length: int
    buffer_len: int
    penalty_factor: float


def share_summaries(local: dict[tuple[int, int], Group]) -> list[GroupSummary]:
    """All-gather the summaries of every rank's `local` groups (keyed (round, position)) on the
    host group: every rank gets the same list, sorted by key. The tokens stay where they are."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [summary_of(g, key, rank) for key, g in local.items()]
    gathered: list[list[GroupSummary]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine, group=host_group())
    return sorted((s for part in gathered for s in part), key=lambda s: s.key)


def gather_groups(summaries: list[GroupSummary],
                  local: dict[tuple[int, int], Group]) -> list[Group]:
    """Every group of `summaries`, tokens included, on every rank, in the summaries' order: the
    old all-gather of the whole batch (world × batch memory). For tests, probes and small tools;
    a collective over all ranks."""
    keys = {s.key for s in summaries}
    mine = [(k, g) for k, g in local.items() if k in keys]
    gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine, group=host_group())
    by_key = {k: g for part in gathered for k, g in part}
    return [by_key[s.key] for s in summaries]


def generate_round(engine, dataset, indices: list[int], params: SamplingParams, *, tokenizer,
                   reward_pool, shaping: ShapingConfig, vllm_tp: int = 1,
                   round_index: int = 0) -> Round:
    """Generate and score the groups of `indices` (the same list on every rank); all-gather only
    their summaries. Keys are (round_index, position in `indices`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n_engines, engine_id = world // vllm_tp, rank // vllm_tp
    positions = list(range(len(indices)))[engine_id::n_engines]
    records = [dataset.records[indices[p]] for p in positions]
    if params.seed is not None:  # each engine samples its own prompts with its own seeds
        params = dataclasses.replace(params, seed=params.seed + 1_000_003 * engine_id)
    out = engine.generate([r.prompt_ids for r in records], params)
    local: dict[tuple[int, int], Group] = {}
    if rank % vllm_tp == 0:  # one scorer per engine: its tensor-parallel peers got the same output
        texts, truths = [], []
        for po in out.outputs:
            for s in po.samples:
                texts.append(tokenizer.decode(s.token_ids, skip_special_tokens=True))
                truths.append(records[po.index].ground_truth)
        results = reward_pool.score(texts, truths) if texts else []
        k = 0
        for po in out.outputs:
            rec = records[po.index]
            scored = results[k:k + len(po.samples)]
            k += len(po.samples)
            acc = [r.score for r in scored]
            reward = [a + (overlong_penalty(len(s.token_ids),
                                            max_response_length=shaping.max_response_length,
                                            buffer_len=shaping.buffer_len,
                                            penalty_factor=shaping.penalty_factor)
                           if shaping.enable else 0.0)
                      for a, s in zip(acc, po.samples)]
            local[(round_index, positions[po.index])] = Group(
                prompt_index=indices[positions[po.index]], data_source=rec.data_source,
                ground_truth=rec.ground_truth, prompt_ids=po.prompt_token_ids,
                responses=[s.token_ids for s in po.samples],
                rollout_logprobs=[s.logprobs for s in po.samples],
                finish_reasons=[s.finish_reason for s in po.samples],
                accuracy=acc, reward=reward, timed_out=sum(r.timed_out for r in scored))
    return Round(share_summaries(local), local)


def generate_groups(engine, dataset, indices: list[int], params: SamplingParams, *, tokenizer,
                    reward_pool, shaping: ShapingConfig, vllm_tp: int = 1) -> list[Group]:
    """Generate, score and all-gather the whole groups of `indices`, tokens included, on every
    rank, in prompt order (the old path: world × batch memory; small runs and tests only)."""
    rnd = generate_round(engine, dataset, indices, params, tokenizer=tokenizer,
                         reward_pool=reward_pool, shaping=shaping, vllm_tp=vllm_tp)
    return gather_groups(rnd.summaries, rnd.local)
